"""Qt pieces shared by the widgets: layer and model choosers, a thread relay,
per-viewer shared state."""

from __future__ import annotations

import weakref
from pathlib import Path

from psygnal import Signal
from qtpy.QtCore import QObject
from qtpy.QtCore import Signal as QtSignal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QWidget,
)

from ..annotate import find_models, is_model_folder


class PluginState:
    """What the widgets of one viewer share: the models known this session and
    the model chosen in the Detect widget."""

    models_changed = Signal(object)  # a model folder to select, or None

    def __init__(self):
        self.extra_models: list[Path] = []
        self.current_model: Path | None = None

    def add_model(self, path) -> None:
        path = Path(path)
        if path.resolve() not in {p.resolve() for p in self.extra_models}:
            self.extra_models.insert(0, path)
        self.models_changed.emit(path)

    def models(self) -> list[Path]:
        out = list(self.extra_models)
        for p in find_models():
            if p.resolve() not in {o.resolve() for o in out}:
                out.append(p)
        return out


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def state_for(viewer) -> PluginState:
    try:
        st = _STATES.get(viewer)
        if st is None:
            st = _STATES[viewer] = PluginState()
        return st
    except TypeError:  # not weak-referenceable
        return _STATES.setdefault(id(viewer), PluginState())  # pragma: no cover


def field_row(field: QWidget, button: QWidget) -> QHBoxLayout:
    """A field that takes the spare width, with its button (Browse...) beside it."""
    row = QHBoxLayout()
    row.addWidget(field, 1)
    row.addWidget(button)
    return row


class WorkerMixin:
    """What a widget running one worker at a time does when the worker fails
    or ends: report the failure, close the progress bar, forget the worker."""

    _pbar = None
    _worker = None

    def _report_failure(self, what: str, exc) -> None:
        msg = f"piscis: {what} failed: {exc}"
        self.status.setText(msg)
        notify_error(msg)

    def _close_worker(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._worker = None


class Relay(QObject):
    """Carries calls from a worker thread to the GUI thread (queued signals)."""

    progressed = QtSignal(object)


def connect_until_destroyed(widget, connections) -> None:
    """Connect (emitter, callback) pairs, and disconnect them when ``widget`` goes,
    so that a closed dock widget is not called by the viewer's events any more."""
    connections = list(connections)
    for emitter, callback in connections:
        emitter.connect(callback)

    def _drop(*_):
        for emitter, callback in connections:
            try:
                emitter.disconnect(callback)
            except (AttributeError, TypeError, ValueError, RuntimeError):
                pass

    widget.destroyed.connect(_drop)


class LayerCombo(QComboBox):
    """A combo box of the viewer's layers of some types, kept up to date."""

    def __init__(
        self, viewer, types, none_text: str | None = None, parent=None, pick_first: bool = False
    ):
        """``pick_first``: with a ``none_text`` item, show the newest layer of the types
        instead of it until the user picks an item themselves."""
        super().__init__(parent)
        self.viewer, self.types, self.none_text = viewer, tuple(types), none_text
        self.pick_first, self._chosen = pick_first, False
        self.activated.connect(self._on_activated)
        self.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        ev = viewer.layers.events
        refresh = self.refresh
        connect_until_destroyed(self, [(e, refresh) for e in (ev.inserted, ev.removed, ev.moved)])
        self._named: list = []  # weak references to the layers whose renaming refreshes us
        self.destroyed.connect(lambda *_, named=self._named, f=refresh: _disconnect_names(named, f))
        self.refresh()

    def layers(self):
        return [ly for ly in self.viewer.layers if isinstance(ly, self.types)]

    def refresh(self, event=None):
        current = self.currentText()
        self.blockSignals(True)
        self.clear()
        if self.none_text is not None:
            self.addItem(self.none_text)
        for ly in self.layers():
            self.addItem(ly.name)
            if not any(ly is r() for r in self._named):
                ly.events.name.connect(self.refresh)
                self._named.append(weakref.ref(ly))
        idx = self.findText(current)
        if idx < 0 and self.count():
            idx = self.count() - 1 if self.none_text is None else 0
        if self.pick_first and not self._chosen and idx == 0 and self.none_text is not None:
            idx = self.count() - 1  # the newest layer (0, the none item, when there is none)
        self.setCurrentIndex(max(idx, 0))
        self.blockSignals(False)
        if self.currentText() != current:
            self.currentIndexChanged.emit(self.currentIndex())

    def _on_activated(self, *_):
        self._chosen = True

    def layer(self):
        name = self.currentText()
        for ly in self.layers():
            if ly.name == name:
                return ly
        return None

    def set_layer(self, layer) -> None:
        self.refresh()
        idx = self.findText(layer.name if layer is not None else (self.none_text or ""))
        if idx >= 0:
            self.setCurrentIndex(idx)


def _disconnect_names(refs, callback) -> None:
    for ref in refs:
        try:
            ref().events.name.disconnect(callback)
        except (AttributeError, TypeError, ValueError, RuntimeError):
            pass  # the layer is gone already


class ModelChooser(QWidget):
    """A list of model folders (shipped, user's, trained this session) and a
    "Browse..." button for any other folder."""

    NEW = "(new model)"

    def __init__(self, state: PluginState, allow_new: bool = False, parent=None):
        super().__init__(parent)
        self.state, self.allow_new = state, allow_new
        self.combo = QComboBox()
        self.combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(14)
        self.browse = QPushButton("Browse...")
        self.browse.setToolTip("Choose any model folder (config.json + model.safetensors)")
        self.browse.clicked.connect(self._browse)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.combo, 1)
        lay.addWidget(self.browse)
        self.refresh()
        connect_until_destroyed(self, [(state.models_changed, self._on_models_changed)])

    def _on_models_changed(self, path):
        self.refresh(select=path)

    def refresh(self, select=None) -> None:
        current = self.path() if select is None else Path(select)
        self.combo.blockSignals(True)
        self.combo.clear()
        if self.allow_new:
            self.combo.addItem(self.NEW, None)
        for p in self.state.models():
            self.combo.addItem(_model_label(p), str(p))
        idx = -1
        if current is not None:
            for i in range(self.combo.count()):
                d = self.combo.itemData(i)
                if d and Path(d).resolve() == Path(current).resolve():
                    idx = i
        if idx < 0:
            idx = self._default_index()
        self.combo.setCurrentIndex(idx)
        self.combo.blockSignals(False)
        self.combo.currentIndexChanged.emit(self.combo.currentIndex())

    def _default_index(self) -> int:
        for i in range(self.combo.count()):
            if self.combo.itemText(i) == "default":
                return i
        return 1 if self.allow_new and self.combo.count() > 1 else 0

    def path(self) -> Path | None:
        d = self.combo.currentData()
        return Path(d) if d else None

    def set_path(self, path) -> None:
        path = Path(path)
        if not any(
            self.combo.itemData(i) and Path(self.combo.itemData(i)).resolve() == path.resolve()
            for i in range(self.combo.count())
        ):
            self.state.add_model(path)  # refreshes every chooser
        self.refresh(select=path)

    def _browse(self):
        d = QFileDialog.getExistingDirectory(self, "Model folder")
        if d:
            if not is_model_folder(d):
                from napari.utils.notifications import show_error

                show_error(f"{d}: not a model folder (config.json + model.safetensors)")
                return
            self.set_path(d)


def _model_label(path: Path) -> str:
    from ..io import MODELS_DIR

    try:
        if path.resolve().parent == MODELS_DIR.resolve():
            return path.name
    except OSError:
        pass
    return f"{path.name}  ({path.parent})"


def status_label() -> QLabel:
    lab = QLabel("")
    lab.setWordWrap(True)
    return lab


def notify_error(msg: str) -> None:
    from napari.utils.notifications import show_error

    show_error(msg)


def notify_info(msg: str) -> None:
    from napari.utils.notifications import show_info

    show_info(msg)
