"""The 2D field cases of CASES.md (C01, C04, C05, C06, C10, C11, C12, C14, C15, C16, C17),
each through the Python API, the ``piscis`` command and, where the case touches it, the
napari plugin (those parts skip without napari, pytest-qt or a display: run them under
``xvfb-run -a``). Figures that depend on detection quality use the shipped default model;
every input is generated here from a seeded generator.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from piscis import cli
from piscis.api import count_spots
from piscis.detect import detect, estimate_normalization, predict_maps
from piscis.io import MODELS_DIR, InputError, load_model, read_image, read_spots
from piscis.metrics import match
from piscis.synth import render_spots, spot_image

HAS_DEFAULT = (MODELS_DIR / "default" / "model.safetensors").exists()
needs_default = pytest.mark.skipif(not HAS_DEFAULT, reason="no shipped default model")


def _has_viewer() -> bool:
    import importlib.util

    display = (
        os.environ.get("DISPLAY")
        or os.environ.get("WAYLAND_DISPLAY")
        or os.environ.get("QT_QPA_PLATFORM") == "offscreen"
    )
    found = all(importlib.util.find_spec(m) for m in ("napari", "pytestqt"))
    return bool(display and found)


needs_viewer = pytest.mark.skipif(
    not _has_viewer(), reason="needs napari, pytest-qt and a display (xvfb-run -a)"
)

SPOT_HEADER = "y,x,score,intensity,background"


@pytest.fixture(scope="module")
def default():
    return load_model("default")


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _coords(path: Path) -> np.ndarray:
    rows = _rows(path)
    return np.array([[float(r["y"]), float(r["x"])] for r in rows]).reshape(-1, 2)


def _recall(pred, true, cutoff=1.5) -> float:
    return len(match(pred, true, cutoff)[0]) / max(len(true), 1)


def _viewer_helpers():
    """The napari test helpers (imported only where a viewer runs)."""
    import test_napari_plugin as tnp

    tnp._register()
    return tnp


@pytest.fixture
def _plugin_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PISCIS_MODELS_DIR", str(tmp_path / "user_models"))


# --------------------------------------------------------------------------- C01


def _noise(rng, shape) -> np.ndarray:
    """Background 100 and Gaussian noise of sigma 5, no spots (CASES.md C01 (b), (d))."""
    return np.clip(np.round(100 + rng.normal(0, 5, shape)), 0, None).astype(np.uint16)


def _c01_blanks(rng) -> dict[str, np.ndarray]:
    return {
        "a_constant": np.full((512, 512), 100, np.uint16),
        "b_noise": _noise(rng, (512, 512)),
        "c_zeros": np.zeros((512, 512), np.uint16),
    }


def _four_cells(shape) -> np.ndarray:
    cells = np.zeros(shape, np.int32)
    h, w = shape
    cells[: h // 2, : w // 2], cells[: h // 2, w // 2 :] = 1, 2
    cells[h // 2 :, : w // 2], cells[h // 2 + 10 :, w // 2 + 10 :] = 3, 40
    return cells


@needs_default
def test_c01_blank_images_api(default, caplog):
    """(a)-(c): no exception in model, peaks, cells; 0 spots; every cell 0; a warning."""
    rng = np.random.default_rng(101)
    for name, image in _c01_blanks(rng).items():
        if name == "b_noise":
            continue  # a chance 5-sigma noise spot is possible: test_c01_noise_false_spot_rate
        cells = _four_cells(image.shape)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="piscis"):
            table, rows = count_spots(image, cells=cells, nuclei=cells, model=default, name=name)
        assert len(table["y"]) == 0 and set(table) >= set(SPOT_HEADER.split(","))
        assert [r["cell_id"] for r in rows] == [1, 2, 3, 40]
        assert all(r["n_spots"] == 0 and r["n_spots_nucleus"] == 0 for r in rows)
        assert all(r["dense"] is False for r in rows)
        assert f"{name}: no spots detected" in caplog.text


@needs_default
def test_c01_noise_false_spot_rate(default):
    """(b) 12 noise images (background 100, sigma 5, 512 x 512): at most 1 false spot per
    megapixel, as the significance floor (SNR 5) allows."""
    n = sum(len(detect(_noise(np.random.default_rng(s), (512, 512)), default)) for s in range(12))
    assert n <= 12 * 0.262, n


@needs_default
def test_c01_batch_with_normal_images_and_too_high_threshold_cli(tmp_path, capsys):
    """(b) + (e): header-only CSV, summary 0, every cell 0, a warning, exit 0, the normal
    images 30 +- 1 each; (f) a threshold nothing passes: every image 0, exit 0."""
    rng = np.random.default_rng(105)
    d, masks = tmp_path / "in", tmp_path / "masks"
    d.mkdir()
    masks.mkdir()
    truth = {}
    for k in range(3):
        image, truth[f"n{k}"] = spot_image(rng, (512, 512), n_spots=30, amp=400)
        tifffile.imwrite(d / f"n{k}.tif", image)
    blanks = _c01_blanks(rng)
    tifffile.imwrite(d / "noise.tif", blanks["b_noise"])
    tifffile.imwrite(d / "blank.tif", blanks["a_constant"])
    tifffile.imwrite(d / "zeros.tif", blanks["c_zeros"])
    for stem in ("n0", "n1", "n2", "noise", "blank", "zeros"):
        tifffile.imwrite(masks / f"{stem}_masks.tif", _four_cells((512, 512)))

    out = tmp_path / "out"
    rc, _, err = _run(capsys, "count", d, "-o", out, "--cells", masks, "-q")
    assert rc == 0, err
    summary = {Path(r["image"]).stem: int(r["n_spots"]) for r in _rows(out / "summary.csv")}
    assert summary["blank"] == summary["zeros"] == 0 and summary["noise"] <= 1
    for k in range(3):
        assert abs(summary[f"n{k}"] - 30) <= 1, summary
        assert _recall(_coords(out / "spots" / f"n{k}.csv"), truth[f"n{k}"]) >= 0.95
    assert (out / "spots" / "blank.csv").read_text().splitlines()[0].startswith(SPOT_HEADER)
    assert len((out / "spots" / "blank.csv").read_text().splitlines()) == 1
    cells = [r for r in _rows(out / "cells.csv") if Path(r["image"]).stem == "blank"]
    assert [int(r["cell_id"]) for r in cells] == [1, 2, 3, 40]
    assert all(r["n_spots"] == "0" for r in cells)

    out2 = tmp_path / "out_f"
    rc, _, err = _run(capsys, "count", d, "-o", out2, "--threshold", "0.999999999999")
    assert rc == 0, err
    assert [r["n_spots"] for r in _rows(out2 / "summary.csv")] == ["0"] * 6
    for stem in ("n0", "n1", "n2", "noise", "blank", "zeros"):
        assert f"WARNING: {d / stem}.tif: no spots detected" in err
        assert (out2 / "spots" / f"{stem}.csv").read_text() == SPOT_HEADER + "\n"
    assert "ERROR" not in err


@needs_default
def test_c01d_zyx_noise_stack_api_and_cli(default, tmp_path, capsys):
    """(d) uint16 10x256x256 ZYX noise, detected in 3D: 0 spots, no exception, a
    header-only CSV with the 3D columns, a warning naming the file, exit 0."""
    rng = np.random.default_rng(104)
    stack = _noise(rng, (10, 256, 256))
    path = tmp_path / "zyx.tif"
    tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "ZYX"})
    volume = read_image(path).image
    assert volume.shape == (10, 256, 256)
    spots = detect(volume, default)
    assert len(spots) == 0 and spots.coords.shape == (0, 3)
    rc, _, err = _run(capsys, "count", path, "-o", tmp_path / "out")
    assert rc == 0, err
    header = (tmp_path / "out" / "spots" / "zyx.csv").read_text()
    assert header.startswith("z," + SPOT_HEADER) and header.count("\n") == 1, header
    summary = _rows(tmp_path / "out" / "summary.csv")
    assert summary[0]["n_spots"] == "0" and summary[0]["depth"] == "10"
    assert "no spots detected" in err


@needs_default
@needs_viewer
def test_c01_plugin_detect_and_review_blank(make_napari_viewer, qtbot, _plugin_env):
    tnp = _viewer_helpers()
    rng = np.random.default_rng(106)
    viewer = tnp._viewer(make_napari_viewer, show=False)
    detect_w = tnp._dock(viewer, "Detect spots")
    detect_w.model.set_path(MODELS_DIR / "default")
    for name, image in _c01_blanks(rng).items():
        layer = viewer.add_image(image, name=name)
        detect_w.image.set_layer(layer)
        detect_w.run()
        tnp._wait_idle(qtbot, detect_w, 60_000)
        points = detect_w.points_layer
        assert points is not None and len(points.data) == 0, name
        assert detect_w.status.text().startswith("0 spots")
    cells = viewer.add_labels(_four_cells((512, 512)), name="cells")
    review = tnp._dock(viewer, "Review cells")
    review.points.set_layer(points)
    review.cells.set_layer(cells)
    rows = review.count()
    assert [r["cell_id"] for r in rows] == [1, 2, 3, 40]
    assert all(r["n_spots"] == 0 for r in rows)


# --------------------------------------------------------------------------- C04

C04_EDGE = np.array([[1.0, 50], [254.5, 100], [128, 0.0], [128, 255.0], [0.0, 0.0], [255, 255]])


def _c04_image():
    rng = np.random.default_rng(404)
    _, inner = spot_image(rng, (256, 256), n_spots=14, margin=10)
    coords = np.concatenate([C04_EDGE, inner])
    return spot_image(rng, (256, 256), coords=coords)


def _inside(coords, y0, y1, x0, x1):
    pix = np.floor(coords + 0.5)
    return (pix[:, 0] >= y0) & (pix[:, 0] < y1) & (pix[:, 1] >= x0) & (pix[:, 1] < x1)


@needs_default
def test_c04_edge_spots_and_roi_api(default):
    image, truth = _c04_image()
    whole = detect(image, default)
    # (a): 20 spots, each of the 6 edge and corner spots among them.
    assert len(whole) == 20
    _, ti = match(whole.coords, truth, 1.5)
    assert set(range(6)) <= set(ti.tolist())
    for roi, box, must in [
        ((0, 0, 256, 256), (0, 256, 0, 256), range(6)),  # (a) as a ROI
        ((200, 200, 100, 100), (200, 256, 200, 256), [5]),  # (b) past the border: (255, 255)
        ((-20, -20, 40, 40), (0, 20, 0, 20), [4]),  # (c) before the origin: (0, 0)
    ]:
        got = detect(image, default, roi=roi)
        keep = _inside(whole.coords, *box)
        assert len(got) == int(keep.sum()) > 0, roi
        np.testing.assert_allclose(got.coords, whole.coords[keep], atol=1e-4)
        np.testing.assert_allclose(got.score, whole.score[keep], atol=1e-5)
        np.testing.assert_allclose(got.intensity, whole.intensity[keep], rtol=1e-6)
        assert set(must) <= set(match(got.coords, truth, 1.5)[1].tolist()), roi
        table, _ = count_spots(image, model=default, roi=roi)
        np.testing.assert_allclose(table["y"], got.coords[:, 0])
    # (d) zero area, and a ROI wholly off the image: a clear message.
    with pytest.raises(ValueError, match="is empty"):
        detect(image, default, roi=(10, 10, 0, 30))
    with pytest.raises(ValueError, match="empty once clipped"):
        detect(image, default, roi=(300, 300, 20, 20))


@needs_default
def test_c04_roi_cli(tmp_path, capsys, default):
    image, _ = _c04_image()
    path = tmp_path / "edge.tif"
    tifffile.imwrite(path, image)
    rc, _, err = _run(capsys, "detect", path, "-o", tmp_path / "b", "--roi", "200,200,100,100")
    assert rc == 0, err
    expected = detect(image, default, roi=(200, 200, 100, 100)).coords
    np.testing.assert_allclose(_coords(tmp_path / "b" / "edge.csv"), expected, atol=1e-3)
    rc, _, err = _run(capsys, "detect", path, "-o", tmp_path / "c", "--roi=-20,-20,40,40")
    assert rc == 0, err
    assert np.any(np.all(np.abs(_coords(tmp_path / "c" / "edge.csv")) < 1.0, axis=1))
    with pytest.raises(SystemExit) as exc:
        cli.main(["detect", str(path), "-o", str(tmp_path / "d"), "--roi", "10,10,0,5"])
    assert exc.value.code == 2
    assert "is empty" in capsys.readouterr().err
    rc, _, err = _run(capsys, "detect", path, "-o", tmp_path / "e", "--roi", "400,400,9,9")
    assert rc == 1 and f"{path}: ROI" in err and "empty once clipped" in err


@needs_default
@needs_viewer
def test_c04_plugin_shapes_roi_half_outside(make_napari_viewer, qtbot, _plugin_env, default):
    """(e) a Shapes rectangle half outside the canvas is the Detect widget's region."""
    tnp = _viewer_helpers()
    image, truth = _c04_image()
    viewer = tnp._viewer(make_napari_viewer, show=False)
    layer = viewer.add_image(image, name="edge")
    shapes = viewer.add_shapes(
        [np.array([[150.0, -60.0], [150.0, 80.0], [320.0, 80.0], [320.0, -60.0]])],
        shape_type="rectangle",
        name="roi",
    )
    w = tnp._dock(viewer, "Detect spots")
    w.image.set_layer(layer)
    w.model.set_path(MODELS_DIR / "default")
    w.roi.set_layer(shapes)
    w.run()
    tnp._wait_idle(qtbot, w, 60_000)
    got = np.asarray(w.points_layer.data)
    whole = detect(image, default)
    keep = _inside(whole.coords, 150, 256, 0, 80)
    assert len(got) == int(keep.sum()) > 0
    np.testing.assert_allclose(got, whole.coords[keep], atol=1e-4)
    # An empty region: a message, no crash, no worker.
    shapes.data = [np.array([[300.0, 300.0], [300.0, 400.0], [400.0, 400.0], [400.0, 300.0]])]
    w.run()
    assert w._worker is None and "empty" in w.status.text()


# --------------------------------------------------------------------------- C05


def _c05_layout(rng, shape=(1024, 1024), n=256, n_seam=64, min_sep=6.0):
    seams = np.array([255.5, 256.0, 511.5, 512.0, 767.5, 768.0])
    pts = [np.array(c, float) for c in ((256, 256), (512, 512), (768, 768))]

    def free(p):
        return all(np.hypot(*(p - q)) >= min_sep for q in pts)

    k = 0
    while len(pts) < n_seam:
        other = rng.uniform(4, shape[0] - 5)
        p = np.array([seams[k % 6], other]) if k % 2 == 0 else np.array([other, seams[k % 6]])
        k += 1
        if free(p):
            pts.append(p)
    while len(pts) < n:
        p = rng.uniform(4, shape[0] - 5, 2)
        if free(p):
            pts.append(p)
    return np.array(pts)


@needs_default
def test_c05_tile_seams_tiled_equals_untiled(default):
    rng = np.random.default_rng(505)
    coords = _c05_layout(rng)
    image, truth = spot_image(rng, (1024, 1024), coords=coords)
    untiled = detect(image, default, tile_size=1024)
    tiled = detect(image, default, tile_size=256)  # 4 x 4 tiles, default margin
    assert len(tiled) == len(untiled)
    pi, ti = match(tiled.coords, untiled.coords, 0.5)
    assert len(pi) == len(untiled)
    assert np.max(np.abs(tiled.coords[pi] - untiled.coords[ti])) < 0.5
    from scipy.spatial import cKDTree

    d, _ = cKDTree(tiled.coords).query(tiled.coords, k=2)
    assert d[:, 1].min() >= 1.0, "two detections closer than 1 px"
    seam_found = set(match(tiled.coords, truth[:64], 1.5)[1].tolist())
    assert seam_found == set(range(64)), sorted(set(range(64)) - seam_found)
    assert abs(len(tiled) - 256) <= 2
    maps_t, _ = predict_maps(image, default, tile_size=256)
    maps_u, _ = predict_maps(image, default, tile_size=1024)
    assert np.max(np.abs(maps_t.prob - maps_u.prob)) < 1e-3


# --------------------------------------------------------------------------- C06


def _c06_pairs(rng):
    centres: list[np.ndarray] = []
    while len(centres) < 40:
        c = rng.uniform(12, 244, 2)
        if all(np.hypot(*(c - o)) >= 15 for o in centres):
            centres.append(c)
    truth, sep_of = [], []
    for i, c in enumerate(centres):
        sep = (2, 3, 4, 6)[i // 10]
        a = rng.uniform(0, np.pi)
        d = np.array([np.sin(a), np.cos(a)]) * sep / 2
        truth += [c - d, c + d]
        sep_of += [sep, sep]
    return np.array(truth), np.array(sep_of), np.array(centres)


def _c06_measure(default):
    rng = np.random.default_rng(606)
    truth, sep_of, centres = _c06_pairs(rng)
    image, _ = spot_image(rng, (256, 256), coords=truth)
    got = detect(image, default).coords
    _, ti = match(got, truth, 1.5)
    found = np.isin(np.arange(len(truth)), ti)
    recall = {s: float(found[sep_of == s].mean()) for s in (2, 3, 4, 6)}
    return got, truth, sep_of, centres, recall


@needs_default
def test_c06_pairs_4_and_6_px_resolved_without_merges(default):
    got, truth, sep_of, centres, recall = _c06_measure(default)
    assert recall[4] >= 0.9 and recall[6] >= 0.9, recall
    # No single merged detection between the two spots of a pair >= 4 px apart: a
    # detection nearer the midpoint than 1 px would be one.
    from scipy.spatial import cKDTree

    mids = centres[[i for i in range(40) if (2, 3, 4, 6)[i // 10] >= 4]]
    d, _ = cKDTree(got).query(mids)
    assert np.all(d >= 1.0), d.min()


@needs_default
def test_c06_pairs_2_and_3_px(default):
    _, _, _, _, recall = _c06_measure(default)
    assert recall[3] >= 0.9 and recall[2] >= 0.5, recall


def _c06_patch(rng, n=60, size=24, min_sep=2.5, origin=(100.0, 100.0)):
    pts: list[np.ndarray] = []
    while len(pts) < n:
        p = rng.uniform(0, size, 2) + np.asarray(origin)
        if all(np.hypot(*(p - q)) >= min_sep for q in pts):
            pts.append(p)
    return np.array(pts)


C06_ORIGIN = np.array([116.0, 116.0])  # the dense patch: 24 x 24 px from here


def _c06_image(seed):
    """CASES C06 in one 256 x 256 image: the 40 pairs (2, 3, 4, 6 px) and the 24 x 24 px
    patch of 60 spots at least 2.5 px apart, the pairs at least 12 px from the patch."""
    rng = np.random.default_rng(seed)
    centres: list[np.ndarray] = []
    while len(centres) < 40:
        c = rng.uniform(12, 244, 2)
        if np.all(np.abs(c - (C06_ORIGIN + 12)) < 24):
            continue
        if all(np.hypot(*(c - q)) >= 15 for q in centres):
            centres.append(c)
    truth = []
    for i, c in enumerate(centres):
        a = rng.uniform(0, np.pi)
        d = np.array([np.sin(a), np.cos(a)]) * (2, 3, 4, 6)[i // 10] / 2
        truth += [c - d, c + d]
    patch = _c06_patch(rng, origin=C06_ORIGIN)
    image, _ = spot_image(rng, (256, 256), coords=np.vstack([truth, patch]))
    return image, np.array(truth), patch


def _in_patch(coords):
    return np.all((coords >= C06_ORIGIN - 1.5) & (coords <= C06_ORIGIN + 25.5), axis=1)


@needs_default
def test_c06_dense_patch_count(default, caplog):
    """The patch of 60 spots 2.5 px apart: the network alone finds about half of them
    (26 to 34 over seeds 700-707); the dense cluster is fitted with the spot shape of the
    image's single spots and comes to 60 here (53 to 58 over those seeds), 55 of them
    within 1.5 px of a spot. Nothing changes outside the patch."""
    import piscis.detect as pd

    caplog.set_level(logging.INFO, logger="piscis.crowding")
    image, pairs, patch = _c06_image(66)
    got = detect(image, default)
    n = int(np.count_nonzero(_in_patch(got.coords)))
    assert abs(n - 60) <= 15, n
    pi, _ = match(got.coords[_in_patch(got.coords)], patch, 1.5)
    assert len(pi) >= 0.9 * n, (len(pi), n)  # the added spots lie on spots
    assert "dense cluster" in caplog.text and "by fitting the image" in caplog.text
    with pytest.MonkeyPatch.context() as mp:  # the network's own detections
        mp.setattr(pd, "add_crowded", lambda image, spots, *a, **k: spots)
        plain = detect(image, default)
    assert np.count_nonzero(_in_patch(plain.coords)) < 45  # without the fit: a miss
    outside = ~_in_patch(got.coords)
    np.testing.assert_array_equal(got.coords[outside], plain.coords[~_in_patch(plain.coords)])


@needs_default
def test_c06_dense_fit_is_the_same_tiled_streamed_and_in_napari_candidates(default, tmp_path):
    """The fit runs once on the whole image's detections: tiles of 256 px (the patch on a
    seam), the streamed reader of a TIFF and the plugin's re-thresholding give the same
    spots."""
    from piscis import lazy
    from piscis.annotate import detect_candidates

    image, _, _ = _c06_image(67)
    ref = detect(image, default)
    assert np.count_nonzero(_in_patch(ref.coords)) >= 45
    moved = np.roll(image, (12, 12), axis=(0, 1))  # the patch across the seam at 128
    a, b = detect(moved, default, tile_size=1024), detect(moved, default, tile_size=128)
    np.testing.assert_allclose(a.coords, b.coords, atol=1e-6)
    tifffile.imwrite(tmp_path / "c06.tif", image)
    streamed = lazy.detect_lazy(lazy.open_lazy(tmp_path / "c06.tif"), default, tile_size=256)
    np.testing.assert_allclose(streamed.coords, ref.coords, atol=1e-6)
    cands = detect_candidates(image, default)
    for t in (default.threshold, 0.9):
        np.testing.assert_allclose(
            cands.at(t).coords, detect(image, default, threshold=t).coords, atol=1e-9
        )
        assert cands.count(t) == len(detect(image, default, threshold=t))


@needs_default
def test_c06_dense_patch_alone_says_its_count_is_a_lower_bound(default, caplog):
    """A patch and nothing else: no single spot shows the spot shape, so nothing is
    added, and a warning says the count there is a lower bound."""
    rng = np.random.default_rng(68)
    image, _ = spot_image(rng, (256, 256), coords=_c06_patch(rng))
    got = detect(image, default, name="patch.tif")
    assert 15 <= len(got) < 45
    assert "patch.tif" in caplog.text and "lower bounds" in caplog.text


def test_c06_crowding_adds_nothing_without_dense_clusters():
    """Spots 8 px apart on a grid (no spot with 4 others within 6 px): nothing is fitted,
    whatever the image."""
    from piscis.crowding import crowded_spots

    rng = np.random.default_rng(69)
    coords = np.array([[y, x] for y in range(8, 120, 8) for x in range(8, 120, 8)], float)
    image = rng.normal(100, 5, (128, 128)) + 1000.0  # light everywhere, none of it spots
    added, cluster = crowded_spots(image, coords, np.full(len(coords), 100.0), 5.0)
    assert added.shape == (0, 2) and cluster == []


@needs_default
def test_c06_dense_cell_flag_api_and_cli(default, tmp_path, capsys):
    """A cell holding a 5 px grid of spots (0.04 spots/px^2, each with 4 neighbours within
    6 px) is flagged dense, a cell of spots 8 px apart is not; a cells.csv column."""
    g = np.arange(6) * 5.0
    grid = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2) + 40
    sparse = np.stack(np.meshgrid(np.arange(4) * 8.0, np.arange(4) * 8.0), -1).reshape(-1, 2)
    coords = np.concatenate([grid, sparse + [40, 160]])
    rng = np.random.default_rng(607)
    image, _ = spot_image(rng, (128, 256), coords=coords, dtype=np.uint16)
    cells = np.zeros(image.shape, np.int32)
    cells[20:90, 20:100], cells[20:90, 140:230] = 1, 2
    table, rows = count_spots(image, cells=cells, model=default)
    by = {r["cell_id"]: r for r in rows}
    assert by[1]["n_spots"] == 36 and by[2]["n_spots"] == 16, (by[1], by[2])
    assert by[1]["dense"] is True and by[2]["dense"] is False
    tifffile.imwrite(tmp_path / "grid.tif", image)
    tifffile.imwrite(tmp_path / "grid_masks.tif", cells)
    rc, _, err = _run(capsys, "count", tmp_path / "grid.tif", "--cells", tmp_path, "-o",
                      tmp_path / "out")  # fmt: skip
    assert rc == 0, err
    flags = {int(r["cell_id"]): r["dense"] for r in _rows(tmp_path / "out" / "cells.csv")}
    assert flags == {1: "1", 2: "0"}


# --------------------------------------------------------------------------- C10


def _c10_images(tmp_path, n=4):
    rng = np.random.default_rng(1010)
    out = []
    for k in range(n):
        image, coords = spot_image(rng, (128, 128), n_spots=20)
        out.append((f"img{k}", image, coords))
    return out


def _write_csv(path: Path, header: list[str] | None, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header is not None:
            w.writerow(header)
        w.writerows(rows)


def _variant(path: Path, kind: str, coords: np.ndarray) -> None:
    y, x = coords[:, 0], coords[:, 1]
    if kind == "a":
        _write_csv(path, ["y", "x"], zip(y, x))
    elif kind == "b":
        _write_csv(path, ["x", "y"], zip(x, y))
    elif kind == "c":
        _write_csv(path, ["y", "x", "class"], ((a, b, 0) for a, b in zip(y, x)))
    elif kind == "d":
        _write_csv(path, ["index", "axis-0", "axis-1"], ((i, a, b) for i, (a, b) in
                                                         enumerate(zip(y, x))))  # fmt: skip
    elif kind == "e":
        pix = np.round(coords).astype(int)
        rows = [(py + dy, px + dx) for py, px in pix for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        _write_csv(path, ["y", "x"], rows)
    elif kind == "f":
        _write_csv(path, None, zip(y, x))
    elif kind == "g":
        _write_csv(path, ["y", "x"], zip(y + 1, x + 1))


def test_c10_csv_variants_read_the_same(tmp_path, caplog):
    from piscis.io import MERGE_DISTANCE

    (_, _, coords), *_ = _c10_images(tmp_path, 1)
    got = {}
    for kind in "abcd":
        _variant(tmp_path / f"{kind}.csv", kind, coords)
        with caplog.at_level(logging.INFO, logger="piscis"):
            got[kind] = read_spots(tmp_path / f"{kind}.csv")
        assert got[kind].shape == (20, 2)
        np.testing.assert_allclose(got[kind], coords, atol=1e-9)
    assert "column 'class' ignored" in caplog.text
    # (e) one row per pixel of each 3x3 window: 180 rows, merged into 20 with a warning.
    _variant(tmp_path / "e.csv", "e", coords)
    assert read_spots(tmp_path / "e.csv").shape == (180, 2)  # as it is, unless asked
    caplog.clear()
    merged = read_spots(tmp_path / "e.csv", merge_distance=MERGE_DISTANCE)
    assert merged.shape == (20, 2)
    assert np.max(np.abs(np.sort(merged, 0) - np.sort(np.round(coords), 0))) < 1e-9
    assert "180 rows lie within 1 px" in caplog.text and "20 spots" in caplog.text
    # (f) no header: an error that asks for one or for the columns option.
    _variant(tmp_path / "f.csv", "f", coords)
    with pytest.raises(InputError, match=r"f\.csv: no header row.*--columns"):
        read_spots(tmp_path / "f.csv")
    np.testing.assert_allclose(read_spots(tmp_path / "f.csv", columns=("y", "x")), coords)
    np.testing.assert_allclose(read_spots(tmp_path / "f.csv", columns=("x", "y")), coords[:, ::-1])
    # (g) 1-based: read as written (0-based convention), one pixel off.
    _variant(tmp_path / "g.csv", "g", coords)
    np.testing.assert_allclose(read_spots(tmp_path / "g.csv"), coords + 1)


@needs_default
def test_c10_accepted_variants_train_one_epoch_with_preflight(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for (stem, image, coords), kind in zip(_c10_images(tmp_path, 5), "abcde"):
        tifffile.imwrite(data / f"{stem}.tif", image)
        _variant(data / f"{stem}.csv", kind, coords)
    args = ["train", data, "-o", tmp_path / "m", "--init", "default", "--epochs", "1",
            "--steps", "1", "--batch", "2", "--crop", "64", "--val-fraction", "0"]  # fmt: skip
    rc, _, err = _run(capsys, *args)
    assert rc == 0, err
    assert "pre-flight: 100/100 annotations on pixels above background + 3 sigma" in err
    assert "merged into 20 spots" in err  # the 3x3-window file
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["training"]["config"]["epochs"] == 1
    # (f) without a header: refused with the option to use, then accepted with it.
    for f in data.glob("*.csv"):
        f.unlink()
    for stem, _, coords in _c10_images(tmp_path):
        _variant(data / f"{stem}.csv", "f", coords)
    rc, _, err = _run(capsys, "train", data, "-o", tmp_path / "m2", "--epochs", "1")
    assert rc == 2 and "no header row" in err and "--columns" in err
    assert not (tmp_path / "m2").exists()


def test_c10_preflight_catches_an_xy_swap(tmp_path, caplog):
    from piscis.data import annotation_check, load_pairs

    data = tmp_path / "data"
    data.mkdir()
    for stem, image, coords in _c10_images(tmp_path, 2):
        tifffile.imwrite(data / f"{stem}.tif", image)
        _write_csv(data / f"{stem}.csv", ["y", "x"], coords[:, ::-1])  # x values under 'y'
    pairs = load_pairs(data)
    bright, total, swapped = annotation_check(pairs[0])
    assert total == 20 and bright <= 3 and swapped == 20
    with caplog.at_level(logging.INFO, logger="piscis"):
        cli._preflight(pairs)
    assert "img0: only" in caplog.text and "y and x exchanged 20/20" in caplog.text
    assert "pre-flight:" in caplog.text


def test_c17_pixel_size_converts_physical_csvs(tmp_path, capsys):
    """A CSV in micrometres with pixel size 0.065 um reads as the same pixels; train's
    pre-flight and evaluate's matching work in pixels with --pixel-size."""
    (stem, image, coords), *_ = _c10_images(tmp_path, 1)
    um = 0.065
    data = tmp_path / "data"
    data.mkdir()
    tifffile.imwrite(data / f"{stem}.tif", image)
    _write_csv(data / f"{stem}.csv", ["y", "x"], coords * um)
    np.testing.assert_allclose(read_spots(data / f"{stem}.csv", pixel_size=um), coords)
    np.testing.assert_allclose(
        read_spots(data / f"{stem}.csv", pixel_size=(um, 2 * um)), coords / [1, 2]
    )
    from piscis.data import annotation_check, load_pairs

    assert annotation_check(load_pairs(data, pixel_size=um)[0])[:2] == (20, 20)
    assert annotation_check(load_pairs(data)[0])[0] <= 2  # in um, all in the corner
    # evaluate: predictions 1.2 px off; in pixels F1@1 is 0, in um every one "matches".
    _write_csv(tmp_path / "pred.csv", ["y", "x"], (coords + [1.2, 0]) * um)
    rc, out, _ = _run(capsys, "evaluate", tmp_path / "pred.csv", data / f"{stem}.csv")
    assert rc == 0 and float(out.splitlines()[1].split()[3]) == 1.0
    rc, out, _ = _run(capsys, "evaluate", tmp_path / "pred.csv", data / f"{stem}.csv",
                      "--pixel-size", str(um))  # fmt: skip
    f1_1, f1_2 = (float(v) for v in out.splitlines()[1].split()[3:5])
    assert rc == 0 and f1_1 == 0.0 and f1_2 == 1.0


# --------------------------------------------------------------------------- C11


def _c11_image():
    """2048x2048, 800 spots (sigma 1, amp 300); crop A has 3 spots, B none, C an
    artefact blob (sigma 4, amp 20000) and 3 spots."""
    rng = np.random.default_rng(1111)
    a, b, c = (512, 512), (1024, 1536), (1536, 256)
    pts: list[np.ndarray] = []

    def free(p, sep=6.0):
        return all(np.hypot(*(p - q)) >= sep for q in pts)

    def inside(p, o, pad=0):
        return o[0] - pad <= p[0] < o[0] + 128 + pad and o[1] - pad <= p[1] < o[1] + 128 + pad

    for origin in (a, c):
        while sum(inside(p, origin) for p in pts) < 3:
            p = np.asarray(origin) + rng.uniform(12, 116, 2)
            if free(p) and np.hypot(*(p - np.asarray(c) - 64)) > 25:
                pts.append(p)
    while len(pts) < 800:
        p = rng.uniform(4, 2043, 2)
        if free(p) and not any(inside(p, o, 8) for o in (a, b, c)):
            pts.append(p)
    truth = np.array(pts)
    image = 100.0 + render_spots((2048, 2048), truth, np.ones(800), np.full(800, 300.0))
    image += render_spots(
        (2048, 2048), np.array([[c[0] + 64.0, c[1] + 64.0]]), np.array([4.0]), np.array([2e4])
    )
    image = np.clip(np.round(image + rng.normal(0, 5, image.shape)), 0, 65535).astype(np.uint16)
    return image, truth, {"A": a, "B": b, "C": c}


@needs_default
def test_c11_crops_match_the_whole_image(default):
    image, truth, crops = _c11_image()
    whole = detect(image, default).coords
    assert _recall(whole, truth) >= 0.97
    pooled_pred, pooled_whole = [], []
    for name, (y0, x0) in crops.items():
        crop = image[y0 : y0 + 128, x0 : x0 + 128]
        got = detect(crop, default, name=name).coords + [y0, x0]
        ref = whole[_inside(whole, y0, y0 + 128, x0, x0 + 128)]
        in_truth = truth[_inside(truth, y0, y0 + 128, x0, x0 + 128)]
        pooled_pred.append(got)
        pooled_whole.append(ref)
        if name == "B":
            assert len(got) == 0, got  # noise is not stretched into spots
        else:
            assert len(in_truth) == 3
            assert _recall(got, in_truth) == 1.0, (name, got, in_truth)
    pred, ref = np.concatenate(pooled_pred), np.concatenate(pooled_whole)
    pi, _ = match(pred, ref, 1.5)
    f1 = 2 * len(pi) / (len(pred) + len(ref))
    assert f1 >= 0.95, (len(pred), len(ref), len(pi))


def _model_copy(tmp_path, **normalization) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(MODELS_DIR / "default", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["normalization"].update(normalization)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@needs_default
def test_c11_normalization_mode_is_saved_and_used_at_inference(default, tmp_path):
    from piscis.detect import model_normalization

    rng = np.random.default_rng(1112)
    image, truth = spot_image(rng, (256, 256), n_spots=20, amp=300)
    # The shipped model keeps today's behaviour: whole-image statistics.
    assert default.config["normalization"].get("mode", "image") == "image"
    own = estimate_normalization(image, default.compression, default.contrast_ratio)
    assert model_normalization(image, default) == own
    ref = detect(image, default)
    assert _recall(ref.coords, truth) >= 0.95
    # "fixed": the config's statistics for every image, whatever the image holds.
    same = load_model(_model_copy(tmp_path / "s", mode="fixed", background=own.background,
                                  unit=own.unit, noise=own.noise))  # fmt: skip
    np.testing.assert_allclose(detect(image, same).coords, ref.coords, atol=1e-6)
    brighter = (image.astype(np.float32) - 100) * 0.1 + 100  # 10x dimmer spots
    assert len(detect(brighter, same)) < len(detect(brighter, default)) / 2
    bad = _model_copy(tmp_path / "b", mode="fixed")
    with pytest.raises(ValueError, match="'fixed' needs numbers 'background' and 'unit'"):
        detect(image, load_model(bad))


def test_c11_training_per_crop_or_global_normalization(tmp_path, tiny_model):
    from piscis.data import Pair, sample_real
    from piscis.train import TrainConfig, train

    rng = np.random.default_rng(1113)
    image, coords = spot_image(rng, (128, 128), n_spots=12)
    image[:, 64:] += 400  # a brighter half: crop statistics differ from the image's
    pair = Pair("half", image, coords)
    x_img, _, _ = sample_real(np.random.default_rng(0), pair, 48, augment=False)
    x_crop, _, _ = sample_real(np.random.default_rng(0), pair, 48, augment=False, per_crop=True)
    assert not np.allclose(x_img, x_crop)
    for mode in ("image", "crop"):
        cfg = TrainConfig(epochs=1, steps_per_epoch=1, batch_size=2, crop=32,
                          synthetic_fraction=0.0, channels=(4, 8), normalization=mode)  # fmt: skip
        out = train([pair], tmp_path / mode, cfg)
        saved = json.loads((out / "config.json").read_text())["normalization"]
        assert saved["mode"] == mode
        assert load_model(out).config["normalization"]["mode"] == mode
    with pytest.raises(ValueError, match="'image' or 'crop'"):
        train([pair], tmp_path / "x", TrainConfig(normalization="percentile"))


# --------------------------------------------------------------------------- C12


@needs_default
def test_c12_tiff_suffixes_and_bad_files_cli(tmp_path, capsys):
    rng = np.random.default_rng(1212)
    d = tmp_path / "in"
    d.mkdir()
    names = ["a.tif", "b.tiff", "c.TIF", "d.ome.tif", "e.ome.tiff", "f.btf"]
    for name in names:
        image, _ = spot_image(rng, (128, 128), n_spots=10)
        if name.endswith(".btf"):
            tifffile.imwrite(d / name, image, bigtiff=True)
        elif ".ome." in name:
            tifffile.imwrite(d / name, image, ome=True)
        else:
            tifffile.imwrite(d / name, image)
    assert tifffile.TiffFile(d / "f.btf").is_bigtiff
    (d / "notes.txt").write_text("imaged on Tuesday\n")
    (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (d / "x.tif").write_bytes(b"")
    raw = (d / "a.tif").read_bytes()
    (d / "y.tif").write_bytes(raw[: len(raw) // 2])

    rc, _, err = _run(capsys, "count", d, "-o", tmp_path / "out")
    rows = _rows(tmp_path / "out" / "summary.csv")
    assert sorted(Path(r["image"]).name for r in rows) == sorted(names)
    assert all(r["n_spots"] == "10" for r in rows), [r["n_spots"] for r in rows]
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert any("x.tif: empty file (0 bytes)" in line for line in errors)
    assert any("y.tif: not a readable TIFF" in line for line in errors)
    assert "2 input(s) failed" in err
    assert not any("notes.txt" in line or ".DS_Store" in line for line in errors)
    assert "INFO: " + str(d / "notes.txt") + ": not an image file, skipped" in err
    assert "INFO: " + str(d / ".DS_Store") + ": not an image file, skipped" in err
    # Issue #2: a real failure makes the exit code 1; skipped non-image files do not.
    assert rc == 1
    (d / "x.tif").unlink()
    (d / "y.tif").unlink()
    rc, _, err = _run(capsys, "count", d, "-o", tmp_path / "out2")
    assert rc == 0, err


# --------------------------------------------------------------------------- C14


def _c14_image():
    rng = np.random.default_rng(1414)
    image, truth = spot_image(rng, (256, 256), n_spots=20, amp=300, dtype=np.float32)
    image[0] = np.nan
    image[100:116, 100:116] = np.nan
    image[50, 200], image[200, 50] = np.inf, -np.inf
    return image, truth


def _c14_check(coords, truth):
    assert np.all(np.isfinite(coords))
    assert abs(len(coords) - 20) <= 1, len(coords)
    pi, _ = match(coords, truth, 1.5)
    assert len(coords) - len(pi) <= 1  # nothing spurious, at the NaN block edges or elsewhere
    near_block = np.all((coords > 96) & (coords < 120), axis=1)
    assert not near_block.any() or np.all(
        [np.min(np.hypot(*(truth - c).T)) < 1.5 for c in coords[near_block]]
    )


@needs_default
def test_c14_nan_and_inf_pixels_api_and_cli(default, tmp_path, capsys, caplog):
    image, truth = _c14_image()
    with caplog.at_level(logging.WARNING, logger="piscis"):
        spots = detect(image, default, name="nan.tif")
    _c14_check(spots.coords, truth)
    assert "nan.tif: 514 non-finite (NaN or infinite) pixels are ignored" in caplog.text
    tifffile.imwrite(tmp_path / "nan.tif", image)
    tifffile.imwrite(tmp_path / "allnan.tif", np.full((64, 64), np.nan, np.float32))
    rc, _, err = _run(capsys, "count", tmp_path, "-o", tmp_path / "out")
    assert rc == 0, err
    _c14_check(_coords(tmp_path / "out" / "spots" / "nan.csv"), truth)
    assert "514 non-finite" in err
    assert f"{tmp_path / 'allnan.tif'}: 4096 non-finite" in err
    assert f"{tmp_path / 'allnan.tif'}: no spots detected" in err
    assert (tmp_path / "out" / "spots" / "allnan.csv").read_text() == SPOT_HEADER + "\n"


@needs_default
@needs_viewer
def test_c14_plugin_nan_image(make_napari_viewer, qtbot, _plugin_env):
    tnp = _viewer_helpers()
    image, truth = _c14_image()
    viewer = tnp._viewer(make_napari_viewer, show=False)
    w = tnp._dock(viewer, "Detect spots")
    w.model.set_path(MODELS_DIR / "default")
    for data, expect in ((image, truth), (np.full((64, 64), np.nan, np.float32), None)):
        layer = viewer.add_image(data)
        w.image.set_layer(layer)
        w.run()
        tnp._wait_idle(qtbot, w, 60_000)
        got = np.asarray(w.points_layer.data)
        n_bad = int(np.count_nonzero(~np.isfinite(data)))
        assert f"({n_bad} non-finite pixels ignored)" in w.status.text()
        if expect is None:
            assert len(got) == 0
        else:
            assert n_bad == 514
            _c14_check(got, expect)


# --------------------------------------------------------------------------- C15

C15_COMPRESSIONS = {
    "none": {},
    "lzw": {"compression": "lzw"},
    "lzw_predictor": {"compression": "lzw", "predictor": True},
    "deflate": {"compression": "zlib"},
    "zstd": {"compression": "zstd"},
    "packbits": {"compression": "packbits"},
}


@pytest.fixture(scope="module")
def c15_folder(tmp_path_factory):
    rng = np.random.default_rng(1515)
    image, truth = spot_image(rng, (512, 512), n_spots=30)
    d = tmp_path_factory.mktemp("c15")
    for name, opts in C15_COMPRESSIONS.items():
        tifffile.imwrite(d / f"{name}.tif", image, **opts)
    return d, image, truth


@needs_default
def test_c15_every_compression_reads_with_30_spots(c15_folder, tmp_path, capsys):
    d, image, truth = c15_folder
    for name in C15_COMPRESSIONS:
        assert np.array_equal(read_image(d / f"{name}.tif").image, image), name
    rc, _, err = _run(capsys, "count", d, "-o", tmp_path / "out")
    assert rc == 0, err
    rows = _rows(tmp_path / "out" / "summary.csv")
    assert len(rows) == 6
    assert all(abs(int(r["n_spots"]) - 30) <= 1 for r in rows), rows


def test_c15_without_imagecodecs_names_the_compression(c15_folder, tmp_path, capsys,
                                                      monkeypatch, tiny_model):  # fmt: skip
    """imagecodecs made unavailable (tifffile falls back on its pure-Python codecs):
    each file it cannot decode is named with its compression and the package to install;
    the others are counted."""
    import tifffile.tifffile as tt

    try:
        from tifffile import _imagecodecs as fallback
    except ImportError:
        pytest.skip("this tifffile has no pure-Python codec fallback")
    d, image, _ = c15_folder
    monkeypatch.setattr(tt, "imagecodecs", fallback)
    monkeypatch.setitem(tt.TIFF.__dict__, "DECOMPRESSORS", tt.CompressionCodec(encode=False))
    rc, _, err = _run(capsys, "count", d, "-o", tmp_path / "out", "--model", tiny_model)
    assert rc == 1
    errors = [line for line in err.splitlines() if line.startswith("ERROR: ")]
    unreadable = {"lzw": "LZW", "lzw_predictor": "LZW", "zstd": "ZSTD"}
    for name, comp in unreadable.items():
        line = next(e for e in errors if f"{name}.tif" in e)
        assert f"cannot decode its {comp} compression" in line, line
        assert "pip install imagecodecs" in line
    counted = {Path(r["image"]).stem for r in _rows(tmp_path / "out" / "summary.csv")}
    assert counted == {"none", "deflate", "packbits"}
    assert "no reader" not in err.lower()


# --------------------------------------------------------------------------- C16


@needs_viewer
def test_c16_review_widget(make_napari_viewer, qtbot, _plugin_env, tmp_path):
    """The C16 masks in the Review widget: all 7 cells, 10 spots each, label 65000 kept,
    the nucleus/cytoplasm split and cells.csv as the core gives them."""
    from test_count_cells import make_c16

    from piscis.cells import spots_per_cell

    tnp = _viewer_helpers()
    image, cells, nuclei, coords, boxes = make_c16()
    viewer = tnp._viewer(make_napari_viewer, show=False)
    viewer.add_image(image, name="c16")
    pts = viewer.add_points(coords, name="spots")
    review = tnp._dock(viewer, "Review cells")
    review.points.set_layer(pts)
    review.cells.set_layer(viewer.add_labels(cells, name="cells"))
    review.nuclei.set_layer(viewer.add_labels(nuclei, name="nuclei"))
    rows = review.count()
    assert [r["cell_id"] for r in rows] == sorted(boxes)
    assert all(r["n_spots"] == 10 for r in rows), [r["n_spots"] for r in rows]
    _, _, expected = spots_per_cell(coords, cells, nuclei)
    assert rows == expected
    assert int(np.sum(pts.features["cell_id"] == 0)) == 9  # 8 background + 1 off-cell nucleus
    assert review.table.rowCount() == 7
    review.export_path.setText(str(tmp_path / "cells.csv"))
    review.export()
    exported = {int(r["cell_id"]): int(r["n_spots"]) for r in _rows(tmp_path / "cells.csv")}
    assert exported == {k: 10 for k in boxes}


@needs_default
@pytest.mark.parametrize("tails", ["cut", "full"])
def test_c02_noise_free_image_gives_the_same_spots_in_every_dtype(default, tails):
    """A rendering with no noise (a flat background of 20 and 20 spots of 200) in every
    integer and float dtype, both byte orders: the same 20 spots each time. Before,
    uint16, float16, float32 and float64 gave 20, 26, 0 and 20 spots: the few pixels
    above the flat background are spots, and their spread was taken for the noise.
    ``full`` keeps every spot's Gaussian tail to the edge of the image (float64 holds
    values 1e-14 above the background far from any spot); ``cut`` stops it at 4 sigma."""
    rng = np.random.default_rng(2020)
    truth = rng.uniform(8, 120, (20, 2))
    while (
        np.min(np.hypot(*(truth[:, None] - truth[None]).transpose(2, 0, 1))[np.triu_indices(20, 1)])
        < 8
    ):
        truth = rng.uniform(8, 120, (20, 2))
    if tails == "cut":
        flat = 20.0 + render_spots((128, 128), truth, np.full(20, 1.0), np.full(20, 200.0))
    else:
        yy, xx = np.mgrid[:128, :128]
        flat = 20.0 + sum(200 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 2) for y, x in truth)
    dtypes = ["u1", "u2", "<u2", ">u2", "i2", ">i4", "u4", "f2", "<f4", ">f4", "f8", ">f8"]
    for dt in dtypes:
        kind = np.dtype(dt).kind
        data = (np.round(flat) if kind in "iu" else flat).astype(dt)
        got = detect(data, default).coords
        pi, _ = match(got, truth, 1.0)
        assert len(got) == 20 and len(pi) == 20, (dt, len(got), len(pi))


@needs_default
@pytest.mark.parametrize("dtype", ["u1", "u2", "i4", "f2", "f4", ">f4", "f8"])
@pytest.mark.parametrize("value", [0, 7])
def test_c02_flat_image_gives_no_spots_and_no_warning(default, dtype, value):
    """A flat image (a blank frame, a dead camera) of any dtype: 0 spots, and no numpy
    RuntimeWarning (a float32 frame of zeros divided 0 by 0)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(detect(np.full((64, 64), value, dtype), default)) == 0


@needs_default
def test_c02_float_images_at_any_scale_give_the_same_spots(default):
    """Float data in any unit: 1e-40 or 1e300 per grey level (beyond float32's range in
    float64), negative offsets; the same spots as the integer image."""
    rng = np.random.default_rng(202)
    image, truth = spot_image(rng, (192, 192), n_spots=20, amp=400)
    ref = detect(image, default).coords
    assert len(ref) == 20
    variants = {
        "f8*1e-20": image.astype(np.float64) * 1e-20,
        "f8*1e-40": image.astype(np.float64) * 1e-40,
        "f8*1e300": image.astype(np.float64) * 1e300,
        "f8-1e6": image.astype(np.float64) - 1e6,
        "f4*1e-20": image.astype(np.float32) * np.float32(1e-20),
        "f4*1e30": image.astype(np.float32) * np.float32(1e30),
    }
    for name, data in variants.items():
        got = detect(data, default).coords
        assert len(got) == 20, (name, len(got))
        pi, ti = match(got, ref, 0.5)
        assert len(pi) == 20, name


@needs_default
@pytest.mark.parametrize(
    "dtype, offset",
    [("int64", 2**34), ("uint32", 2**32 - 2**16), ("uint64", 2**40)],
    ids=["int64+2^34", "uint32_near_2^32", "uint64+2^40"],
)
def test_c02_large_integer_offsets_keep_their_spots(default, dtype, offset):
    """Integer data far from 0 (a camera's offset, a sum of frames): the spots of the
    same image at 0. float32, where the background was subtracted, spaces its values
    256 apart near 2^32 (positions 0.4 px off) and 2048 apart near 2^34 (no spot left);
    32- and 64-bit integers are now scaled in float64, which holds them exactly."""
    rng = np.random.default_rng(202)
    image, _ = spot_image(rng, (192, 192), n_spots=20, amp=400)
    ref = detect(image, default)
    assert len(ref) == 20
    data = image.astype(dtype) + np.array(offset, dtype)
    assert np.array_equal(data - np.array(offset, dtype), image)  # the offset is exact
    got = detect(data, default)
    pi, ti = match(got.coords, ref.coords, 0.5)
    assert len(got) == 20 and len(pi) == 20, (len(got), len(pi))
    assert np.abs(got.coords[pi] - ref.coords[ti]).max() < 0.01
    np.testing.assert_allclose(got.intensity[pi], ref.intensity[ti], rtol=1e-6, atol=1e-6)


def test_c12_pipes_links_and_folders_are_named_not_hung(tmp_path, capsys, tiny_model):
    """A named FIFO or a dangling link given as an image: one error line each, no hang;
    in a folder they (and a folder named like an image) are skipped with an info line;
    the image is counted."""
    rng = np.random.default_rng(212)
    d = tmp_path / "in"
    d.mkdir()
    tifffile.imwrite(d / "good.tif", spot_image(rng, (96, 96), n_spots=5)[0])
    os.mkfifo(d / "pipe.tif")
    (d / "gone.tif").symlink_to(tmp_path / "missing.tif")
    (d / "sub.tif").mkdir()
    args = ["-o", tmp_path / "o1", "-q", "--model", tiny_model]
    rc, _, err = _run(capsys, "count", d / "pipe.tif", d / "gone.tif", d / "good.tif", *args)
    assert rc == 1
    assert "pipe.tif: not a regular file" in err and "gone.tif: no such file" in err
    assert [Path(r["image"]).name for r in _rows(tmp_path / "o1" / "summary.csv")] == ["good.tif"]
    rc, _, err = _run(capsys, "count", d, "-o", tmp_path / "o2", "-v", "--model", tiny_model)
    assert rc == 0
    for line in (
        "gone.tif: a link to a missing file",
        "pipe.tif: not a regular file",
        "sub.tif: a folder (not a Zarr array)",
    ):
        assert line in err
    assert [Path(r["image"]).name for r in _rows(tmp_path / "o2" / "summary.csv")] == ["good.tif"]


def test_c18_bad_stream_pixels_setting_is_one_line(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(218)
    tifffile.imwrite(tmp_path / "a.tif", spot_image(rng, (64, 64), n_spots=3)[0])
    monkeypatch.setenv("PISCIS_STREAM_PIXELS", "abc")
    rc, _, err = _run(capsys, "count", tmp_path / "a.tif", "-o", tmp_path / "o", "-q")
    assert rc == 2
    assert "PISCIS_STREAM_PIXELS='abc': expected a whole number" in err
    assert "Traceback" not in err


@needs_default
@pytest.mark.parametrize("fill", [100, 0, 37, 900])
def test_c01_constant_surround_is_not_taken_for_the_noise(default, fill):
    """One cell kept, its surround set to one value (the background, 0 for a mask, any
    other): the surround holds no noise. Set to the background it gave 1851 spots for
    the 12 of the cell (the noise was measured as 0 over most of the image)."""
    rng = np.random.default_rng(120)
    yy, xx = np.mgrid[:512, :512]
    grid = np.stack(np.meshgrid(np.arange(32, 512, 64), np.arange(32, 512, 64)), -1)
    pts = grid.reshape(-1, 2) + rng.uniform(-3, 3, (64, 2))
    image = rng.normal(100, 5, (512, 512)) + render_spots(
        (512, 512), pts, np.full(64, 1.0), np.full(64, 400.0)
    )
    cell = np.hypot(yy - 256, xx - 256) < 120
    inside = pts[cell[tuple(np.round(pts).astype(int).T)]]
    data = np.where(cell, image, fill).round().astype(np.uint16)
    got = detect(data, default).coords
    pi, _ = match(got, inside, 1.5)
    assert len(inside) == 12 and len(pi) == 12 and len(got) <= 13, len(got)


@needs_default
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_c01_noise_clipped_at_zero_is_not_stretched_into_spots(default, dtype):
    """Background taken away (or a camera offset removed) and clipped at 0: more than
    half the pixels are 0. Pure noise gave 14261 spots when the noise fell to its
    floor; the spots of a real image must all stay, and nothing else."""
    rng = np.random.default_rng(11)
    noise = np.clip(np.round(rng.normal(0.0, 5.0, (512, 512))), 0, None).astype(dtype)
    assert len(detect(noise, default)) <= 1
    image, truth = spot_image(rng, (256, 256), n_spots=40)
    sub = np.clip(image.astype(np.int64) - 100, 0, None).astype(dtype)
    got = detect(sub, default).coords
    pi, _ = match(got, truth, 1.5)
    assert len(got) == 40 and len(pi) == 40, len(got)
    assert 4.0 < estimate_normalization(noise).noise < 8.0  # sigma 5, from the half above 0
