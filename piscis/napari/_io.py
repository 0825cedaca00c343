"""npe2 reader, writer and sample data (no Qt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LABEL_SUFFIXES = (
    ".labels.tif",
    ".labels.tiff",
    ".mask.tif",
    ".mask.tiff",
    ".cells.tif",
    ".nuclei.tif",
    "_masks.tif",
    "_masks.tiff",
    "_cp_masks.png",
    "_seg.npy",
)

IMAGE_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
CHANNEL_COLORMAPS = ("green", "magenta", "cyan", "yellow", "red", "blue")

# Spot markers are rings, so a spot's own pixels stay visible inside; coloured by score
# where the spots have one (detections, tables with a score column).
POINTS_STYLE = {"size": 7, "border_width": 0.2, "opacity": 1.0, "face_color": "transparent"}
SCORE_COLORS = {
    "border_color": "score",
    "border_colormap": "viridis",
    "border_contrast_limits": (0.0, 1.0),
}


# --------------------------------------------------------------------------- reader


def get_reader(path):
    """npe2 reader: a spot CSV -> Points, a label mask -> Labels, another TIFF -> one
    Image layer per channel (:func:`image_layers`); None otherwise."""
    if isinstance(path, list):
        if not path:
            return None
        readers = [get_reader(p) for p in path]
        if any(r is None for r in readers):
            return None
        return lambda paths: [d for p, r in zip(paths, readers) for d in r(p)]
    name = str(path).lower()
    if name.endswith(".csv"):
        return _read_csv if _looks_like_spots(path) else None
    if name.endswith(LABEL_SUFFIXES):
        return _read_labels
    if name.endswith(IMAGE_SUFFIXES):
        return _read_image
    return None


def _read_image(path):
    """A TIFF as one Image layer per channel, each [T]ZYX or [T]YX (see image_layers)."""
    from ..io import read_stack

    return image_layers(read_stack(path))


def image_layers(stack) -> list:
    """Layer data tuples of a :class:`piscis.io.Stack`: one Image layer per channel.

    The channel axis (from the file's metadata or the documented defaults, see the
    README on input axes) is split off, so each layer is (Z, Y, X), (Y, X), or with a
    time axis (T, Z, Y, X) / (T, Y, X). An opaque alpha channel (RGBA, the fourth of
    four channels constant) is dropped, as the CLI does. The scale is the voxel size in
    micrometres when the file gives it (1 per pixel otherwise). ``metadata["piscis"]``
    holds the layer's ``axes``, ``spacing`` (None when unknown), ``channel`` and
    ``source``.
    """
    from ..io import _is_alpha

    data, axes = stack.data, stack.axes
    stem = Path(stack.name).name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".btf", ".tf8"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    rest = axes.replace("C", "")
    spatial = [a for a in rest if a in "ZYX"]
    known = all(a in stack.spacing for a in spatial)
    spacing = tuple(float(stack.spacing[a]) for a in spatial) if known else None
    scale = tuple(1.0 for a in rest if a == "T") + (spacing or (1.0,) * len(spatial))
    channels = [None] if "C" not in axes else list(range(data.shape[axes.index("C")]))
    if len(channels) == 4 and _is_alpha(data.take(3, axis=axes.index("C"))):
        channels = channels[:3]  # RGBA with an opaque alpha: the colour channels
    layers = []
    for c in channels:
        arr = data if c is None else data.take(c, axis=axes.index("C"))
        kwargs = {
            "name": stem if c is None else f"{stem} [c{c}]",
            "scale": scale,
            "metadata": {
                "piscis": {
                    "axes": rest,
                    "spacing": spacing,
                    "channel": c,
                    "source": str(stack.name),
                }
            },
        }
        if c is not None and len(channels) > 1:
            kwargs["colormap"] = CHANNEL_COLORMAPS[c % len(CHANNEL_COLORMAPS)]
            kwargs["blending"] = "additive"
        layers.append((arr, kwargs, "image"))
    return layers


def _looks_like_spots(path) -> bool:
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            header = f.readline().strip().lower().split(",")
    except OSError:
        return False
    header = [h.strip().strip('"') for h in header]
    return ("y" in header and "x" in header) or sum(h.startswith("axis-") for h in header) >= 2


def _read_csv(path):
    from ..annotate import read_spot_table

    table = read_spot_table(path)
    coords = table.coords
    nd = coords.shape[1]
    scale = (1.0,) * (nd - 2) + tuple(table.scale)
    translate = (0.0,) * (nd - 2) + tuple(table.translate)
    features = dict(table.features)
    kwargs = {
        "name": Path(path).stem,
        "features": features,
        "scale": scale,
        "translate": translate,
        "metadata": {"piscis": {"role": "spots", "source": str(path)}},
        **POINTS_STYLE,
    }
    score = np.asarray(features.get("score", []), float)
    if len(score) and np.isfinite(score).all():
        kwargs.update(SCORE_COLORS)
    return [(coords, kwargs, "points")]


def _read_labels(path):
    from ..api import read_mask

    labels = read_mask(path)
    name = Path(path).name
    for suffix in LABEL_SUFFIXES:
        if name.lower().endswith(suffix):
            kind = suffix.strip("._").split(".")[0].replace("cp_", "")
            name = f"{name[: -len(suffix)]} {kind}"
            break
    return [(labels, {"name": name.strip() or "labels"}, "labels")]


# --------------------------------------------------------------------------- writer


def write_points(path: str, data, attributes: dict) -> list[str]:
    """npe2 writer: a Points layer -> our spot CSV, with its scale and translate."""
    from ..annotate import SpotTable, write_spot_table

    path = str(path)
    if not path.lower().endswith(".csv"):
        path += ".csv"
    data = np.asarray(data, float)
    nd = data.shape[1] if data.ndim == 2 and data.size else int(attributes.get("ndim", 2))
    data = data.reshape(-1, nd)
    feats = {}
    axes = ((attributes.get("metadata") or {}).get("piscis") or {}).get("axes")
    if isinstance(axes, str) and len(axes) == nd and "T" in axes:
        # Detections of one time point: the T coordinate is a t column, not z.
        feats["t"] = np.round(data[:, axes.index("T")]).astype(np.int64)
        data = data[:, [axes.index(a) for a in "ZYX" if a in axes]]
    elif nd > 3:
        data = data[:, -3:]
    features = attributes.get("features")
    if features is not None and len(features.columns):
        for col in features.columns:
            values = np.asarray(features[col])
            if values.dtype.kind in "biuf" or values.dtype == object:
                feats[str(col)] = values
    table = SpotTable(
        data,
        feats,
        tuple(attributes.get("scale", (1.0, 1.0)))[-2:],
        tuple(attributes.get("translate", (0.0, 0.0)))[-2:],
    )
    write_spot_table(path, table)
    return [path]


# --------------------------------------------------------------------------- sample data


def sample_dir() -> Path | None:
    """``sample_data/``: inside the installed package (``piscis/sample_data``, when
    the wheel ships it) or beside the package in a source checkout."""
    here = Path(__file__).resolve().parents[1]  # the piscis package
    for p in (here / "sample_data", here.parent / "sample_data"):
        if p.is_dir():
            return p
    return None


SAMPLES = {
    # key: (file, display name)
    "hybiss_2d": ("hybiss_2d.tif", "HybISS spots (512x512)"),
    "terra_2d": ("terra_2d.tif", "Live-cell spots (1024x1024)"),
    "synthetic_simple": ("synthetic_simple.tif", "Synthetic: 60 spots (512x512)"),
    "synthetic_cells": ("synthetic_cells.tif", "Synthetic: spots on cells (512x512)"),
    "synthetic_blank": ("synthetic_blank.tif", "Synthetic: no spots (512x512)"),
    "nuclei_2d": ("nuclei/nuclei_2d.tif", "Nuclei with labels (512x512)"),
    "synth_3d": ("3d/synth_3d.tif", "Synthetic 3D stack (32x128x128)"),
}


def load_sample(key: str) -> list:
    import tifffile

    folder = sample_dir()
    if folder is None:
        raise FileNotFoundError("piscis sample_data/ folder not found in this installation")
    rel, _ = SAMPLES[key]
    path = folder / rel
    data = tifffile.imread(path)
    layers = [(data, {"name": key}, "image")]
    labels = path.with_name(path.stem + ".labels.tif")
    if labels.exists():
        layers.append(
            (tifffile.imread(labels).astype(np.int32), {"name": f"{key} labels"}, "labels")
        )
    return layers


def _sample(key):
    def f():
        return load_sample(key)

    f.__name__ = f"sample_{key}"
    return f


sample_hybiss_2d = _sample("hybiss_2d")
sample_terra_2d = _sample("terra_2d")
sample_synthetic_simple = _sample("synthetic_simple")
sample_synthetic_cells = _sample("synthetic_cells")
sample_synthetic_blank = _sample("synthetic_blank")
sample_nuclei_2d = _sample("nuclei_2d")
sample_synth_3d = _sample("synth_3d")
