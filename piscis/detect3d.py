"""3D (Z, Y, X) spot detection with the 2D network (README "3D stacks").

1. One normalisation for the whole volume, from a sample over all planes
   (:func:`volume_normalization`), so a dim plane is not stretched.
2. Per plane (read as ``vol[z]``, so a lazy zarr or memmap volume streams), the 2D
   network tiled exactly as in 2D, decoded at the threshold: only peak lists are kept
   (:func:`volume_peaks`), never the float maps of the volume.
3. Peaks of consecutive planes within ``LINK_DISTANCE`` px in yx are linked into chains
   (one plane may be skipped); a chain whose intensity profile along z has two maxima
   with a clear dip is split there (:func:`link_peaks`). A chain is one spot; chains
   seen in fewer than ``min_planes`` planes are dropped (a spot's PSF spans several
   planes, a hot pixel one).
4. Each spot is measured on a crop of raw voxels read plane by plane
   (:func:`measure_spots`): a pixel-integrated 3D Gaussian with separate widths in z
   and yx gives the sub-slice z and the FWHMs; yx comes from the network in the best
   planes. A spot that two Gaussians on one z line fit much better is two spots (a z
   pair, ``z_split``).

Memory: a few planes and the peak lists. Processing the volume in z-blocks (``z_block``)
gives the same spots: each block is run with ``Z_HALO`` planes of context on either
side and keeps the spots whose z lies in its own planes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
from scipy.optimize import least_squares
from scipy.spatial import cKDTree
from scipy.special import erf

from .detect import (
    DEFAULT_TILE,
    SAMPLE_PIXELS,
    Normalization,
    Spots,
    _plane_peaks,
    estimate_normalization,
    spot_intensities,
    spot_significance,
)

logger = logging.getLogger(__name__)

LINK_DISTANCE = 1.5  # px in yx between peaks of consecutive planes of one spot
Z_HALO = 8  # planes of context on either side of a z-block
DIP_RATIO = 0.8  # a chain splits where its profile falls below this share of both maxima
DIP_SIGMAS = 4.0  # ... and by more than this many noise standard deviations
ELONGATED = 1.15  # FWHM_z above this multiple of the volume's median: a possible z pair
CROP_YX = 5  # half-size in px of the crop a spot is fitted on
# Peaks dropped for being seen in too few planes: warned about when at least this many,
# and more than the spots kept (a z step too coarse for the rule).
MIN_DROPPED_TO_WARN = 3
COLUMNS_3D = (
    "fwhm_z", "fwhm_yx", "fwhm_z_um", "fwhm_yx_um", "n_planes", "z_split", "z_elongated",
)  # fmt: skip


# --------------------------------------------------------------------------- input


def check_volume(vol, name: str = "image"):
    """Validate a (Z, Y, X) array-like (``.shape``, ``.dtype``, ``vol[z]``)."""
    if not hasattr(vol, "shape") or not hasattr(vol, "dtype"):
        vol = np.asarray(vol)
    dtype = np.dtype(vol.dtype)
    if dtype.kind not in "uif":
        raise TypeError(
            f"{name}: image dtype {dtype} is not supported: give integer or float pixels"
        )
    if len(vol.shape) != 3:
        raise ValueError(f"{name}: a volume must be 3D (Z, Y, X), got shape {tuple(vol.shape)}")
    if 0 in tuple(vol.shape):
        raise ValueError(f"{name}: image has a zero-size axis: shape {tuple(vol.shape)}")
    check_not_channels_last(vol.shape, name)
    return vol


CHANNELS_LAST = 4  # a last axis this short, under two axes longer than ...
MIN_PLANE_SIDE = 16  # ... this, is colour channels (Y, X, C), not a (Z, Y, X) stack


def check_not_channels_last(shape, name: str = "image") -> None:
    """Refuse a 3D shape that is a (Y, X, C) colour image (what PIL, imageio and
    scikit-image give for an RGB file), not a (Z, Y, X) stack: it would be detected as
    Y planes of X by C pixels."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == 3 and shape[-1] <= CHANNELS_LAST and min(shape[:2]) > MIN_PLANE_SIDE:
        raise ValueError(
            f"{name}: shape {shape} looks like a (Y, X, C) image with {shape[-1]} channel(s) "
            "last, not a (Z, Y, X) stack; pass one channel, image[..., c] (a 2D image), or "
            "a (Z, Y, X) stack (np.moveaxis(image, -1, 0) for planes stored last)"
        )


def read_plane(vol, z: int) -> np.ndarray:
    """Plane ``z`` as a native-byte-order array."""
    plane = np.asarray(vol[int(z)])
    if plane.dtype.byteorder not in "=|":
        plane = plane.astype(plane.dtype.newbyteorder("="))
    return plane


def _volume_sample(vol, n: int = SAMPLE_PIXELS) -> np.ndarray:
    """All planes, or evenly spaced planes, each sampled as :func:`detect._sample` does:
    (k, Y, X) whole planes or (m, 64, 64) blocks."""
    from .detect import _sample

    nz, h, w = vol.shape
    if nz * h * w <= n:
        return np.stack([read_plane(vol, z) for z in range(nz)])
    per_plane_min = 16 * 64 * 64
    k = nz if n // nz >= per_plane_min else max(1, n // per_plane_min)
    zs = np.unique(np.round(np.linspace(0, nz - 1, k)).astype(int))
    parts = [_sample(read_plane(vol, z), n // len(zs)) for z in zs]
    if parts[0].ndim == 2:
        return np.stack(parts)
    return np.concatenate(parts)


def volume_normalization(vol, compression: float, contrast_ratio: float) -> Normalization:
    """:func:`piscis.detect.estimate_normalization` on a sample over all planes."""
    sample = _volume_sample(vol)
    norm = estimate_normalization(sample, compression, contrast_ratio)
    norm.n_nonfinite = 0  # counted plane by plane in volume_peaks
    return norm


# --------------------------------------------------------------------------- peaks per plane

_W = np.exp(-0.5 * np.sum(np.mgrid[-2:3, -2:3] ** 2, axis=0))  # profile weights, sigma 1 px
PROFILE_GAIN = float(np.sqrt(np.sum(_W**2)) / np.sum(_W))  # noise of a profile value / noise


def _profile_values(plane: np.ndarray, coords: np.ndarray, background: float) -> np.ndarray:
    """Gaussian-weighted (sigma 1 px, 5x5) mean of plane - background at each spot."""
    if len(coords) == 0:
        return np.zeros(0)
    h, w = plane.shape
    c = np.floor(coords + 0.5).astype(np.int64)
    oy, ox = np.mgrid[-2:3, -2:3]
    py = c[:, 0, None, None] + oy
    px = c[:, 1, None, None] + ox
    inside = (py >= 0) & (py < h) & (px >= 0) & (px < w)
    vals = plane[np.clip(py, 0, h - 1), np.clip(px, 0, w - 1)].astype(np.float64)
    ok = inside & np.isfinite(vals)
    wgt = np.where(ok, _W, 0.0)
    num = np.sum(wgt * np.where(ok, vals - background, 0.0), axis=(1, 2))
    den = np.sum(wgt, axis=(1, 2))
    return np.where(den > 0, num / np.maximum(den, 1e-12), 0.0)


def volume_peaks(
    vol,
    net,
    norm: Normalization,
    threshold: float,
    scale: float = 1.0,
    tile_size: int = DEFAULT_TILE,
    planes=None,
    progress: Callable[[int, int], None] | None = None,
    cache: dict | None = None,
) -> dict[str, np.ndarray]:
    """2D peaks of every plane in ``planes`` (default all): a dict of arrays
    ``z`` (int), ``yx`` (N, 2), ``score``, ``signal`` (profile value, grey levels above
    the volume's background) and ``nonfinite``: (n_planes,) non-finite voxels per plane
    of ``planes``. ``cache`` (a dict kept by the caller) holds the planes already run,
    so z-blocks sharing context planes run the network on each plane once."""
    nz = vol.shape[0]
    planes = range(nz) if planes is None else planes
    planes = list(planes)
    cache = {} if cache is None else cache
    zs, yxs, scores, signals = [], [], [], []
    nonfinite = np.zeros(len(planes), np.int64)
    for i, z in enumerate(planes):

        def tick(done, total, i=i):
            if progress is not None:
                progress(i * total + done, len(planes) * total)

        if z not in cache:
            plane = read_plane(vol, z)
            bad = (
                plane.size - np.count_nonzero(np.isfinite(plane)) if plane.dtype.kind == "f" else 0
            )
            coords, sc = _plane_peaks(plane, net, norm, threshold, scale, tile_size, tick)
            cache[z] = (coords, sc, _profile_values(plane, coords, norm.background), bad)
        coords, sc, sig, nonfinite[i] = cache[z]
        zs.append(np.full(len(coords), z, np.int64))
        yxs.append(coords)
        scores.append(sc)
        signals.append(sig)
    cat = lambda a, shape: np.concatenate(a) if a else np.zeros(shape)  # noqa: E731
    return {
        "z": cat(zs, 0).astype(np.int64),
        "yx": cat(yxs, (0, 2)).reshape(-1, 2),
        "score": cat(scores, 0),
        "signal": cat(signals, 0),
        "nonfinite": nonfinite,
    }


# --------------------------------------------------------------------------- linking


def _link(z: np.ndarray, yx: np.ndarray, distance: float = LINK_DISTANCE, gap: int = 1):
    """Chain id per peak: peaks of consecutive planes (up to ``gap`` planes skipped)
    within ``distance`` px in yx, matched greedily nearest first, one to one."""
    n = len(z)
    chain = np.full(n, -1, np.int64)
    if n == 0:
        return chain
    order = np.lexsort((yx[:, 1], yx[:, 0], z))
    z, yx = z[order], yx[order]
    starts = np.searchsorted(z, np.unique(z))
    bounds = dict(zip(np.unique(z).tolist(), zip(starts, [*starts[1:], n])))
    last_seen: dict[int, int] = {}  # chain -> index of its last peak
    next_id = 0
    out = np.full(n, -1, np.int64)
    for zz, (a, b) in bounds.items():
        # Open chains: their last peak is 1..gap+1 planes before this one.
        open_idx = [i for i in last_seen.values() if 1 <= zz - z[i] <= gap + 1]
        taken_new = np.zeros(b - a, bool)
        if open_idx:
            open_idx = np.asarray(sorted(open_idx))
            tree_new = cKDTree(yx[a:b])
            tree_old = cKDTree(yx[open_idx])
            pairs = tree_old.sparse_distance_matrix(tree_new, distance, output_type="ndarray")
            if len(pairs):
                io, inew, d = pairs["i"], pairs["j"], pairs["v"]
                gapk = zz - z[open_idx[io]]  # prefer the nearest plane, then yx distance
                for k in np.lexsort((inew, io, d, gapk)):
                    old, new = open_idx[io[k]], inew[k]
                    cid = out[old]
                    if taken_new[new] or last_seen.get(cid) != old:
                        continue  # this peak is taken, or that chain was continued already
                    out[a + new] = cid
                    last_seen[cid] = a + new
                    taken_new[new] = True
        for j in np.flatnonzero(~taken_new):
            out[a + j] = next_id
            last_seen[next_id] = a + j
            next_id += 1
        # Forget chains that can no longer be continued.
        for cid in [c for c, i in last_seen.items() if zz - z[i] > gap]:
            del last_seen[cid]
    chain[order] = out
    return chain


def _split_profile(zs: np.ndarray, signal: np.ndarray, noise: float) -> list[int]:
    """Indices (into the z-sorted chain) where the chain splits: a minimum of the
    profile that is below DIP_RATIO of the maxima on both sides and DIP_SIGMAS noise
    standard deviations under both."""
    n = len(zs)
    if n < 3:
        return []
    p = signal.astype(np.float64)
    cuts: list[int] = []
    start = 0
    i = 1
    while i < n - 1:
        left = p[start : i + 1]
        imax_l = start + int(np.argmax(left))
        # the deepest point between the left maximum and the best maximum after it
        right = p[i + 1 :]
        if imax_l >= i or not len(right):
            i += 1
            continue
        imax_r = i + 1 + int(np.argmax(right))
        seg = p[imax_l : imax_r + 1]
        imin = imax_l + int(np.argmin(seg))
        low, high = p[imin], min(p[imax_l], p[imax_r])
        if imax_l < imin < imax_r and low < DIP_RATIO * high and high - low > DIP_SIGMAS * noise:
            cuts.append(imin)
            start = imin
            i = imin + 1
            continue
        i += 1
    return sorted(set(cuts))


def link_peaks(
    peaks: dict, noise: float, min_planes: int = 2, dropped: list | None = None
) -> list[np.ndarray]:
    """Spots as lists of peak indices (each sorted by z): chains of :func:`_link`,
    split at clear dips of their profile (:func:`_split_profile`; the minimum plane goes
    to the brighter side), without chains of fewer than ``min_planes`` planes (whose
    first plane is appended to ``dropped`` when given)."""
    chain = _link(peaks["z"], peaks["yx"])
    if len(chain) == 0:
        return []
    order = np.lexsort((peaks["z"], chain))
    bounds = np.flatnonzero(np.diff(chain[order])) + 1
    groups = np.split(order, bounds)
    out: list[np.ndarray] = []
    prof_noise = noise * PROFILE_GAIN
    for g in groups:
        cuts = _split_profile(peaks["z"][g], peaks["signal"][g], prof_noise)
        pieces, s0 = [], 0
        for c in cuts:
            # the dip plane joins the brighter of its two neighbours' sides
            sig = peaks["signal"][g]
            left_brighter = sig[c - 1] >= sig[c + 1]
            pieces.append(g[s0 : c + 1] if left_brighter else g[s0:c])
            s0 = c + 1 if left_brighter else c
        pieces.append(g[s0:])
        for piece in pieces:
            if len(np.unique(peaks["z"][piece])) >= min_planes:
                out.append(piece)
            elif dropped is not None and len(piece):
                dropped.append(int(peaks["z"][piece].min()))
    return out


# --------------------------------------------------------------------------- measuring


_SQRT2PI = math.sqrt(2.0 * math.pi)


# Model evaluations allowed per least-squares fit: a real spot converges in a few tens;
# noise fitted as spots must not cost seconds each (a bound on the time per spot).
FIT_MAX_EVALS = 60


def _ig_d(c: np.ndarray, mu: float, s: float):
    """Pixel-integrated Gaussian of unit integral and its derivatives in mu and sigma."""
    up, um = (c + 0.5 - mu) / s, (c - 0.5 - mu) / s
    pp, pm = np.exp(-0.5 * up**2) / _SQRT2PI, np.exp(-0.5 * um**2) / _SQRT2PI
    g = 0.5 * (erf(up / math.sqrt(2.0)) - erf(um / math.sqrt(2.0)))
    return g, -(pp - pm) / s, -(pp * up - pm * um) / s


def _fit_gaussians(crop, ok, origin, init, k: int = 1, spread: float = 0.8):
    """Least-squares fit of ``k`` pixel-integrated 3D Gaussians on the voxels ``ok`` of
    ``crop``: same y, x, sigma_z and sigma_yx, own amplitude and z, one background.

    ``init`` is (peak height, background, z, y, x, sigma_z, sigma_yx) of one spot; with
    k = 2 the components start at z -+ ``spread`` sigma_z. Returns (params, rss) in volume
    coordinates, params = (amplitudes (k,), background, zs (k,), y, x, sigma_z,
    sigma_yx), amplitudes as integrals (grey levels x voxels), or None when the fit
    fails or leaves the crop.
    """
    zc = np.arange(crop.shape[0]) + origin[0]
    yc = np.arange(crop.shape[1]) + origin[1]
    xc = np.arange(crop.shape[2]) + origin[2]
    a0, b0, z0, y0, x0, sz0, sr0 = init
    zs0 = [z0] if k == 1 else [z0 - spread * sz0, z0 + spread * sz0]
    amps0 = [a0] if k == 1 else [0.6 * a0, 0.6 * a0]
    data = crop[ok]

    def unpack(p):
        # sigma = sqrt(s^2 + 0.3^2) keeps the widths positive without bounds
        sz, sr = np.sqrt(p[-2:] ** 2 + 0.09)
        return p[:k], p[k], p[k + 1 : 2 * k + 1], p[2 * k + 1], p[2 * k + 2], sz, sr

    def parts(p):
        amps, b, zs, y, x, sz, sr = unpack(p)
        gy, dgy, sgy = _ig_d(yc, y, sr)
        gx, dgx, sgx = _ig_d(xc, x, sr)
        gzs = [_ig_d(zc, z, sz) for z in zs]
        return amps, b, gzs, (gy, dgy, sgy), (gx, dgx, sgx), p[-2:] / np.array([sz, sr])

    def outer(gz, gy, gx):
        return (gz[:, None, None] * gy[None, :, None] * gx[None, None, :])[ok]

    def resid(p):
        amps, b, gzs, (gy, _, _), (gx, _, _), _ = parts(p)
        gz = sum(a * g[0] for a, g in zip(amps, gzs))
        return b + outer(gz, gy, gx) - data

    def jac(p):
        amps, b, gzs, (gy, dgy, sgy), (gx, dgx, sgx), dsdp = parts(p)
        gz = sum(a * g[0] for a, g in zip(amps, gzs))
        cols = [outer(g[0], gy, gx) for g in gzs]
        cols.append(np.ones(len(data)))
        cols += [a * outer(g[1], gy, gx) for a, g in zip(amps, gzs)]
        cols.append(outer(gz, dgy, gx))
        cols.append(outer(gz, gy, dgx))
        cols.append(outer(sum(a * g[2] for a, g in zip(amps, gzs)), gy, gx) * dsdp[0])
        cols.append((outer(gz, sgy, gx) + outer(gz, gy, sgx)) * dsdp[1])
        return np.stack(cols, axis=1)

    peak = _ig_d(np.zeros(1), 0.0, sz0)[0][0] * _ig_d(np.zeros(1), 0.0, sr0)[0][0] ** 2
    amps0 = [a / peak for a in amps0]
    sz0, sr0 = (math.sqrt(max(v**2 - 0.09, 1e-4)) for v in (sz0, sr0))
    p0 = np.array([*amps0, b0, *zs0, y0, x0, sz0, sr0], dtype=np.float64)
    unit = max(abs(amps0[0]), 1e-6)
    try:
        r = least_squares(
            resid,
            p0,
            jac=jac,
            method="lm",
            x_scale=[unit] * k + [unit * peak] + [1.0] * (k + 4),
            max_nfev=FIT_MAX_EVALS,
        )
    except (ValueError, FloatingPointError):
        return None
    if not r.success or not np.all(np.isfinite(r.x)):
        return None
    amps, b, zs, y, x, sz, sr = unpack(r.x)
    inside = (zc[0] - 0.5 <= zs.min()) and (zs.max() <= zc[-1] + 0.5) and amps.min() > 0
    inside &= abs(y - y0) <= 2 and abs(x - x0) <= 2 and sz < crop.shape[0] and sr < CROP_YX
    if not inside:
        return None
    return (amps, b, zs, y, x, sz, sr), float(np.sum(r.fun**2))


def _split_normal_cdf(t: np.ndarray, s1: float, s2: float) -> np.ndarray:
    """Integral up to ``t`` of exp(-t^2 / 2 s^2), s = s1 below 0 and s2 above."""
    k = math.sqrt(math.pi / 2)
    below = s1 * k * (1 + erf(np.minimum(t, 0) / (math.sqrt(2) * s1)))
    above = s2 * k * erf(np.maximum(t, 0) / (math.sqrt(2) * s2))
    return below + above


def _skewed_rss(crop, ok, origin, one) -> float | None:
    """Residual sum of squares of one spot whose z profile is a split Gaussian (its own
    width below and above its maximum: an asymmetric axial PSF), started from the
    symmetric fit ``one``; None when the fit fails."""
    (amps, b, zs, y0, x0, sz, sr), _ = one
    zc = np.arange(crop.shape[0]) + origin[0]
    yc = np.arange(crop.shape[1]) + origin[1]
    xc = np.arange(crop.shape[2]) + origin[2]
    data = crop[ok]

    def resid(p):
        a, bb, mz, y, x, s1, s2, r = p
        s1, s2, r = (math.sqrt(v * v + 0.09) for v in (s1, s2, r))
        gz = _split_normal_cdf(zc + 0.5 - mz, s1, s2) - _split_normal_cdf(zc - 0.5 - mz, s1, s2)
        gy, gx = _ig_d(yc, y, r)[0], _ig_d(xc, x, r)[0]
        return bb + a * (gz[:, None, None] * gy[None, :, None] * gx[None, None, :])[ok] - data

    w = lambda v: math.sqrt(max(v * v - 0.09, 1e-4))  # noqa: E731
    amp = float(amps[0]) / (math.sqrt(2 * math.pi) * sz)  # integral in z -> peak in z
    p0 = np.array([amp, b, zs[0], y0, x0, w(sz), w(sz), w(sr)], dtype=np.float64)
    try:
        r = least_squares(
            resid,
            p0,
            method="lm",
            x_scale=[abs(amp) + 1e-6, 1, 1, 1, 1, 1, 1, 1],
            max_nfev=9 * FIT_MAX_EVALS,  # its Jacobian by differences: 9 calls a step
        )
    except (ValueError, FloatingPointError):
        return None
    return float(np.sum(r.fun**2)) if np.all(np.isfinite(r.x)) else None


def _parabolic_z(zs: np.ndarray, signal: np.ndarray) -> float:
    """Sub-slice z of a profile's maximum: a Gaussian (log-parabola) through the
    maximum and its two neighbours; the maximum's plane at the ends."""
    k = int(np.argmax(signal))
    if 0 < k < len(zs) - 1 and zs[k + 1] - zs[k] == 1 and zs[k] - zs[k - 1] == 1:
        a, b, c = (max(float(v), 1e-9) for v in signal[k - 1 : k + 2])
        la, lb, lc = math.log(a), math.log(b), math.log(c)
        den = la - 2 * lb + lc
        if den < 0:
            return float(zs[k] + np.clip(0.5 * (la - lc) / den, -0.5, 0.5))
    return float(zs[k])


SPLIT_CHI2 = 50.0  # drop of the residual sum of squares (in noise variances) for a z split
SPLIT_MIN_DZ = 1.5  # slices between the two components of a z split
SPLIT_MIN_AMP = 0.3  # the weaker component's amplitude relative to the stronger
SPLIT_WIDER = 1.15  # the one-spot fit's FWHM_z over the components' FWHM_z

_FIELDS = ("z", "y", "x", "score", "intensity", "background", "snr", "sz", "sr", "n_planes")


def measure_spots(
    vol,
    peaks: dict,
    groups: list[np.ndarray],
    norm: Normalization,
    radius: float = 2.0,
) -> dict[str, np.ndarray]:
    """Per spot: z, y, x, score, intensity, background, snr, sigma_z (sz), sigma_yx (sr),
    n_planes, z_split.

    Raw voxels are read plane by plane (each plane once); a spot's crop spans its
    chain's planes plus two on either side (at least 4 planes from its best plane),
    and ``CROP_YX`` px around it in y and x. Voxels nearer another spot than this one
    are left out of its fit. ``intensity``, ``background`` and ``snr`` are measured in
    the spot's plane as in 2D (:func:`piscis.detect.spot_intensities`,
    :func:`piscis.detect.spot_significance`).

    z split: a spot whose voxels two Gaussians on one z line (same y, x and widths)
    fit much better than one (residual drop > ``SPLIT_CHI2`` noise variances,
    components ``SPLIT_MIN_DZ`` slices or more apart, the weaker at least
    ``SPLIT_MIN_AMP`` of the stronger, and the one-Gaussian fit ``SPLIT_WIDER`` times
    wider in z than the components), and much better than one spot with an asymmetric
    z profile (a split Gaussian: aberrated PSFs are), is two spots.
    """
    n = len(groups)
    nz, h, w = vol.shape
    rows: list[tuple] = []
    if n == 0:
        return {k: np.zeros(0) for k in (*_FIELDS, "z_split")}
    zlo = np.zeros(n, np.int64)
    zhi = np.zeros(n, np.int64)
    zinit = np.zeros(n)
    yx = np.zeros((n, 2))
    score = np.zeros(n)
    nplanes = np.zeros(n, np.int64)
    for i, g in enumerate(groups):
        zs, sig = peaks["z"][g], peaks["signal"][g]
        k = int(np.argmax(sig))
        near = np.abs(zs - zs[k]) <= 1
        wts = np.clip(sig[near], 0, None) + 1e-9
        yx[i] = np.sum(peaks["yx"][g][near] * wts[:, None], axis=0) / wts.sum()
        score[i] = float(np.max(peaks["score"][g]))
        nplanes[i] = len(np.unique(zs))
        zinit[i] = _parabolic_z(zs, sig)
        zlo[i] = max(0, min(zs[0] - 2, zs[k] - 4))
        zhi[i] = min(nz - 1, max(zs[-1] + 2, zs[k] + 4))
    # Neighbours, to leave their voxels out of each other's fits.
    pos = np.column_stack([zinit, yx])
    tree = cKDTree(pos * _METRIC)
    crops = {}
    order = np.argsort(zlo, kind="stable")
    active: list[int] = []
    nxt = 0
    r = CROP_YX
    results: dict[int, list[tuple]] = {}
    for z in range(int(zlo.min()), int(zhi.max()) + 1):
        while nxt < n and zlo[order[nxt]] <= z:
            active.append(int(order[nxt]))
            nxt += 1
        if not active:
            continue
        plane = read_plane(vol, z)
        for i in active:
            if i not in crops:
                crops[i] = np.full((zhi[i] - zlo[i] + 1, 2 * r + 1, 2 * r + 1), np.nan)
            cy, cx = int(round(yx[i, 0])), int(round(yx[i, 1]))
            y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, h), max(cx - r, 0), min(cx + r + 1, w)
            crops[i][z - zlo[i], y0 - cy + r : y1 - cy + r, x0 - cx + r : x1 - cx + r] = plane[
                y0:y1, x0:x1
            ]
        for i in [i for i in active if zhi[i] == z]:
            origin = (int(zlo[i]), int(round(yx[i, 0])) - r, int(round(yx[i, 1])) - r)
            others = [j for j in tree.query_ball_point(pos[i] * _METRIC, 2 * r + 2) if j != i]
            results[i] = _measure_one(crops.pop(i), origin, pos[i], pos[others], norm, radius)
        active = [i for i in active if zhi[i] != z]
    for i in range(n):
        for zz, y, x, inten, bg, snr, sz, sr, split in results[i]:
            rows.append((zz, y, x, score[i], inten, bg, snr, sz, sr, nplanes[i], split))
    cols = list(zip(*rows))
    out = {k: np.asarray(v, dtype=np.float64) for k, v in zip(_FIELDS, cols)}
    out["n_planes"] = out["n_planes"].astype(np.int64)
    out["z_split"] = np.asarray(cols[-1], dtype=bool)
    return out


_METRIC = np.array([1 / 1.5, 1.0, 1.0])  # z counts less: spots are longer in z


def _measure_one(crop, origin, own, others, norm, radius) -> list[tuple]:
    """Rows (z, y, x, intensity, background, snr, sigma_z, sigma_yx, split) of one spot:
    one row, or two after a z split."""
    gz, gy, gx = np.meshgrid(*(np.arange(n) + o for n, o in zip(crop.shape, origin)), indexing="ij")
    ok = np.isfinite(crop)
    if len(others):
        vox = np.stack([gz.ravel(), gy.ravel(), gx.ravel()], 1) * _METRIC
        d_own = np.sum((vox - own * _METRIC) ** 2, axis=1)
        d_oth = np.min(np.sum((vox[:, None, :] - (others * _METRIC)[None]) ** 2, axis=2), axis=1)
        ok &= (d_own <= d_oth).reshape(crop.shape)
    z, y, x = own
    sz = sr = np.nan
    comps = [z]
    split = False
    if ok.sum() >= 20:
        data = crop[ok]
        bg0 = float(np.percentile(data, 20))
        init = (max(float(data.max()) - bg0, 1e-6), bg0, z, y, x, 1.5, 1.2)
        one = _fit_gaussians(crop, ok, origin, init, 1)
        if one is not None:
            (amps, b, zs, my, mx, sz, sr), rss1 = one
            if abs(zs[0] - z) <= 1.5:
                z = comps[0] = float(zs[0])
            peak = max(float(data.max()) - b, 1e-6)
            two = None
            for spread in (0.8, 0.5, 1.2):  # another start when a fit goes astray
                two = _fit_gaussians(crop, ok, origin, (peak, b, z, my, mx, sz, sr), 2, spread)
                if two is not None:
                    break
            if two is not None and norm.noise > 0:
                (amps2, _, zs2, _, _, sz2, sr2), rss2 = two
                gain = (rss1 - rss2) / norm.noise**2
                dz = abs(zs2[1] - zs2[0])
                ratio = min(amps2) / max(max(amps2), 1e-12)
                if (
                    gain > SPLIT_CHI2
                    and dz >= SPLIT_MIN_DZ
                    and ratio >= SPLIT_MIN_AMP
                    and sz >= SPLIT_WIDER * sz2
                ):
                    # Not if one spot with an asymmetric axial profile fits as well.
                    skew = _skewed_rss(crop, ok, origin, one)
                    if skew is None or (skew - rss2) / norm.noise**2 > SPLIT_CHI2:
                        comps, sz, sr, split = sorted(float(v) for v in zs2), sz2, sr2, True
    rows = []
    for zc in comps:
        k = int(np.clip(np.floor(zc + 0.5), origin[0], origin[0] + crop.shape[0] - 1))
        plane = crop[k - origin[0]]
        rel = np.array([[y - origin[1], x - origin[2]]])
        inten, bg = spot_intensities(plane, rel, radius, (radius + 1.0, radius + 3.0))
        snr = spot_significance(plane, rel, bg, norm.noise, sigma=0.75 * radius)[0]
        rows.append((zc, y, x, inten[0], bg[0], snr, sz, sr, split))
    return rows


# --------------------------------------------------------------------------- the detector


def detect_volume(
    vol,
    loaded,
    threshold: float,
    scale: float,
    tile_size: int,
    progress=None,
    name: str = "image",
    min_snr: float = 0.0,
    spacing=None,
    z_block: int | None = None,
    z_range=None,
    min_planes: int | None = None,
    norm: Normalization | None = None,
) -> Spots:
    """3D detection (see the module docstring); called by :func:`piscis.detect.detect`."""
    vol = check_volume(vol, name)
    nz = int(vol.shape[0])
    if norm is None:
        norm = volume_normalization(vol, loaded.compression, loaded.contrast_ratio)
    if min_planes is None:
        min_planes = 2 if nz >= 3 else 1
    z0, z1 = (0, nz) if z_range is None else (max(0, int(z_range[0])), min(nz, int(z_range[1])))
    if z0 >= z1:
        raise ValueError(f"{name}: empty z range {z_range} for {nz} planes")
    block = (z1 - z0) if not z_block else max(1, int(z_block))
    parts = []
    n_nonfinite = n_dropped = 0
    cache: dict = {}
    starts = list(range(z0, z1, block))
    for bi, b0 in enumerate(starts):
        b1 = min(b0 + block, z1)
        lo, hi = max(0, b0 - Z_HALO), min(nz, b1 + Z_HALO)
        if len(starts) == 1 and z_range is None:
            lo, hi = 0, nz

        def tick(done, total, bi=bi):
            if progress is not None:
                progress(bi * total + done, len(starts) * total)

        peaks = volume_peaks(
            vol, loaded.net, norm, threshold, scale, tile_size, range(lo, hi), tick, cache
        )
        for z in [z for z in cache if z < lo]:
            del cache[z]  # peak lists of planes no later block needs
        n_nonfinite += int(peaks["nonfinite"][b0 - lo : b1 - lo].sum())
        dropped: list[int] = []
        m = _measured(vol, peaks, norm, min_planes, 2.0 / scale, dropped)
        # Counted once over the blocks: by their first plane, in this block's own planes.
        n_dropped += sum(b0 <= z < b1 for z in dropped)
        own = (m["z"] >= b0 - 0.5) & (m["z"] < b1 - 0.5)
        if b0 == 0:
            own |= m["z"] < -0.5
        if b1 == nz:
            own |= m["z"] >= nz - 0.5
        parts.append({k: v[own] for k, v in m.items()})
    m = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if n_nonfinite:
        logger.warning("%s: %d non-finite (NaN or infinite) voxels are ignored", name, n_nonfinite)
    spots = _spots_3d(_significant(m, norm, min_snr), spacing, name)
    if n_dropped >= MIN_DROPPED_TO_WARN and n_dropped > len(spots):
        # A z step as coarse as the PSF is deep shows each spot in one plane only: the
        # rule meant for hot pixels then drops the spots themselves, silently.
        logger.warning(
            "%s: %d peaks seen in fewer than %d planes were dropped and %d spots kept; if "
            "the z step is as coarse as the spots are deep, pass --min-planes 1 "
            "(min_planes=1) or --project",
            name,
            n_dropped,
            min_planes,
            len(spots),
        )
    return spots


def _measured(vol, peaks, norm, min_planes, radius, dropped=None) -> dict[str, np.ndarray]:
    groups = link_peaks(peaks, norm.noise, min_planes, dropped)
    return measure_spots(vol, peaks, groups, norm, radius)


def _significant(m: dict, norm: Normalization, min_snr: float) -> dict:
    """Spots whose SNR reaches ``min_snr`` (those whose SNR cannot be measured stay)."""
    if min_snr > 0 and norm.noise > 0 and len(m["z"]):
        keep = ~(m["snr"] < min_snr)
        m = {k: v[keep] for k, v in m.items()}
    return m


class VolumeCandidates:
    """3D twin of :class:`piscis.annotate.SpotCandidates`: the network runs once.

    Every plane's peaks are decoded once at ``min_threshold`` (a peak at a higher
    threshold is one of these, at the same position); :meth:`at` keeps the peaks
    reaching the threshold, links and measures them (no network): ``at(t)`` gives the
    spots of ``detect(vol, threshold=t)``.
    """

    def __init__(
        self, vol, model=None, scale=None, tile_size: int = DEFAULT_TILE,
        min_threshold: float = 0.05, progress=None, spacing=None, name: str = "image",
        min_snr: float | None = None, min_planes: int | None = None,
    ):  # fmt: skip
        from .io import load_model

        loaded = load_model(model)
        self.vol = check_volume(vol, name)
        self.scale = loaded.scale if scale is None else float(scale)
        self.norm = volume_normalization(self.vol, loaded.compression, loaded.contrast_ratio)
        self.peaks = volume_peaks(
            self.vol, loaded.net, self.norm, min_threshold, self.scale, tile_size,
            progress=progress,
        )  # fmt: skip
        s = np.clip(self.peaks["score"].astype(np.float64), 1e-300, None)
        with np.errstate(divide="ignore"):
            self.logits = (np.log(s) - np.log1p(-s)).astype(np.float32)
        self.min_threshold = float(min_threshold)
        self.spacing, self.name = spacing, name
        self.min_snr = loaded.min_snr if min_snr is None else float(min_snr)
        nz = self.vol.shape[0]
        self.min_planes = (2 if nz >= 3 else 1) if min_planes is None else int(min_planes)
        self._last: tuple[float, Spots] | None = None

    def at(self, threshold: float) -> Spots:
        from .detect import _logit

        threshold = float(threshold)
        if threshold < self.min_threshold - 1e-12:
            raise ValueError(
                f"threshold {threshold} is below the cached minimum {self.min_threshold}; "
                "decode the maps again"
            )
        if self._last is not None and self._last[0] == threshold:
            return self._last[1]
        keep = self.logits >= np.float32(_logit(threshold))
        peaks = {k: self.peaks[k][keep] for k in ("z", "yx", "score", "signal")}
        m = _measured(self.vol, peaks, self.norm, self.min_planes, 2.0 / self.scale)
        spots = _spots_3d(_significant(m, self.norm, self.min_snr), self.spacing, self.name)
        self._last = (threshold, spots)
        return spots

    def count(self, threshold: float) -> int:
        return len(self.at(threshold))


def _spots_3d(m: dict, spacing, name: str) -> Spots:
    coords = np.column_stack([m["z"], m["y"], m["x"]]) if len(m["z"]) else np.zeros((0, 3))
    order = np.lexsort((coords[:, 2], coords[:, 1], coords[:, 0])) if len(coords) else []
    m = {k: np.asarray(v)[order] for k, v in m.items()}
    coords = coords[order].reshape(-1, 3)
    fz, fr = 2.3548 * m["sz"], 2.3548 * m["sr"]
    elongated = np.zeros(len(coords), bool)
    good = np.isfinite(fz)
    if good.sum() >= 5:
        med = float(np.median(fz[good]))
        elongated = good & (fz > ELONGATED * med)
        if elongated.any():
            logger.warning(
                "%s: %d spots are elongated in z (FWHM_z > %.2f x the median %.2f slices): "
                "possibly two spots closer in z than the axial resolution, counted as one "
                "(column z_elongated)",
                name,
                int(elongated.sum()),
                ELONGATED,
                med,
            )
    if spacing is not None:
        sz_um, sy_um, sx_um = (float(s) for s in spacing)
        fz_um, fr_um = fz * sz_um, fr * math.sqrt(sy_um * sx_um)
    else:
        fz_um = fr_um = np.full(len(coords), np.nan)
    extra = {
        "fwhm_z": fz,
        "fwhm_yx": fr,
        "fwhm_z_um": fz_um,
        "fwhm_yx_um": fr_um,
        "n_planes": m["n_planes"].astype(np.int64),
        "z_split": m["z_split"].astype(bool),
        "z_elongated": elongated,
    }
    return Spots(coords, m["score"], m["intensity"], m["background"], extra)


def empty_spots_3d() -> Spots:
    z = np.zeros(0)
    extra = {k: z.copy() for k in COLUMNS_3D}
    extra["n_planes"] = np.zeros(0, np.int64)
    extra["z_split"] = np.zeros(0, bool)
    extra["z_elongated"] = np.zeros(0, bool)
    return Spots(np.zeros((0, 3)), z, z.copy(), z.copy(), extra)
