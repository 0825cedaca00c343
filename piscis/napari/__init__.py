"""The napari plugin of piscis (npe2; ``napari.yaml`` beside this file).

Install with ``pip install 'piscis[napari]'``. The plugin is a thin front end:
every computation is in the core (:mod:`piscis.detect`, :mod:`piscis.annotate`,
:mod:`piscis.train`, :mod:`piscis.cells`), which imports neither Qt nor napari.

- reader: spot CSVs (ours and napari's Points export) -> Points; label masks -> Labels
- writer: Points -> our spot CSV, with the layer's scale and translate
- sample data: the images of ``sample_data/``
- widgets: Detect, Annotate, Train, Review (``_detect.py`` ... ``_review.py``)
"""

__all__ = ["AnnotateWidget", "DetectWidget", "ReviewWidget", "TrainWidget"]


def __getattr__(name):  # the widgets import Qt: only when asked for
    if name == "DetectWidget":
        from ._detect import DetectWidget

        return DetectWidget
    if name == "AnnotateWidget":
        from ._annotate import AnnotateWidget

        return AnnotateWidget
    if name == "TrainWidget":
        from ._train import TrainWidget

        return TrainWidget
    if name == "ReviewWidget":
        from ._review import ReviewWidget

        return ReviewWidget
    raise AttributeError(f"module 'piscis.napari' has no attribute {name!r}")
