"""The napari plugin in a real viewer (pytest-qt, napari's make_napari_viewer).

Run under a display: ``xvfb-run -a pytest tests/test_napari_plugin.py``. Skipped
without napari, pytest-qt or a display. Set PISCIS_SCREENSHOTS=docs to write the
widget screenshots into docs/ (else they go to the test's tmp folder).
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")
if not (
    os.environ.get("DISPLAY")
    or os.environ.get("WAYLAND_DISPLAY")
    or os.environ.get("QT_QPA_PLATFORM") == "offscreen"
):
    pytest.skip("no display: run the napari tests under `xvfb-run -a`", allow_module_level=True)

from qtpy.QtCore import QPoint, Qt, QTimer  # noqa: E402

from piscis.annotate import is_model_folder  # noqa: E402
from piscis.io import MODELS_DIR  # noqa: E402
from piscis.synth import spot_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CELL_HEADER = (
    "image,cell_id,area,n_spots,n_spots_nucleus,n_spots_cytoplasm,centroid_y,centroid_x,"
    "touches_border,dense"
)


@pytest.fixture(scope="module")
def model_path():
    """The shipped default model (PISCIS_TEST_MODEL overrides, for development)."""
    env = os.environ.get("PISCIS_TEST_MODEL")
    path = Path(env) if env else MODELS_DIR / "default"
    if not is_model_folder(path):
        pytest.skip(f"no model at {path} (the shipped default model is not built yet)")
    return path


@pytest.fixture(autouse=True)
def _private_models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PISCIS_MODELS_DIR", str(tmp_path / "user_models"))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


def _register():
    """napari's test support hides installed plugins: register ours, from its entry point."""
    import npe2

    pm = npe2.PluginManager.instance()
    try:
        pm.get_manifest("piscis")
    except KeyError:
        pm.register(npe2.PluginManifest.from_distribution("piscis"))


def _viewer(make_napari_viewer, show=True):
    viewer = make_napari_viewer(show=show)
    _register()
    if show:
        viewer.window._qt_window.resize(1500, 950)
    return viewer


def _dock(viewer, title):
    """Open one of our widgets from the plugin's manifest; hide the others (they live on)."""
    dock, widget = viewer.window.add_plugin_dock_widget("piscis", title)
    _only(viewer, dock)
    return widget


def _only(viewer, dock):
    from qtpy.QtWidgets import QDockWidget

    for d in viewer.window._qt_window.findChildren(QDockWidget):
        if "(piscis)" in d.windowTitle() or "piscis" in d.objectName():
            d.setVisible(d is dock)


def _wait_idle(qtbot, widget, timeout=180_000):
    qtbot.waitUntil(lambda: widget._worker is None, timeout=timeout)


def _shot(viewer, qtbot, tmp_path, name):
    """A screenshot of the whole window, notifications closed; checked not blank."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for w in viewer.window._qt_window.findChildren(NapariQtNotification):
        w.close()
    qtbot.wait(300)
    folder = Path(os.environ.get("PISCIS_SCREENSHOTS") or tmp_path)
    if not folder.is_absolute():
        folder = ROOT / folder
    folder.mkdir(parents=True, exist_ok=True)
    img = viewer.screenshot(path=str(folder / name), canvas_only=False, flash=False)
    assert img.shape[0] > 500 and img.shape[1] > 900
    assert img[..., :3].std() > 10  # not a blank window
    return img


def _click(viewer, qtbot, world_yx):
    """A real left click on the canvas at a world position (y, x)."""
    native = viewer.window._qt_viewer.canvas.native
    cy, cx = _cam(viewer).center[-2:]
    zoom = _cam(viewer).zoom
    x = (world_yx[1] - cx) * zoom + native.width() / 2
    y = (world_yx[0] - cy) * zoom + native.height() / 2
    qtbot.mouseClick(native, Qt.LeftButton, pos=QPoint(int(round(x)), int(round(y))))
    qtbot.wait(20)


def _assert_responsive(ticks, detect, elapsed=None):
    """The click returned at once, the event loop ran all along the detection (a 10 ms
    timer never waited more than 0.25 s), and putting the result in the viewer took
    under a second."""
    t0, t1 = detect.result_shown
    assert t1 - t0 < 1.0, f"showing the result took {t1 - t0:.2f} s"
    ticks = np.asarray(ticks)
    assert detect.run_returned - ticks[0] < 0.5, "the Detect click blocked"
    before = ticks[(ticks >= detect.run_returned) & (ticks <= t0)]
    assert len(before) > 5
    gaps = np.diff(before)
    assert gaps.max() < 0.25, f"GUI blocked for {gaps.max():.2f} s during the detection"
    if elapsed is not None:
        assert gaps.max() < elapsed / 4


def _cam(viewer):
    from piscis.napari._layers import camera

    return camera(viewer)


def _truth(name):
    from piscis.io import read_spots

    return read_spots(ROOT / "sample_data" / f"{name}.truth.csv")


# --------------------------------------------------------------------------- reader, writer


def test_manifest_and_sample_data(make_napari_viewer):
    import npe2

    viewer = _viewer(make_napari_viewer, show=False)
    mf = npe2.PluginManager.instance().get_manifest("piscis")
    assert {w.display_name for w in mf.contributions.widgets} == {
        "Detect spots", "Annotate spots", "Train a model", "Review cells"
    }  # fmt: skip
    keys = {s.key for s in mf.contributions.sample_data}
    assert {"hybiss_2d", "synthetic_simple", "nuclei_2d"} <= keys
    viewer.open_sample("piscis", "nuclei_2d")
    img, labels = viewer.layers
    assert img.data.shape == (512, 512) and labels.__class__.__name__ == "Labels"
    assert len(np.unique(labels.data)) - 1 == 125
    # Every widget opens from the manifest, and once closed the viewer's events leave it alone.
    from qtpy.QtWidgets import QApplication

    docks = [
        viewer.window.add_plugin_dock_widget("piscis", w.display_name)[0]
        for w in mf.contributions.widgets
    ]
    for dock in docks:
        viewer.window.remove_dock_widget(dock)
    for _ in range(3):
        QApplication.processEvents()
        QApplication.sendPostedEvents(None, 0)  # runs the deleteLater of the docks
    viewer.add_points(np.zeros((1, 2)), name="after closing")
    img.name = "renamed"
    viewer.layers.remove("after closing")


def test_points_save_and_read_back_on_the_same_pixels(make_napari_viewer, tmp_path):
    viewer = _viewer(make_napari_viewer, show=False)
    rng = np.random.default_rng(0)
    image, coords = spot_image(rng, (64, 64), n_spots=5)
    img = viewer.add_image(image, scale=(0.5, 0.5), translate=(10.0, -4.0))
    pts = viewer.add_points(
        coords,
        scale=img.scale,
        translate=img.translate,
        features={"score": rng.uniform(0, 1, 5), "intensity": rng.uniform(1, 9, 5),
                  "cell_id": np.arange(5)},
    )  # fmt: skip
    path = tmp_path / "spots.csv"
    written = pts.save(str(path), plugin="piscis")
    assert Path(written[0]) == path and path.exists()
    header = path.read_text().splitlines()[0]
    assert header.startswith("y,x,score,intensity,cell_id") and "scale_y" in header
    (back,) = viewer.open(str(path), plugin="piscis")
    np.testing.assert_allclose(back.data, pts.data, atol=1e-4)
    np.testing.assert_allclose(back.scale, (0.5, 0.5))
    np.testing.assert_allclose(back.translate, (10.0, -4.0))
    # Same pixels of the image: world positions agree, and so do the image's pixels under them.
    world = np.array([back.data_to_world(p) for p in back.data])
    np.testing.assert_allclose(world, [pts.data_to_world(p) for p in pts.data], atol=1e-4)
    np.testing.assert_allclose([img.world_to_data(w) for w in world], coords, atol=1e-3)
    np.testing.assert_allclose(back.features["score"], pts.features["score"], atol=1e-4)
    np.testing.assert_array_equal(back.features["cell_id"], np.arange(5))


def test_napari_own_points_export_and_label_masks_are_read(make_napari_viewer, tmp_path):
    import tifffile

    viewer = _viewer(make_napari_viewer, show=False)
    pts = viewer.add_points(np.array([[3.25, 4.5], [10.0, 20.0]]), features={"score": [0.2, 0.8]})
    path = tmp_path / "napari_export.csv"
    pts.save(str(path), plugin="napari")  # napari's own writer: index,axis-0,axis-1,...
    assert path.read_text().startswith("index,axis-0,axis-1")
    (back,) = viewer.open(str(path), plugin="piscis")
    assert back.__class__.__name__ == "Points"
    np.testing.assert_allclose(back.data, pts.data)
    np.testing.assert_allclose(back.features["score"], [0.2, 0.8])
    assert {"score", "intensity", "cell_id"} <= set(back.features.columns)
    labels = np.zeros((32, 32), np.uint16)
    labels[2:10, 2:10] = 7
    labels[15:30, 15:30] = 65000
    tifffile.imwrite(tmp_path / "img.labels.tif", labels)
    (lab,) = viewer.open(str(tmp_path / "img.labels.tif"), plugin="piscis")
    assert lab.__class__.__name__ == "Labels"
    np.testing.assert_array_equal(lab.data, labels)


# --------------------------------------------------------------------------- the workflow


def test_workflow_detect_threshold_annotate_train_review_export(
    make_napari_viewer, qtbot, tmp_path, model_path
):
    viewer = _viewer(make_napari_viewer)
    viewer.open_sample("piscis", "synthetic_simple")
    (image,) = viewer.layers
    truth = _truth("synthetic_simple")

    # ---- detect: in a worker, with a progress bar, the viewer responsive
    detect = _dock(viewer, "Detect spots")
    detect.model.set_path(model_path)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    detect.run_button.click()
    assert detect._worker is not None and detect._pbar is not None  # running in the background
    _wait_idle(qtbot, detect, 60_000)
    timer.stop()
    _assert_responsive(ticks, detect)
    points = detect.points_layer
    assert points is not None and points in viewer.layers
    assert points.border_color_mode == "colormap"  # rings coloured by score
    assert np.allclose(np.asarray(points.face_color)[:, 3], 0)  # hollow: the spot shows
    from piscis.metrics import score

    s = score(points.data, truth)
    assert s.f1_int > 0.8 and abs(len(points.data) - len(truth)) <= 3, (s, len(points.data))
    assert {"score", "intensity"} <= set(points.features.columns)
    assert (points.features["score"] >= detect.threshold.value() - 1e-6).all()

    # ---- the threshold slider: live, from the cache
    n0, t_model = len(points.data), detect.threshold.value()
    assert t_model == pytest.approx(
        json.loads((model_path / "config.json").read_text())["threshold"]
    )
    detect.threshold.setValue(0.99)
    n_hi = len(points.data)
    assert detect.last_update_s < 0.5
    detect.threshold.setValue(0.05)
    n_lo = len(points.data)
    assert n_hi <= n0 <= n_lo  # (the spots of this image are all sure ones; see below)
    cands = detect._result["candidates"]
    assert n_hi == cands.count(0.99) and n_lo == cands.count(0.05)
    detect.threshold.setValue(t_model)
    assert len(points.data) == n0

    # ---- annotate three points with napari's add tool (real clicks), snapped
    annotate = _dock(viewer, "Annotate spots")
    annotate.image.set_layer(image)
    annotate.source.setCurrentIndex(0)  # from nothing
    ann = annotate.new_annotation_layer()
    assert ann.mode == "add" and len(ann.data) == 0
    # the fully annotated region: a band at the top, half outside the image (clipped)
    first = truth[np.argsort(truth[:, 0])[:3]]
    lo = np.array([-30.0, first[:, 1].min() - 10])
    hi = np.array([first[:, 0].max() + 6, first[:, 1].max() + 10])
    inside = truth[np.all((truth >= lo) & (truth <= hi), axis=1)]
    assert len(inside) >= 3
    offset = np.array([1.2, -0.9])
    _cam(viewer).center = tuple(inside.mean(0))
    _cam(viewer).zoom = 3.0
    for p in inside:
        _click(viewer, qtbot, p + offset)
    assert len(ann.data) == len(inside)
    d = np.linalg.norm(ann.data[:, None] - inside[None], axis=2).min(1)
    assert d.max() < 0.6, d  # snapped from 1.5 px away onto the spots
    # delete one (select + delete, as the layer's delete button does) and click it back
    ann.mode = "select"
    ann.selected_data = {0}
    ann.remove_selected()
    assert len(ann.data) == len(inside) - 1
    ann.mode = "add"
    _click(viewer, qtbot, inside[0] + offset)
    assert len(ann.data) == len(inside)
    # move one (what the select tool's drag does to the layer), and back
    moved = np.array(ann.data)
    moved[1] += (0.5, 0.0)
    ann.data = moved
    assert len(ann.data) == len(inside) and np.allclose(ann.data[1], moved[1])
    moved[1] -= (0.5, 0.0)
    ann.data = moved
    region = annotate.new_region_layer()
    region.add_rectangles(np.array([lo, hi]))
    points.visible = False  # the screenshot shows the annotations alone
    _cam(viewer).center = ((max(lo[0], 0) + hi[0]) / 2, (lo[1] + hi[1]) / 2)
    _cam(viewer).zoom = 600 / (hi[1] - lo[1])
    _shot(viewer, qtbot, tmp_path, "napari_annotate.png")
    points.visible = True
    viewer.reset_view()
    annotate.folder.setText(str(tmp_path / "pairs"))
    annotate.name.setText("simple")
    paths = annotate.save()
    assert paths is not None and set(paths) == {"image", "spots", "frame", "mask"}
    from piscis.data import load_pairs

    (pair,) = load_pairs(tmp_path / "pairs")
    np.testing.assert_array_equal(pair.image, image.data)
    np.testing.assert_allclose(np.sort(pair.coords, 0), np.sort(ann.data, 0), atol=1e-3)
    ys, xs = np.nonzero(pair.region)
    assert ys.min() == 0 and abs(ys.max() - hi[0]) <= 1  # clipped at the top edge
    assert abs(xs.min() - lo[1]) <= 1 and abs(xs.max() - hi[1]) <= 1

    # ---- train one short epoch from the widget; the model appears in Detect's list
    train = _dock(viewer, "Train a model")
    assert [train.layers.item(i).text() for i in range(train.layers.count())] == [ann.name]
    assert train.init.path() is not None and train.init.path().resolve() == model_path.resolve()
    train.epochs.setValue(1)
    train.steps.setValue(3)
    train.train_button.click()
    assert train._worker is not None and not train.train_button.isEnabled()
    _wait_idle(qtbot, train, 180_000)
    out = train.result_path
    assert out is not None and is_model_folder(out), train.status.text()
    cfg = json.loads((out / "config.json").read_text())
    assert len(cfg["training"]["history"]) == 1
    assert cfg["training"]["init"] == str(model_path)
    assert len(train.plot.steps) == 3 and len(train.plot.val_f1) == 1
    listed = [detect.model.combo.itemData(i) for i in range(detect.model.combo.count())]
    assert str(out) in listed and detect.model.path() == out

    # ---- review: cells as labels, counts, sort, click, colour, export
    cells = np.zeros(image.data.shape, np.int32)
    cells[:256, :256], cells[:256, 256:], cells[256:, :200] = 1, 2, 3
    nuclei = np.zeros_like(cells)
    nuclei[60:200, 60:200], nuclei[60:200, 320:460], nuclei[300:460, 40:160] = 1, 2, 3
    cells_layer = viewer.add_labels(cells, name="cells")
    nuclei_layer = viewer.add_labels(nuclei, name="nuclei", visible=False)
    for ly in (cells_layer, nuclei_layer):
        viewer.layers.move(viewer.layers.index(ly), 1)  # under the spots
    review = _dock(viewer, "Review cells")
    review.points.set_layer(points)
    review.cells.set_layer(cells_layer)
    review.nuclei.set_layer(nuclei_layer)
    rows = review.count()
    pix = np.floor(points.data + 0.5).astype(int)
    cell_of, nuc_of = cells[pix[:, 0], pix[:, 1]], nuclei[pix[:, 0], pix[:, 1]]
    expected = {k: int(np.sum(cell_of == k)) for k in (1, 2, 3)}
    assert {r["cell_id"]: r["n_spots"] for r in rows} == expected
    in_nuc = {k: int(np.sum((cell_of == k) & (nuc_of > 0))) for k in (1, 2, 3)}
    assert {r["cell_id"]: r["n_spots_nucleus"] for r in rows} == in_nuc
    assert {r["cell_id"]: r["n_spots_cytoplasm"] for r in rows} == {
        k: expected[k] - in_nuc[k] for k in expected
    }
    assert 0 < sum(in_nuc.values()) < sum(expected.values())
    assert list(points.features["cell_id"]) == list(cells[pix[:, 0], pix[:, 1]])
    assert review.table.rowCount() == 3
    header = review.table.horizontalHeader()
    x = header.sectionViewportPosition(1) + 5
    qtbot.mouseClick(header.viewport(), Qt.LeftButton, pos=QPoint(x, 5))
    order = [r for r in review.row_cell_ids()]
    counts = [expected[c] for c in order]
    assert counts in (sorted(counts), sorted(counts, reverse=True)) and len(set(counts)) > 1
    qtbot.mouseClick(header.viewport(), Qt.LeftButton, pos=QPoint(x, 5))
    assert [expected[c] for c in review.row_cell_ids()] == counts[::-1]
    top = review.row_cell_ids()[0]
    rect = review.table.visualItemRect(review.table.item(0, 1))
    qtbot.mouseClick(review.table.viewport(), Qt.LeftButton, pos=rect.center())
    row = next(r for r in rows if r["cell_id"] == top)
    np.testing.assert_allclose(_cam(viewer).center[-2:], (row["centroid_y"], row["centroid_x"]))
    assert cells_layer.selected_label == top
    assert points.selected_data == set(np.flatnonzero(points.features["cell_id"] == top).tolist())
    review.colour.setCurrentText("n_spots")
    cm = cells_layer.colormap
    lo_id = min(expected, key=expected.get)
    hi_id = max(expected, key=expected.get)
    np.testing.assert_allclose(
        cm.map(np.array([hi_id]))[0],
        napari.utils.colormaps.ensure_colormap("viridis").map(np.array([1.0]))[0],
        atol=1e-3,
    )
    assert not np.allclose(cm.map(np.array([lo_id])), cm.map(np.array([hi_id])))
    region.visible = ann.visible = False
    _shot(viewer, qtbot, tmp_path, "napari_review.png")
    review.export_path.setText(str(tmp_path / "cells.csv"))
    assert review.export() == tmp_path / "cells.csv"
    with open(tmp_path / "cells.csv") as f:
        lines = list(csv.reader(f))
    assert ",".join(lines[0]) == CELL_HEADER
    assert {int(r[1]): int(r[3]) for r in lines[1:]} == expected
    assert {int(r[1]): int(r[4]) for r in lines[1:]} == in_nuc
    assert all(r[0] == "synthetic_simple" for r in lines[1:])
    review.colour.setCurrentText("(none)")
    assert cells_layer.colormap is not cm


# --------------------------------------------------------------------------- focused tests


def test_detect_stays_responsive_and_colours_by_score(
    make_napari_viewer, qtbot, tmp_path, model_path
):
    """A 1024x1024 image: the GUI keeps running while the network does; the slider
    shows spots appear and vanish from the cached maps."""
    viewer = _viewer(make_napari_viewer)
    viewer.open_sample("piscis", "synthetic_cells")
    (image,) = viewer.layers
    big = np.tile(np.asarray(image.data), (2, 2))
    image2 = viewer.add_image(big, name="cells 1024")
    detect = _dock(viewer, "Detect spots")
    detect.image.set_layer(image2)
    detect.model.set_path(model_path)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    t0 = time.perf_counter()
    detect.run_button.click()
    _wait_idle(qtbot, detect, 120_000)
    elapsed = time.perf_counter() - t0
    timer.stop()
    _assert_responsive(ticks, detect, elapsed)
    points = detect.points_layer
    n = {}
    for t in (0.2, 0.5, 0.8):
        detect.threshold.setValue(t)
        n[t] = len(points.data)
        assert detect.last_update_s < 0.5
    assert n[0.2] >= n[0.5] >= n[0.8] and n[0.2] > n[0.8]
    detect.threshold.setValue(0.3)
    colours = np.asarray(points.border_color)
    scores = np.asarray(points.features["score"])
    lo, hi = np.argmin(scores), np.argmax(scores)
    assert not np.allclose(colours[lo], colours[hi])  # coloured by score
    _cam(viewer).center = (256, 256)
    _cam(viewer).zoom = 1.5
    _shot(viewer, qtbot, tmp_path, "napari_detect.png")


def test_detect_picks_a_channel(make_napari_viewer, qtbot, model_path):
    """A CYX layer: the widget offers the axes that can run and detects in the chosen channel."""
    rng = np.random.default_rng(7)
    spots, truth = spot_image(rng, (128, 128), n_spots=15)
    yy, xx = np.mgrid[:128, :128]
    blob = (100 + 800 * (((yy - 64) ** 2 + (xx - 64) ** 2) < 30**2)).astype(np.uint16)
    viewer = _viewer(make_napari_viewer, show=False)
    viewer.add_image(np.stack([blob, spots]), name="two channels")
    detect = _dock(viewer, "Detect spots")
    detect.model.set_path(model_path)
    assert [detect.axes.itemText(i) for i in range(detect.axes.count())] == ["CYX", "ZYX"]
    assert detect.channel.isEnabled() and detect.channel.maximum() == 1
    detect.channel.setValue(1)
    detect.run()
    _wait_idle(qtbot, detect, 60_000)
    from piscis.metrics import score

    got = detect.points_layer.data
    assert score(got, truth).f1_int > 0.8, len(got)


def test_detect_slider_shows_the_model_threshold_and_detect_keeps_the_users(
    make_napari_viewer, qtbot, model_path
):
    rng = np.random.default_rng(8)
    image, _ = spot_image(rng, (128, 128), n_spots=25)
    viewer = _viewer(make_napari_viewer, show=False)
    viewer.add_image(image, name="spots")
    detect = _dock(viewer, "Detect spots")
    detect.model.set_path(model_path)
    own = json.loads((model_path / "config.json").read_text())["threshold"]
    assert detect.threshold.value() == pytest.approx(own)  # before any detection
    detect.threshold.setValue(0.3)
    detect.run()
    _wait_idle(qtbot, detect, 60_000)
    assert detect.threshold.value() == pytest.approx(0.3)  # not reset by the detection
    scores = np.asarray(detect.points_layer.features["score"])
    assert len(scores) and scores.min() >= 0.3 - 1e-6
    assert len(scores) == detect._result["candidates"].count(0.3)


def test_train_cancel_keeps_the_best_checkpoint(make_napari_viewer, qtbot, tmp_path, model_path):
    rng = np.random.default_rng(11)
    image, truth = spot_image(rng, (256, 256), n_spots=40, amp=150)
    viewer = _viewer(make_napari_viewer)
    img = viewer.add_image(image, name="dim spots")
    annotate = _dock(viewer, "Annotate spots")
    annotate.image.set_layer(img)
    annotate.snap.setChecked(False)
    ann = annotate.new_annotation_layer()
    ann.add(truth)
    assert len(ann.data) == len(truth)
    train = _dock(viewer, "Train a model")
    train.init.set_path(model_path)
    train.epochs.setValue(20)
    train.steps.setValue(8)
    train.train_button.click()
    qtbot.waitUntil(lambda: len(train.history) >= 2, timeout=240_000)
    train.cancel_button.click()
    assert not train.cancel_button.isEnabled()
    _wait_idle(qtbot, train, 120_000)
    out = train.result_path
    assert out is not None and is_model_folder(out), train.status.text()
    cfg = json.loads((out / "config.json").read_text())
    tr = cfg["training"]
    assert tr["stopped_early"] is True and 2 <= len(tr["history"]) < 20
    f1 = [h["val"]["f1_int"] for h in tr["history"] if "val" in h]
    assert tr["best_epoch"] == int(np.argmax(f1))
    assert cfg["metrics"]["validation"]["f1_int"] == pytest.approx(max(f1), abs=1e-6)
    assert (out.with_name(out.name + ".ckpt") / "best.pt").exists()
    assert len(train.plot.val_f1) == len(f1) and len(train.plot.steps) >= 16
    _shot(viewer, qtbot, tmp_path, "napari_train.png")


def test_review_segments_nuclei_from_a_channel(make_napari_viewer, qtbot, tmp_path):
    viewer = _viewer(make_napari_viewer, show=False)
    viewer.open_sample("piscis", "nuclei_2d")
    dapi = viewer.layers["nuclei_2d"]
    viewer.layers.remove("nuclei_2d labels")
    rng = np.random.default_rng(2)
    pts = viewer.add_points(rng.uniform(0, 511, (300, 2)), name="spots")
    review = _dock(viewer, "Review cells")
    review.nuclear.set_layer(dapi)
    review.diameter.setValue(24)
    review.segment_button.click()
    _wait_idle(qtbot, review, 60_000)
    nuclei, cells = viewer.layers["nuclei_2d nuclei"], viewer.layers["nuclei_2d cells"]
    assert 100 <= nuclei.data.max() <= 150  # 125 nuclei in the sample
    assert review.cells.layer() is cells and review.nuclei.layer() is nuclei
    review.points.set_layer(pts)
    rows = review.count()
    assert len(rows) == len(np.unique(cells.data)) - 1
    assert sum(r["n_spots"] for r in rows) == int((pts.features["cell_id"] > 0).sum())
    for r in rows:
        assert r["n_spots_nucleus"] + r["n_spots_cytoplasm"] == r["n_spots"]
    assert sum(r["n_spots_nucleus"] for r in rows) > 0


def test_review_picks_the_labels_layer_and_lists_cells_by_id(make_napari_viewer, qtbot):
    """The fresh-user path: the sample's labels are the cells without choosing them, and
    the table lists cell 1 first (the header's arrow says ascending)."""
    viewer = _viewer(make_napari_viewer, show=False)
    viewer.open_sample("piscis", "nuclei_2d")
    labels = viewer.layers["nuclei_2d labels"]
    rng = np.random.default_rng(3)
    viewer.add_points(rng.uniform(0, 511, (200, 2)), name="spots")
    review = _dock(viewer, "Review cells")
    assert review.cells.layer() is labels
    assert review.nuclei.layer() is None  # only the cells combo picks by itself
    rows = review.count()
    ids = review.row_cell_ids()
    assert len(rows) == len(ids) > 10 and ids == sorted(ids)
    review.cells.setCurrentIndex(0)  # the user's own choice, "(none)", is kept
    review.cells.activated.emit(0)
    viewer.add_labels(np.zeros((512, 512), np.int32), name="more labels")
    assert review.cells.layer() is None
