"""piscis: spot detection for fluorescence microscopy.

The core works on NumPy arrays and imports neither Qt nor napari::

    import piscis
    image = piscis.read_image("cell.tif").image
    spots = piscis.detect_spots(image)   # the default model shipped in the package
    spots.coords                         # (N, 2) float, (y, x)
    spots, cells = piscis.count_spots(image, nuclear_image=dapi)  # per spot and per cell

``detect_spots`` is :func:`piscis.detect.detect` (the module ``piscis.detect``
keeps its name, so the function has another one here).
"""

__version__ = "0.1.0"

__all__ = ["__version__", "count_spots", "detect_spots", "load_model", "read_image"]


def __dir__():
    return sorted(set(globals()) | set(__all__))


def __getattr__(name):
    # Lazy: `import piscis` stays light; torch loads on first use.
    if name == "detect_spots":
        from .detect import detect

        return detect
    if name == "count_spots":
        from .api import count_spots

        return count_spots
    if name in ("load_model", "read_image"):
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module 'piscis' has no attribute {name!r}")
