"""Review widget: spots + cell labels (given, or segmented from a nuclear channel)
-> a sortable table of cells with their counts; a row click centres and selects
the cell; cells coloured by count; Export writes the CLI's cells.csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.layers import Image, Labels, Points
from napari.qt.threading import create_worker
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..annotate import cells_table_text, count_values
from . import _layers
from ._common import LayerCombo, field_row, notify_error, notify_info, status_label

NONE = "(none)"
TABLE_COLUMNS = [
    ("cell_id", "cell"),
    ("n_spots", "spots"),
    ("n_spots_nucleus", "nucleus"),
    ("n_spots_cytoplasm", "cytoplasm"),
    ("area", "area"),
    ("touches_border", "border"),
    ("dense", "dense"),
]
COLOUR_KEYS = ["n_spots", "n_spots_nucleus", "n_spots_cytoplasm"]


class _Item(QTableWidgetItem):
    """A table cell that sorts by number (None last)."""

    def __init__(self, value):
        text = (
            ""
            if value is None
            else (str(int(value)) if isinstance(value, (bool, np.bool_)) else str(value))
        )
        super().__init__(text)
        self.value = value
        self.setFlags(self.flags() & ~Qt.ItemIsEditable)

    def __lt__(self, other):
        a, b = self.value, getattr(other, "value", None)
        if a is None or b is None:
            return a is not None and b is None
        return a < b


class ReviewWidget(QWidget):
    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.rows: list[dict] = []
        self._colormaps: dict[int, object] = {}
        self._worker = None
        self._context: dict = {}

        self.image = LayerCombo(napari_viewer, (Image,))
        self.points = LayerCombo(napari_viewer, (Points,))
        self.cells = LayerCombo(napari_viewer, (Labels,), none_text=NONE, pick_first=True)
        self.nuclei = LayerCombo(napari_viewer, (Labels,), none_text=NONE)
        self.nuclear = LayerCombo(napari_viewer, (Image,))
        self.diameter = QDoubleSpinBox()
        self.diameter.setRange(3, 500)
        self.diameter.setValue(30)
        self.diameter.setSuffix(" px")
        self.expand = QDoubleSpinBox()
        self.expand.setRange(0, 500)
        self.expand.setValue(15)
        self.expand.setSuffix(" px")
        self.segment_button = QPushButton("Segment nuclei and cells")
        self.count_button = QPushButton("Count spots per cell")
        self.colour = QComboBox()
        self.colour.addItems([NONE, *COLOUR_KEYS])
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels([h for _, h in TABLE_COLUMNS])
        self.table.setSortingEnabled(True)
        self._sorted_by_user = False  # a click on a header: the user's order is kept
        self.table.horizontalHeader().sectionClicked.connect(self._on_sort_clicked)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setMinimumHeight(200)
        self.export_path = QLineEdit(str(Path.cwd() / "cells.csv"))
        self.export_browse = QPushButton("...")
        self.export_button = QPushButton("Export cells.csv")
        self.status = status_label()

        form = QFormLayout()
        form.addRow("image", self.image)
        form.addRow("spots", self.points)
        form.addRow("cells", self.cells)
        form.addRow("nuclei", self.nuclei)
        form.addRow("nuclear channel", self.nuclear)
        seg = QHBoxLayout()
        seg.addWidget(self.diameter)
        seg.addWidget(self.expand)
        form.addRow("diameter, expand", seg)
        form.addRow(self.segment_button)
        form.addRow(self.count_button)
        form.addRow("colour cells by", self.colour)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.table, 1)
        exp = field_row(self.export_path, self.export_browse)
        lay.addLayout(exp)
        lay.addWidget(self.export_button)
        lay.addWidget(self.status)

        self.segment_button.clicked.connect(self.segment)
        self.count_button.clicked.connect(self.count)
        self.colour.currentIndexChanged.connect(self.apply_colours)
        self.table.itemSelectionChanged.connect(self._on_row_selected)
        self.export_browse.clicked.connect(self._browse)
        self.export_button.clicked.connect(self.export)

    # ------------------------------------------------------------------ segmentation

    def segment(self) -> None:
        """Nuclei from the nuclear channel, cells grown from them (core, in a worker)."""
        if self._worker is not None:
            return
        layer = self.nuclear.layer()
        if layer is None:
            notify_error("piscis: choose the nuclear channel's image layer")
            return
        try:
            dapi = _layers.layer_plane(layer)
        except ValueError as e:
            notify_error(f"piscis: {e}")
            return
        diameter, expand = float(self.diameter.value()), float(self.expand.value())

        def work():
            from ..cells import segment_cells, segment_nuclei

            nuclei = segment_nuclei(dapi, diameter=diameter)
            return nuclei, segment_cells(nuclei, expand=expand)

        self.segment_button.setEnabled(False)
        self.status.setText(f"segmenting {layer.name}...")
        worker = create_worker(work, _start_thread=False)
        worker.returned.connect(lambda r: self._on_segmented(r, layer))
        worker.errored.connect(lambda e: notify_error(f"piscis: segmentation failed: {e}"))
        worker.finished.connect(self._on_seg_finished)
        self._worker = worker
        worker.start()

    def _on_seg_finished(self):
        self._worker = None
        self.segment_button.setEnabled(True)

    def _on_segmented(self, result, layer):
        nuclei, cells = result
        kw = _layers.aligned_kwargs(layer)
        nl = self.viewer.add_labels(
            nuclei, name=f"{layer.name} nuclei", opacity=0.3, visible=False, **kw
        )
        cl = self.viewer.add_labels(cells, name=f"{layer.name} cells", opacity=0.45, **kw)
        _below_points(self.viewer, [nl, cl])
        self.nuclei.set_layer(nl)
        self.cells.set_layer(cl)
        self.status.setText(f"{int(nuclei.max())} nuclei, {len(np.unique(cells)) - 1} cells")

    # ------------------------------------------------------------------ counting

    def count(self) -> list[dict]:
        """Assign the spots to the cells and fill the table (core: spots_per_cell)."""
        from ..cells import spots_per_cell

        points = self.points.layer()
        cells_l, nuclei_l = self.cells.layer(), self.nuclei.layer()
        if points is None or (cells_l is None and nuclei_l is None):
            notify_error("piscis: choose a spots layer and a cells (or nuclei) layer")
            return []
        ref = cells_l if cells_l is not None else nuclei_l
        try:
            cells = None if cells_l is None else _labels_2d(cells_l)
            nuclei = None if nuclei_l is None else _labels_2d(nuclei_l)
            coords = (
                _layers.to_pixels(points.data, points, ref)
                if len(points.data)
                else np.zeros((0, 2))
            )
            cell_id, in_nucleus, rows = spots_per_cell(coords, cells, nuclei)
        except ValueError as e:
            notify_error(f"piscis: {e}")
            self.status.setText(str(e))
            return []
        # The spots learn their cell.
        feats = points.features.copy()
        feats["cell_id"] = np.asarray(cell_id, np.int64)
        if nuclei is not None:
            feats["in_nucleus"] = np.asarray(in_nucleus, bool)
        points.features = feats
        self.rows = rows
        self._context = {"points": points, "labels": ref, "cell_id": np.asarray(cell_id)}
        self._fill_table()
        self.apply_colours()
        n_in = int(np.count_nonzero(np.asarray(cell_id) > 0))
        self.status.setText(f"{len(rows)} cells, {n_in} of {len(coords)} spots in cells")
        return rows

    def _fill_table(self):
        self.table.setSortingEnabled(False)
        self.table.clearContents()
        self.table.setRowCount(len(self.rows))
        for i, r in enumerate(self.rows):
            for j, (key, _) in enumerate(TABLE_COLUMNS):
                self.table.setItem(i, j, _Item(r[key]))
        self.table.setSortingEnabled(True)
        if not self._sorted_by_user:  # by cell id, ascending, as the header arrow shows
            self.table.sortByColumn(0, Qt.AscendingOrder)
        self.table.resizeColumnsToContents()

    def _on_sort_clicked(self, *_):
        self._sorted_by_user = True

    def row_cell_ids(self) -> list[int]:
        """Cell ids in the table's current (sorted) order."""
        return [self.table.item(i, 0).value for i in range(self.table.rowCount())]

    def _on_row_selected(self):
        items = self.table.selectedItems()
        if not items:
            return
        self.select_cell(int(self.table.item(items[0].row(), 0).value))

    def select_cell(self, cell: int) -> None:
        """Centre the view on a cell, select it in its Labels layer and its spots."""
        row = next((r for r in self.rows if r["cell_id"] == cell), None)
        labels = self._context.get("labels")
        if row is None or labels is None:
            return
        s, t = _layers.yx_transform(labels)
        centre = np.array([row["centroid_y"], row["centroid_x"]]) * s + t
        _layers.camera(self.viewer).center = tuple(centre)
        labels.selected_label = int(cell)
        points = self._context.get("points")
        if points is not None and points in self.viewer.layers:
            ids = self._context["cell_id"]
            if len(ids) == len(points.data):
                points.selected_data = set(np.flatnonzero(ids == cell).tolist())

    # ------------------------------------------------------------------ colours

    def apply_colours(self, *_):
        """Colour the cells by a count column (viridis, low to high), or restore."""
        from napari.utils.colormaps import DirectLabelColormap, ensure_colormap

        labels = self._context.get("labels")
        if labels is None or labels not in self.viewer.layers:
            return
        key = self.colour.currentText()
        lid = id(labels)
        if key == NONE:
            if lid in self._colormaps:
                labels.colormap = self._colormaps.pop(lid)
            return
        self._colormaps.setdefault(lid, labels.colormap)
        values = count_values(self.rows, key)
        cmap = ensure_colormap("viridis")
        ids = list(values)
        colours = cmap.map(np.array([values[i] for i in ids], float)) if ids else np.zeros((0, 4))
        color_dict = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
        color_dict.update({int(i): tuple(c) for i, c in zip(ids, colours)})
        labels.colormap = DirectLabelColormap(color_dict=color_dict)

    # ------------------------------------------------------------------ export

    def _browse(self):
        p, _ = QFileDialog.getSaveFileName(
            self, "cells.csv", self.export_path.text(), "CSV (*.csv)"
        )
        if p:
            self.export_path.setText(p)

    def export(self) -> Path | None:
        """Write cells.csv with the CLI's columns (image first)."""
        from ..io import atomic_write_text

        if not self.rows:
            notify_error("piscis: count first (no cells in the table)")
            return None
        image = self.image.layer()
        name = _layers.source_name(image) if image is not None else self._context["labels"].name
        path = Path(self.export_path.text()).expanduser()
        try:
            atomic_write_text(path, cells_table_text(self.rows, name))
        except OSError as e:
            notify_error(f"piscis: {path}: {e}")
            return None
        self.status.setText(f"{len(self.rows)} cells written to {path}")
        notify_info(f"piscis: cells written to {path}")
        return path


def _labels_2d(layer) -> np.ndarray:
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    data = np.asarray(data)
    if data.ndim != 2:
        raise ValueError(f"{layer.name}: label layers must be 2D (Y, X), got shape {data.shape}")
    return data


def _below_points(viewer, layers) -> None:
    """Move label layers under the lowest Points layer, so the spots stay visible."""
    idx = [i for i, ly in enumerate(viewer.layers) if isinstance(ly, Points)]
    if not idx:
        return
    for ly in layers:
        i = viewer.layers.index(ly)
        if i > idx[0]:
            viewer.layers.move(i, idx[0])
