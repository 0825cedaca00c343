"""Synthetic fluorescence images with exact spot positions.

The generator varies what real smFISH data vary: spot width and brightness,
Poisson and read noise, smooth and cellular backgrounds, out-of-focus haze,
bright blobs and autofluorescent specks that are not spots, hot pixels,
dense clusters, saturated spots, spot-free fields, 8- and 16-bit ranges.
It feeds training and the tests. Only NumPy and SciPy are used.

Spots are rendered as pixel-integrated Gaussians (the error function over
each pixel), so a spot at a pixel centre and one between pixels carry the
same total signal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from scipy.special import erf


@dataclass
class SynthConfig:
    """Ranges the generator draws from; every field has a realistic default."""

    shape: tuple[int, int] = (128, 128)
    density: tuple[float, float] = (0.0, 0.006)  # spots per pixel
    sigma: tuple[float, float] = (0.7, 2.0)  # spot Gaussian sigma, px
    snr: tuple[float, float] = (2.5, 300.0)  # peak amplitude / noise sd, log-uniform
    empty_fraction: float = 0.12  # share of spot-free fields
    cluster_fraction: float = 0.3  # share of images with dense clusters
    cell_fraction: float = 0.6  # share with a cellular background
    blob_fraction: float = 0.5  # share with bright non-spot blobs
    speck_fraction: float = 0.4  # share with autofluorescent specks
    hot_pixel_fraction: float = 0.3
    saturate_fraction: float = 0.15
    eight_bit_fraction: float = 0.35
    correlated_noise_fraction: float = 0.35
    stripe_fraction: float = 0.15
    dim_fraction: float = 0.4  # share with a population of dim, unannotated spots
    min_separation: float = 1.5  # px between spot centres
    # Share of images that also hold pairs of equally bright spots 2.2-5 px apart (at
    # least 2.2 sigma: a dip between them), to teach the network to split them.
    pair_fraction: float = 0.0
    # Share of images with a crowded patch: spots 2.2 sigma-3.2 px apart, packed.
    dense_fraction: float = 0.0
    extra: dict = field(default_factory=dict)


def render_spots(
    shape: tuple[int, int],
    coords: np.ndarray,
    sigmas: np.ndarray,
    amps: np.ndarray,
) -> np.ndarray:
    """Sum of pixel-integrated Gaussians of peak height ``amps`` at ``coords``."""
    out = np.zeros(shape, dtype=np.float64)
    for (y, x), s, a in zip(coords, np.broadcast_to(sigmas, len(coords)), amps):
        r = int(np.ceil(4 * s)) + 1
        y0, y1 = max(int(np.floor(y)) - r, 0), min(int(np.floor(y)) + r + 2, shape[0])
        x0, x1 = max(int(np.floor(x)) - r, 0), min(int(np.floor(x)) + r + 2, shape[1])
        if y0 >= y1 or x0 >= x1:
            continue
        gy = _integrated_gauss(np.arange(y0, y1), y, s)
        gx = _integrated_gauss(np.arange(x0, x1), x, s)
        # Peak height a for a spot centred on a pixel.
        norm = _integrated_gauss(np.zeros(1), 0.0, s)[0] ** 2
        out[y0:y1, x0:x1] += a * np.outer(gy, gx) / norm
    return out


def _integrated_gauss(centres: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    k = 1.0 / (np.sqrt(2.0) * sigma)
    return 0.5 * (erf((centres + 0.5 - mu) * k) - erf((centres - 0.5 - mu) * k))


def _smooth_field(rng: np.random.Generator, shape, scale: float) -> np.ndarray:
    """A smooth random field in [0, 1] with features of about ``scale`` px."""
    small = [max(2, int(np.ceil(n / scale)) + 2) for n in shape]
    f = ndi.zoom(rng.random(small), [n / s * 1.0001 for n, s in zip(shape, small)], order=3)
    f = f[: shape[0], : shape[1]]
    f -= f.min()
    return f / max(f.max(), 1e-12)


def _cells(rng: np.random.Generator, shape) -> np.ndarray:
    """Cell-like background: a few smooth, textured ellipses with nuclei."""
    h, w = shape
    out = np.zeros(shape)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(rng.integers(1, 5)):
        cy, cx = rng.uniform(-0.2, 1.2) * h, rng.uniform(-0.2, 1.2) * w
        ry, rx = rng.uniform(0.2, 0.6) * h, rng.uniform(0.2, 0.6) * w
        t = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dy * np.cos(t) + dx * np.sin(t)) / ry
        v = (-dy * np.sin(t) + dx * np.cos(t)) / rx
        inside = (u**2 + v**2) < 1
        texture = 0.5 + 0.5 * _smooth_field(rng, shape, rng.uniform(3, 12))
        out += inside * texture * rng.uniform(0.5, 1.0)
        # nucleus: a dimmer or brighter hole
        nu = (u * 2.2) ** 2 + (v * 2.2) ** 2 < 1
        out -= nu * rng.uniform(-0.3, 0.4) * inside
    return ndi.gaussian_filter(np.clip(out, 0, None), rng.uniform(1.0, 3.0))


def _positions(rng, shape, n, min_sep, clusters: bool) -> np.ndarray:
    """Random sub-pixel positions at least ``min_sep`` apart, some clustered."""
    h, w = shape
    pts: list[np.ndarray] = []
    cand = []
    if clusters and n > 4:
        n_cl = rng.integers(1, 4)
        for _ in range(n_cl):
            c = rng.uniform([0, 0], [h, w])
            spread = rng.uniform(2.0, 6.0)
            k = rng.integers(4, 16)
            cand.append(c + rng.normal(0, spread, (k, 2)))
    cand.append(rng.uniform([-0.5, -0.5], [h - 0.5, w - 0.5], (n, 2)))
    cand = np.concatenate(cand)
    for p in cand:
        if not (-0.5 <= p[0] < h - 0.5 and -0.5 <= p[1] < w - 0.5):
            continue
        if pts and np.min(np.sum((np.asarray(pts) - p) ** 2, axis=1)) < min_sep**2:
            continue
        pts.append(p)
    return np.asarray(pts, dtype=float).reshape(-1, 2)


def _pairs(rng, shape, base_sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """2-8 pairs of spots of one width, each pair 2.2 sigma to 5 px apart."""
    h, w = shape
    k = int(rng.integers(2, 9))
    sigma = np.full(k, min(base_sigma, 1.6)) * rng.uniform(0.9, 1.1, k)
    sep = rng.uniform(np.maximum(2.2 * sigma, 2.0), 5.0)
    angle = rng.uniform(0, np.pi, k)
    half = 0.5 * sep[:, None] * np.stack([np.sin(angle), np.cos(angle)], 1)
    centre = rng.uniform([2.0, 2.0], [h - 3.0, w - 3.0], (k, 2))
    coords = np.stack([centre - half, centre + half], 1).reshape(-1, 2)
    coords = np.clip(coords, -0.5, np.array([h, w]) - 0.501)
    return coords, np.repeat(sigma, 2)


def _dense_patch(rng, shape, base_sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """A square patch of 12-32 px packed with spots of one width, at least
    max(2.2 sigma, 2.2 px) apart (darts thrown until 30 in a row miss)."""
    h, w = shape
    sigma = min(base_sigma, 1.4)
    gap = rng.uniform(max(2.2 * sigma, 2.2), max(2.2 * sigma, 2.2) + 1.0)
    side = rng.uniform(12, min(32, h - 4, w - 4))
    origin = rng.uniform([1.0, 1.0], [h - side - 2.0, w - side - 2.0])
    pts: list[np.ndarray] = []
    misses = 0
    while misses < 30:
        p = origin + rng.uniform(0, side, 2)
        if pts and np.min(np.sum((np.asarray(pts) - p) ** 2, axis=1)) < gap**2:
            misses += 1
            continue
        pts.append(p)
        misses = 0
    coords = np.asarray(pts, dtype=float).reshape(-1, 2)
    return coords, np.full(len(coords), sigma) * rng.uniform(0.95, 1.05, len(coords))


def generate(
    rng: np.random.Generator, config: SynthConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic image and its spot coordinates.

    Returns
    -------
    image : 2D array, uint8 or uint16 (as a camera would give).
    coords : (N, 2) float (y, x) of the spots, 0-based pixel centres.
    """
    image, spots = generate_spots(rng, config)
    return image, spots["coords"]


def generate_spots(
    rng: np.random.Generator, config: SynthConfig | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Like :func:`generate`, with every rendered spot's ``coords``,
    ``sigma`` and ``amplitude`` (peak height in the image's grey levels).

    Some images also hold a population of dim spots, 3-12 times fainter
    than the others (unspecific probe binding, autofluorescent dots); they
    are listed too, and the caller decides which spots an annotator would
    call (:func:`piscis.data.sample_synthetic` keeps those that stand out).
    """
    cfg = config or SynthConfig()
    shape = tuple(cfg.shape)
    h, w = shape
    area = h * w

    # Noise model: signal in photo-electrons, Poisson shot noise, read noise.
    read_sd = rng.uniform(1.0, 8.0)
    offset = rng.uniform(0, 200)
    bg_level = np.exp(rng.uniform(np.log(2.0), np.log(400.0)))
    noise_sd = np.sqrt(bg_level + read_sd**2)

    background = np.full(shape, bg_level)
    background *= 1.0 + rng.uniform(0, 1.0) * _smooth_field(rng, shape, rng.uniform(30, 120))
    if rng.random() < cfg.cell_fraction:
        background += _cells(rng, shape) * noise_sd * np.exp(rng.uniform(np.log(1), np.log(30)))
    if rng.random() < 0.3:  # out-of-focus haze: wide, faint blobs
        haze_pts = rng.uniform([0, 0], [h, w], (rng.integers(1, 6), 2))
        haze = render_spots(
            shape,
            haze_pts,
            rng.uniform(6, 15, len(haze_pts)),
            rng.uniform(1, 15, len(haze_pts)) * noise_sd,
        )
        background += haze

    # Spots.
    if rng.random() < cfg.empty_fraction:
        n = 0
    else:
        n = rng.poisson(np.exp(rng.uniform(np.log(1e-4), np.log(cfg.density[1]))) * area)
    coords = _positions(rng, shape, n, cfg.min_separation, rng.random() < cfg.cluster_fraction)
    base_sigma = rng.uniform(*cfg.sigma)
    sigmas = np.clip(base_sigma * rng.uniform(0.85, 1.15, len(coords)), cfg.sigma[0], cfg.sigma[1])
    log_lo, log_hi = np.log(cfg.snr[0]), np.log(cfg.snr[1])
    centre = rng.uniform(log_lo, log_hi)
    snrs = np.exp(np.clip(centre + rng.normal(0, 0.5, len(coords)), log_lo, log_hi))
    # Dim spots need width to be seen: keep the matched-filter SNR above 5.5.
    snrs = np.maximum(snrs, 5.5 / (np.sqrt(np.pi) * sigmas))
    if cfg.pair_fraction > 0 and rng.random() < cfg.pair_fraction:
        pairs, pair_sigmas = _pairs(rng, shape, base_sigma)
        coords = np.concatenate([coords, pairs])
        sigmas = np.concatenate([sigmas, pair_sigmas])
        pair_snr = np.exp(rng.normal(centre, 0.3, len(pairs) // 2))
        snrs = np.concatenate([snrs, np.repeat(pair_snr, 2)])
        snrs = np.clip(snrs, 5.5 / (np.sqrt(np.pi) * sigmas), np.exp(log_hi))
    if cfg.dense_fraction > 0 and rng.random() < cfg.dense_fraction:
        packed, packed_sigmas = _dense_patch(rng, shape, base_sigma)
        coords = np.concatenate([coords, packed])
        sigmas = np.concatenate([sigmas, packed_sigmas])
        packed_snr = np.exp(rng.normal(centre, 0.3, len(packed)))
        snrs = np.concatenate(
            [snrs, np.maximum(packed_snr, 5.5 / (np.sqrt(np.pi) * packed_sigmas))]
        )
    if len(coords) and rng.random() < cfg.dim_fraction:
        n_dim = rng.poisson(len(coords) * rng.uniform(0.3, 1.5))
        dim = _positions(rng, shape, n_dim, cfg.min_separation, False)
        coords = np.concatenate([coords, dim])
        sigmas = np.concatenate(
            [
                sigmas,
                np.clip(base_sigma * rng.uniform(0.8, 1.2, len(dim)), cfg.sigma[0], cfg.sigma[1]),
            ]
        )
        snrs = np.concatenate([snrs, np.exp(centre) / rng.uniform(3, 12, len(dim))])
    signal = render_spots(shape, coords, sigmas, snrs * noise_sd)

    # Things that are not spots.
    if rng.random() < cfg.blob_fraction:  # large bright blobs (debris, cells)
        k = rng.integers(1, 4)
        pts = rng.uniform([0, 0], [h, w], (k, 2))
        signal += render_spots(
            shape, pts, rng.uniform(3.5, 8, k), rng.uniform(5, 200, k) * noise_sd
        )
    if rng.random() < cfg.speck_fraction:  # elongated autofluorescent specks
        for _ in range(rng.integers(1, 6)):
            c = rng.uniform([0, 0], [h, w])
            ang = rng.uniform(0, np.pi)
            length = rng.uniform(5, 14)
            t = np.linspace(-length / 2, length / 2, int(length * 2))
            pts = c + np.stack([np.sin(ang) * t, np.cos(ang) * t], 1)
            signal += render_spots(
                shape,
                pts,
                np.full(len(pts), rng.uniform(0.8, 1.6)),
                np.full(len(pts), rng.uniform(2, 15) * noise_sd / 3),
            )

    clean = np.clip(background + signal, 0, None)
    noise = rng.poisson(clean) - clean + rng.normal(0, read_sd, shape)
    if rng.random() < cfg.correlated_noise_fraction:
        # Spatially correlated noise (smoothed or upsampled data), same per-pixel sd.
        s = rng.uniform(0.5, 1.2)
        delta = np.zeros((21, 21))
        delta[10, 10] = 1.0
        gain = np.sqrt(np.sum(ndi.gaussian_filter(delta, s) ** 2))
        noise = ndi.gaussian_filter(noise, s) / gain
    if rng.random() < cfg.stripe_fraction:  # column or row fixed-pattern noise
        axis = rng.integers(2)
        stripes = rng.normal(0, rng.uniform(0.1, 0.5) * noise_sd, shape[1 - axis])
        noise = noise + (stripes[None, :] if axis == 0 else stripes[:, None])
    image = clean + noise + offset

    if rng.random() < cfg.hot_pixel_fraction:
        k = rng.integers(1, 8)
        ys, xs = rng.integers(0, h, k), rng.integers(0, w, k)
        image[ys, xs] += rng.uniform(20, 300, k) * noise_sd

    # Camera range: 8 or 16 bit with a random gain, sometimes saturating.
    eight = rng.random() < cfg.eight_bit_fraction
    top = 255.0 if eight else 65535.0
    peak = np.percentile(image, 99.99)
    if rng.random() < cfg.saturate_fraction:
        gain = top / max(np.percentile(image, 99.5), 1e-6)
    elif eight:
        gain = rng.uniform(0.3, 1.0) * top / max(peak, 1e-6)
    else:
        gain = min(rng.uniform(0.5, 4.0), top / max(peak, 1e-6))
    # Keep quantisation below the noise: at least ~1.5 grey levels of noise.
    gain = max(gain, min(1.5 / noise_sd, top / max(peak, 1e-6)))
    image = np.clip(np.round(image * gain), 0, top)
    spots = {"coords": coords, "sigma": sigmas, "amplitude": snrs * noise_sd * gain}
    return image.astype(np.uint8 if eight else np.uint16), spots


def noise_image(
    rng: np.random.Generator, shape=(512, 512), background: float = 100.0, read_sd: float = 5.0
) -> np.ndarray:
    """A spot-free uint16 field: Poisson background plus Gaussian read noise."""
    img = rng.poisson(background, shape) + rng.normal(0, read_sd, shape)
    return np.clip(np.round(img), 0, 65535).astype(np.uint16)


def spot_image(
    rng: np.random.Generator,
    shape=(256, 256),
    n_spots: int = 20,
    sigma: float = 1.0,
    amp: float = 400.0,
    background: float = 100.0,
    noise_sd: float = 5.0,
    margin: float = 4.0,
    min_sep: float = 6.0,
    coords: np.ndarray | None = None,
    dtype=np.uint16,
) -> tuple[np.ndarray, np.ndarray]:
    """A simple test image as CASES.md describes: Gaussian spots over a flat
    background with Gaussian read noise. Spots are at least ``min_sep`` apart
    and ``margin`` px from the border unless ``coords`` is given."""
    if coords is None:
        coords = random_positions(rng, shape, n_spots, min_sep, margin, max_tries=100000)
    coords = np.asarray(coords, dtype=float).reshape(-1, 2)
    img = background + render_spots(
        shape, coords, np.full(len(coords), sigma), np.full(len(coords), amp)
    )
    img = img + rng.normal(0, noise_sd, shape)
    return _as_dtype(img, dtype), coords


def _as_dtype(img: np.ndarray, dtype) -> np.ndarray:
    """Round and clip to an integer dtype's range, or cast to a float dtype."""
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        img = np.clip(np.round(img), info.min, info.max)
    return img.astype(dtype)


def render_spots_3d(shape, coords, sigmas, amps) -> np.ndarray:
    """Sum of voxel-integrated 3D Gaussians of peak height ``amps`` (for a spot on a
    voxel centre) at ``coords`` (N, 3) (z, y, x); ``sigmas`` (N, 2) or (2,) is
    (sigma_z, sigma_yx) in voxels."""
    out = np.zeros(shape, dtype=np.float64)
    coords = np.asarray(coords, dtype=float).reshape(-1, 3)
    sigmas = np.broadcast_to(np.asarray(sigmas, dtype=float), (len(coords), 2))
    amps = np.broadcast_to(np.asarray(amps, dtype=float), (len(coords),))
    for c, (sz, sr), a in zip(coords, sigmas, amps):
        sl, parts = [], []
        for mu, s, n in zip(c, (sz, sr, sr), shape):
            r = int(np.ceil(4 * s)) + 1
            lo, hi = max(int(np.floor(mu)) - r, 0), min(int(np.floor(mu)) + r + 2, n)
            if lo >= hi:
                break
            g = _integrated_gauss(np.arange(lo, hi), mu, s)
            parts.append(g / _integrated_gauss(np.zeros(1), 0.0, s)[0])
            sl.append(slice(lo, hi))
        if len(parts) < 3:
            continue
        out[tuple(sl)] += a * parts[0][:, None, None] * parts[1][None, :, None] * parts[2]
    return out


def random_positions(
    rng, shape, n, min_sep: float = 6.0, margin: float = 4.0, max_tries: int = 200000
) -> np.ndarray:
    """``n`` uniform positions in ``shape`` (any dimension), at least ``min_sep`` apart
    and ``margin`` from the border (rejection sampling)."""
    shape = np.asarray(shape, dtype=float)
    lo, hi = np.full(len(shape), margin), shape - 1 - margin
    pts: list[np.ndarray] = []
    tries = 0
    while len(pts) < n and tries < max_tries:
        tries += 1
        p = rng.uniform(lo, hi)
        if pts and np.min(np.sum((np.asarray(pts) - p) ** 2, axis=1)) < min_sep**2:
            continue
        pts.append(p)
    return np.asarray(pts).reshape(-1, len(shape))


def spot_volume(
    rng: np.random.Generator,
    shape=(16, 128, 128),
    n_spots: int = 20,
    sigma=(1.5, 1.0),
    amp: float = 400.0,
    background: float = 100.0,
    noise_sd: float = 5.0,
    margin: float = 4.0,
    min_sep: float = 6.0,
    coords: np.ndarray | None = None,
    dtype=np.uint16,
) -> tuple[np.ndarray, np.ndarray]:
    """A ZYX test volume as CASES.md describes: 3D Gaussian spots (sigma_z, sigma_yx)
    over a flat background with Gaussian read noise, clipped to the dtype's range.
    Random spots are ``min_sep`` apart (in voxels) and ``margin`` from the border."""
    if coords is None:
        coords = random_positions(rng, shape, n_spots, min_sep, margin)
    coords = np.asarray(coords, dtype=float).reshape(-1, 3)
    vol = background + render_spots_3d(shape, coords, sigma, amp)
    vol = vol + rng.normal(0, noise_sd, shape)
    return _as_dtype(vol, dtype), coords
