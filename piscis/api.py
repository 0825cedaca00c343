"""One call from arrays to a spot table and a per-cell table (DESIGN.md section 7).

:func:`count_spots` detects the spots of an image, takes cell and nucleus label images
from the caller or segments them from a nuclear (and optionally a cytoplasm) channel,
assigns every spot to its cell (:func:`piscis.cells.assign_spots`) and builds the
per-cell table (:func:`piscis.cells.cell_table`). ``piscis count`` calls it for every
image, so the command and the Python API give the same numbers::

    import piscis
    spots, cells = piscis.count_spots(image, nuclear_image=dapi)
    spots["cell_id"]          # per spot; 0 = outside every cell
    cells[0]["n_spots"]       # per cell, also for cells without spots
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import numpy as np

from .cells import check_labels, read_labels, segment_cells, segment_nuclei, spots_per_cell

logger = logging.getLogger(__name__)

# Keywords of segment_nuclei / segment_cells reachable through count_spots(**kwargs).
_PREFIXES = {
    "nucleus_": (segment_nuclei, {"image", "diameter", "min_area"}),
    "cell_": (segment_cells, {"nuclei", "cytoplasm", "expand"}),
}


def _split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """Map ``nucleus_<name>`` to segment_nuclei and ``cell_<name>`` to segment_cells."""
    known = {
        prefix: set(inspect.signature(func).parameters) - explicit
        for prefix, (func, explicit) in _PREFIXES.items()
    }
    out: dict[str, dict] = {prefix: {} for prefix in _PREFIXES}
    for key, value in kwargs.items():
        prefix = next((p for p in known if key.startswith(p) and key[len(p) :] in known[p]), None)
        if prefix is None:
            allowed = sorted(p + k for p, names in known.items() for k in names)
            raise TypeError(
                f"count_spots() got an unexpected keyword argument {key!r} "
                f"(segmentation keywords: {', '.join(allowed)})"
            )
        out[prefix][key[len(prefix) :]] = value
    return out["nucleus_"], out["cell_"]


def _plane(array, shape, what: str, name: str) -> np.ndarray:
    """A (Y, X) channel to segment: of the image's shape, or of its (Y, X) shape for a
    volume; a (Z, Y, X) channel of a volume's shape is max-projected."""
    array = np.asarray(array)
    shape = tuple(shape)
    if len(shape) == 3 and array.shape == shape:
        logger.info("%s: %s segmented on its max projection along z", name, what)
        return array.max(axis=0)
    if array.shape != shape[-2:] and array.shape != shape:
        raise ValueError(
            f"{name}: {what} shape {array.shape} does not match the image shape {shape}"
        )
    return array


def count_spots(
    image,
    cells=None,
    nuclei=None,
    nuclear_image=None,
    cytoplasm_image=None,
    model=None,
    threshold: float | None = None,
    scale: float | None = None,
    *,
    nucleus_diameter: float = 30,
    min_nucleus_area: float | None = None,
    expand: float = 15,
    tile_size: int | None = None,
    min_snr: float | None = None,
    min_planes: int | None = None,
    spacing=None,
    name: str = "image",
    return_masks: bool = False,
    roi=None,
    **segmentation_kwargs,
):
    """Detect the spots of an image and count them per cell and per nucleus.

    Cells and nuclei are integer label images (0 = background; ids need not be
    consecutive and are kept, nucleus ids need not match cell ids). Where they come from:

    - ``cells`` and/or ``nuclei`` given: used as they are;
    - ``nuclear_image`` given (instead of ``nuclei``): nuclei from
      :func:`piscis.cells.segment_nuclei`;
    - no ``cells`` but nuclei (given or segmented): cells from
      :func:`piscis.cells.segment_cells`, the nuclei grown by ``expand`` px, or a
      watershed on ``cytoplasm_image`` when given; a cell keeps its nucleus' id;
    - nothing: spots only, ``cells_table`` is empty.

    Parameters
    ----------
    image : (Y, X) or (Z, Y, X) array
        The spot channel. A volume may be any array-like with ``.shape``, ``.dtype``
        and ``image[z]`` (zarr, memmap); it is read plane by plane. A (Y, X, C) colour
        array (last axis 1 to 4 long, the others longer than 16) is refused: pass
        ``image[..., c]``.
    cells, nuclei : int arrays, optional
        Label images: (Y, X) of the image's (Y, X) shape (for a volume, applied to
        every plane), or (Z, Y, X) of a volume's shape; refused, with both shapes,
        otherwise.
    nuclear_image, cytoplasm_image : (Y, X) arrays, optional
        Channels to segment nuclei and cells from (not together with ``nuclei`` and
        ``cells`` respectively; ``cytoplasm_image`` needs nuclei as seeds). For a
        volume: (Y, X), or (Z, Y, X) segmented on its max projection (2D cells for
        every plane).
    model, threshold, scale :
        As for :func:`piscis.detect.detect` (None: the default model, its threshold and
        scale).
    nucleus_diameter : float
        Expected nucleus diameter in px for :func:`~piscis.cells.segment_nuclei`
        (default 30).
    min_nucleus_area : float, optional
        Smallest nucleus area in px (default ``0.1 * pi * (nucleus_diameter / 2) ** 2``).
    expand : float
        Growth of the nuclei into cells in px without a cytoplasm channel (default 15;
        0: the nuclei are the cells).
    tile_size : int, optional
        Tile size of the detector (default its own).
    min_snr : float, optional
        Significance floor of the detector (default the model's own).
    min_planes : int, optional
        For a volume: planes a spot must be seen in (default the detector's, 2; 1 for
        fewer than 3 planes); ignored for a 2D image.
    spacing : tuple, optional
        Voxel size (z, y, x) in micrometres of a volume (``ImageData.spacing``), for the
        detector's ``fwhm_*_um`` columns.
    name : str
        How messages name the image (e.g. its file name).
    return_masks : bool
        Also return the label images used (given or segmented).
    roi : (y0, x0, height, width), optional
        Count only the spots in this rectangle, clipped to the image (see
        :func:`piscis.detect.detect`); cells are still listed whole.
    **segmentation_kwargs
        Further segmentation keywords: ``nucleus_<name>`` goes to ``segment_nuclei``
        (``nucleus_threshold``, ``nucleus_smooth_sigma``, ``nucleus_local_ratio``,
        ``nucleus_min_distance``, ``nucleus_h``, ``nucleus_dist_sigma``,
        ``nucleus_min_contrast``) and ``cell_<name>`` to ``segment_cells``
        (``cell_threshold``, ``cell_smooth_sigma``, ``cell_max_distance``).

    Returns
    -------
    spots_table : dict of str -> (N,) array
        ``y, x, score, intensity, background`` (``z, y, x, ...`` for a volume, see
        :meth:`piscis.detect.Spots.columns`; and the detector's extra columns), with
        cells or nuclei also ``cell_id`` (0 = outside every cell) and ``in_nucleus``
        (bool; None for every spot when there is no nucleus mask). Sorted by (y, x)
        ((z, y, x) for a volume).
    cells_table : list of dict
        One row per cell label (sorted by id, also cells without spots), keys
        :data:`piscis.cells.CELL_COLUMNS`; ``n_spots_nucleus`` and ``n_spots_cytoplasm``
        are None without nuclei. Empty without cells and nuclei.
    masks : dict, only with ``return_masks``
        ``{"cells": labels or None, "nuclei": labels or None}``, (Y, X) or (Z, Y, X)
        int64.

    Notes
    -----
    A spot belongs to the pixel ``floor(y + 0.5), floor(x + 0.5)`` (see
    :mod:`piscis.cells`; on a 3D mask the voxel, z rounded the same way); a spot on
    nucleus pixels outside every cell has ``cell_id`` 0 and ``in_nucleus`` True.
    """
    from .detect import detect  # looked up at each call (tests may replace it)

    if not (hasattr(image, "shape") and hasattr(image, "dtype") and len(image.shape) == 3):
        image = np.asarray(image)  # a volume may stay lazy (read plane by plane)
    if len(image.shape) not in (2, 3):
        raise ValueError(
            f"{name}: count_spots takes a 2D (Y, X) image or a 3D (Z, Y, X) volume, "
            f"got shape {tuple(image.shape)}"
        )
    from .detect3d import check_not_channels_last

    check_not_channels_last(image.shape, name)  # before any segmentation
    if nuclei is not None and nuclear_image is not None:
        raise ValueError(f"{name}: give nuclei or nuclear_image, not both")
    if cells is not None and cytoplasm_image is not None:
        raise ValueError(f"{name}: give cells or cytoplasm_image, not both")
    if cytoplasm_image is not None and nuclei is None and nuclear_image is None:
        raise ValueError(f"{name}: cytoplasm_image needs nuclei or nuclear_image (the seeds)")
    nuc_kw, cell_kw = _split_kwargs(segmentation_kwargs)
    shape = tuple(image.shape)
    if cells is not None:
        cells = check_labels(cells, shape, name=f"{name}: cells")
    if nuclei is not None:
        nuclei = check_labels(nuclei, shape, name=f"{name}: nuclei")
    if nuclear_image is not None:
        nuclear_image = _plane(nuclear_image, shape, "nuclear image", name)
    if cytoplasm_image is not None:
        cytoplasm_image = _plane(cytoplasm_image, shape, "cytoplasm image", name)

    if nuclear_image is not None:
        nuclei = segment_nuclei(
            nuclear_image, diameter=nucleus_diameter, min_area=min_nucleus_area, **nuc_kw
        )
        logger.info("%s: %d nuclei segmented", name, int(nuclei.max()))
    if nuclei is not None and cells is None:
        cells = segment_cells(nuclei, cytoplasm=cytoplasm_image, expand=expand, **cell_kw)

    options = {} if tile_size is None else {"tile_size": tile_size}
    if roi is not None:
        options["roi"] = roi
    if len(shape) == 3 and spacing is not None:
        options["spacing"] = spacing
    if len(shape) == 3 and min_planes is not None:
        options["min_planes"] = min_planes
    spots = detect(
        image, model=model, threshold=threshold, scale=scale, name=name, min_snr=min_snr, **options
    )
    if len(spots) == 0:
        logger.warning("%s: no spots detected", name)
    table = dict(spots.columns())
    rows: list[dict] = []
    if cells is not None or nuclei is not None:
        cell_id, in_nucleus, rows = spots_per_cell(spots.coords, cells, nuclei)
        table["cell_id"] = cell_id
        table["in_nucleus"] = in_nucleus if nuclei is not None else np.full(len(cell_id), None)
    if return_masks:
        return table, rows, {"cells": cells, "nuclei": nuclei}
    return table, rows


def read_mask(path) -> np.ndarray:
    """Read a label image: TIFF, ``.npy``, Cellpose ``_seg.npy`` or PNG.

    TIFF and NumPy files go through :func:`piscis.cells.read_labels` (its note on
    ``_seg.npy`` and pickle applies); PNG (e.g. Cellpose's ``_cp_masks.png``, 8 or
    16 bit grey) is read here.

    Returns
    -------
    labels : (Y, X) int64 array.

    Raises
    ------
    ValueError
        Naming the file and the problem.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        return read_labels(path)
    import warnings

    from skimage import io as skio

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            labels = np.asarray(skio.imread(path))
    except Exception as err:
        msg = f"cannot read labels from {path}: {type(err).__name__}: {err}"
        raise ValueError(msg) from err
    if labels.ndim > 2:
        labels = labels.squeeze()
    return check_labels(labels, name=str(path))
