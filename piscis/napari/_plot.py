"""A live plot of the training loss and the validation F1 (matplotlib in Qt)."""

from __future__ import annotations

import time

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure

BG = "#262930"  # napari's dark theme
FG = "#d6d6d6"


class TrainingPlot(FigureCanvasQTAgg):
    def __init__(self, parent=None):
        fig = Figure(figsize=(4.0, 2.8), dpi=90, facecolor=BG, layout="constrained")
        super().__init__(fig)
        self.setParent(parent)
        self.ax = fig.add_subplot(111)
        self.ax2 = self.ax.twinx()
        for a in (self.ax, self.ax2):
            a.set_facecolor(BG)
            a.tick_params(colors=FG, labelsize=8)
            for s in a.spines.values():
                s.set_color(FG)
        self.ax.set_xlabel("step", color=FG, fontsize=8)
        self.ax.set_ylabel("loss", color="#4fc3f7", fontsize=8)
        self.ax2.set_ylabel("validation F1 (integrated)", color="#ffb74d", fontsize=8)
        self.ax2.set_ylim(0, 1)
        (self.loss_line,) = self.ax.plot([], [], color="#4fc3f7", lw=0.6, alpha=0.5)
        (self.smooth_line,) = self.ax.plot([], [], color="#4fc3f7", lw=1.6, label="loss")
        (self.f1_line,) = self.ax2.plot(
            [], [], "o-", color="#ffb74d", lw=1.6, ms=4, label="validation F1"
        )
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.val_steps: list[int] = []
        self.val_f1: list[float] = []
        self._drawn = 0.0

    def reset(self) -> None:
        self.steps.clear()
        self.losses.clear()
        self.val_steps.clear()
        self.val_f1.clear()
        self.redraw(force=True)

    def add_loss(self, step: int, loss: float) -> None:
        self.steps.append(int(step))
        self.losses.append(float(loss))
        self.redraw()

    def add_validation(self, step: int, f1: float) -> None:
        self.val_steps.append(int(step))
        self.val_f1.append(float(f1))
        self.redraw(force=True)

    def redraw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < 0.25:
            return
        self._drawn = now
        x, y = np.asarray(self.steps), np.asarray(self.losses)
        self.loss_line.set_data(x, y)
        if len(y):
            k = max(1, min(20, len(y) // 5))
            sm = np.convolve(y, np.ones(k) / k, mode="valid")
            self.smooth_line.set_data(x[k - 1 :], sm)
            lo, hi = float(np.nanmin(y)), float(np.nanmax(y))
            pad = 0.05 * (hi - lo or 1.0)
            self.ax.set_ylim(lo - pad, hi + pad)
            self.ax.set_xlim(0, max(x.max(), 1))
        else:
            self.smooth_line.set_data([], [])
        self.f1_line.set_data(self.val_steps, self.val_f1)
        self.draw_idle()
