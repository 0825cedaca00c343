"""Annotate widget: an annotation Points layer (from the detections or empty)
edited with napari's own Points tools, optional snapping of new points to the
intensity peak, the fully annotated region (Shapes or Labels), and saving a
training pair that ``piscis train`` reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.layers import Image, Labels, Points, Shapes
from napari.layers.base._base_constants import ActionType
from qtpy.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..annotate import pair_name, save_training_pair, snap_to_peak
from . import _layers
from ._common import (
    LayerCombo,
    connect_until_destroyed,
    field_row,
    notify_error,
    notify_info,
    status_label,
)

WHOLE_IMAGE = "(whole image)"
NOTHING = "(nothing)"


class AnnotateWidget(QWidget):
    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._planes: dict[int, np.ndarray] = {}
        self._snapping = False

        self.image = LayerCombo(napari_viewer, (Image,))
        self.source = LayerCombo(napari_viewer, (Points,), none_text=NOTHING)
        self.source.setToolTip("Start from these points (the detections), or from nothing")
        self.start_button = QPushButton("New annotation layer")
        self.snap = QCheckBox("snap new points to the intensity peak")
        self.snap.setChecked(True)
        self.snap_radius = QDoubleSpinBox()
        self.snap_radius.setRange(0.5, 10.0)
        self.snap_radius.setValue(3.0)
        self.snap_radius.setSuffix(" px")
        self.region = LayerCombo(napari_viewer, (Shapes, Labels), none_text=WHOLE_IMAGE)
        self.region.setToolTip(
            "The part of the image where every spot is annotated; training ignores the rest"
        )
        self.region_button = QPushButton("Draw region")
        self.points = LayerCombo(napari_viewer, (Points,))
        self.folder = QLineEdit(str(Path.cwd() / "annotated"))
        self.folder_button = QPushButton("...")
        self.name = QLineEdit("")
        self.name.setPlaceholderText("the image layer's name")
        self.overwrite = QCheckBox("overwrite")
        self.save_button = QPushButton("Save training pair")
        self.status = status_label()

        form = QFormLayout()
        form.addRow("image", self.image)
        form.addRow("start from", self.source)
        form.addRow(self.start_button)
        form.addRow(self.snap)
        form.addRow("snap radius", self.snap_radius)
        reg = field_row(self.region, self.region_button)
        form.addRow("region", reg)
        form.addRow("annotations", self.points)
        fold = field_row(self.folder, self.folder_button)
        form.addRow("folder", fold)
        form.addRow("name", self.name)
        form.addRow(self.overwrite)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.save_button)
        lay.addWidget(self.status)
        lay.addStretch(1)

        self.start_button.clicked.connect(self.new_annotation_layer)
        self.region_button.clicked.connect(self.new_region_layer)
        self.folder_button.clicked.connect(self._browse)
        self.save_button.clicked.connect(self.save)
        self.region.currentIndexChanged.connect(self._remember_region)
        connect_until_destroyed(self, [(napari_viewer.layers.events.inserted, self._on_inserted)])
        for ly in napari_viewer.layers:
            self._watch(ly)

    # ------------------------------------------------------------------ layers

    def _on_inserted(self, event):
        self._watch(event.value)

    def _watch(self, layer):
        if isinstance(layer, Points) and _layers.meta(layer).get("role") == "annotation":
            try:
                layer.events.data.disconnect(self._on_points_data)
            except (TypeError, ValueError, RuntimeError):
                pass
            layer.events.data.connect(self._on_points_data)

    def new_annotation_layer(self):
        """A Points layer on the image's pixels, with the chosen points copied in."""
        image = self.image.layer()
        if image is None:
            notify_error("piscis: add an image layer first")
            return None
        src = self.source.layer()
        axes = _layers.default_axes(image)
        volume = _layers.volume_axes(image, axes) is not None
        ndim = image.ndim if volume else 2
        aligned = (
            {"scale": tuple(image.scale), "translate": tuple(image.translate)}
            if volume
            else _layers.aligned_kwargs(image)
        )
        data = np.zeros((0, ndim))
        if src is not None and len(src.data):
            if volume:
                vox = _layers.voxels_of_points(src.data, src, image, axes)
                data = _layers.points_from_voxels(vox, image, axes)
            else:
                data = _layers.to_pixels(src.data, src, image)
        name = f"{image.name} annotations"
        k = 2
        while name in self.viewer.layers:
            name = f"{image.name} annotations {k}"
            k += 1
        layer = Points(
            data,
            name=name,
            ndim=ndim,
            size=7,
            face_color="transparent",
            border_color="#ffd700",
            border_width=0.15,
            metadata={"piscis": {"role": "annotation", "image": image.name}},
            **aligned,
        )
        self.viewer.add_layer(layer)  # _on_inserted connects the snapping
        region = self.region.layer()
        if region is not None:
            _layers.meta(layer)["region"] = region.name
        self.viewer.layers.selection.active = layer
        layer.mode = "add"
        self.points.set_layer(layer)
        self.status.setText(
            f"{name}: {len(data)} points. Add (P), select (S) and delete, or drag points "
            "with napari's Points tools."
        )
        return layer

    def new_region_layer(self):
        """A Shapes layer on the image's pixels to draw the annotated region in."""
        image = self.image.layer()
        if image is None:
            notify_error("piscis: add an image layer first")
            return None
        layer = self.viewer.add_shapes(
            name=f"{image.name} region",
            ndim=2,
            edge_color="#00e5ff",
            face_color="#00e5ff22",
            edge_width=2,
            metadata={"piscis": {"role": "region", "image": image.name}},
            **_layers.aligned_kwargs(image),
        )
        layer.mode = "add_rectangle"
        self.region.set_layer(layer)
        self._remember_region()
        return layer

    def _remember_region(self, *_):
        ann = self.points.layer()
        if ann is not None:
            region = self.region.layer()
            _layers.meta(ann)["region"] = None if region is None else region.name

    # ------------------------------------------------------------------ snapping

    def _image_for(self, points) -> Image | None:
        name = _layers.meta(points).get("image")
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], Image):
            return self.viewer.layers[name]
        return self.image.layer()

    def _plane_of(self, image) -> np.ndarray:
        """What the image's annotations index: its (Y, X) plane, or its (Z, Y, X)
        volume when it has a Z axis."""
        key = id(image)
        if key not in self._planes:
            self._planes[key] = _layers.layer_image(image)
        return self._planes[key]

    def _is_volume(self, image) -> bool:
        return _layers.volume_axes(image, _layers.default_axes(image)) is not None

    def _on_points_data(self, event):
        layer = event.source
        if getattr(event, "action", None) in (ActionType.ADDED, ActionType.REMOVED):
            self.status.setText(f"{layer.name}: {len(layer.data)} points")
        if self._snapping or not self.snap.isChecked():
            return
        if getattr(event, "action", None) != ActionType.ADDED:
            return
        image = self._image_for(layer)
        if image is None:
            return
        n = len(layer.data)
        idx = sorted({int(i) % n for i in event.data_indices}) if n else []
        if not idx:
            return
        plane = self._plane_of(image)
        data = np.array(layer.data, float)
        radius = self.snap_radius.value()
        if self._is_volume(image):
            # In the point's own plane: z stays, y and x go to the peak.
            vox = _layers.voxels_of_points(data[idx], layer, image)
            for v in vox:
                z = int(np.clip(np.floor(v[0] + 0.5), 0, plane.shape[0] - 1))
                v[1:] = snap_to_peak(np.asarray(plane[z]), v[1:], radius)
            data[idx] = _layers.points_data_from_voxels(vox, layer, image)
        else:
            pix = _layers.to_pixels(data[idx], layer, image)
            snapped = np.array([snap_to_peak(plane, p, radius) for p in pix])
            data[np.ix_(idx, [-2, -1])] = _layers.from_pixels(snapped, layer, image)
        self._snapping = True
        try:
            selected = set(layer.selected_data)
            layer.data = data
            layer.selected_data = selected
        finally:
            self._snapping = False

    # ------------------------------------------------------------------ saving

    def _browse(self):
        d = QFileDialog.getExistingDirectory(self, "Training folder", self.folder.text())
        if d:
            self.folder.setText(d)

    def save(self) -> dict | None:
        """Save image + annotation points (+ region mask) as a training pair."""
        ann = self.points.layer()
        if ann is None:
            notify_error("piscis: no annotation layer (press 'New annotation layer')")
            return None
        image = self._image_for(ann)
        if image is None:
            notify_error("piscis: the annotation layer's image is not in the viewer")
            return None
        try:
            plane = np.asarray(self._plane_of(image))
            if self._is_volume(image):
                dims = _layers.volume_axes(image, _layers.default_axes(image))
                coords = _layers.voxels_of_points(ann.data, ann, image)
                scale = np.asarray(image.scale)[dims]
                translate = np.asarray(image.translate)[dims]
            else:
                coords = _layers.to_pixels(ann.data, ann, image)
                scale, translate = _layers.yx_transform(image)
            coords = coords if len(ann.data) else np.zeros((0, plane.ndim))
            region = _layers.region_mask(self.region.layer(), image, plane.shape[-2:])
            name = self.name.text().strip() or pair_name(image.name)
            paths = save_training_pair(
                self.folder.text(),
                name,
                plane,
                coords,
                region,
                overwrite=self.overwrite.isChecked(),
                scale=scale,
                translate=translate,
                units=_layers.world_units(image),
            )
        except (ValueError, OSError, TypeError) as e:
            msg = f"piscis: not saved: {e}"
            self.status.setText(msg)
            notify_error(msg)
            return None
        md = _layers.meta(ann)
        md["saved"] = {k: str(v) for k, v in paths.items()}
        reg = self.region.layer()
        md["region"] = None if reg is None else reg.name
        text = f"saved {len(coords)} spots: " + ", ".join(p.name for p in paths.values())
        text += f" in {paths['image'].parent}"
        self.status.setText(text)
        notify_info(f"piscis: {text}")
        return paths
