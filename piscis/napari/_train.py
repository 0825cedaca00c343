"""Train widget: fine-tune the current model (or train a new one) on the
annotation layers of the viewer and/or a training folder, in a worker thread,
with a live plot of the loss and the validation F1 and a Cancel button."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from napari.layers import Image, Points
from napari.qt.threading import create_worker
from napari.utils import progress
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..annotate import new_model_folder, split_for_validation, user_models_dir
from . import _layers
from ._common import (
    ModelChooser,
    Relay,
    WorkerMixin,
    connect_until_destroyed,
    field_row,
    notify_error,
    notify_info,
    state_for,
    status_label,
)
from ._plot import TrainingPlot

# Defaults sized so that fine-tuning on one 512x512 image takes under 3 minutes on 2 cores
# (scripts/bench_finetune.py measures it).
DEFAULTS = {
    "epochs": 6,
    "steps": 50,
    "lr": 1e-3,
    "lr_new": 2e-3,
    "val_share": 0.2,
    "batch": 8,
    "crop": 128,
    "synthetic": 0.1,
}


class TrainWidget(WorkerMixin, QWidget):
    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self._worker = None
        self._pbar = None
        self._stop = threading.Event()
        self.result_path: Path | None = None
        self.history: list[dict] = []

        self.layers = QListWidget()
        self.layers.setToolTip("Annotation layers (from the Annotate widget) to train on")
        self.layers.setMaximumHeight(90)
        self.use_folder = QCheckBox("also a training folder")
        self.folder = QLineEdit("")
        self.folder.setPlaceholderText("NAME.tif + NAME.csv (+ NAME.mask.tif)")
        self.folder_button = QPushButton("...")
        self.init = ModelChooser(self.state, allow_new=True)
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 1000)
        self.epochs.setValue(DEFAULTS["epochs"])
        self.steps = QSpinBox()
        self.steps.setRange(1, 100000)
        self.steps.setValue(DEFAULTS["steps"])
        self.steps.setToolTip(f"optimiser steps per epoch (batches of {DEFAULTS['batch']} crops)")
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(5)
        self.lr.setRange(1e-5, 1e-1)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(DEFAULTS["lr"])
        self.val_share = QDoubleSpinBox()
        self.val_share.setRange(0.0, 0.9)
        self.val_share.setSingleStep(0.05)
        self.val_share.setValue(DEFAULTS["val_share"])
        self.val_share.setToolTip(
            "Held out for validation: whole images when there are enough, else the last "
            "part of each image"
        )
        self.out_dir = QLineEdit(str(user_models_dir()))
        self.out_button = QPushButton("...")
        self.out_name = QLineEdit("")
        self.out_name.setPlaceholderText("automatic: <model>-<date>-<time>")
        self.train_button = QPushButton("Train")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.plot = TrainingPlot(self)
        self.plot.setMinimumHeight(240)
        self.status = status_label()

        form = QFormLayout()
        form.addRow("annotations", self.layers)
        fold = field_row(self.folder, self.folder_button)
        form.addRow(self.use_folder)
        form.addRow("folder", fold)
        form.addRow("start from", self.init)
        form.addRow("epochs", self.epochs)
        form.addRow("steps / epoch", self.steps)
        form.addRow("learning rate", self.lr)
        form.addRow("validation share", self.val_share)
        out = field_row(self.out_dir, self.out_button)
        form.addRow("save in", out)
        form.addRow("model name", self.out_name)
        buttons = QHBoxLayout()
        buttons.addWidget(self.train_button)
        buttons.addWidget(self.cancel_button)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(buttons)
        lay.addWidget(self.plot, 1)
        lay.addWidget(self.status)

        self.relay = Relay()
        self.relay.progressed.connect(self._on_progress)
        self.train_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.folder_button.clicked.connect(self._browse_folder)
        self.out_button.clicked.connect(self._browse_out)
        self.init.combo.currentIndexChanged.connect(self._on_init_changed)
        ev = napari_viewer.layers.events
        connect_until_destroyed(self, [(e, self.refresh_layers) for e in (ev.inserted, ev.removed)])
        self.refresh_layers()
        if self.state.current_model is not None:
            self.init.refresh(select=self.state.current_model)

    # ------------------------------------------------------------------ inputs

    def refresh_layers(self, *_):
        checked = {
            self.layers.item(i).text(): self.layers.item(i).checkState()
            for i in range(self.layers.count())
        }
        self.layers.clear()
        for ly in self.viewer.layers:
            if isinstance(ly, Points) and _layers.meta(ly).get("role") == "annotation":
                item = QListWidgetItem(ly.name)
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                item.setCheckState(checked.get(ly.name, Qt.Checked))
                self.layers.addItem(item)

    def _on_init_changed(self, *_):
        self.lr.setValue(DEFAULTS["lr"] if self.init.path() is not None else DEFAULTS["lr_new"])

    def _browse_folder(self):
        d = QFileDialog.getExistingDirectory(self, "Training folder", self.folder.text())
        if d:
            self.folder.setText(d)
            self.use_folder.setChecked(True)

    def _browse_out(self):
        d = QFileDialog.getExistingDirectory(self, "Save models in", self.out_dir.text())
        if d:
            self.out_dir.setText(d)

    def viewer_pairs(self) -> list:
        """Training pairs from the checked annotation layers: image plane, points
        in its pixels, and the region the layer's metadata names (else the whole image)."""
        from ..data import Pair

        pairs = []
        for i in range(self.layers.count()):
            item = self.layers.item(i)
            if item.checkState() != Qt.Checked or item.text() not in self.viewer.layers:
                continue
            ann = self.viewer.layers[item.text()]
            md = _layers.meta(ann)
            image = (
                self.viewer.layers[md["image"]] if md.get("image") in self.viewer.layers else None
            )
            if not isinstance(image, Image):
                raise ValueError(
                    f"{ann.name}: its image layer {md.get('image')!r} is not in the viewer"
                )
            plane = _layers.layer_plane(image)
            coords = _layers.to_pixels(ann.data, ann, image)
            region_layer = (
                self.viewer.layers[md["region"]] if md.get("region") in self.viewer.layers else None
            )
            region = _layers.region_mask(region_layer, image, plane.shape)
            pairs.append(Pair(ann.name, plane, coords, region))
        return pairs

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        if self._worker is not None:
            return
        try:
            pairs = self.viewer_pairs()
            if self.use_folder.isChecked() and self.folder.text().strip():
                from ..data import load_pairs

                pairs += load_pairs(self.folder.text().strip())
        except (ValueError, OSError, TypeError) as e:
            notify_error(f"piscis: {e}")
            self.status.setText(str(e))
            return
        if not pairs:
            msg = "piscis: nothing to train on: annotate an image or give a training folder"
            notify_error(msg)
            self.status.setText(msg)
            return
        from ..train import TrainConfig, train

        init = self.init.path()
        base_threshold, base_name = 0.5, "piscis"
        if init is not None:
            try:
                cfg0 = json.loads((init / "config.json").read_text())
                base_threshold = float(cfg0.get("threshold", 0.5))
                base_name = init.name
            except (OSError, ValueError):
                pass
        name = self.out_name.text().strip()
        parent = Path(self.out_dir.text().strip() or user_models_dir()).expanduser()
        out = parent / name if name else new_model_folder(parent, base_name)
        if out.exists():
            notify_error(f"piscis: {out} exists; choose another model name")
            return
        cfg = TrainConfig(
            epochs=int(self.epochs.value()),
            steps_per_epoch=int(self.steps.value()),
            batch_size=DEFAULTS["batch"],
            crop=DEFAULTS["crop"],
            lr=float(self.lr.value()),
            synthetic_fraction=DEFAULTS["synthetic"] if init is not None else 0.5,
            threshold=base_threshold,
            workers=0,
        )
        share = float(self.val_share.value())
        relay, stop = self.relay, self._stop
        stop.clear()
        n_pairs = len(pairs)

        def work():
            train_pairs, val_pairs = split_for_validation(pairs, share, seed=cfg.seed)
            return train(
                train_pairs,
                out,
                cfg,
                val_pairs=val_pairs,
                init=init,
                progress=relay.progressed.emit,
                should_stop=stop.is_set,
                description=f"Trained in the napari plugin on {n_pairs} annotated image(s).",
            )

        self.plot.reset()
        self.history = []
        self.result_path = None
        self._t0 = time.monotonic()
        self._pbar = progress(total=cfg.epochs * cfg.steps_per_epoch, desc="piscis: training")
        self.train_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText(f"training on {n_pairs} image(s) -> {out}")
        worker = create_worker(work, _start_thread=False)
        worker.returned.connect(self._on_done)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        worker.start()

    def cancel(self) -> None:
        """Stop after the current step; the best epoch so far is saved."""
        if self._worker is not None:
            self._stop.set()
            self.cancel_button.setEnabled(False)
            self.status.setText("stopping: saving the best checkpoint...")

    def _on_progress(self, info: dict):
        if "step" in info:
            self.plot.add_loss(info["step"], info["loss"])
            if self._pbar is not None:
                self._pbar.update(info["step"] - self._pbar.n)
        elif "epoch_done" in info:
            rec = info["record"]
            self.history.append(rec)
            val = rec.get("val", {})
            step = self.plot.steps[-1] if self.plot.steps else 0
            if "f1_int" in val:
                self.plot.add_validation(step, val["f1_int"])
            self.status.setText(
                f"epoch {rec['epoch'] + 1}/{info['total_epochs']}: loss {rec['loss']:.3f}"
                + (f", validation F1 {val['f1_int']:.3f}" if "f1_int" in val else "")
            )

    def _on_done(self, path):
        self.result_path = Path(path)
        self.state.add_model(self.result_path)  # every model list shows it now
        secs = time.monotonic() - self._t0
        msg = f"model saved in {self.result_path} ({secs:.0f} s)"
        self.status.setText(msg)
        notify_info(f"piscis: {msg}")

    def _on_error(self, exc):
        self._report_failure("training", exc)

    def _on_finished(self):
        self._close_worker()
        self.train_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
