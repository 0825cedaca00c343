"""Detect widget: image layer, model, channel, scale -> a Points layer coloured
by score; a threshold slider that re-decodes live from the cached network output."""

from __future__ import annotations

import time

import numpy as np
from napari.layers import Image, Points, Shapes
from napari.qt.threading import create_worker
from napari.utils import progress
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QLabeledDoubleSlider

from ..annotate import MIN_THRESHOLD, detect_candidates
from . import _layers
from ._common import (
    LayerCombo,
    ModelChooser,
    Relay,
    WorkerMixin,
    notify_error,
    notify_info,
    state_for,
    status_label,
)
from ._io import POINTS_STYLE, SCORE_COLORS


class DetectWidget(WorkerMixin, QWidget):
    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self._worker = None
        self._pbar = None
        self._result: dict | None = None  # candidates, points layer, image layer
        self.last_update_s = float("nan")  # seconds of the last re-threshold
        self.result_shown = (float("nan"), float("nan"))  # perf_counter span of showing it
        self.run_returned = float("nan")  # when the Detect click handed the work to the worker

        self.image = LayerCombo(napari_viewer, (Image,))
        self.axes = QComboBox()
        self.axes.setToolTip(
            "How the image's axes are read: C = channels, Z = planes of a volume (3D "
            "detection, 3D points), T = time points (the one shown in the viewer is detected)"
        )
        self.channel = QSpinBox()
        self.channel.setRange(0, 0)
        self.channel.setToolTip("Channel of a multi-channel image (0-based)")
        self.model = ModelChooser(self.state)
        self.scale = QDoubleSpinBox()
        self.scale.setRange(0.05, 20.0)
        self.scale.setSingleStep(0.05)
        self.scale.setDecimals(2)
        self.scale.setToolTip(
            "Resize before the network: < 1 for spots larger than 2-3 px; "
            "positions come back in the image's pixels"
        )
        self.threshold = QLabeledDoubleSlider(Qt.Horizontal)
        self.threshold.setRange(MIN_THRESHOLD, 0.99)
        self.threshold.setDecimals(2)
        self.threshold.setSingleStep(0.01)
        self.threshold.setValue(0.5)
        self.threshold.setToolTip("Spot probability threshold: re-decoded live, no network run")
        self.roi = LayerCombo(napari_viewer, (Shapes,), none_text="(whole image)")
        self.roi.setToolTip(
            "A Shapes layer: detect only in the bounding box of its shapes (clipped to the "
            "image; the spots are those the whole image gives there)"
        )
        self.run_button = QPushButton("Detect")
        self.status = status_label()

        form = QFormLayout()
        form.addRow("image", self.image)
        form.addRow("axes", self.axes)
        form.addRow("channel", self.channel)
        form.addRow("model", self.model)
        form.addRow("scale", self.scale)
        form.addRow("threshold", self.threshold)
        form.addRow("region", self.roi)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.run_button)
        lay.addWidget(self.status)
        lay.addStretch(1)

        self.relay = Relay()
        self.relay.progressed.connect(self._on_progress)
        self.image.currentIndexChanged.connect(self._on_image_changed)
        self.axes.currentIndexChanged.connect(self._on_axes_changed)
        self.model.combo.currentIndexChanged.connect(self._on_model_changed)
        self.threshold.valueChanged.connect(self.apply_threshold)
        self.run_button.clicked.connect(self.run)
        self._on_image_changed()
        self._on_model_changed()

    # ------------------------------------------------------------------ fields

    def _on_image_changed(self, *_):
        layer = self.image.layer()
        self.axes.blockSignals(True)
        self.axes.clear()
        if layer is not None:
            self.axes.addItems(_layers.layer_axes_choices(layer))
        self.axes.blockSignals(False)
        self._on_axes_changed()

    def _on_axes_changed(self, *_):
        layer, axes = self.image.layer(), self.axes.currentText()
        n = 1
        if layer is not None and "C" in axes:
            shape = _layers.layer_shape(layer)
            n = shape[axes.index("C")]
        self.channel.setRange(0, max(n - 1, 0))
        self.channel.setEnabled(n > 1)
        self.axes.setEnabled(self.axes.count() > 1)

    def _on_model_changed(self, *_):
        path = self.model.path()
        self.state.current_model = path
        if path is None:
            return
        try:
            import json

            cfg = json.loads((path / "config.json").read_text())
            self.scale.setValue(float(cfg.get("scale", 1.0)))
            # The slider shows the chosen model's own threshold; detecting keeps
            # whatever the user sets after that.
            self.threshold.blockSignals(True)
            self.threshold.setValue(float(cfg.get("threshold", 0.5)))
            self.threshold.blockSignals(False)
        except (OSError, ValueError, TypeError):
            pass

    # ------------------------------------------------------------------ running

    def run(self) -> None:
        """Detect on the chosen image in a worker thread."""
        if self._worker is not None:
            return
        layer = self.image.layer()
        model_path = self.model.path()
        if layer is None:
            notify_error("piscis: add an image layer first")
            return
        if model_path is None:
            notify_error("piscis: no model; choose a model folder with Browse...")
            return
        axes, channel = self.axes.currentText(), self.channel.value()
        t = None
        if "T" in axes:  # one time point: the one the viewer shows, else the first
            t = _layers.current_index(self.viewer, layer, axes.index("T"))
            t = 0 if t is None else t
        try:
            img = _layers.layer_image(layer, axes, channel, t)
        except ValueError as e:
            notify_error(f"piscis: {e}")
            self.status.setText(str(e))
            return
        scale = float(self.scale.value())
        relay = self.relay
        roi = _layers.roi_of_shapes(self.roi.layer(), layer)
        if roi is not None and len(img.shape) == 3:
            msg = "a region applies to 2D images; choose (whole image) for a z-stack"
            notify_error(f"piscis: {msg}")
            self.status.setText(msg)
            return
        if roi is not None:
            from ..detect import clip_roi

            try:
                clip_roi(roi, img.shape, name=layer.name)
            except ValueError as e:
                notify_error(f"piscis: {e}")
                self.status.setText(str(e))
                return

        volume = len(img.shape) == 3
        spacing = _layers.meta(layer).get("spacing") if volume else None
        threshold = float(self.threshold.value())  # the slider's, as the user left it

        def work():
            from ..io import load_model

            model = load_model(model_path)
            tick = lambda d, t: relay.progressed.emit((d, t))  # noqa: E731
            if volume:
                from ..detect3d import VolumeCandidates

                cands = VolumeCandidates(
                    img, model, scale=scale, progress=tick, spacing=spacing, name=layer.name
                )
                relay.progressed.emit(("decode", 0))
                cands.at(threshold)  # linked and measured here, not in the GUI thread
                return cands, threshold, model.name
            cands = detect_candidates(img, model, scale, roi, progress=tick)
            return cands, threshold, model.name

        self.run_button.setEnabled(False)
        at = "" if t is None else f" at time point {t}"
        self.status.setText(f"Detecting spots in {layer.name}{at}...")
        self._pbar = progress(total=0, desc="piscis: detecting")
        worker = create_worker(work, _start_thread=False)
        # Points over all the layer's dimensions for a volume or a time point (the
        # time point's T coordinate shows them on that frame); 2D points otherwise.
        frame = (axes, channel, t) if volume or t is not None else None
        worker.returned.connect(lambda r: self._on_result(r, layer, img.shape, frame))
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        worker.start()
        self.run_returned = time.perf_counter()

    def _on_progress(self, info):
        if self._pbar is None:
            return
        done, total = info
        if done == "decode":
            self._pbar.set_description("piscis: decoding spots")
            return
        if self._pbar.total != total:
            self._pbar.total = total
        self._pbar.update(done - self._pbar.n)

    def _on_error(self, exc):
        self._report_failure("detection", exc)

    def _on_finished(self):
        self._close_worker()
        self.run_button.setEnabled(True)

    def _on_result(self, result, image_layer, shape, frame=None):
        t0 = time.perf_counter()
        try:
            self._show_result(result, image_layer, shape, frame)
        finally:
            self.result_shown = (t0, time.perf_counter())

    def _show_result(self, result, image_layer, shape, frame=None):
        """``frame``: (axes, channel, time) of a volume or of a time point (points over
        all the image layer's dimensions, with its scale and translate; a T axis holds
        the time point, which the layer name ends with, ``[t3]``); None for a 2D plane."""
        cands, threshold, model_name = result
        t = frame[2] if frame is not None else None
        name = f"{image_layer.name} spots" + ("" if t is None else f" [t{t}]")
        ndim = image_layer.ndim if frame is not None else 2
        aligned = (
            {"scale": tuple(image_layer.scale), "translate": tuple(image_layer.translate)}
            if frame is not None
            else _layers.aligned_kwargs(image_layer)
        )
        points = None
        for ly in self.viewer.layers:
            if (
                isinstance(ly, Points)
                and ly.name == name
                and _layers.meta(ly).get("role") == "detections"
                and ly.ndim == ndim
            ):
                points = ly
        if points is None:
            points = self.viewer.add_points(
                np.zeros((0, ndim)),
                name=name,
                features={k: np.zeros(0) for k in ("score", "intensity", "background", "cell_id")},
                **POINTS_STYLE,
                **SCORE_COLORS,
                **aligned,
            )
        md = _layers.meta(points)
        md.update(role="detections", image=image_layer.name, model=model_name, shape=tuple(shape))
        if frame is not None:
            md["axes"] = frame[0]
        if t is not None:
            md["t"] = t
        self._result = {"candidates": cands, "points": points, "image": image_layer}
        self._result["frame"] = frame
        if getattr(cands, "n_nonfinite", 0):
            notify_info(f"piscis: {cands.n_nonfinite} non-finite (NaN or infinite) pixels ignored")
        self.threshold.blockSignals(True)
        self.threshold.setValue(threshold)
        self.threshold.blockSignals(False)
        self.apply_threshold(self.threshold.value())

    def apply_threshold(self, threshold: float) -> None:
        """Show the spots at ``threshold`` from the cached candidates (no network)."""
        if self._result is None:
            return
        t0 = time.perf_counter()
        cands, points = self._result["candidates"], self._result["points"]
        if points not in self.viewer.layers:
            self._result = None
            return
        spots = cands.at(threshold)
        coords = spots.coords
        frame = self._result.get("frame")
        if frame is not None:
            coords = _layers.points_from_voxels(coords, self._result["image"], *frame)
        _layers.set_points(points, coords, _layers.spots_features(spots))
        _layers.meta(points)["threshold"] = float(threshold)
        self.last_update_s = time.perf_counter() - t0
        text = f"{len(spots)} spots at threshold {threshold:.2f} in {self._result['image'].name}"
        if frame is not None and frame[2] is not None:
            text += f" at time point {frame[2]}"
        n_bad = getattr(cands, "n_nonfinite", 0)
        if n_bad:
            text += f" ({n_bad} non-finite pixels ignored)"
        self.status.setText(text)

    @property
    def points_layer(self):
        return None if self._result is None else self._result["points"]
