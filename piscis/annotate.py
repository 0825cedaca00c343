"""What the interactive front end (the napari plugin) needs from the core, as plain
NumPy: live re-thresholding, spot tables with a display transform, snapping a
clicked point to its spot, saving training pairs, validation splits, model
folders, and the per-cell export. No Qt, no napari: every function here can be
used from a script as well.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .crowding import add_crowded
from .detect import Maps, Spots, _logit, in_box, spots_from_maps, subset
from .io import MODELS_DIR, InputError, atomic_write_text, table_text, to_plane

logger = logging.getLogger(__name__)

MIN_THRESHOLD = 0.05  # the lowest threshold a slider can reach without a new decode


# --------------------------------------------------------------------------- re-thresholding


@dataclass
class SpotCandidates:
    """Every spot of an image down to ``min_threshold``, decoded once.

    A peak of the pooled map is a peak at any threshold below its score, and its
    position and intensity do not depend on the threshold, so the spots at a
    higher threshold are a subset of these: :meth:`at` filters, it does not
    decode. ``at(t)`` gives exactly ``spots_from_maps(maps, image, t)`` for every
    ``t >= min_threshold``.
    """

    spots: Spots
    logits: np.ndarray  # float32 pooled logit of each spot, the value decode compares
    min_threshold: float = MIN_THRESHOLD
    n_nonfinite: int = 0  # NaN or infinite pixels of the image, left out of the statistics
    # For the dense clusters of the spots kept at a threshold (None: not fitted): the
    # image, its noise and the measuring radius, and the offset of the spots' frame.
    image: np.ndarray | None = None
    noise: float = 0.0
    radius: float = 2.0
    origin: tuple[float, float] = (0.0, 0.0)
    box: tuple[int, int, int, int] | None = None  # a ROI (y0, y1, x0, x1): spots kept in it

    @classmethod
    def from_maps(
        cls, maps: Maps, image: np.ndarray, min_threshold: float = MIN_THRESHOLD
    ) -> SpotCandidates:
        spots = spots_from_maps(maps, image, min_threshold, crowded=False)
        s = np.clip(spots.score.astype(np.float64), 1e-300, None)
        with np.errstate(divide="ignore"):
            logits = (np.log(s) - np.log1p(-s)).astype(np.float32)  # exact float32 round trip
        return cls(
            spots, logits, float(min_threshold), image=image, noise=maps.noise,
            radius=2.0 / maps.scale,
        )  # fmt: skip

    def __len__(self) -> int:
        if self.box is None:
            return len(self.spots)
        return int(np.count_nonzero(in_box(self.spots.coords, self.box)))

    def mask(self, threshold: float) -> np.ndarray:
        threshold = float(threshold)
        if threshold < self.min_threshold - 1e-12:
            raise ValueError(
                f"threshold {threshold} is below the cached minimum {self.min_threshold}; "
                "decode the maps again"
            )
        return self.logits >= np.float32(_logit(threshold))

    def at(self, threshold: float) -> Spots:
        """The spots at ``threshold``, in (y, x) order as :func:`spots_from_maps` gives them."""
        keep = self.mask(threshold)
        s = self.spots
        extra = {k: np.asarray(v)[keep] for k, v in s.extra.items()}
        spots = Spots(s.coords[keep], s.score[keep], s.intensity[keep], s.background[keep], extra)
        if self.image is None:
            return spots
        # Dense clusters depend on which spots are kept: fitted at each threshold.
        shift = np.asarray(self.origin, dtype=float)
        spots.coords = spots.coords - shift
        spots = add_crowded(self.image, spots, self.noise, self.radius)
        spots.coords = spots.coords + shift
        return spots if self.box is None else subset(spots, in_box(spots.coords, self.box))

    def count(self, threshold: float) -> int:
        if self.image is None:
            return int(np.count_nonzero(self.mask(threshold)))
        return len(self.at(threshold))


def detect_candidates(
    image: np.ndarray,
    model,
    scale: float | None = None,
    roi=None,
    progress=None,
    min_threshold: float = MIN_THRESHOLD,
) -> SpotCandidates:
    """The :class:`SpotCandidates` of an image, or of a region of interest of it.

    The number of non-finite pixels (left out of the statistics) is in the
    candidates' ``n_nonfinite``. ``roi`` (y0, x0, height, width) is clipped to the
    image (an empty one is a ValueError); the network sees the ROI's surroundings
    and the normalisation comes from the whole image, so the candidates are the
    whole image's inside the ROI, in the whole image's coordinates (as
    :func:`piscis.detect.detect` gives them).
    """
    from .detect import clip_roi, model_normalization, predict_maps, roi_window

    norm = model_normalization(image, model)
    if norm.n_nonfinite:
        logger.warning("%d non-finite (NaN or infinite) pixels are ignored", norm.n_nonfinite)
    if roi is None:
        maps, _ = predict_maps(image, model, norm=norm, scale=scale, progress=progress)
        cands = SpotCandidates.from_maps(maps, image, min_threshold)
        cands.n_nonfinite = norm.n_nonfinite
        return cands
    box = clip_roi(roi, image.shape)
    wy0, wy1, wx0, wx1 = roi_window(box, image.shape, model.net)
    window = image[wy0:wy1, wx0:wx1]
    maps, _ = predict_maps(window, model, norm=norm, scale=scale, progress=progress)
    cands = SpotCandidates.from_maps(maps, window, min_threshold)
    origin = (float(wy0), float(wx0))
    # The window's spots are kept for fitting dense clusters, and cut to the ROI after.
    out = SpotCandidates(
        subset(cands.spots, np.ones(len(cands.spots), bool), origin), cands.logits,
        min_threshold, image=window, noise=cands.noise, radius=cands.radius, origin=origin,
        box=box,
    )  # fmt: skip
    out.n_nonfinite = norm.n_nonfinite
    return out


# --------------------------------------------------------------------------- spot tables

TRANSFORM_COLUMNS = ("scale_y", "scale_x", "translate_y", "translate_x")
FEATURE_COLUMNS = ("score", "intensity", "cell_id")  # always present when read
_COORD_NAMES = ("z", "y", "x")


@dataclass
class SpotTable:
    """Spot coordinates in the image's pixels, per-spot values, and how the
    spots were displayed: world = pixel * scale + translate (last two axes)."""

    coords: np.ndarray  # (N, 2) (y, x) or (N, 3) (z, y, x)
    features: dict[str, np.ndarray] = field(default_factory=dict)
    scale: tuple[float, ...] = (1.0, 1.0)
    translate: tuple[float, ...] = (0.0, 0.0)


def read_spot_table(path) -> SpotTable:
    """Read a spot CSV with all its numeric columns.

    Our tables (``y,x[,z],score,intensity,...``, optionally the display transform
    ``scale_y,scale_x,translate_y,translate_x`` written by :func:`write_spot_table`)
    and napari's Points export (``index,axis-0,axis-1[,...]``) are read; the
    coordinates go through :func:`piscis.io.read_spots` (same checks, same
    messages). ``score``, ``intensity`` and ``cell_id`` are always among the
    features (NaN where the file has none). Text columns are dropped.
    """
    from .io import csv_rows, read_spots

    path = Path(path)
    coords = read_spots(path)
    numbered, delimiter, _ = csv_rows(path)  # as read_spots reads it (delimiter, encoding)
    rows = [r for _, r in numbered]
    header = [c.strip() for c in rows[0]]
    lower = [h.lower() for h in header]
    body = rows[1:]
    axes = [h for h in lower if h.startswith("axis-")]
    napari_style = not ("y" in lower and "x" in lower) and len(axes) >= 2
    if napari_style and len(axes) >= 3:
        # napari's export of 3D points: axis-0 is z.
        iz = lower.index(sorted(axes, key=lambda h: int(h[5:]) if h[5:].isdigit() else 0)[-3])
        z = np.array([float(r[iz]) for r in body]).reshape(-1, 1)
        coords = np.hstack([z, coords])
    elif "z" in lower:
        z = _column(body, lower.index("z"), delimiter)
        if z is not None and np.all(np.isfinite(z)):
            coords = np.hstack([z.reshape(-1, 1), coords])
    used = set(axes) | {"index", *_COORD_NAMES}
    features: dict[str, np.ndarray] = {}
    transform: dict[str, float] = {}
    for i, (name, low) in enumerate(zip(header, lower)):
        if low in used or not name:
            continue
        values = _column(body, i, delimiter)
        if values is None:
            continue  # text
        if low in TRANSFORM_COLUMNS:
            finite = values[np.isfinite(values)]
            if finite.size:
                transform[low] = float(finite[0])
            continue
        features[low if low in FEATURE_COLUMNS else name] = values
    n = len(coords)
    for name in FEATURE_COLUMNS:
        features.setdefault(name, np.full(n, np.nan))
    scale = (transform.get("scale_y", 1.0), transform.get("scale_x", 1.0))
    translate = (transform.get("translate_y", 0.0), transform.get("translate_x", 0.0))
    if min(abs(scale[0]), abs(scale[1])) == 0:
        raise InputError(f"{path}: scale_y and scale_x must not be 0")
    return SpotTable(coords, features, scale, translate)


def _column(rows, i, delimiter: str = ",") -> np.ndarray | None:
    """A numeric column (empty cells: NaN), or None when it holds text; with a ';' or
    tab ``delimiter`` decimal commas are numbers too."""
    from .io import csv_number

    out = np.full(len(rows), np.nan)
    for k, r in enumerate(rows):
        cell = r[i].strip() if i < len(r) else ""
        if cell == "":
            continue
        if cell.lower() in ("true", "false"):
            out[k] = float(cell.lower() == "true")
            continue
        try:
            out[k] = csv_number(cell, delimiter)
        except ValueError:
            return None
    return out


def spot_table_columns(table: SpotTable) -> dict[str, np.ndarray]:
    """Columns for :func:`piscis.io.table_text`: coordinates, the features
    that hold a value, then the display transform when it is not the identity."""
    coords = np.asarray(table.coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] not in (2, 3):
        raise ValueError(f"coords must be (N, 2) or (N, 3), got shape {coords.shape}")
    names = _COORD_NAMES[3 - coords.shape[1] :]
    # y, x first (our convention), z after them.
    cols: dict[str, np.ndarray] = {"y": coords[:, -2], "x": coords[:, -1]}
    if coords.shape[1] == 3:
        cols["z"] = coords[:, 0]
    for name, values in table.features.items():
        if name in names or name in cols or name in TRANSFORM_COLUMNS:
            continue
        values = np.asarray(values)
        if values.shape != (len(coords),):
            continue
        if values.dtype.kind in "biuf":
            if values.dtype.kind == "f" and not np.isfinite(values).any():
                continue  # nothing to say (a feature read as NaN, say)
            if name in ("cell_id",) and values.dtype.kind == "f":
                if np.all(np.isfinite(values) & (values == np.round(values))):
                    values = values.astype(np.int64)
            cols[name] = values
        else:
            cols[name] = np.array([str(v) for v in values], dtype=object)
    scale = tuple(float(s) for s in table.scale[-2:])
    translate = tuple(float(t) for t in table.translate[-2:])
    if scale != (1.0, 1.0) or translate != (0.0, 0.0):
        n = len(coords)
        for name, v in zip(TRANSFORM_COLUMNS, (*scale, *translate)):
            cols[name] = np.full(n, v)
    return cols


def write_spot_table(path, table: SpotTable, overwrite: bool = True) -> Path:
    """Write ``table`` as our spot CSV (atomically); read back by :func:`read_spot_table`.

    Transform values use 12 significant digits so that a layer drawn at
    (0.5, 0.5) scale comes back on the same pixels; coordinates use 4 decimals
    (0.1 nm at 1 um per pixel).
    """
    path = Path(path)
    cols = spot_table_columns(table)
    text = table_text({k: v for k, v in cols.items() if k not in TRANSFORM_COLUMNS})
    if any(k in cols for k in TRANSFORM_COLUMNS):
        lines = text.splitlines()
        extra = [cols[k] for k in TRANSFORM_COLUMNS]
        lines[0] += "," + ",".join(TRANSFORM_COLUMNS)
        for i in range(1, len(lines)):
            lines[i] += "," + ",".join(f"{float(c[i - 1]):.12g}" for c in extra)
        text = "\n".join(lines) + "\n"
    atomic_write_text(path, text, overwrite=overwrite)
    return path


# --------------------------------------------------------------------------- annotation


def snap_to_peak(image: np.ndarray, point, radius: float = 3.0, sigma: float = 1.0) -> np.ndarray:
    """Move a clicked point to the intensity peak of its spot.

    The brightest pixel of the image smoothed with a Gaussian (``sigma``) within
    ``radius`` px of ``point``, then the centroid of the background-subtracted
    3x3 window around it (sub-pixel). The point is returned unchanged when the
    window holds no finite pixel or no peak. (y, x) in pixels.
    """
    image = np.asarray(image)
    p = np.asarray(point, dtype=np.float64)[-2:]
    if image.ndim != 2 or not np.all(np.isfinite(p)):
        return p
    h, w = image.shape
    k = int(math.ceil(radius)) + 3
    cy, cx = int(round(p[0])), int(round(p[1]))
    y0, y1, x0, x1 = max(cy - k, 0), min(cy + k + 1, h), max(cx - k, 0), min(cx + k + 1, w)
    if y0 >= y1 or x0 >= x1:
        return p
    crop = image[y0:y1, x0:x1].astype(np.float64)
    finite = np.isfinite(crop)
    if not finite.any():
        return p
    crop = np.where(finite, crop, np.min(crop[finite]))
    smooth = ndi.gaussian_filter(crop, sigma) if sigma > 0 else crop
    yy, xx = np.mgrid[y0:y1, x0:x1]
    near = np.hypot(yy - p[0], xx - p[1]) <= radius
    if not near.any():
        return p
    masked = np.where(near, smooth, -np.inf)
    iy, ix = np.unravel_index(int(np.argmax(masked)), masked.shape)
    level = float(np.median(smooth))
    spread = 1.4826 * float(np.median(np.abs(smooth - level)))
    if smooth[iy, ix] - level <= 3 * spread:
        return p  # no spot stands out here: keep the click
    box = (slice(max(iy - 1, 0), iy + 2), slice(max(ix - 1, 0), ix + 2))
    wgt = np.clip(smooth[box] - level, 0, None)
    wy, wx = yy[box], xx[box]
    if wgt.sum() <= 0:
        return np.array([yy[iy, ix], xx[iy, ix]], dtype=np.float64)
    return np.array([(wgt * wy).sum() / wgt.sum(), (wgt * wx).sum() / wgt.sum()])


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")


def pair_name(name: str) -> str:
    """A file-name-safe training pair name (letters, digits, ``._ -``)."""
    name = re.sub(r"[^A-Za-z0-9._ -]+", "_", str(name)).strip(" ._-") or "pair"
    if name.lower().endswith((".tif", ".tiff", ".png", ".csv")):
        name = name.rsplit(".", 1)[0]
    if name.lower().endswith(".mask"):
        name = name[:-5] + "_mask"
    return name


ANNOTATION_FRAME = "pixel"  # annotation CSVs hold 0-based pixel indices, centres at integers


def save_training_pair(
    folder,
    name: str,
    image: np.ndarray,
    coords: np.ndarray,
    region: np.ndarray | None = None,
    overwrite: bool = False,
    scale=None,
    translate=None,
    units: str | None = None,
) -> dict[str, Path]:
    """Write one training pair as ``piscis train`` reads it.

    ``NAME.tif`` (the image, its own dtype; a (Z, Y, X) volume with axes ``ZYX`` in
    its metadata), ``NAME.csv`` (``y,x`` or ``z,y,x``: 0-based pixel indices of the
    image array, pixel centres at integers), ``NAME.json`` (the coordinate frame:
    ``frame`` "pixel", ``axes``, and the display ``scale``, ``translate`` and
    ``units`` the points were drawn with, so world = pixel * scale + translate) and,
    when ``region`` is given, ``NAME.mask.tif`` (uint8, 255 where the image was fully
    annotated; a (Y, X) region of a volume applies to every plane). Spots off the
    image are dropped with a message. Existing files are kept unless ``overwrite``;
    with ``overwrite`` and no region, a stale ``NAME.mask.tif`` is removed (it would
    restrict training to an old region).

    Returns the paths written, by kind (``image``, ``spots``, ``frame``, ``mask``).
    """
    import json

    import tifffile

    folder = Path(folder)
    name = pair_name(name)
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(
            f"a training image must be 2D (Y, X) or 3D (Z, Y, X), got shape {image.shape}"
        )
    nd = image.ndim
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, nd)
    on = np.all((coords >= -0.5) & (coords < np.asarray(image.shape) - 0.5), axis=1)
    on &= np.all(np.isfinite(coords), axis=1)
    if not on.all():
        logger.info("%s: %d spots off the image left out", name, int((~on).sum()))
        coords = coords[on]
    if region is not None:
        region = np.asarray(region).astype(bool)
        if nd == 3 and region.shape == image.shape[1:]:
            region = np.broadcast_to(region, image.shape)
        if region.shape != image.shape:
            raise ValueError(
                f"region shape {region.shape} differs from the image shape {image.shape}"
            )
        if not region.any():
            raise ValueError("the annotated region is empty: draw it over the image")
    axes = "ZYX"[3 - nd :]
    scale = [1.0] * nd if scale is None else [float(v) for v in scale][-nd:]
    translate = [0.0] * nd if translate is None else [float(v) for v in translate][-nd:]
    frame = {
        "frame": ANNOTATION_FRAME,
        "origin": "0-based pixel indices, pixel centres at integers",
        "axes": axes,
        "columns": list(axes.lower()),
        "shape": list(image.shape),
        "scale": scale,
        "translate": translate,
        "units": units or ("pixel" if scale == [1.0] * nd else "unknown"),
        "world": "pixel * scale + translate",
    }
    paths = {
        "image": folder / f"{name}.tif",
        "spots": folder / f"{name}.csv",
        "frame": folder / f"{name}.json",
    }
    mask_path = folder / f"{name}.mask.tif"
    if region is not None:
        paths["mask"] = mask_path
    if not overwrite:
        existing = [p for p in [*paths.values(), mask_path] if p.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} exists; choose another name or overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_tiff(paths["image"], image, tifffile)
    cols = {a: coords[:, i] for i, a in enumerate(axes.lower())}
    if nd == 3:
        cols = {"z": cols["z"], "y": cols["y"], "x": cols["x"]}
    atomic_write_text(paths["spots"], table_text(cols, float_format="{:.6f}"))
    atomic_write_text(paths["frame"], json.dumps(frame, indent=2) + "\n")
    if region is not None:
        _atomic_tiff(mask_path, region.astype(np.uint8) * 255, tifffile)
    elif mask_path.exists():
        mask_path.unlink()
    return paths


@dataclass
class Annotations:
    """Annotation points read back: pixel indices and the frame they were drawn in."""

    coords: np.ndarray  # (N, 2) (y, x) or (N, 3) (z, y, x), 0-based pixel indices
    axes: str = "YX"
    scale: tuple[float, ...] = (1.0, 1.0)
    translate: tuple[float, ...] = (0.0, 0.0)
    units: str = "pixel"

    def world(self) -> np.ndarray:
        """The points in the display (world) frame: pixel * scale + translate."""
        return self.coords * np.asarray(self.scale) + np.asarray(self.translate)


def read_annotations(path) -> Annotations:
    """Read ``NAME.csv`` of a training pair with its ``NAME.json`` frame (when there).

    ``y,x`` or ``z,y,x`` columns (our CSVs; other layouts go through
    :func:`piscis.io.read_spots`, 2D). Without a JSON the frame is the identity.
    """
    import json

    from .io import read_spots

    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = [h.strip().lower() for h in next(csv.reader(f), [])]
    yx = read_spots(path)
    coords = yx
    if "z" in header:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))[1:]
        iz = header.index("z")
        z = np.array([float(r[iz]) for r in rows if r and any(c.strip() for c in r)])
        coords = np.column_stack([z, yx])
    nd = coords.shape[1]
    side = path.with_suffix(".json")
    info: dict = {}
    if side.exists():
        try:
            info = json.loads(side.read_text())
        except ValueError as e:
            raise InputError(f"{side}: not a JSON frame file ({e})") from None
        if info.get("frame", ANNOTATION_FRAME) != ANNOTATION_FRAME:
            raise InputError(f"{side}: frame {info.get('frame')!r} is not supported (pixel)")
        if len(info.get("axes", "ZYX"[3 - nd :])) != nd:
            raise InputError(f"{side}: axes {info.get('axes')!r} do not match {nd} CSV columns")
    return Annotations(
        coords,
        info.get("axes", "ZYX"[3 - nd :]),
        tuple(float(v) for v in info.get("scale", [1.0] * nd)),
        tuple(float(v) for v in info.get("translate", [0.0] * nd)),
        str(info.get("units", "pixel")),
    )


def _atomic_tiff(path: Path, data: np.ndarray, tifffile) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        md = {"axes": "ZYX"} if data.ndim == 3 else None  # tifffile's shaped metadata
        tifffile.imwrite(tmp, data, photometric="minisblack", metadata=md)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def split_for_validation(pairs: list, share: float, seed: int = 0) -> tuple[list, list]:
    """Hold out ``share`` of the annotations for validation.

    With enough pairs (``round(share * n) >= 1`` and at least one left to train
    on) whole pairs are held out, chosen with ``seed``. Otherwise (one annotated
    image, typically) each pair is cut in two: the last ``share`` of its longer
    axis validates, the rest trains, so even a single image gets a validation
    score. ``share`` 0 validates on nothing.
    """
    from .data import Pair

    pairs = list(pairs)
    if share <= 0 or not pairs:
        return pairs, []
    if not 0 < share < 1:
        raise ValueError(f"validation share must be in [0, 1), got {share}")
    n_val = int(round(share * len(pairs)))
    if n_val >= 1 and len(pairs) - n_val >= 1:
        order = np.random.default_rng(seed).permutation(len(pairs))
        val = [pairs[i] for i in sorted(order[:n_val])]
        train = [pairs[i] for i in sorted(order[n_val:])]
        return train, val
    train, val = [], []
    for p in pairs:
        axis = int(np.argmax(p.image.shape))
        length = p.image.shape[axis]
        cut = int(round(length * (1 - share)))
        if cut < 16 or length - cut < 16:
            train.append(p)  # too small to cut
            continue
        coords = np.asarray(p.coords).reshape(-1, 2)
        below = coords[:, axis] < cut - 0.5
        sl_a = [slice(None), slice(None)]
        sl_b = [slice(None), slice(None)]
        sl_a[axis], sl_b[axis] = slice(0, cut), slice(cut, None)
        shift = np.zeros(2)
        shift[axis] = cut
        region = p.region
        ra = None if region is None else region[tuple(sl_a)]
        rb = None if region is None else region[tuple(sl_b)]
        train.append(Pair(f"{p.name}[train]", p.image[tuple(sl_a)], coords[below], ra, p.norm))
        val.append(Pair(f"{p.name}[val]", p.image[tuple(sl_b)], coords[~below] - shift, rb, p.norm))
    return train, val


# --------------------------------------------------------------------------- images


def axes_choices(shape, rgb: bool = False, recorded: str | None = None) -> list[str]:
    """The axis orders a displayed array of ``shape`` can be read with (the first is
    the best guess): only orders with Y and X last (or channels after them).

    ``recorded``: the axes a reader gave the array (the piscis reader records them,
    e.g. ``TZYX`` for a time series of z-stacks), offered first when they can run
    (:func:`runnable_axes`). This is the only way to a T (time) axis: one time point is
    detected at a time (``time`` of :func:`image_array` and :func:`plane`).
    """
    nd = len(shape)
    if nd == 2:
        guess = ["YX"]
    elif rgb:
        guess = ["YXC"] if nd == 3 else ["Z" * (nd - 3) + "YXC"]
    elif nd == 3:
        first = shape[0]
        guess = ["CYX", "ZYX"] if first <= 8 and first < min(shape[1:]) else ["ZYX", "CYX"]
    elif nd == 4:
        guess = ["ZCYX", "CZYX"] if shape[1] <= shape[0] else ["CZYX", "ZCYX"]
    else:
        guess = []
    if isinstance(recorded, str) and not rgb and runnable_axes(recorded, shape):
        recorded = recorded.upper()
        guess = [recorded, *[g for g in guess if g != recorded]]
    return guess


def runnable_axes(axes: str, shape) -> bool:
    """Whether :func:`image_array` and :func:`plane` run on an array of ``shape`` read
    with ``axes``: one letter per dimension, each of ``TCZYX`` once, Y and X last (or
    channels after them)."""
    axes = str(axes).upper()
    if len(axes) != len(shape) or len(set(axes)) != len(axes) or set(axes) - set("TCZYX"):
        return False
    return axes.replace("T", "").replace("C", "") in ("YX", "ZYX") and (
        axes.endswith("YX") or axes.endswith("YXC")
    )


def _time_point(data, axes: str, time: int | None, name: str):
    """``data`` at time point ``time`` (default 0) of a T axis, and the axes left;
    ``data`` and ``axes`` as they are without a T axis. A lazy array stays lazy (only
    that time point is read)."""
    if "T" not in axes:
        return data, axes
    i = axes.index("T")
    n = data.shape[i]
    t = 0 if time is None else int(time)
    if not 0 <= t < n:
        raise ValueError(f"{name}: time point {t} is out of range (0..{n - 1}, axes {axes})")
    return data[(slice(None),) * i + (t,)], axes.replace("T", "")


def plane(
    data, axes: str, channel: int | None = None, name: str = "image", time: int | None = None
) -> np.ndarray:
    """A 2D (Y, X) plane of a displayed array: the time point ``time`` of a T axis
    (default 0), the channel picked, a Z axis max-projected (see
    :func:`piscis.io.to_plane`)."""
    if isinstance(data, (list, tuple)):  # a multiscale pyramid: the full resolution
        data = data[0]
    data, axes = _time_point(data, axes.upper(), time, name)
    data = np.asarray(data)
    if "C" not in axes:
        channel = None
    return to_plane(data, axes, channel=channel, name=name, explicit=True).image


def image_array(
    data, axes: str, channel: int | None = None, name: str = "image", time: int | None = None
):
    """The (Y, X) or (Z, Y, X) array of a displayed array: the time point ``time`` of a
    T axis (default 0), the channel picked, the axes put in Z, Y, X order, no
    projection. A plain (Y, X) or (Z, Y, X) layer's data is returned as it is (a lazy
    volume stays lazy)."""
    if isinstance(data, (list, tuple)):  # a multiscale pyramid: the full resolution
        data = data[0]
    axes = axes.upper()
    if len(axes) == len(data.shape):
        data, axes = _time_point(data, axes, time, name)
    if "C" in axes:
        c = axes.index("C")
        n = data.shape[c]
        ch = 0 if channel is None else int(channel)
        if not 0 <= ch < n:
            raise ValueError(f"{name}: channel {ch} is out of range (0..{n - 1})")
        data = np.take(np.asarray(data), ch, axis=c)
        axes = axes.replace("C", "")
    if set(axes) - set("ZYX") or len(axes) != len(data.shape) or not axes.endswith("X"):
        raise ValueError(
            f"{name}: axes {axes!r} cannot be detected on (shape {tuple(data.shape)}); "
            "supported: YX, ZYX, with a C axis anywhere and a T axis (one time point)"
        )
    order = [axes.index(a) for a in "ZYX" if a in axes]
    if order != list(range(len(order))):
        data = np.transpose(np.asarray(data), order)
    return data


# --------------------------------------------------------------------------- models


def user_models_dir() -> Path:
    """Where new models go by default: ``$PISCIS_MODELS_DIR`` or ``~/.piscis/models``."""
    env = os.environ.get("PISCIS_MODELS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".piscis" / "models"


def is_model_folder(path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def find_models(extra_dirs=()) -> list[Path]:
    """Model folders: the shipped ones, then those under :func:`user_models_dir`
    and ``extra_dirs`` (a folder that is a model counts itself), newest first
    within each place."""
    out: list[Path] = []
    places = [MODELS_DIR, user_models_dir(), *[Path(d) for d in extra_dirs]]
    for place in places:
        if is_model_folder(place):
            found = [place]
        elif place.is_dir():
            found = sorted(
                (d for d in place.iterdir() if d.is_dir() and is_model_folder(d)),
                key=lambda d: (-d.stat().st_mtime, d.name) if place != MODELS_DIR else (0, d.name),
            )
        else:
            found = []
        for d in found:
            if d.resolve() not in {o.resolve() for o in out}:
                out.append(d)
    return out


def new_model_folder(parent, base: str) -> Path:
    """A model folder name under ``parent`` that does not exist yet:
    ``BASE-YYYYmmdd-HHMMSS`` (with a counter if needed)."""
    parent = Path(parent)
    stem = f"{pair_name(base)}-{time.strftime('%Y%m%d-%H%M%S')}"
    cand, k = parent / stem, 1
    while cand.exists() or cand.with_name(cand.name + ".ckpt").exists():
        k += 1
        cand = parent / f"{stem}-{k}"
    return cand


# --------------------------------------------------------------------------- cells


def cells_table_text(rows: list[dict], image: str) -> str:
    """``cells.csv`` as ``piscis count`` writes it: ``image`` then
    :data:`piscis.cells.CELL_COLUMNS`, one row per cell."""
    from .cells import CELL_COLUMNS

    names = ["image", *CELL_COLUMNS]
    full = [{"image": str(image), **r} for r in rows]
    return table_text({k: [r.get(k) for r in full] for k in names})


def count_values(rows: list[dict], key: str = "n_spots") -> dict[int, float]:
    """``cell_id`` -> ``rows[key]`` scaled to [0, 1] (for colouring cells by count);
    0 where the count is unknown (None)."""
    vals = {int(r["cell_id"]): (np.nan if r.get(key) is None else float(r[key])) for r in rows}
    arr = np.array(list(vals.values()), dtype=float)
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    return {k: (0.0 if not np.isfinite(v) else (v - lo) / span) for k, v in vals.items()}
