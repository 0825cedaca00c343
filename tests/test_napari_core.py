"""The core side of the napari plugin (piscis.annotate): no Qt, no napari needed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from piscis.annotate import (
    SpotCandidates,
    SpotTable,
    axes_choices,
    cells_table_text,
    count_values,
    find_models,
    new_model_folder,
    pair_name,
    plane,
    read_spot_table,
    save_training_pair,
    snap_to_peak,
    split_for_validation,
    write_spot_table,
)
from piscis.data import Pair, load_pairs
from piscis.detect import Maps, spots_from_maps
from piscis.synth import spot_image


def _random_maps(seed=1, shape=(192, 160)):
    rng = np.random.default_rng(seed)
    logit = rng.normal(-3, 3, shape).astype(np.float32)
    disp = rng.normal(0, 0.6, (2, *shape)).astype(np.float32)
    image = rng.normal(100, 5, shape)
    return Maps(logit, disp), image


def test_candidates_equal_a_fresh_decode_at_every_threshold():
    maps, image = _random_maps()
    cands = SpotCandidates.from_maps(maps, image)
    assert len(cands) > 100
    thresholds = [*np.linspace(0.05, 0.99, 60), *cands.spots.score[::37].tolist()]
    for t in thresholds:
        a, b = cands.at(float(t)), spots_from_maps(maps, image, float(t))
        assert np.array_equal(a.coords, b.coords), t
        assert np.array_equal(a.score, b.score), t
        np.testing.assert_array_equal(a.intensity, b.intensity)
        assert cands.count(float(t)) == len(b)
    counts = [cands.count(t) for t in np.linspace(0.05, 0.99, 20)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    with pytest.raises(ValueError, match="below the cached minimum"):
        cands.at(0.01)


def test_spot_table_round_trip_keeps_features_and_transform(tmp_path):
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 100, (12, 2))
    feats = {
        "score": rng.uniform(0, 1, 12),
        "intensity": rng.uniform(100, 900, 12),
        "cell_id": rng.integers(0, 4, 12),
        "label": np.array(["a"] * 12, dtype=object),
    }
    table = SpotTable(coords, feats, scale=(0.5, 0.25), translate=(3.0, -7.125))
    path = write_spot_table(tmp_path / "s.csv", table)
    header = path.read_text().splitlines()[0].split(",")
    assert header[:2] == ["y", "x"] and header[-4:] == [
        "scale_y",
        "scale_x",
        "translate_y",
        "translate_x",
    ]
    back = read_spot_table(path)
    np.testing.assert_allclose(back.coords, coords, atol=1e-4)
    assert back.scale == (0.5, 0.25) and back.translate == (3.0, -7.125)
    np.testing.assert_allclose(back.features["score"], feats["score"], atol=1e-4)
    np.testing.assert_array_equal(back.features["cell_id"], feats["cell_id"])
    assert "label" not in back.features  # text columns are dropped on reading
    # The CLI's own reader still takes it (y, x by name).
    from piscis.io import read_spots

    np.testing.assert_allclose(read_spots(path), coords, atol=1e-4)


def test_identity_transform_is_not_written_and_missing_features_are_nan(tmp_path):
    path = write_spot_table(tmp_path / "s.csv", SpotTable(np.array([[1.0, 2.0]]), {}))
    assert path.read_text().splitlines()[0] == "y,x"
    back = read_spot_table(path)
    assert back.scale == (1.0, 1.0) and back.translate == (0.0, 0.0)
    assert set(back.features) == {"score", "intensity", "cell_id"}
    assert np.isnan(back.features["score"]).all()


def test_napari_points_export_is_read(tmp_path):
    p = tmp_path / "napari.csv"
    p.write_text("index,axis-0,axis-1,score\n0,10.5,20.25,0.9\n1,3.0,4.0,0.1\n")
    t = read_spot_table(p)
    np.testing.assert_allclose(t.coords, [[10.5, 20.25], [3.0, 4.0]])
    np.testing.assert_allclose(t.features["score"], [0.9, 0.1])
    p3 = tmp_path / "napari3d.csv"
    p3.write_text("index,axis-0,axis-1,axis-2\n0,2,10.5,20.25\n")
    np.testing.assert_allclose(read_spot_table(p3).coords, [[2, 10.5, 20.25]])


def test_snap_moves_a_click_onto_the_spot():
    rng = np.random.default_rng(3)
    image, coords = spot_image(rng, (96, 96), n_spots=6)
    for true in coords:
        if np.any(true < 6) or np.any(true > 90):
            continue
        click = true + np.array([1.4, -1.1])
        snapped = snap_to_peak(image, click, radius=3)
        assert np.hypot(*(snapped - true)) < 0.5, (true, click, snapped)
        assert np.hypot(*(click - true)) > 1.5
    flat = np.full((20, 20), 7.0)
    np.testing.assert_allclose(snap_to_peak(flat, (5.2, 5.7)), (5.2, 5.7))  # nothing to snap to
    nan = np.full((20, 20), np.nan)
    np.testing.assert_allclose(snap_to_peak(nan, (5.2, 5.7)), (5.2, 5.7))


def test_saved_pair_is_what_load_pairs_reads(tmp_path):
    rng = np.random.default_rng(4)
    image, coords = spot_image(rng, (64, 80), n_spots=10)
    region = np.zeros(image.shape, bool)
    region[:40, :50] = True
    coords = np.vstack([coords, [[-3.0, 5.0]]])  # off the image: dropped
    paths = save_training_pair(tmp_path, "my image.tif", image, coords, region)
    names = {"my image.tif", "my image.csv", "my image.json", "my image.mask.tif"}
    assert {p.name for p in paths.values()} == names
    (pair,) = load_pairs(tmp_path)
    assert pair.name == "my image"
    np.testing.assert_array_equal(pair.image, image)
    np.testing.assert_allclose(pair.coords, coords[:-1], atol=1e-4)
    np.testing.assert_array_equal(pair.region, region)
    with pytest.raises(FileExistsError):
        save_training_pair(tmp_path, "my image", image, coords)
    save_training_pair(tmp_path, "my image", image, coords, overwrite=True)
    assert not (tmp_path / "my image.mask.tif").exists()  # a stale region is not kept
    with pytest.raises(ValueError, match="region is empty"):
        save_training_pair(tmp_path, "x", image, coords, np.zeros(image.shape, bool))
    assert pair_name("a/b:c.mask") == "a_b_c_mask"


def test_validation_split_whole_pairs_or_strips():
    rng = np.random.default_rng(5)
    pairs = [Pair(f"p{i}", *spot_image(rng, (64, 64), n_spots=5)) for i in range(5)]
    train, val = split_for_validation(pairs, 0.2)
    assert len(train) == 4 and len(val) == 1
    assert {p.name for p in train} | {p.name for p in val} == {p.name for p in pairs}
    image, coords = spot_image(rng, (100, 200), n_spots=30)
    (tr,), (va,) = split_for_validation([Pair("one", image, coords)], 0.25)
    assert tr.image.shape == (100, 150) and va.image.shape == (100, 50)
    assert len(tr.coords) + len(va.coords) == len(coords)
    assert np.all(va.coords[:, 1] >= -0.5) and np.all(tr.coords[:, 1] < 149.5)
    # The validation spots sit on the same pixels as before the cut.
    back = np.vstack([tr.coords, va.coords + [0, 150]])
    np.testing.assert_allclose(np.sort(back, 0), np.sort(coords, 0))
    assert split_for_validation(pairs, 0.0) == (pairs, [])


def test_axes_and_plane():
    assert axes_choices((5, 64, 64))[0] == "CYX"
    assert axes_choices((30, 64, 64))[0] == "ZYX"
    assert axes_choices((64, 64, 3), rgb=True) == ["YXC"]
    stack = np.zeros((2, 3, 16, 16))
    stack[1, 0, 4, 4] = 9  # z=1, channel 0
    assert plane(stack, "ZCYX", channel=0)[4, 4] == 9
    assert plane(stack, "ZCYX", channel=1)[4, 4] == 0


def test_model_folders_and_cells_text(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv("PISCIS_MODELS_DIR", str(tmp_path / "mine"))
    assert tiny_model in find_models([tiny_model])
    a = new_model_folder(tmp_path / "mine", "default")
    a.mkdir(parents=True)
    b = new_model_folder(tmp_path / "mine", "default")
    assert a != b and not b.exists()
    rows = [
        {"cell_id": 3, "area": 10, "n_spots": 2, "n_spots_nucleus": None,
         "n_spots_cytoplasm": None, "centroid_y": 1.5, "centroid_x": 2.0,
         "touches_border": True},
        {"cell_id": 9, "area": 12, "n_spots": 6, "n_spots_nucleus": None,
         "n_spots_cytoplasm": None, "centroid_y": 4.0, "centroid_x": 5.0,
         "touches_border": False},
    ]  # fmt: skip
    text = cells_table_text(rows, "img.tif").splitlines()
    assert text[0] == (
        "image,cell_id,area,n_spots,n_spots_nucleus,n_spots_cytoplasm,centroid_y,centroid_x,"
        "touches_border,dense"
    )
    assert text[1].startswith("img.tif,3,10,2,,,1.5000,2.0000,1")
    assert count_values(rows) == {3: 0.0, 9: 1.0}


def test_import_piscis_without_napari_or_qt():
    """The core imports with napari and every Qt binding made unimportable."""
    code = textwrap.dedent(
        """
        import sys
        BLOCKED = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt",
                   "magicgui", "vispy", "matplotlib", "npe2")

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Block())
        import piscis, piscis.detect, piscis.cli, piscis.annotate, piscis.train, piscis.cells
        import piscis.io, piscis.data, piscis.metrics, piscis.synth, piscis.api
        try:
            import napari  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker does not work")
        bad = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not bad, bad
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("axes", ["ZYX", "CZYX", "ZCYX"])
def test_volume_points_and_voxels_round_trip_through_layer_transforms(axes):
    pytest.importorskip("napari")
    from napari.layers import Image, Points

    from piscis.napari import _layers

    sizes = {"Z": 6, "C": 2, "Y": 20, "X": 24}
    scales = {"Z": 0.3, "C": 1.0, "Y": 0.1, "X": 0.1}
    shifts = {"Z": 1.0, "C": 0.0, "Y": 5.0, "X": -2.0}
    image = Image(
        np.zeros([sizes[a] for a in axes], np.uint16),
        scale=[scales[a] for a in axes],
        translate=[shifts[a] for a in axes],
    )
    image.metadata["piscis"] = {"axes": axes}
    assert _layers.default_axes(image) == axes
    vox = np.array([[0.0, 3.0, 4.0], [5.0, 19.0, 23.0], [2.5, 7.25, 0.0]])
    data = _layers.points_from_voxels(vox, image, axes, channel=1)
    pts = Points(data, scale=image.scale, translate=image.translate)
    np.testing.assert_allclose(_layers.voxels_of_points(pts.data, pts, image), vox, atol=1e-12)
    nd = len(axes)  # another layer over the image's dimensions, its own transform
    other = Points(np.zeros((0, nd)), scale=[0.6] + [0.2] * (nd - 1), translate=[0.5] * nd)
    back = _layers.points_data_from_voxels(vox, other, image)
    np.testing.assert_allclose(_layers.voxels_of_points(back, other, image), vox, atol=1e-12)
    vol = _layers.layer_image(image, axes, channel=1)
    assert vol.shape == (6, 20, 24)


def test_every_sample_image_ships_in_the_wheel():
    """File > Open Sample reads ``piscis/sample_data`` in an installed wheel: every
    sample file (and its labels, licences and truth) must match the package data."""
    from pathlib import Path

    from piscis.napari._io import SAMPLES

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    conf = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert conf["package-dir"]["piscis.sample_data"] == "sample_data"
    assert "piscis.sample_data" in conf["packages"]
    patterns = conf["package-data"]["piscis.sample_data"]
    folder = root / "sample_data"
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert all(rel in files for rel, _ in SAMPLES.values())
    # setuptools globs: "*" stays within one folder (as Path.glob, not fnmatch)
    shipped = {p.relative_to(folder).as_posix() for pat in patterns for p in folder.glob(pat)}
    assert set(files) <= shipped, sorted(set(files) - shipped)
