"""Dense clusters: spots the network cannot separate, recovered by fitting the image.

Spots packed closer than about twice their width look like one bright patch, and the
network gives such a patch fewer peaks than it holds (a 24 x 24 px patch of 60 spots
2.5 px apart gave 25). Where the detections themselves are dense, by the same rule as
the per-cell ``dense`` flag (a spot with :data:`piscis.cells.DENSE_NEIGHBOURS` or more
others within :data:`piscis.cells.DENSE_RADIUS` px), the cluster's pixels are fitted
by least squares as a sum of the image's own spot shape at the detections plus a
constant, and a spot is added where the residual holds a spot-shaped excess, one at
a time, refitting after each (the find, fit and subtract loop of crowded-field
photometry). The spot shape (width and amplitude) is measured on the image's single,
isolated detections. Anywhere else nothing changes: no spot is moved or removed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

logger = logging.getLogger(__name__)

ISOLATION = 5.0  # px: a detection with no other this close can show the spot shape
MIN_REFERENCES = 3  # single spots needed to measure the shape; fewer: nothing added
SIGMAS = np.round(np.arange(0.6, 3.01, 0.1), 2)  # the widths tried
MIN_AMPLITUDE = 0.5  # an added spot has at least this share of a single spot's amplitude
MIN_SNR = 5.0  # ... and stands this many noise levels out (matched filter)
REACH = 3.0  # sigmas: an added spot lies this close to a spot of its cluster
RELATIVE = 0.25  # ... with at least this share of its brightest neighbour's amplitude
GAP = 1.5  # sigmas: ... and no closer than this to any (a misfit there is the spot's own)
MAX_CLUSTER = 2000  # detections: a larger cluster is left as it is (and said)
MAX_REFERENCES = 400  # single spots read to measure the shape, spread over the image


@dataclass
class SpotShape:
    """A single spot of the image: a Gaussian of peak ``amplitude`` and width ``sigma``."""

    amplitude: float
    sigma: float
    n_references: int


def _gauss(py, px, y, x, sigma):
    return np.exp(-((py - y) ** 2 + (px - x) ** 2) / (2.0 * sigma**2))


def _read(image, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """A window of a 2D array or of a lazy plane (read by slicing only), as float64."""
    return np.asarray(image[y0:y1, x0:x1], dtype=np.float64)


def spot_shape(image, coords, background, noise: float, half: int = 3) -> SpotShape | None:
    """The width and the median amplitude of the image's single, isolated spots.

    A detection is a reference when no other lies within :data:`ISOLATION` px, its
    (2 ``half`` + 1)-px square lies on the image and its best-fitting Gaussian is among
    the narrowest (two merged spots fit a wider one). At most
    :data:`MAX_REFERENCES`, spread over the image, are read. None when fewer than
    :data:`MIN_REFERENCES` detections qualify.
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, float).reshape(-1, 2)
    background = np.asarray(background, float)
    if len(coords) < MIN_REFERENCES or not noise > 0:
        return None
    d = cKDTree(coords).query(coords, k=2)[0][:, 1]
    c = np.rint(coords).astype(int)
    h, w = image.shape[-2:]
    alone = (
        (d >= ISOLATION)
        & np.isfinite(background)
        & (c[:, 0] >= half) & (c[:, 0] < h - half) & (c[:, 1] >= half) & (c[:, 1] < w - half)
    )  # fmt: skip
    idx = np.flatnonzero(alone)
    if idx.size > MAX_REFERENCES:
        idx = idx[np.linspace(0, idx.size - 1, MAX_REFERENCES).astype(int)]
    patches = [_read(image, y - half, y + half + 1, x - half, x + half + 1) for y, x in c[idx]]
    fine = [i for i, v in enumerate(patches) if np.isfinite(v).all()]
    if len(fine) < MIN_REFERENCES:
        return None
    idx = idx[fine]
    vals = np.stack([patches[i] for i in fine]) - background[idx][:, None, None]
    off = np.arange(-half, half + 1)
    py = (c[idx, 0][:, None] + off)[:, :, None]
    px = (c[idx, 1][:, None] + off)[:, None, :]
    cy, cx = coords[idx, 0][:, None, None], coords[idx, 1][:, None, None]
    errs, amps = [], []
    for s in SIGMAS:
        g = _gauss(py, px, cy, cx, s)
        amp = np.sum(g * vals, axis=(1, 2)) / np.sum(g * g, axis=(1, 2))
        errs.append(np.sum((vals - amp[:, None, None] * g) ** 2, axis=(1, 2)))
        amps.append(amp)
    best = np.argmin(np.array(errs), axis=0)
    widths = SIGMAS[best]
    amp = np.array(amps)[best, np.arange(best.size)]
    # Two spots merged into one detection fit a wider Gaussian: the single spots are
    # the narrow ones, within 0.15 px of the width of the narrowest tenth.
    single = (widths <= np.quantile(widths, 0.1) + 0.15) & (amp > 0)
    if np.count_nonzero(single) < MIN_REFERENCES:
        return None
    sigma = float(np.median(widths[single]))
    return SpotShape(float(np.median(amp[single])), sigma, int(np.count_nonzero(single)))


def dense_clusters(coords: np.ndarray) -> list[np.ndarray]:
    """Groups of detections (index arrays) linked within the dense radius that hold at
    least one dense spot (the per-cell ``dense`` rule)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    from .cells import DENSE_NEIGHBOURS, DENSE_RADIUS, dense_spots

    coords = np.asarray(coords, float).reshape(-1, 2)
    seeds = dense_spots(coords) >= DENSE_NEIGHBOURS
    if not seeds.any():
        return []
    pairs = cKDTree(coords).query_pairs(DENSE_RADIUS, output_type="ndarray")
    n = len(coords)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    return [np.flatnonzero(label == k) for k in np.unique(label[seeds])]


def _residual(window, py, px, coords, sigma, valid):
    """Residual (0 off the ``valid`` pixels) and amplitudes of the least-squares fit
    of Gaussians at ``coords`` plus a constant, all >= 0 (the window is taken from its
    minimum: the constant is the background above it)."""
    from scipy.optimize import nnls  # only once a cluster is fitted: a large import

    b = window.ravel() - window.min()
    cols = [_gauss(py, px, y, x, sigma).ravel() for y, x in coords]
    a = np.column_stack([*cols, np.ones(b.size)])
    ok = valid.ravel()
    x, _ = nnls(a[ok], b[ok], maxiter=50 * a.shape[1])
    r = b - a @ x
    return np.where(ok, r, 0.0).reshape(window.shape), x


def _parabola(a: float, c: float, b: float) -> float:
    """Offset of the top of a parabola through (-1, a), (0, c), (1, b), within +-0.5."""
    den = a - 2 * c + b
    if not (np.isfinite(den) and den < 0):  # a side masked off (-inf), or flat
        return 0.0
    return float(np.clip(0.5 * (a - b) / den, -0.5, 0.5))


def _in_box(points: np.ndarray, lo, hi) -> np.ndarray:
    return np.all((points >= lo) & (points < hi), axis=1)


def crowded_spots(image, coords, background, noise: float, name: str = "image"):
    """The spots to add inside dense clusters of detections.

    Parameters
    ----------
    image : 2D array, or a lazy plane that reads windows by slicing
    coords : (N, 2) detections (y, x)
    background : (N,) each detection's local background (its ring's median)
    noise : the image's noise, in grey levels
    name : how log messages name the image

    Returns
    -------
    coords : (M, 2) positions of the added spots
    cluster : M index arrays: the detections of each added spot's cluster
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, float).reshape(-1, 2)
    none: tuple[np.ndarray, list[np.ndarray]] = (np.zeros((0, 2)), [])
    clusters = dense_clusters(coords)
    if not clusters:
        return none
    n_dense = sum(len(c) for c in clusters)
    shape = spot_shape(image, coords, background, noise)
    if shape is None:
        logger.warning(
            "%s: %d spots lie in dense clusters, and too few single spots (%d needed) show "
            "the spot shape to fit them: counts there are lower bounds",
            name, n_dense, MIN_REFERENCES,
        )  # fmt: skip
        return none
    s = shape.sigma
    floor = max(MIN_AMPLITUDE * shape.amplitude, MIN_SNR * noise / (math.sqrt(math.pi) * s))
    margin = int(math.ceil(3 * s)) + 1
    h, w = image.shape[-2:]
    dtype = np.dtype(getattr(image, "dtype", np.float64))
    saturation = float(np.iinfo(dtype).max) if dtype.kind in "iu" else None
    added: list[tuple[float, float]] = []
    owner: list[int] = []
    for k, members in enumerate(clusters):
        if len(members) > MAX_CLUSTER:
            logger.warning(
                "%s: a dense cluster of %d spots is too large to fit; its count is a lower "
                "bound", name, len(members),
            )  # fmt: skip
            continue
        y0, x0 = np.maximum(np.floor(coords[members].min(axis=0)).astype(int) - margin, 0)
        y1, x1 = np.minimum(np.ceil(coords[members].max(axis=0)).astype(int) + margin + 1, (h, w))
        window = _read(image, y0, y1, x0, x1)
        if not np.isfinite(window).all():
            continue
        py, px = np.mgrid[y0:y1, x0:x1]
        grid = np.column_stack([py.ravel(), px.ravel()])
        # Every spot that sheds light into the window is part of the fit: detections
        # outside the cluster, and spots added in a neighbouring cluster.
        lo, hi = (y0 - margin, x0 - margin), (y1 + margin, x1 + margin)
        outside = np.ones(len(coords), bool)
        outside[members] = False
        fixed = coords[outside & _in_box(coords, lo, hi)]
        if added:
            done = np.asarray(added)
            fixed = np.vstack([fixed, done[_in_box(done, lo, hi)]])
        own = coords[members]
        # Saturated pixels say only that the light is at least that much: left out.
        valid = window < saturation if saturation is not None else np.ones(window.shape, bool)
        new: list[tuple[float, float]] = []
        refused = np.zeros(window.shape, bool)
        for _ in range(3 * len(members)):
            pts = np.vstack([own, np.asarray(new).reshape(-1, 2)])
            every = np.vstack([pts, fixed])
            resid, _ = _residual(window, py, px, every, s, valid)
            # Matched filter: a Gaussian of width s and peak A gives A / 2 at its centre.
            mf = 2.0 * ndi.gaussian_filter(resid, s, mode="nearest")
            gap = cKDTree(pts).query(grid)[0].reshape(mf.shape)
            mf[(gap > REACH * s) | (gap < GAP * s) | refused] = -np.inf
            iy, ix = np.unravel_index(int(np.argmax(mf)), mf.shape)
            if not mf[iy, ix] >= floor:
                break
            dy = _parabola(*mf[iy - 1 : iy + 2, ix]) if 0 < iy < mf.shape[0] - 1 else 0.0
            dx = _parabola(*mf[iy, ix - 1 : ix + 2]) if 0 < ix < mf.shape[1] - 1 else 0.0
            cand = (y0 + iy + dy, x0 + ix + dx)
            # A misfit of a bright spot (wider, flatter or saturated) leaves a fraction of
            # its light beside it; a spot hidden in a cluster is about as bright as the
            # spots around it.
            near = np.hypot(*(every - cand).T) <= REACH * s
            _, amp = _residual(window, py, px, np.vstack([every, cand]), s, valid)
            if near.any() and amp[len(every)] < RELATIVE * amp[: len(every)][near].max():
                # Not a spot: the next best place is tried, away from this one.
                refused |= np.hypot(py - cand[0], px - cand[1]) < GAP * s
                continue
            new.append(cand)
        added.extend(new)
        owner.extend([k] * len(new))
    if added:
        logger.info(
            "%s: %d spots added in %d dense cluster(s) of %d detections by fitting the image "
            "(spot width %.2g px, from %d single spots)",
            name, len(added), len(clusters), n_dense, s, shape.n_references,
        )  # fmt: skip
    return np.asarray(added, float).reshape(-1, 2), [clusters[k] for k in owner]


def add_crowded(image, spots, noise: float, radius: float = 2.0, name: str = "image"):
    """``spots`` (a 2D :class:`piscis.detect.Spots`) with the spots of its dense clusters
    added (:func:`crowded_spots`), sorted as the detector sorts.

    An added spot's ``score`` is the median score of its cluster's detections; its
    ``intensity`` and ``background`` are measured as a detection's are.
    """
    from .detect import Spots, spot_intensities

    if len(spots) < 2 or spots.coords.shape[1] != 2 or spots.extra:
        return spots
    coords, cluster = crowded_spots(image, spots.coords, spots.background, noise, name)
    if not len(coords):
        return spots
    score = np.array([np.median(spots.score[m]) for m in cluster])
    inten, bg = np.full(len(coords), np.nan), np.full(len(coords), np.nan)
    k = int(math.ceil(radius + 3.0)) + 1
    h, w = image.shape[-2:]
    for i, (y, x) in enumerate(coords):
        y0, x0 = max(int(y) - k, 0), max(int(x) - k, 0)
        win = _read(image, y0, min(int(y) + k + 1, h), x0, min(int(x) + k + 1, w))
        a, b = spot_intensities(
            win, np.array([[y - y0, x - x0]]), radius, (radius + 1.0, radius + 3.0)
        )
        inten[i], bg[i] = a[0], b[0]
    all_c = np.vstack([spots.coords, coords])
    order = np.lexsort((all_c[:, 1], all_c[:, 0]))
    return Spots(
        all_c[order],
        np.r_[spots.score, score][order],
        np.r_[spots.intensity, inten][order],
        np.r_[spots.background, bg][order],
    )
