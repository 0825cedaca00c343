"""Cells and nuclei: label masks, classical segmentation, spot assignment, per-cell tables.

Spots are assigned to cells through integer label images (DESIGN.md section 7): 0 is
background and every cell (or nucleus) has its own id. Labels need not be consecutive
and keep their ids in every output (label 65000 stays 65000).

Label masks come from the user (:func:`read_labels`: TIFF, plain ``.npy``, Cellpose
``_seg.npy``) or from :func:`segment_nuclei` and :func:`segment_cells`.

**Assignment rule.** A spot at (y, x) (0-based, pixel (0, 0) centred at (0.0, 0.0))
belongs to the pixel ``(floor(y + 0.5), floor(x + 0.5))``: pixel (i, j) covers
[i - 0.5, i + 0.5) x [j - 0.5, j + 0.5), so a spot exactly half-way between two pixels
goes to the one with the larger index. ``cell_id`` is the cell label there (0 = outside
every cell, outside the image, or a non-finite coordinate); ``in_nucleus`` is True when
the nucleus label there is not 0. A spot on nucleus pixels that stick out of every cell
has ``cell_id`` 0 and ``in_nucleus`` True, and is counted in no cell.

**Per-cell table.** One row (a dict with the keys :data:`CELL_COLUMNS`) per label of
the cell mask, also for cells without spots, sorted by ``cell_id``; cells on the image
edge are kept and flagged (``touches_border``). Without a nucleus mask
``n_spots_nucleus`` and ``n_spots_cytoplasm`` are None (empty fields when written with
:class:`csv.DictWriter`); with nuclei only, the cells are the nuclei and every spot of a
cell is nuclear.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage import filters, morphology, segmentation
from skimage.feature import peak_local_max

logger = logging.getLogger(__name__)

# fmt: off
CELL_COLUMNS = ["cell_id", "area", "n_spots", "n_spots_nucleus", "n_spots_cytoplasm",
                "centroid_y", "centroid_x", "touches_border", "dense"]
# fmt: on

# A cell is "dense" when one of its spots has at least DENSE_NEIGHBOURS other spots within
# DENSE_RADIUS px: a local density of (4 + 1) / (pi 6^2) = 0.044 spots/px^2, about one spot
# per 5 x 5 px. The network does not resolve every spot past it (README, resolution
# limit): such clusters are fitted spot by spot (piscis.crowding), and flagged for review.
DENSE_RADIUS = 6.0
DENSE_NEIGHBOURS = 4


def dense_spots(coords, radius: float = DENSE_RADIUS) -> np.ndarray:
    """Per spot, how many other spots lie within ``radius`` px (an (N,) int array).

    The distance is taken in (y, x): a 3D spot's z is left out.
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=float)
    coords = coords.reshape(-1, coords.shape[-1] if coords.ndim == 2 else 2)[:, -2:]
    if len(coords) < 2:
        return np.zeros(len(coords), dtype=np.int64)
    counts = cKDTree(coords).query_ball_point(coords, radius, return_length=True)
    return np.asarray(counts, dtype=np.int64) - 1


_TIFF_SUFFIXES = (".tif", ".tiff", ".btf")


def _ids(values: np.ndarray, limit: int = 10) -> str:
    """Format up to ``limit`` ids for a message."""
    values = [int(v) for v in values]
    text = ", ".join(str(v) for v in values[:limit])
    return text + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")


def read_labels(path) -> np.ndarray:
    """Read an integer label image from a TIFF, a ``.npy`` file or a Cellpose ``_seg.npy``.

    Parameters
    ----------
    path : str or Path
        ``*.tif``/``*.tiff`` (tifffile), ``*_seg.npy`` (Cellpose: a dict saved with
        ``np.save``, masks under ``"masks"``) or another ``*.npy`` (a plain array).
        Singleton axes are squeezed.

    Returns
    -------
    labels : (Y, X) or (Z, Y, X) int64 array, checked with :func:`check_labels`.

    Raises
    ------
    ValueError
        Naming the file and the problem (unreadable, not 2D or 3D, no ``masks``, bad
        values).

    Notes
    -----
    Cellpose ``_seg.npy`` files are pickled dicts, so files whose name ends with
    ``_seg.npy`` are loaded with ``allow_pickle=True``: **this runs pickle, which can
    execute code; open only ``_seg.npy`` files you trust.** Every other ``.npy`` file
    is loaded with ``allow_pickle=False``.
    """
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith("_seg.npy"):
            data = np.load(path, allow_pickle=True)  # Cellpose: pickled dict (see Notes)
            if isinstance(data, np.ndarray) and data.dtype == object and data.ndim == 0:
                data = data.item()
            if not isinstance(data, dict):
                raise ValueError("a Cellpose _seg.npy file should hold a dict")
            if "masks" not in data:
                raise ValueError(f"no 'masks' key in the Cellpose file (keys: {sorted(data)})")
            labels = np.asarray(data["masks"])
        elif name.endswith(".npy"):
            labels = np.load(path, allow_pickle=False)
        elif name.endswith(_TIFF_SUFFIXES):
            labels = tifffile.imread(path)
        else:
            raise ValueError("unknown label file type (expected .tif, .tiff, .npy, _seg.npy)")
    except ValueError as err:
        raise ValueError(f"cannot read labels from {path}: {err}") from err
    except Exception as err:  # missing, truncated or corrupt file
        raise ValueError(f"cannot read labels from {path}: {type(err).__name__}: {err}") from err
    labels = np.asarray(labels)
    if labels.ndim > 2:
        labels = labels.squeeze()
    return check_labels(labels, name=str(path))


def check_labels(labels, shape=None, name: str = "labels") -> np.ndarray:
    """Validate a label image and return it as an int64 array.

    Parameters
    ----------
    labels : array_like
        2D (Y, X) or 3D (Z, Y, X) label image, 0 = background. Every integer dtype and
        byte order gives the same result. bool is one object (label 1), with a warning;
        floats are accepted, with a warning, only if all values are integral. Only 0: a
        warning.
    shape : tuple, optional
        The image's shape: a 2D mask must match its last two axes (it applies to every
        plane of a volume), a 3D mask all three.
    name : str
        How to call the mask in messages (e.g. its file name).

    Raises
    ------
    ValueError
        Not 2D or 3D, shape differing from ``shape`` (both shapes given), complex/object
        dtype, non-integral or non-finite floats, negative values, values beyond int64.
    """
    labels = np.asarray(labels)
    kind = labels.dtype.kind
    if labels.ndim not in (2, 3):
        raise ValueError(
            f"{name}: a label image must be 2D (Y, X) or 3D (Z, Y, X), got shape {labels.shape}"
        )
    if shape is not None and tuple(labels.shape) != tuple(shape)[-labels.ndim :]:
        want = tuple(shape)[-labels.ndim :]
        if len(shape) < labels.ndim:
            want = f"{tuple(shape)} (a 3D mask needs a 3D image)"
        raise ValueError(
            f"{name}: label shape {tuple(labels.shape)} does not match the image shape {want}"
        )
    if kind == "b":
        logger.warning("%s: boolean mask taken as a single object (label 1)", name)
        labels = labels.astype(np.int64)
    elif kind == "f":
        if not np.all(np.isfinite(labels)):
            raise ValueError(f"{name}: labels hold non-finite values (NaN or inf)")
        frac = labels != np.round(labels)
        if frac.any():
            raise ValueError(
                f"{name}: labels must be integers, got {labels.dtype} with non-integral "
                f"values (e.g. {labels[frac][0].item()!r}, {int(frac.sum())} pixels)"
            )
        logger.warning("%s: float labels (%s) with integral values cast to int", name, labels.dtype)
    elif kind not in "ui":
        raise ValueError(f"{name}: labels must be an integer image, got dtype {labels.dtype}")
    if kind in "uf" and labels.size and labels.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: label values too large for int64 ({labels.max()!r})")
    if kind in "fi" and labels.size and labels.min() < 0:
        raise ValueError(
            f"{name}: labels must not be negative (0 = background); {int((labels < 0).sum())} "
            f"pixels are, the smallest is {labels.min()}"
        )
    labels = labels.astype(np.int64, copy=False)
    if not labels.any():
        logger.warning("%s: label image holds only 0 (no objects)", name)
    return labels


def _prepare(image, name="image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"{name} must be 2D (Y, X), got shape {image.shape}")
    if image.dtype.kind not in "uif":
        raise ValueError(f"{name}: unsupported dtype {image.dtype}")
    image = image.astype(np.float64)
    finite = np.isfinite(image)
    if not finite.all():
        logger.warning("%s: %d non-finite pixels set to the minimum", name, int((~finite).sum()))
        image[~finite] = image[finite].min() if finite.any() else 0.0
    return image


def _threshold(smoothed: np.ndarray, threshold, name: str) -> float | None:
    """Return the foreground threshold, or None when the image is flat."""
    if threshold is not None and not isinstance(threshold, str):
        return float(threshold)
    if smoothed.max() - smoothed.min() <= 1e-12 * max(1.0, abs(smoothed.max())):
        logger.warning("%s is flat: no objects", name)
        return None
    method = (threshold or "otsu").lower()
    if method == "otsu":
        return float(filters.threshold_otsu(smoothed))
    if method == "li":
        return float(filters.threshold_li(smoothed))
    raise ValueError(f"unknown threshold method {threshold!r} (use 'otsu', 'li' or a number)")


def segment_nuclei(
    image,
    diameter: float = 30,
    smooth_sigma: float = 2.0,
    min_area: float | None = None,
    threshold=None,
    local_ratio: float | None = 1.1,
    min_distance: int | None = None,
    h: float | None = None,
    dist_sigma: float = 0.03,
    min_contrast: float = 3.0,
) -> np.ndarray:
    """Segment nuclei in a nuclear (e.g. DAPI) channel; all sizes in pixels.

    On the image smoothed with a Gaussian (``smooth_sigma``):

    1. foreground = above a global automatic threshold and locally bright,
       ``s - b > local_ratio * (m - b)`` (``s`` smoothed image, ``m`` its local mean,
       Gaussian sigma ``diameter / 3``, ``b`` median of the pixels below the global
       threshold). The local test trims the blurred halo between neighbouring nuclei so
       that dim and bright nuclei are both outlined and touching ones part at the neck;
    2. holes filled; objects smaller than ``min_area``, or whose mean exceeds ``b`` by
       no more than ``min_contrast`` background noise SDs (robust, raw pixels), are
       dropped, so a blank or noise-only image gives no nuclei;
    3. distance-transform watershed: seeds are maxima of the distance map (smoothed by
       ``dist_sigma * diameter``) at least ``min_distance`` apart (``peak_local_max``
       with a disk footprint of that radius) that rise ``h`` above their saddle
       (h-maxima), against over-splitting; every object gets at least one seed;
    4. watershed pieces smaller than ``min_area`` merge into the neighbour they touch
       most.

    With the defaults, ``scripts/eval_segmentation.py`` matches 86% of the 125 nuclei
    (about 24 px) of the StarDist example image at IoU >= 0.5.

    Parameters
    ----------
    image : (Y, X) array
        Nuclear channel; non-finite pixels are set to the minimum.
    diameter : float
        Expected nucleus diameter (default 30); 0.7-1.3 times the truth works.
    smooth_sigma : float
        Gaussian sigma before thresholding (default 2).
    min_area : float, optional
        Smallest nucleus area; default ``0.1 * pi * (diameter / 2) ** 2``.
    threshold : None, "li", "otsu" or float
        Global threshold on the smoothed image: None = Li (keeps dim nuclei), Otsu
        (stricter), or a value in image units.
    local_ratio : float or None
        Local contrast factor of step 1 (default 1.1); None turns the test off.
    min_distance : int, optional
        Smallest distance between nucleus centres; default ``diameter / 4``.
    h : float, optional
        Dynamic a distance maximum needs to seed its own nucleus; default
        ``diameter / 60``.
    dist_sigma : float
        Distance-map smoothing as a fraction of ``diameter`` (default 0.03).
    min_contrast : float
        Smallest object contrast in background noise SDs (default 3).

    Returns
    -------
    labels : (Y, X) int64 array, nuclei numbered 1..n (all 0 when none is found).
    """
    image = _prepare(image, "nuclear channel")
    diameter = float(diameter)
    if not diameter > 0:
        raise ValueError(f"diameter must be positive, got {diameter}")
    min_area = 0.1 * np.pi * (diameter / 2) ** 2 if min_area is None else min_area
    min_distance = max(1, round(diameter / 4)) if min_distance is None else min_distance
    h = diameter / 60 if h is None else h
    empty = np.zeros(image.shape, np.int64)
    smoothed = ndi.gaussian_filter(image, smooth_sigma) if smooth_sigma > 0 else image
    level = _threshold(smoothed, "li" if threshold is None else threshold, "nuclear channel")
    fg = smoothed > level if level is not None else None
    if fg is None or not fg.any() or fg.all():
        return empty
    bg_level = float(np.median(image[~fg]))
    noise = 1.4826 * float(np.median(np.abs(image[~fg] - bg_level)))
    # The nuclei's size, on the thresholded foreground (before the local-contrast cut,
    # which splits a textured nucleus into bits).
    whole, n_whole = ndi.label(ndi.binary_fill_holes(fg))
    _check_diameter(ndi.distance_transform_edt(whole > 0), whole, n_whole, diameter)
    if local_ratio is not None:
        b = float(np.median(smoothed[~fg]))
        fg &= smoothed - b > local_ratio * (ndi.gaussian_filter(smoothed, diameter / 3) - b)
    components, n = ndi.label(ndi.binary_fill_holes(fg))
    drop = np.bincount(components.ravel(), minlength=n + 1) < min_area  # debris
    if n:
        means = ndi.mean(image, components, index=np.arange(1, n + 1))
        drop[1:] |= means - bg_level <= min_contrast * noise  # noise, not nuclei
    drop[0] = True
    fg = ~drop[components]
    if not fg.any():
        return empty
    components, _ = ndi.label(fg)
    raw_dist = ndi.distance_transform_edt(fg)
    dist = ndi.gaussian_filter(raw_dist, dist_sigma * diameter) if dist_sigma else raw_dist
    footprint = morphology.disk(min_distance)
    peaks = peak_local_max(
        dist, min_distance, footprint=footprint, labels=components, exclude_border=False
    )
    # One seed per h-maximum plateau that holds a kept peak.
    tops = np.zeros(fg.shape, bool)
    tops[tuple(peaks.T)] = True
    if h:
        tops = morphology.h_maxima(dist, h).astype(bool)
    regions, n_regions = ndi.label(tops & fg, structure=np.ones((3, 3)))
    seeded = np.zeros(n_regions + 1, bool)
    seeded[regions[tuple(peaks.T)]] = True
    seeded[0] = False
    markers = np.where(seeded[regions], regions, 0)
    labels = segmentation.watershed(-raw_dist, markers, mask=fg)
    orphans, _ = ndi.label(fg & (labels == 0))  # objects without a seed: one nucleus each
    labels = np.where(orphans > 0, orphans + n_regions, labels)
    labels = segmentation.relabel_sequential(labels)[0]
    return segmentation.relabel_sequential(_merge_small(labels, min_area))[0].astype(np.int64)


def _check_diameter(dist, components, n: int, diameter: float) -> None:
    """Warn when the foreground's objects are far wider or narrower than ``diameter``.

    An object's width is its widest inscribed circle (twice its largest distance to the
    background): a clump of touching nuclei is as wide as one of them. Nuclei 5 times
    the diameter given are cut into some 20 pieces each, with no other sign of it.
    """
    if n == 0:
        return
    index = np.arange(1, n + 1)
    big = np.bincount(components.ravel(), minlength=n + 1)[1:] >= 50  # not specks
    if np.count_nonzero(big) < 3:
        return
    widths = 2 * np.asarray(ndi.maximum(dist, components, index=index[big]))
    width = float(np.median(widths))
    if not 0.4 * diameter <= width <= 2.0 * diameter:
        logger.warning(
            "nuclear channel: the nuclei look about %.0f px across (median widest inscribed "
            "circle of %d objects) for a nucleus diameter of %g px: they may be %s; set the "
            "diameter to about %.0f (--nucleus-diameter in the CLI)",
            width, len(widths), diameter,
            "cut into pieces" if width > diameter else "merged", width,
        )  # fmt: skip


def _merge_small(labels: np.ndarray, min_area: float) -> np.ndarray:
    """Merge objects (labels 1..n) smaller than ``min_area`` into the neighbour they touch most."""
    labels = labels.copy()
    areas = np.bincount(labels.ravel())
    boxes = ndi.find_objects(labels)
    for lab in np.flatnonzero(areas < min_area):
        if lab == 0 or areas[lab] == 0 or boxes[lab - 1] is None:
            continue
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in boxes[lab - 1])
        view = labels[box]  # a view: writes go to labels
        obj = view == lab
        around = view[ndi.binary_dilation(obj, np.ones((3, 3), bool)) & ~obj]
        around = around[(around > 0) & (around != lab)]
        target = np.bincount(around).argmax() if around.size else 0
        view[obj] = target
        areas[target] += areas[lab]
        areas[lab] = 0
    return labels


def segment_cells(
    nuclei,
    cytoplasm=None,
    expand: float = 15,
    threshold=None,
    smooth_sigma: float = 2.0,
    max_distance: float | None = None,
) -> np.ndarray:
    """Make cell labels from nucleus labels, keeping the nucleus ids; sizes in pixels.

    Without a cytoplasm channel each nucleus grows by at most ``expand``, never into a
    neighbour (:func:`skimage.segmentation.expand_labels`: a pixel goes to the nearest
    nucleus). With one, the cell foreground (smoothed channel above ``threshold``, plus
    the nuclei) is split by a watershed on the inverted smoothed intensity seeded by the
    nuclei; foreground not connected to a nucleus stays background.

    Parameters
    ----------
    nuclei : (Y, X) int array
        Nucleus labels.
    cytoplasm : (Y, X) array, optional
        Cytoplasm channel.
    expand : float
        Growth distance without a cytoplasm channel (default 15).
    threshold : None, "otsu", "li" or float
        Cell foreground threshold on the smoothed cytoplasm (None = Otsu).
    smooth_sigma : float
        Gaussian sigma for the cytoplasm channel (default 2).
    max_distance : float, optional
        With a cytoplasm channel, pixels farther from every nucleus stay background.

    Returns
    -------
    labels : (Y, X) int64 array; the cell grown from nucleus k has label k.
    """
    nuclei = check_labels(nuclei, name="nuclei")
    if cytoplasm is None:
        return segmentation.expand_labels(nuclei, distance=expand).astype(np.int64)
    cyto = _prepare(cytoplasm, "cytoplasm channel")
    if cyto.shape != nuclei.shape:
        raise ValueError(
            f"cytoplasm shape {cyto.shape} does not match the nuclei shape {nuclei.shape}"
        )
    smoothed = ndi.gaussian_filter(cyto, smooth_sigma) if smooth_sigma > 0 else cyto
    level = _threshold(smoothed, threshold, "cytoplasm channel")
    fg = nuclei > 0
    if level is not None:
        fg = fg | (smoothed > level)
    if max_distance is not None:
        fg &= ndi.distance_transform_edt(nuclei == 0) <= max_distance
    labels = segmentation.watershed(-smoothed, nuclei, mask=fg)
    return labels.astype(np.int64)


def assign_spots(coords, cells=None, nuclei=None) -> tuple[np.ndarray, np.ndarray]:
    """Give each spot its cell and say whether it lies in a nucleus.

    Parameters
    ----------
    coords : (N, 2) float array
        Spot (y, x) positions, 0-based, pixel centres at integer coordinates. (N, 3)
        (z, y, x) spots use their y, x columns on a 2D mask (applied to every slice)
        and the rounded voxel on a 3D mask.
    cells : (Y, X) or (Z, Y, X) int array, optional
        Cell labels. If None, the nuclei are the cells.
    nuclei : int array of the cells' shape, optional
        Nucleus labels; their ids need not match the cell ids.

    Returns
    -------
    cell_id : (N,) int64
        Cell label at the rounded pixel ``floor(coord + 0.5)``; 0 outside every cell,
        outside the image, or for a non-finite coordinate.
    in_nucleus : (N,) bool
        Nucleus label at the rounded pixel is not 0; all False without nuclei.
    """
    if cells is None and nuclei is None:
        raise ValueError("assign_spots needs cells, nuclei, or both")
    if cells is None:
        nuclei = check_labels(nuclei, name="nuclei")
        cells = nuclei
    else:
        cells = check_labels(cells, name="cells")
        if nuclei is not None:
            nuclei = check_labels(nuclei, cells.shape, name="nuclei")
    coords = np.asarray(coords, dtype=np.float64)
    coords = coords.reshape(0, 2) if coords.size == 0 else coords
    if coords.ndim != 2 or coords.shape[1] not in (2, 3):
        raise ValueError(f"coords must be an (N, 2) or (N, 3) array, got shape {coords.shape}")
    if cells.ndim == 3 and coords.shape[1] != 3:
        raise ValueError("a 3D (Z, Y, X) mask needs (z, y, x) spots, got (y, x) ones")
    pos = coords[:, -cells.ndim :]  # (z, y, x) spots on a 2D mask: use y, x
    valid = np.all(np.isfinite(pos), axis=1)
    pix = np.zeros(pos.shape, np.int64)
    pix[valid] = np.floor(pos[valid] + 0.5).astype(np.int64)
    valid &= np.all((pix >= 0) & (pix < np.asarray(cells.shape)), axis=1)
    at = tuple(pix[valid].T)
    cell_id = np.zeros(len(pix), np.int64)
    cell_id[valid] = cells[at]
    in_nucleus = np.zeros(len(pix), bool)
    if nuclei is not None:
        in_nucleus[valid] = nuclei[at] != 0
    if not valid.all():
        logger.info("%d spots outside the image or non-finite: cell_id 0", int((~valid).sum()))
    return cell_id, in_nucleus


def nuclei_outside_cells(cells, nuclei) -> np.ndarray:
    """Ids of the nuclei that have no pixel in any cell; logs a warning naming them.

    Such nuclei are not made into cells. Nuclei that stick partly out of their cell are
    reported at info level.
    """
    cells = check_labels(cells, name="cells")
    nuclei = check_labels(nuclei, cells.shape, name="nuclei")
    all_ids = np.unique(nuclei[nuclei > 0])
    inside = np.unique(nuclei[(nuclei > 0) & (cells > 0)])
    outside = np.setdiff1d(all_ids, inside)
    if outside.size:
        msg = "%d nuclei lie outside every cell and are ignored (nucleus ids: %s)"
        logger.warning(msg, outside.size, _ids(outside))
    partial = np.setdiff1d(np.unique(nuclei[(nuclei > 0) & (cells == 0)]), outside)
    if partial.size:
        msg = "%d nuclei stick out of the cell mask; spots there get cell_id 0 (ids: %s)"
        logger.info(msg, partial.size, _ids(partial))
    return outside


def _per_label(values: np.ndarray, ids: np.ndarray, weights=None) -> np.ndarray:
    """Count (or sum ``weights``) per id of the sorted ``ids`` over the labels ``values``."""
    if not len(ids):
        return np.zeros(0)
    idx = np.clip(np.searchsorted(ids, values), 0, len(ids) - 1)
    hit = ids[idx] == values
    w = None if weights is None else np.asarray(weights)[hit]
    return np.bincount(idx[hit], weights=w, minlength=len(ids))


def _label_stats(cells: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, ...]:
    """Area (voxels for a 3D mask) and centroid (y, x) of each id, in blocks of rows
    to bound memory."""
    if cells.ndim == 3:
        stats = [_label_stats(plane, ids) for plane in cells]
        area = np.sum([a for a, _, _ in stats], axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            sy = np.sum([np.nan_to_num(a * y) for a, y, _ in stats], axis=0) / area
            sx = np.sum([np.nan_to_num(a * x) for a, _, x in stats], axis=0) / area
        return area, sy, sx
    area, sy, sx = (np.zeros(len(ids)) for _ in range(3))
    step = max(1, 2**16 // max(1, cells.shape[1]))
    cols = np.arange(cells.shape[1], dtype=np.float64)
    for r0 in range(0, cells.shape[0], step):
        block = cells[r0 : r0 + step]
        rows = np.arange(r0, r0 + len(block), dtype=np.float64)
        flat = block.ravel()
        area += _per_label(flat, ids)
        sy += _per_label(flat, ids, np.repeat(rows, block.shape[1]))
        sx += _per_label(flat, ids, np.tile(cols, len(block)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return area, sy / area, sx / area


def cell_table(
    cells, cell_id, in_nucleus=None, nuclei=None, drop_border: bool = False, coords=None
) -> list[dict]:
    """Per-cell summary: one row per cell label, also for cells without spots.

    Parameters
    ----------
    cells : (Y, X) or (Z, Y, X) int array
        Cell labels (with only nuclei, pass them as ``cells`` and as ``nuclei``).
    cell_id, in_nucleus : (N,) arrays
        Output of :func:`assign_spots`.
    nuclei : (Y, X) int array, optional
        Nucleus labels. Without them the nuclear/cytoplasmic split is unknown:
        ``n_spots_nucleus`` and ``n_spots_cytoplasm`` are None. Nuclei outside every
        cell are reported in a warning (:func:`nuclei_outside_cells`).
    drop_border : bool
        Leave out cells touching the image edge, logging their ids (default False:
        they are kept and flagged).
    coords : (N, 2) array, optional
        The spots' positions, for the ``dense`` flag (None without them).

    Returns
    -------
    rows : list of dict with the keys :data:`CELL_COLUMNS`, sorted by ``cell_id``:
        ``area`` (px; voxels for a 3D mask), ``n_spots``, ``n_spots_nucleus``,
        ``n_spots_cytoplasm`` (= n_spots - n_spots_nucleus), ``centroid_y``,
        ``centroid_x`` (mean pixel position), ``touches_border`` (a pixel of the cell
        lies on the image's y or x edge; the first and last planes of a stack do not
        count), ``dense`` (a spot of the cell has :data:`DENSE_NEIGHBOURS` or more other
        spots within :data:`DENSE_RADIUS` px: its count is a lower bound).
    """
    cells = check_labels(cells, name="cells")
    if nuclei is not None:
        nuclei_outside_cells(cells, nuclei)
    cell_id = np.asarray(cell_id, dtype=np.int64).ravel()
    ids = np.unique(cells)
    ids = ids[ids > 0]
    unknown = np.setdiff1d(cell_id[cell_id > 0], ids)
    if unknown.size:
        raise ValueError(f"cell_id holds ids that are not in the cell mask: {_ids(unknown)}")
    area, cy, cx = _label_stats(cells, ids)
    edge = np.concatenate(
        [e.ravel() for e in (cells[..., 0, :], cells[..., -1, :], cells[..., 0], cells[..., -1])]
    )
    border = np.isin(ids, edge)
    n_spots = _per_label(cell_id, ids).astype(np.int64)
    n_nuc = [None] * len(ids)
    if nuclei is not None:
        flag = np.zeros(cell_id.shape, bool) if in_nucleus is None else np.asarray(in_nucleus)
        if flag.shape != cell_id.shape:
            raise ValueError(f"in_nucleus has {flag.size} values for {cell_id.size} spots")
        n_nuc = _per_label(cell_id[flag.astype(bool)], ids).astype(np.int64).tolist()
    dense = [None] * len(ids)
    if coords is not None:
        crowded = dense_spots(coords) >= DENSE_NEIGHBOURS
        if crowded.shape != cell_id.shape:
            raise ValueError(f"coords has {crowded.size} spots, cell_id {cell_id.size}")
        dense = (_per_label(cell_id[crowded], ids) > 0).tolist()
    rows = [
        dict(zip(CELL_COLUMNS, (lab, a, n, nn, None if nn is None else n - nn, y, x, bd, de)))
        for lab, a, n, nn, y, x, bd, de in zip(
            ids.tolist(), area.astype(np.int64).tolist(), n_spots.tolist(), n_nuc,
            cy.tolist(), cx.tolist(), border.tolist(), dense,
        )
    ]  # fmt: skip
    if drop_border and border.any():
        msg = "%d cells touching the image border left out (drop_border): ids %s"
        logger.info(msg, int(border.sum()), _ids(ids[border]))
        rows = [r for r in rows if not r["touches_border"]]
    return rows


def spots_per_cell(coords, cells=None, nuclei=None, drop_border: bool = False):
    """Assign spots and build the per-cell table in one call.

    Returns ``(cell_id, in_nucleus, rows)`` from :func:`assign_spots` and
    :func:`cell_table`. With only ``nuclei``, the nuclei are the cells.
    """
    cell_id, in_nucleus = assign_spots(coords, cells, nuclei)
    table_cells = nuclei if cells is None else cells
    rows = cell_table(
        table_cells, cell_id, in_nucleus, nuclei, drop_border=drop_border, coords=coords
    )
    return cell_id, in_nucleus, rows
