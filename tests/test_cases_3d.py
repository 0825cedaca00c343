"""Field cases of 3D (Z, Y, X) detection (../shared/cases/CASES.md): C02, C03, C05 (3D
variant), C06 (3D variant), C08 and C17, through the Python API, ``piscis count`` and,
for C17, the annotation files the napari plugin writes.

Every input is built here with a fixed seed (``piscis.synth.spot_volume``: voxel-
integrated Gaussians, peak height ``amp`` above the background, Gaussian read noise).
Matching as CASES.md says: one to one (Hungarian), within 1.5 px in yx and 1.5 slices
in z. The real default model is used throughout: the figures depend on it.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy.optimize import linear_sum_assignment

from piscis import cli, synth
from piscis.api import count_spots
from piscis.batch import RECORD_NAME
from piscis.detect import detect
from piscis.io import load_model


@pytest.fixture(scope="module")
def model():
    return load_model()


def match3(pred, true, tol: float = 1.5) -> np.ndarray:
    """(k, 2) index pairs (pred, true): one to one, |dz| <= tol and yx distance <= tol."""
    pred, true = np.asarray(pred, float).reshape(-1, 3), np.asarray(true, float).reshape(-1, 3)
    if not len(pred) or not len(true):
        return np.zeros((0, 2), int)
    d = pred[:, None, :] - true[None]
    dyx, dz = np.hypot(d[..., 1], d[..., 2]), np.abs(d[..., 0])
    ok = (dyx <= tol) & (dz <= tol)
    r, c = linear_sum_assignment(np.where(ok, dyx + dz, 1e6))
    keep = ok[r, c]
    return np.stack([r[keep], c[keep]], 1)


def add_positions(rng, shape, fixed, n, min_sep=6.0, margin=4.0) -> np.ndarray:
    """``fixed`` positions plus ``n`` random ones, all ``min_sep`` apart."""
    pts = [np.asarray(p, float) for p in fixed]
    lo, hi = np.full(3, margin), np.asarray(shape, float) - 1 - margin
    while len(pts) < len(fixed) + n:
        p = rng.uniform(lo, hi)
        if not pts or np.min(np.sum((np.asarray(pts) - p) ** 2, axis=1)) >= min_sep**2:
            pts.append(p)
    return np.asarray(pts)


def _count_cli(tmp_path: Path, capsys, image: np.ndarray, *extra, name="vol", **tiff):
    """``piscis count`` on ``image`` written as an ImageJ TIFF; (spot rows, cell rows, rc)."""
    path = tmp_path / f"{name}.tif"
    tifffile.imwrite(
        path, image, imagej=True, metadata={"axes": "ZYX", **tiff.pop("md", {})}, **tiff
    )
    out = tmp_path / "out"
    rc = cli.main(["count", str(path), "-o", str(out), "-q", *[str(a) for a in extra]])
    capsys.readouterr()
    with open(out / "spots" / f"{name}.csv", newline="") as f:
        spots = list(csv.DictReader(f))
    cells = []
    if (out / "cells.csv").exists():
        with open(out / "cells.csv", newline="") as f:
            cells = list(csv.DictReader(f))
    return spots, cells, rc


def _coords(rows) -> np.ndarray:
    return np.array([[float(r["z"]), float(r["y"]), float(r["x"])] for r in rows]).reshape(-1, 3)


# --------------------------------------------------------------------------- C02


def _c02_volume():
    rng = np.random.default_rng(2)
    vol, true = synth.spot_volume(
        rng, (16, 256, 256), 40, sigma=(1.5, 1.0), amp=150, background=20, noise_sd=3,
        dtype=np.float64,
    )  # fmt: skip
    cells = np.zeros((256, 256), np.int64)
    cells[8:120, 8:120], cells[8:120, 136:248] = 1, 2
    cells[136:248, 8:120], cells[136:248, 136:248] = 3, 200
    return vol, true, cells


@pytest.fixture(scope="module")
def c02_reference(model):
    vol, true, cells = _c02_volume()
    table, rows = count_spots(np.clip(np.round(vol), 0, 255).astype(np.uint16), cells, model=model)
    return table, rows


# image dtype, mask dtype, mask as (Y, X) or (Z, Y, X)
C02_RUNS = [
    ("uint8", "uint8", 2), ("uint16", "uint16", 3), ("int16", "int32", 2),
    ("int32", "int64", 3), ("int64", "uint8", 3), ("float16", "uint16", 2),
    ("float32", "int32", 3), ("float64", "int64", 2),
]  # fmt: skip


@pytest.mark.parametrize("dtype, mask_dtype, mask_ndim", C02_RUNS)
def test_c02_every_dtype_gives_the_same_spots_and_cell_counts(
    model, c02_reference, dtype, mask_dtype, mask_ndim
):
    vol, true, cells = _c02_volume()
    ref, ref_rows = c02_reference
    if np.dtype(dtype).kind == "f":
        image = vol.astype(dtype)  # the unrounded float volume
    else:
        image = np.clip(np.round(vol), 0, 255).astype(dtype)
    mask = cells if mask_ndim == 2 else np.broadcast_to(cells, vol.shape)
    table, rows = count_spots(image, mask.astype(mask_dtype), model=model)
    ref_xyz = np.column_stack([ref["z"], ref["y"], ref["x"]])
    xyz = np.column_stack([table["z"], table["y"], table["x"]])
    assert len(match3(ref_xyz, true)) == 40  # the reference finds every spot
    if np.dtype(dtype).kind in "ui":
        np.testing.assert_array_equal(xyz, ref_xyz)
    else:
        pairs = match3(xyz, ref_xyz, tol=0.5)
        assert len(xyz) == len(ref_xyz) == len(pairs)
        assert np.all(np.abs(xyz[pairs[:, 0]] - ref_xyz[pairs[:, 1]]) <= 0.5)
    assert [(r["cell_id"], r["n_spots"]) for r in rows] == [
        (r["cell_id"], r["n_spots"]) for r in ref_rows
    ]
    assert [r["cell_id"] for r in rows] == [1, 2, 3, 200]


@pytest.mark.parametrize("dtype", [bool, np.complex64, np.complex128])
def test_c02_bool_and_complex_volumes_are_refused_naming_the_dtype(model, dtype):
    vol = np.zeros((4, 16, 16), dtype)
    with pytest.raises(TypeError, match=np.dtype(dtype).name):
        detect(vol, model)
    with pytest.raises(TypeError, match=np.dtype(dtype).name):
        count_spots(vol, model=model)


# --------------------------------------------------------------------------- C03


def _c03_volume(x0: int):
    rng = np.random.default_rng(3)
    shape = (41, 256, 256)
    true = synth.random_positions(rng, shape, 60, min_sep=6, margin=4)
    vol, _ = synth.spot_volume(rng, shape, coords=true, sigma=(1.5, 1.0), amp=400)
    vol[40, 0:2, x0 : x0 + 2] = 8000  # hot pixels on the last slice, no PSF shape
    return vol, true


def _at_patch(coords, x0) -> int:
    c = np.asarray(coords).reshape(-1, 3)
    return int(np.sum((c[:, 0] > 36) & (c[:, 1] < 5) & (np.abs(c[:, 2] - (x0 + 0.5)) < 5)))


@pytest.mark.parametrize("x0", [128, 254], ids=["top_edge", "corner"])
def test_c03_hot_pixels_on_the_last_slice_are_not_a_spot(model, x0):
    vol, true = _c03_volume(x0)
    # A cell over the patch counts only its real spots.
    cells = np.zeros(vol.shape[1:], np.int32)
    cells[0:40, x0 - 30 : min(x0 + 30, 256)] = 7
    table, rows = count_spots(vol, cells, model=model)
    coords = np.column_stack([table["z"], table["y"], table["x"]])
    assert abs(len(coords) - 60) <= 2
    assert len(match3(coords, true)) >= 58
    assert _at_patch(coords, x0) == 0  # CASES: at most 1, ideally 0
    inside = np.sum((true[:, 1] < 39.5) & (np.abs(true[:, 2] - x0) < 29.5))
    assert rows[0]["cell_id"] == 7 and rows[0]["n_spots"] == inside
    assert rows[0]["dense"] is False  # CASES: no cluster/dense call at the hot patch


def test_c03_cli_hot_pixels(model, tmp_path, capsys):
    vol, true = _c03_volume(254)
    cells = np.zeros(vol.shape[1:], np.uint16)
    cells[0:40, 200:256] = 7
    tifffile.imwrite(tmp_path / "vol_cells.tif", cells)
    spots, cell_rows, rc = _count_cli(tmp_path, capsys, vol, "--cells", tmp_path / "vol_cells.tif")
    assert rc == 0
    xyz = _coords(spots)
    assert abs(len(xyz) - 60) <= 2 and _at_patch(xyz, 254) == 0
    inside = np.sum((true[:, 1] < 39.5) & (true[:, 2] > 199.5))
    assert [(r["cell_id"], int(r["n_spots"])) for r in cell_rows] == [("7", inside)]
    assert cell_rows[0]["dense"] == "0"  # not flagged dense (CASES: no cluster call there)
    assert len(match3(xyz, true)) >= 58


# --------------------------------------------------------------------------- C05 (3D)


@pytest.mark.slow
def test_c05_3d_tiles_and_z_blocks_give_the_same_spots(model):
    rng = np.random.default_rng(5)
    shape = (64, 512, 512)
    fixed = []
    for v in (255.5, 256.0):  # on the tile boundary of tile_size 256, in y and in x
        for k in range(8):
            fixed.append([rng.uniform(6, 57), v, 30 + 60 * k + (v - 255.5) * 40])
            fixed.append([rng.uniform(6, 57), 50 + 60 * k + (v - 255.5) * 40, v])
    for v in (31.5, 32.0):  # on the z-block boundary
        for k in range(8):
            fixed.append([v, 20 + 60 * k + (v - 31.5) * 30, 40 + 55 * k])
    fixed += [[31.5, 256.0, 256.0], [32.0, 255.5, 200.0]]  # tile corner on the z boundary
    fixed = np.asarray(fixed)
    keep = [0]  # the fixed spots themselves 6 px apart
    for i in range(1, len(fixed)):
        if np.min(np.linalg.norm(fixed[keep] - fixed[i], axis=1)) >= 6:
            keep.append(i)
    fixed = fixed[keep]
    true = add_positions(rng, shape, fixed, 400 - len(fixed))
    vol, _ = synth.spot_volume(rng, shape, coords=true, sigma=(1.5, 1.0), amp=400)
    whole = detect(vol, model)  # one tile per plane (tile 1024), one z block
    parts = [detect(vol, model, tile_size=256, z_range=r) for r in ((0, 32), (32, 64))]
    tiled = np.concatenate([p.coords for p in parts])
    assert len(tiled) == len(whole)
    pairs = match3(tiled, whole.coords, tol=0.5)
    assert len(pairs) == len(whole)
    assert np.max(np.abs(tiled[pairs[:, 0]] - whole.coords[pairs[:, 1]])) < 0.5
    blocks = detect(vol, model, z_block=16)
    np.testing.assert_allclose(blocks.coords, whole.coords, atol=1e-9)
    for c in (whole.coords, tiled):
        d = np.linalg.norm(c[:, None] - c[None], axis=2) + np.eye(len(c)) * 99
        assert d.min() >= 1.0  # no duplicates
    found = match3(whole.coords, true)
    assert len(found) >= 398
    assert set(range(len(fixed))) <= set(found[:, 1].tolist())  # every boundary spot


# --------------------------------------------------------------------------- C06 (3D)


def _z_pairs(sigma_z: float):
    rng = np.random.default_rng(6)
    shape = (16, 128, 128)
    yx = synth.random_positions(rng, (128, 128), 30, min_sep=15, margin=6)
    seps = np.repeat([2, 3, 4], 10)
    true = []
    for (y, x), s in zip(yx, seps):
        z0 = rng.uniform(4, 11 - s)
        true += [[z0, y, x], [z0 + s, y, x]]
    true = np.asarray(true)
    vol, _ = synth.spot_volume(rng, shape, coords=true, sigma=(sigma_z, 1.0), amp=400)
    return vol, true, seps


def test_c06_3d_pairs_along_z_are_resolved(model):
    vol, true, seps = _z_pairs(1.0)  # CASES C06: every spot sigma 1.0
    spots = detect(vol, model)
    hit = np.zeros(len(true), bool)
    hit[match3(spots.coords, true)[:, 1]] = True
    recall = {s: hit[np.repeat(seps == s, 2)].mean() for s in (2, 3, 4)}
    assert recall[3] >= 0.9 and recall[4] >= 0.9 and recall[2] >= 0.5, recall
    # Pairs 4 slices apart: two detections, never one merged between them.
    for k in np.flatnonzero(seps == 4):
        a, b = true[2 * k], true[2 * k + 1]
        near = np.hypot(*(spots.coords[:, 1:] - a[1:]).T) < 1.5
        zs = np.sort(spots.coords[near, 0])
        assert len(zs) == 2 and abs(zs[0] - a[0]) <= 1 and abs(zs[1] - b[0]) <= 1
    assert abs(len(spots) - len(true)) <= 3


# --------------------------------------------------------------------------- C08


SPACING = (0.3, 0.1, 0.1)  # um (z, y, x)
SIGMA_Z, SIGMA_YX = 1.5, 1.3


def _c08_volume():
    rng = np.random.default_rng(8)
    shape = (40, 128, 128)
    yx = synth.random_positions(rng, (128, 128), 39, min_sep=12, margin=6)
    single = np.column_stack([rng.uniform(4, 35, 30), yx[:30]])
    edges = np.column_stack([[0.0, 1.0, 38.0, 39.0], yx[30:34]])
    pairs = np.concatenate(
        [np.column_stack([np.full(5, 18.0), yx[34:]]), np.column_stack([np.full(5, 21.0), yx[34:]])]
    )
    true = np.concatenate([single, edges])
    vol, _ = synth.spot_volume(
        rng, shape, coords=np.concatenate([true, pairs]), sigma=(SIGMA_Z, SIGMA_YX), amp=300,
        background=100, noise_sd=3, dtype=np.float32,
    )  # fmt: skip
    return vol, true, pairs


def _check_c08(coords, cols, true, pairs, spacing_known=True):
    found = match3(coords, true)
    assert len(found) == 34  # every single spot, z = 0, 1, 38, 39 included
    err = coords[found[:, 0]] - true[found[:, 1]]
    assert np.abs(err[:, 0]).max() <= 0.5  # slices
    assert np.hypot(err[:, 1], err[:, 2]).max() <= 0.3  # px
    fz, fyx = cols["fwhm_z"][found[:, 0]], cols["fwhm_yx"][found[:, 0]]
    assert np.all(np.abs(fz / (2.3548 * SIGMA_Z) - 1) <= 0.2)
    assert np.all(np.abs(fyx / (2.3548 * SIGMA_YX) - 1) <= 0.2)
    if spacing_known:
        # (atol: the CLI writes 4 decimals)
        np.testing.assert_allclose(cols["fwhm_z_um"], cols["fwhm_z"] * SPACING[0], atol=2e-4)
        np.testing.assert_allclose(cols["fwhm_yx_um"], cols["fwhm_yx"] * SPACING[1], atol=2e-4)
    # The documented result of the z pairs (same yx, 3 slices apart): 2 detections.
    for y, x in pairs[:5, 1:]:
        near = np.hypot(coords[:, 1] - y, coords[:, 2] - x) < 1.5
        assert np.sort(np.round(coords[near, 0])).tolist() == [18.0, 21.0]
        assert np.all(np.asarray(cols["z_split"])[near].astype(bool))
    assert len(coords) == 44


def test_c08_sizes_and_z_pairs_in_an_anisotropic_volume(model):
    vol, true, pairs = _c08_volume()
    spots = detect(vol, model, spacing=SPACING)
    _check_c08(spots.coords, spots.columns(), true, pairs)
    bare = detect(vol, model)  # no voxel size: the same spots, no micrometres
    np.testing.assert_array_equal(bare.coords, spots.coords)
    assert np.all(np.isnan(bare.columns()["fwhm_z_um"]))


def test_c08_cli_reads_the_voxel_size_from_the_tiff(model, tmp_path, capsys):
    vol, true, pairs = _c08_volume()
    spots, _, rc = _count_cli(
        tmp_path, capsys, vol, resolution=(10.0, 10.0), md={"spacing": 0.3, "unit": "um"}
    )
    assert rc == 0
    cols = {k: np.array([float(r[k]) for r in spots]) for k in spots[0] if k not in ("z_split",)}
    cols["z_split"] = np.array([r["z_split"] in ("True", "true", "1") for r in spots])
    _check_c08(_coords(spots), cols, true, pairs)


def test_c08_z_pairs_below_the_resolution_are_one_spot_with_a_warning(model, caplog):
    vol, true, seps = _z_pairs(1.5)  # sigma_z 1.5: pairs 2 slices apart are one blob
    with caplog.at_level(logging.WARNING, logger="piscis"):
        spots = detect(vol, model)
    cols = spots.columns()
    for k in np.flatnonzero(seps == 2):
        near = np.hypot(*(spots.coords[:, 1:] - true[2 * k, 1:]).T) < 1.5
        assert near.sum() == 1 and cols["z_elongated"][near].all()
        assert true[2 * k, 0] < spots.coords[near, 0][0] < true[2 * k + 1, 0]
    n = int(cols["z_elongated"].sum())
    assert any(f"{n} spots are elongated in z" in r.message for r in caplog.records)
    hit = np.zeros(len(true), bool)
    hit[match3(spots.coords, true)[:, 1]] = True
    assert all(hit[np.repeat(seps == s, 2)].mean() >= 0.9 for s in (3, 4))  # 2 sigma_z: split


# --------------------------------------------------------------------------- C17


C17_SCALE, C17_TRANSLATE = (0.3, 0.1, 0.1), (0.0, 5.0, 5.0)  # um


def _c17_volume():
    rng = np.random.default_rng(17)
    shape = (20, 128, 128)
    vox = np.round(synth.random_positions(rng, shape, 10, min_sep=10, margin=5))
    vol, _ = synth.spot_volume(rng, shape, coords=vox, sigma=(1.5, 1.0), amp=400)
    return vol, vox


def _c17_plane():
    rng = np.random.default_rng(171)
    vox = np.round(synth.random_positions(rng, (128, 128), 10, min_sep=10, margin=5))
    image, _ = synth.spot_image(rng, (128, 128), coords=vox)
    return image, vox


def _check_pair(paths, image, vox, scale, translate, units, exact=True):
    from piscis.annotate import read_annotations

    nd = image.ndim
    frame = __import__("json").loads(Path(paths["frame"]).read_text())
    assert frame["frame"] == "pixel" and frame["axes"] == "ZYX"[3 - nd :]
    assert frame["scale"] == list(scale) and frame["translate"] == list(translate)
    assert frame["units"] == units
    with open(paths["spots"], newline="") as f:
        assert next(csv.reader(f)) == list("zyx"[3 - nd :])
    ann = read_annotations(paths["spots"])
    np.testing.assert_array_equal(np.floor(ann.coords + 0.5), vox)  # the same voxels
    if exact:  # unsnapped: the very positions, in pixels and in the display frame
        np.testing.assert_allclose(ann.coords, vox, atol=1e-6)
        np.testing.assert_allclose(ann.world(), vox * scale + np.asarray(translate), atol=1e-6)
    raw = tifffile.imread(paths["image"])
    np.testing.assert_array_equal(raw, image)
    idx = tuple(np.floor(ann.coords + 0.5).astype(int).T)
    assert np.all(raw[idx] > 100 + 3 * 5)  # every annotation on a spot of the raw array


def test_c17_training_pairs_keep_their_frame_core(tmp_path):
    from piscis.annotate import save_training_pair

    vol, vox = _c17_volume()
    paths = save_training_pair(
        tmp_path, "crop", vol, vox, scale=C17_SCALE, translate=C17_TRANSLATE, units="micrometer"
    )
    _check_pair(paths, vol, vox, C17_SCALE, C17_TRANSLATE, "micrometer")
    image, yx = _c17_plane()
    paths = save_training_pair(tmp_path, "flat", image, yx, scale=(0.065, 0.065), units="um")
    _check_pair(paths, image, yx, (0.065, 0.065), (0.0, 0.0), "um")


@pytest.fixture
def viewer(make_napari_viewer):
    import os

    if not (os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM") == "offscreen"):
        pytest.skip("no display: run under `xvfb-run -a`")
    return make_napari_viewer(show=False)


@pytest.mark.parametrize("snap", [False, True], ids=["clicked", "snapped"])
@pytest.mark.parametrize("ndim", [3, 2])
def test_c17_plugin_annotations_round_trip_to_the_same_voxels(viewer, tmp_path, ndim, snap):
    from piscis.napari._annotate import AnnotateWidget

    if ndim == 3:
        image, vox = _c17_volume()
        scale, translate = C17_SCALE, C17_TRANSLATE
    else:
        image, vox = _c17_plane()
        scale, translate = (0.065, 0.065), (0.0, 0.0)
    layer = viewer.add_image(image, name="crop", scale=scale, translate=translate, units="um")
    widget = AnnotateWidget(viewer)
    widget.image.set_layer(layer)
    widget.snap.setChecked(snap)
    points = widget.new_annotation_layer()
    assert points.ndim == ndim and tuple(points.scale) == tuple(layer.scale)
    world = vox * np.asarray(scale) + np.asarray(translate)  # where the user clicks
    for w in world:
        points.add((w - np.asarray(points.translate)) / np.asarray(points.scale))
    widget.folder.setText(str(tmp_path))
    widget.name.setText("c17")
    paths = widget.save()
    assert paths is not None
    _check_pair(paths, image, vox, scale, translate, "micrometer", exact=not snap)


def test_c17_detect_widget_gives_3d_points_on_the_image_layer(viewer, qtbot, model):
    from piscis.io import MODELS_DIR
    from piscis.napari._detect import DetectWidget

    vol, vox = _c17_volume()
    layer = viewer.add_image(vol, name="crop", scale=C17_SCALE, translate=C17_TRANSLATE)
    widget = DetectWidget(viewer)
    widget.image.set_layer(layer)
    assert widget.axes.currentText() == "ZYX"
    widget.model.set_path(MODELS_DIR / "default")
    widget.run()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    points = widget.points_layer
    assert points is not None and points.ndim == 3
    assert tuple(points.scale) == C17_SCALE and tuple(points.translate) == C17_TRANSLATE
    api = detect(vol, model)
    np.testing.assert_allclose(points.data, api.coords, atol=1e-9)  # the same spot list
    assert len(match3(points.data, vox)) == 10
    widget.threshold.setValue(0.97)  # live: no network run
    np.testing.assert_allclose(points.data, detect(vol, model, threshold=0.97).coords, atol=1e-9)


# --------------------------------------------------------------------------- coarse z step


def _coarse_z_volume() -> tuple[np.ndarray, np.ndarray]:
    """9 spots on a grid in a 10-plane stack with a 1 um z step: sigma_z 0.4 slice, so
    each spot stands in one plane only (and a little in its neighbours)."""
    rng = np.random.default_rng(4)
    zz, yy, xx = np.mgrid[:10, :96, :96]
    yx = np.stack(np.meshgrid(np.arange(16, 96, 32), np.arange(16, 96, 32)), -1).reshape(-1, 2)
    true = np.column_stack([rng.integers(2, 8, len(yx)), yx]).astype(float)
    vol = rng.normal(100, 5, zz.shape)
    for z, y, x in true:
        vol += 400 * np.exp(-((zz - z) ** 2) / (2 * 0.4**2) - ((yy - y) ** 2 + (xx - x) ** 2) / 2)
    return vol.astype(np.uint16), true


def test_a_coarse_z_step_warns_and_min_planes_1_finds_the_spots(model, tmp_path, capsys, caplog):
    vol, true = _coarse_z_volume()
    with caplog.at_level(logging.WARNING, logger="piscis"):
        assert len(detect(vol, model, name="coarse.tif")) == 0
    said = [r.getMessage() for r in caplog.records if "fewer than 2 planes" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("coarse.tif: 9 peaks")
    assert "--min-planes 1" in said[0] and "--project" in said[0]
    assert len(match3(detect(vol, model, min_planes=1).coords, true)) == 9
    # A stack whose spots span several planes: no such warning.
    caplog.clear()
    rng = np.random.default_rng(8)
    fine, fine_true = synth.spot_volume(rng, (12, 64, 64), n_spots=6, sigma=(1.5, 1.0), amp=400)
    with caplog.at_level(logging.WARNING, logger="piscis"):
        assert len(match3(detect(fine, model).coords, fine_true)) >= 5
    assert not [r for r in caplog.records if "fewer than" in r.getMessage()]
    # The command: --min-planes is passed to the detector and kept in the run record.
    spots, _, rc = _count_cli(tmp_path, capsys, vol, "--min-planes", 1, name="coarse")
    assert rc == 0 and len(match3(_coords(spots), true)) == 9
    record = (tmp_path / "out" / RECORD_NAME).read_text().splitlines()[0]
    assert '"min_planes": 1' in record


@pytest.mark.parametrize("bad", ["0", "-1", "1.5", "x"])
def test_min_planes_must_be_a_whole_number_from_1(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as e:
        cli.main(["count", str(tmp_path / "a.tif"), "-o", str(tmp_path / "o"), "--min-planes", bad])
    assert e.value.code == 2
    assert "--min-planes: expected a whole number of planes, 1 or more" in capsys.readouterr().err


# --------------------------------------------------------------------------- (Y, X, C) arrays


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_a_channels_last_array_is_refused_not_read_as_a_stack(model, channels):
    rng = np.random.default_rng(6)
    grey, _ = synth.spot_image(rng, (64, 64), n_spots=8, sigma=1.0, amp=400)
    yxc = np.repeat(grey[..., None], channels, axis=-1)  # what PIL or imageio give
    for call in (lambda: detect(yxc, model), lambda: count_spots(yxc, model=model)):
        with pytest.raises(ValueError) as e:
            call()
        text = str(e.value)
        assert f"shape (64, 64, {channels})" in text and "channel(s) last" in text
        assert "image[..., c]" in text and "(Z, Y, X) stack" in text
    # A real stack of as few planes, z first, is detected in 3D as before.
    yx = np.stack(np.meshgrid([16.0, 48.0], [16.0, 48.0]), -1).reshape(-1, 2)
    true = np.column_stack([np.full(4, (channels - 1) / 2), yx])
    vol, _ = synth.spot_volume(rng, (channels, 64, 64), coords=true, sigma=(1.0, 1.0))
    assert len(match3(detect(vol, model).coords, true)) == 4
    table = count_spots(vol, model=model)[0]
    assert len(match3(np.column_stack([table["z"], table["y"], table["x"]]), true)) == 4
