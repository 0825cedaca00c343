"""From an image to spots: normalisation, tiled inference, decoding and
per-spot intensities (DESIGN.md sections 3, 6 and 8).

The network's maps are computed once (:func:`predict_maps`) and decoded as
often as needed (:func:`decode`): a new threshold needs no forward pass.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from .crowding import add_crowded
from .model import SpotNet, receptive_margin

logger = logging.getLogger(__name__)

DEFAULT_TILE = 1024
SAMPLE_PIXELS = 4_000_000  # pixels used for the normalisation statistics
COMPRESSION = 3.0  # asinh(z / COMPRESSION): linear for noise, logarithmic for bright spots
CONTRAST_RATIO = 3.0  # the unit is at least 1/CONTRAST_RATIO of the image's spot-scale contrast


# --------------------------------------------------------------------------- normalisation


@dataclass
class Normalization:
    """How raw intensities become network input: z = (I - background) / unit,
    then asinh(z / compression). The statistics come from the whole image.

    ``unit`` is the noise, or 1/``CONTRAST_RATIO`` of the image's brightest
    spot-scale contrast when that is larger: in an image of bright spots,
    objects several times dimmer than them (autofluorescence, unspecific
    background) weigh less, as they do for an expert annotator; an image of
    noise only keeps the noise as its unit, so noise is never stretched.
    """

    background: float
    noise: float
    compression: float = COMPRESSION
    n_nonfinite: int = 0
    unit: float | None = None

    def __post_init__(self):
        if self.unit is None:
            self.unit = self.noise

    def apply(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        # Integers beyond float32's 24 bits (offset 32- and 64-bit data) are scaled in
        # float64; smaller values the same way as every other dtype, to the last bit.
        wide = image.dtype.kind in "iu" and image.dtype.itemsize >= 4 and image.size > 0
        wide = wide and max(abs(int(image.min())), abs(int(image.max()))) >= 2**24
        if image.dtype == np.float64 or wide or not 0 < np.float32(self.unit) < np.inf:
            # Scaled in double precision: float64 data may lie outside float32's range
            # (1e-40 or 1e300 per grey level), and so may the unit of a flat image;
            # 32- and 64-bit integers hold more digits than float32 (spots 400 over an
            # offset of 2^34 vanished). The result is the same size as ever.
            z = ((image.astype(np.float64, copy=False) - self.background) / self.unit).astype(
                np.float32
            )
        else:
            z = (image.astype(np.float32, copy=False) - np.float32(self.background)) / np.float32(
                self.unit
            )
        z = np.arcsinh(z / np.float32(self.compression))
        z[~np.isfinite(z)] = 0.0
        return z


# Where the normalisation statistics come from (config.json "normalization"/"mode"):
# "image": the image given (default; at training, each whole training image);
# "crop": as "image" at inference (the crop given is the image), each crop at training;
# "fixed": the config's "background" and "unit" (and "noise") for every image.
NORMALIZATION_MODES = ("image", "crop", "fixed")


def model_normalization(image: np.ndarray, model) -> Normalization:
    """The normalisation a model's config asks for, for this image."""
    cfg = dict(getattr(model, "config", {}) or {}).get("normalization", {})
    mode = cfg.get("mode", "image")
    if mode not in NORMALIZATION_MODES:
        msg = f"model normalization mode {mode!r} is unknown; expected one of {NORMALIZATION_MODES}"
        raise ValueError(msg)
    compression = float(cfg.get("compression", COMPRESSION))
    ratio = float(cfg.get("contrast_ratio", 0.0))
    if mode != "fixed":
        return estimate_normalization(image, compression, ratio)
    try:
        background, unit = float(cfg["background"]), float(cfg["unit"])
    except (KeyError, TypeError, ValueError):
        msg = "model normalization mode 'fixed' needs numbers 'background' and 'unit' in config"
        raise ValueError(msg) from None
    arr = np.asarray(image)
    n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr))) if arr.dtype.kind == "f" else 0
    noise = float(cfg.get("noise", unit))
    return Normalization(background, noise, compression, n_bad, unit)


def _sample(image: np.ndarray, n: int = SAMPLE_PIXELS) -> np.ndarray:
    """The whole image, or a regular grid of 64x64 blocks covering it."""
    if image.size <= n:
        return np.asarray(image)
    block = 64
    n_blocks = max(1, n // (block * block))
    h, w = image.shape
    per_side = max(1, int(math.sqrt(n_blocks * h / w)))
    ys = np.linspace(0, max(h - block, 0), per_side).astype(int)
    xs = np.linspace(0, max(w - block, 0), max(1, n_blocks // per_side)).astype(int)
    return np.stack([np.asarray(image[y : y + block, x : x + block]) for y in ys for x in xs])


BAND = (1.0, 3.0)  # the difference of Gaussians that measures noise at the scale of a spot


def _band_gain() -> float:
    """Standard deviation of the band-pass filter's output for unit white noise."""
    delta = np.zeros((41, 41))
    delta[20, 20] = 1.0
    k = ndi.gaussian_filter(delta, BAND[0]) - ndi.gaussian_filter(delta, BAND[1])
    return float(np.sqrt(np.sum(k**2)))


BAND_GAIN = _band_gain()


# Unclipped pixels (with 3 px around them) must cover this share of the image for their
# spread to be the noise when the median itself is clipped.
MIN_BACKGROUND_SHARE = 0.25
# ... and the pixels off the clip levels must cover less than this share to be spots only.
SPOT_SHARE = 1 / 3

BLOB_AREA = 50  # px above half the contrast level: larger objects are not spots


def _spot_contrast(band: np.ndarray, ok: np.ndarray) -> float:
    """The 99.9th percentile of the band-pass image over spot-sized objects.

    Objects of more than :data:`BLOB_AREA` connected pixels above half the current
    level (an artefact blob, a bright cell) are left out, with 3 px around them, and
    the level is taken again: one blob in a crop must not set the scale of its spots.
    An image without such objects keeps the plain percentile.

    The blobs are grown together by a separable maximum filter and the percentile is
    read off the brightest values sorted once: the same figures as growing each blob
    and sorting the whole image each round, at a fraction of the cost.
    """
    plane = np.zeros((3,) * band.ndim, bool)
    plane[(1,) * (band.ndim - 2)] = True  # connectivity within each block
    structure = plane & ndi.generate_binary_structure(band.ndim, band.ndim)
    window = [1] * (band.ndim - 2) + [7, 7]
    ok = ok.copy()
    flat_ok = ok.reshape(-1)  # a view: follows ok
    # The brightest values, sorted once, with their places: enough for the percentile
    # however many pixels the blobs take away (else the whole sort, as np.quantile).
    cand = np.flatnonzero(flat_ok)
    vals = band.reshape(-1)[cand]
    n_top = min(vals.size, max(4096, vals.size // 50))
    top = np.argpartition(vals, vals.size - n_top)[vals.size - n_top :]
    top = top[np.argsort(vals[top], kind="stable")]
    top_at, top_val = cand[top], vals[top]

    def level_now() -> float:
        """np.quantile(band[ok], 0.999), its linear rule step by step."""
        m = int(np.count_nonzero(flat_ok))
        kept = top_val[flat_ok[top_at]]
        pos = (m - 1) * 0.999
        lo = int(math.floor(pos))
        if lo >= m - 1:
            return float(kept[-1])
        if m - lo > kept.size:
            return float(np.quantile(band[ok], 0.999))
        a, b = kept[kept.size - (m - lo)], kept[kept.size - (m - lo) + 1]
        t = pos - lo
        return float(a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t))

    level = level_now()
    for _ in range(8):
        if level <= 0:
            break
        lab, n_obj = ndi.label(band >= 0.5 * level, structure=structure)
        if n_obj == 0:
            break
        sizes = np.bincount(lab.ravel(), minlength=n_obj + 1)
        big = np.flatnonzero(sizes > BLOB_AREA)
        big = big[big > 0]
        if big.size == 0:
            break
        # Three dilations by the in-plane 3x3 square are one 7x7 maximum: separable,
        # so all the blobs are grown at once for little more than a pass over the image.
        is_big = np.zeros(n_obj + 1, np.uint8)
        is_big[big] = 1
        grown = ndi.maximum_filter(is_big[lab], size=window, mode="constant", cval=0)
        before = np.count_nonzero(ok)
        ok &= grown == 0
        n_ok = np.count_nonzero(ok)
        if n_ok <= 100:
            break
        if n_ok == before:  # the same pixels again: the level, and every later round,
            break  # would be the same
        level = level_now()
    return level


def _half_normal(above: np.ndarray) -> bool:
    """Whether positive values look like the upper half of a normal (clipped noise).

    Half a normal has its quartiles at 0.47 and 1.70 times its median; the tails of
    noise-free spots span orders of magnitude (1e-6 to 100 grey levels).
    """
    q25, q50, q75 = np.quantile(above, [0.25, 0.5, 0.75])
    return bool(q50 > 0 and 0.3 * q50 <= q25 <= 0.65 * q50 and 1.4 * q50 <= q75 <= 2.1 * q50)


def _constant_stretches(filled: np.ndarray, side: int = 16) -> np.ndarray:
    """Pixels of aligned ``side`` x ``side`` squares of one value (in each plane or
    block of a sample); a remainder of the width or height is never counted."""
    out = np.zeros(filled.shape, bool)
    h, w = (n - n % side for n in filled.shape[-2:])
    if h == 0 or w == 0:
        return out
    for y in range(0, h, side):  # a band of squares at a time: no copy of the image
        band = filled[..., y : y + side, :w]
        tiles = band.reshape(*band.shape[:-2], side, w // side, side)
        one = tiles.max(axis=(-3, -1)) == tiles.min(axis=(-3, -1))
        if one.any():
            out[..., y : y + side, :w] = np.repeat(one[..., None, :], side, axis=-2).repeat(
                side, axis=-1
            )
    return out


def _masked(filled: np.ndarray, flat: np.ndarray, finite: np.ndarray) -> bool:
    """Whether the constant stretches of an image are a mask set to another level than
    its background (0 outside a cell, a fill value), rather than the background itself
    (a noise-free rendering, a surround set to the background level).

    A mask lies more than 5 noise levels away from the median of the other pixels,
    which must be at least 1000 and hold noise; spots on a flat background do not: the
    pixels beside them are their tails, which start at the flat level.
    """
    rest = finite & ~flat
    if not flat.any() or np.count_nonzero(rest) < 1000:
        return False
    level = float(np.median(filled[flat]))
    vals = filled[rest]
    centre = float(np.median(vals))
    spread = 1.4826 * float(np.median(np.abs(vals - centre)))
    return spread > 0 and abs(level - centre) > 5 * spread


def estimate_normalization(
    image: np.ndarray, compression: float = COMPRESSION, contrast_ratio: float = CONTRAST_RATIO
) -> Normalization:
    """Robust background and noise of an image, ignoring non-finite pixels.

    The background is the median. The noise is measured at the scale of a
    spot: 1.4826 x the median absolute deviation of a difference of
    Gaussians (sigma 1 and 3 px), divided by that filter's gain for white
    noise. White noise gives its standard deviation; spatially correlated
    noise (smoothed, upsampled or 8-bit rendered images) gives more, as it
    should, since such noise makes spot-like blobs. Clipped pixels (at the
    image minimum or maximum), constant stretches (16 x 16 px of one value) and
    non-finite pixels are left out; a constant stretch far from the rest's level (a
    mask, padding) is left out of every statistic. A flat image gets a floor (half a
    grey level for integer data), so noise is never stretched into spots; a
    noise-free one (spots on a flat background) takes its unit from the spots'
    contrast. Statistics come from the whole image, or from a regular grid of
    blocks covering a large one.

    The unit of the network input is max(noise, q / contrast_ratio), where q
    is the 99.9th percentile of the same band-pass image: the contrast of
    the brightest spots.
    """
    sample = _sample(image).astype(np.float64)
    finite = np.isfinite(sample)
    arr = np.asarray(image)
    n_nonfinite = int(arr.size - np.count_nonzero(np.isfinite(arr))) if arr.dtype.kind == "f" else 0
    if not finite.any():
        return Normalization(0.0, 1.0, compression, n_nonfinite)
    # Constant stretches (16 x 16 px squares of one value: outside a cell, padding, a
    # masked area) hold no noise: counted as noise they shrank the unit until the
    # noise of the rest became spots (1851 spots for 12 in a cell whose surround was
    # set to 100).
    filled = sample if finite.all() else np.where(finite, sample, np.median(sample[finite]))
    flat = _constant_stretches(filled) & finite
    if _masked(filled, flat, finite):
        finite = finite & ~flat  # a mask at another level: the rest is the image
    values = sample[finite]
    background = float(np.median(values))
    lo, hi = values.min(), values.max()
    filled = np.where(finite, sample, background)
    sig = lambda s: [0] * (filled.ndim - 2) + [s, s]  # noqa: E731  (blocks filtered apart)
    band = ndi.gaussian_filter(filled, sig(BAND[0])) - ndi.gaussian_filter(filled, sig(BAND[1]))
    # Only pixels whose neighbourhood is finite, unclipped and not constant.
    ok = finite & (filled > lo) & (filled < hi) & ~flat
    size = [1] * (filled.ndim - 2) + [7, 7]
    ok = ndi.minimum_filter(ok.astype(np.uint8), size=size, mode="constant") > 0
    vals = band[ok]
    noise, contrast = 0.0, 0.0
    # When the median is the image's minimum or maximum, the background itself is
    # clipped (or flat: a noise-free rendering). If the unclipped pixels are then only a
    # few, they are spots and their tails, not background, and their spread is no noise
    # figure (it gave 20, 26, 0 and 20 spots for one noise-free image as uint16,
    # float16, float32 and float64). A mosaic padded with zeros keeps its tissue's.
    background_clipped = background <= lo or background >= hi
    spots_only = (
        background_clipped
        and vals.size < MIN_BACKGROUND_SHARE * values.size
        # Spots and their tails cover a minority of the pixels; a contrast-stretched
        # image clipped at 0 keeps a large textured rest (ISS: 46% above 0).
        and np.count_nonzero((values > lo) & (values < hi)) < SPOT_SHARE * values.size
    )
    if vals.size > 100 and not spots_only:
        noise = 1.4826 * float(np.median(np.abs(vals - np.median(vals)))) / BAND_GAIN
        contrast = _spot_contrast(band, ok)
    elif spots_only:
        # The spots still set the contrast, measured over every finite pixel.
        contrast = _spot_contrast(band, finite)
    integer = np.issubdtype(arr.dtype, np.integer)
    # Half a grey level for integers; for float data relative to the range (1e-20 per
    # grey level is still data) and at least half a step of the type at the background
    # (float16 data near 100 come in steps of 0.0625).
    step = 0.5 * float(np.spacing(arr.dtype.type(background))) if arr.dtype.kind == "f" else 0.0
    floor = 0.5 if integer else max(1e-6 * float(hi - lo), step, float(np.finfo(np.float64).tiny))
    if noise <= floor:
        # Fall back on the spread of all pixels (heavily quantised or clipped).
        varied = filled[finite & ~flat]  # the constant stretches say nothing of noise
        varied = varied if varied.size > 100 else values
        spread = 1.4826 * float(np.median(np.abs(varied - background)))
        above = values[values > background] - background if spread <= floor else values[:0]
        if spread <= floor and above.size >= 0.2 * values.size and _half_normal(above):
            # Most pixels sit at the background, which is the image minimum, and a good
            # share above it: noise clipped at zero (an offset or a background taken
            # away). What is left above is half a normal: its median is 0.6745 sigma.
            # (A noise-free image has only spots and their tails above: it keeps the
            # floor, and its unit comes from the contrast.)
            spread = float(np.median(above)) / 0.6745
        noise = max(noise, min(spread, 1e30), floor)
    unit = max(noise, contrast / contrast_ratio) if contrast_ratio > 0 else noise
    return Normalization(background, float(noise), compression, n_nonfinite, float(unit))


# --------------------------------------------------------------------------- inference


@dataclass
class Maps:
    """Cached network output for one image, in the network's (scaled) frame."""

    logit: np.ndarray  # (H, W) float32
    disp: np.ndarray  # (2, H, W) float32, (dy, dx) in pixels
    scale: float = 1.0
    noise: float = 0.0  # the image's noise, for the significance floor
    min_snr: float = 0.0

    @property
    def prob(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logit))


def _tiles(length: int, core: int, multiple: int):
    """Start positions of the cores along one axis; cores are multiples of ``multiple``."""
    core = max(multiple, (core // multiple) * multiple)
    return list(range(0, length, core)), core


def check_decoding(threshold: float, scale: float | None = None) -> None:
    """ValueError, its message starting with the option's name, for a threshold that is
    not a probability in (0, 1) or a scale outside 0.01-100 (None: not checked)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")
    if scale is not None and not 0.01 <= scale <= 100:
        raise ValueError(f"scale must be between 0.01 and 100, got {scale}")


CORE_MARGINS = 4  # the smallest tile core, in margins of the network (smallest_core)


def smallest_core(net) -> int:
    """The smallest tile core :func:`tile_cores` uses: 4 times the network's margin."""
    return CORE_MARGINS * receptive_margin(net.channels)


def tile_cores(shape, net, tile_size: int):
    """(ys, xs, core_y, core_x, margin): the tile grid of an image of ``shape``.

    A core is at least 4 times the network's margin: each tile is run with the margin
    on every side, so a smaller core costs many times the work for no memory worth
    saving (tile size 8 would run the network on 290 times the image). The spots do
    not depend on the core size, so raising it changes nothing else.
    """
    h, w = shape
    mult = net.multiple
    margin = receptive_margin(net.channels)
    size = max(int(tile_size), smallest_core(net))
    ys, core_y = _tiles(h, min(size, _round_up(h, mult)), mult)
    xs, core_x = _tiles(w, min(size, _round_up(w, mult)), mult)
    return ys, xs, core_y, core_x, margin


VIEWS = (1, 2)  # what a model's "views" may be (see _forward)


def _run(model: SpotNet, batch: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(batch[:, None]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = model(x)
    return out.float().numpy()


def _forward(model: SpotNet, batch: np.ndarray) -> np.ndarray:
    """The network's (logit, dy, dx) maps of a batch of tiles (B, H, W).

    A model whose ``views`` attribute is 2 (its config's ``"views"``) also sees each
    tile transposed, rows for columns; that output is transposed back, its dy and dx
    swapped, and the two are averaged. The second view costs a second pass and takes
    away part of the network's own errors, which differ from one orientation to the
    other. Tile origins and sizes are multiples of the network's size multiple, and a
    transpose keeps its pooling grid, so tiled and untiled runs still agree.
    """
    out = _run(model, batch)
    if getattr(model, "views", 1) == 2:
        other = _run(model, np.ascontiguousarray(batch.swapaxes(-1, -2)))
        out += other.swapaxes(-1, -2)[:, [0, 2, 1]]
        out *= 0.5
    return out


def _rescale(image: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return image
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    size = [max(1, round(n * scale)) for n in image.shape]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=scale < 1.0)[
        0, 0
    ].numpy()


def iter_tile_maps(
    image: np.ndarray,
    model: SpotNet,
    norm: Normalization,
    tile_size: int = DEFAULT_TILE,
    progress: Callable[[int, int], None] | None = None,
):
    """Run the network tile by tile; yield (y0, x0, core_h, core_w, maps, pad).

    ``maps`` is (3, th, tw) for the tile including its margin; the core
    starts at (pad_y, pad_x) = ``pad`` within it. Tiles are cut from the
    normalised image padded with its background (0), as the network's own
    zero padding was in training: a mirrored padding would give a spot on
    the border a twin. Tile origins are multiples of the
    network's size multiple, so a tile sees exactly what the whole image
    would: tiled and untiled outputs agree in every core.
    """
    h, w = image.shape
    ys, xs, core_y, core_x, margin = tile_cores(image.shape, model, tile_size)
    # Pad: margin on every side, and up to whole cores at the far end.
    pad_b = _round_up(h, core_y) - h + margin
    pad_r = _round_up(w, core_x) - w + margin
    norm_img = norm.apply(image)
    padded = np.pad(
        norm_img, ((margin, pad_b), (margin, pad_r)), mode="constant", constant_values=0.0
    )
    total = len(ys) * len(xs)
    done = 0
    for y0 in ys:
        for x0 in xs:
            tile = padded[y0 : y0 + core_y + 2 * margin, x0 : x0 + core_x + 2 * margin]
            out = _forward(model, tile[None])[0]
            done += 1
            if progress is not None:
                progress(done, total)
            ch, cw = min(core_y, h - y0), min(core_x, w - x0)
            yield y0, x0, ch, cw, out, (margin, margin)


def _round_up(n: int, m: int) -> int:
    return int(-(-n // m) * m)


def predict_maps(
    image: np.ndarray,
    model,
    norm: Normalization | None = None,
    scale: float | None = None,
    tile_size: int = DEFAULT_TILE,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Maps, Normalization]:
    """Full-image network maps, to decode at any threshold without the network.

    ``model`` is a :class:`piscis.io.LoadedModel` (its normalisation settings
    and scale apply) or a bare :class:`SpotNet`. Memory: 12 bytes per pixel
    for the maps, on top of the image.
    """
    image = _check_2d(image)
    net, compression, ratio, default_scale = model, COMPRESSION, CONTRAST_RATIO, 1.0
    min_snr = 0.0
    if not isinstance(model, SpotNet):
        net, compression, ratio = model.net, model.compression, model.contrast_ratio
        default_scale, min_snr = model.scale, model.min_snr
    scale = default_scale if scale is None else float(scale)
    if norm is None:
        if isinstance(model, SpotNet):
            norm = estimate_normalization(image, compression, ratio)
        else:
            norm = model_normalization(image, model)
    work = _rescale(image, scale)
    h, w = work.shape
    maps = np.empty((3, h, w), dtype=np.float32)
    for y0, x0, ch, cw, out, (py, px) in iter_tile_maps(work, net, norm, tile_size, progress):
        maps[:, y0 : y0 + ch, x0 : x0 + cw] = out[:, py : py + ch, px : px + cw]
    return Maps(maps[0], maps[1:], scale, norm.noise, min_snr), norm


# --------------------------------------------------------------------------- decoding


def _logit(p: float) -> float:
    p = min(max(p, 1e-15), 1 - 1e-15)
    return math.log(p / (1 - p))


def decode(
    logit: np.ndarray, disp: np.ndarray, threshold: float, refine: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spots from the maps: peaks of the vote-pooled map above ``threshold``.

    Returns (coords (N, 2) float, scores (N,), pixels (N, 2) int): the
    sub-pixel position, the pooled probability l(p), and the peak pixel p.
    The position is p + d(p), or with ``refine`` the mean of the positions
    q + d(q) of every pixel q voting for p, weighted by s(q). Pooling runs
    on logits, so saturated probabilities do not tie.
    """
    logit = np.asarray(logit, dtype=np.float32)
    disp = np.asarray(disp, dtype=np.float32)
    pooled = vote_pool_np(logit, disp)
    t = _logit(threshold)
    local_max = ndi.maximum_filter(pooled, size=3, mode="constant", cval=-np.inf)
    peaks = (pooled >= local_max) & (pooled >= t) & np.isfinite(pooled)
    pix = np.argwhere(peaks)
    if len(pix) > 1:
        pix = _break_ties(pix, pooled)
    d = disp[:, pix[:, 0], pix[:, 1]].T if len(pix) else np.zeros((0, 2), np.float32)
    coords = pix.astype(np.float64) + d
    if refine and len(pix):
        coords = _vote_mean(pix, logit, disp, coords)
    scores = 1.0 / (1.0 + np.exp(-pooled[pix[:, 0], pix[:, 1]].astype(np.float64)))
    return coords.reshape(-1, 2), scores, pix.reshape(-1, 2)


def vote_pool_np(value: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`piscis.loss.vote_pool` for inference (fill -inf).

    Each pixel q sends ``value(q)`` to p = q + round(d(q)) when p is in its
    3x3 neighbourhood; p keeps the largest value it receives.
    """
    h, w = value.shape
    oy, ox = np.rint(disp[0]), np.rint(disp[1])
    pooled = np.full((h, w), -np.inf, dtype=np.float32)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            cand = np.where((oy == dy) & (ox == dx), value, -np.inf).astype(np.float32)
            # The value at q goes to p = q + (dy, dx).
            src = cand[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
            dst = pooled[max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)]
            np.maximum(dst, src, out=dst)
    return pooled


def _vote_mean(pix, logit, disp, fallback) -> np.ndarray:
    """Probability-weighted mean of the voters' positions, per peak."""
    h, w = logit.shape
    num = np.zeros((len(pix), 2))
    den = np.zeros(len(pix))
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            qy, qx = pix[:, 0] + dy, pix[:, 1] + dx
            ok = (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)
            qy, qx = np.clip(qy, 0, h - 1), np.clip(qx, 0, w - 1)
            d = disp[:, qy, qx]
            votes = ok & (np.round(d[0]) == -dy) & (np.round(d[1]) == -dx)
            wgt = np.where(votes, 1.0 / (1.0 + np.exp(-logit[qy, qx].astype(np.float64))), 0.0)
            num += wgt[:, None] * (np.stack([qy, qx], 1) + d.T)
            den += wgt
    out = fallback.copy()
    has = den > 0
    out[has] = num[has] / den[has, None]
    return out


def _break_ties(pix: np.ndarray, pooled: np.ndarray) -> np.ndarray:
    """Keep one pixel of each group of adjacent equal maxima (a plateau)."""
    mask = np.zeros(pooled.shape, bool)
    mask[pix[:, 0], pix[:, 1]] = True
    lab, n = ndi.label(mask, structure=np.ones((3, 3)))
    if n == len(pix):
        return pix
    keep = np.zeros(n + 1, bool)
    out = []
    for y, x in pix:  # row-major order: the first pixel of each plateau wins
        k = lab[y, x]
        if not keep[k]:
            keep[k] = True
            out.append((y, x))
    return np.asarray(out, dtype=pix.dtype)


# --------------------------------------------------------------------------- intensities


def spot_intensities(
    image: np.ndarray,
    coords: np.ndarray,
    radius: float = 2.0,
    annulus: tuple[float, float] = (3.0, 5.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Integrated, background-subtracted intensity of each spot.

    For a spot at (y, x): ``background`` is the median of the pixels whose
    centres lie at a distance in [annulus[0], annulus[1]) of (y, x);
    ``intensity`` is the sum over the pixels whose centres lie within
    ``radius`` of (y, x) of (pixel - background). Pixels outside the image
    or not finite are left out. Units are the image's grey levels.
    """
    n = len(coords)
    inten = np.full(n, np.nan)
    bgs = np.full(n, np.nan)
    if n == 0:
        return inten, bgs
    r_out = annulus[1]
    k = int(math.ceil(r_out))
    oy, ox = np.mgrid[-k : k + 1, -k : k + 1]
    h, w = image.shape
    for i, (y, x) in enumerate(coords):
        if not (np.isfinite(y) and np.isfinite(x)):
            continue
        cy, cx = int(round(y)), int(round(x))
        py, px = cy + oy, cx + ox
        inside = (py >= 0) & (py < h) & (px >= 0) & (px < w)
        dist = np.hypot(py - y, px - x)
        vals = np.full(py.shape, np.nan)
        vals[inside] = image[py[inside], px[inside]].astype(np.float64)
        ring = vals[(dist >= annulus[0]) & (dist < annulus[1]) & np.isfinite(vals)]
        disk = vals[(dist <= radius) & np.isfinite(vals)]
        if ring.size == 0 or disk.size == 0:
            continue
        bg = float(np.median(ring))
        bgs[i] = bg
        inten[i] = float(np.sum(disk - bg))
    return inten, bgs


def spot_significance(
    image: np.ndarray,
    coords: np.ndarray,
    background: np.ndarray,
    noise: float,
    sigma: float = 1.5,
) -> np.ndarray:
    """Matched-filter signal-to-noise ratio of each spot.

    snr = sum of w * (pixel - background) / (noise * sqrt(sum of w^2)), with
    w a Gaussian of ``sigma`` px centred on the spot (pixels within 3 sigma,
    on the image and finite). For white noise of standard deviation
    ``noise`` it is distributed N(0, 1) where there is no spot: a spot at
    snr 6 stands six standard deviations out of the noise.
    """
    n = len(coords)
    out = np.full(n, np.nan)
    if n == 0:
        return out
    k = int(math.ceil(3 * sigma))
    oy, ox = np.mgrid[-k : k + 1, -k : k + 1]
    h, w = image.shape
    for i, (y, x) in enumerate(coords):
        if not (np.isfinite(y) and np.isfinite(x) and np.isfinite(background[i])):
            continue
        py, px = int(round(y)) + oy, int(round(x)) + ox
        inside = (py >= 0) & (py < h) & (px >= 0) & (px < w)
        vals = image[py[inside], px[inside]].astype(np.float64)
        wgt = np.exp(-((py[inside] - y) ** 2 + (px[inside] - x) ** 2) / (2 * sigma**2))
        ok = np.isfinite(vals)
        wgt, vals = wgt[ok], vals[ok]
        if wgt.size:
            out[i] = float(np.sum(wgt * (vals - background[i])) / (noise * np.sqrt(np.sum(wgt**2))))
    return out


# --------------------------------------------------------------------------- the detector


@dataclass
class Spots:
    """A spot table: coordinates (N, 2) (y, x) and one value per spot."""

    coords: np.ndarray
    score: np.ndarray
    intensity: np.ndarray
    background: np.ndarray
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.coords)

    @classmethod
    def empty(cls, ndim: int = 2) -> Spots:
        if ndim == 3:
            from .detect3d import empty_spots_3d

            return empty_spots_3d()
        z = np.zeros(0)
        return cls(np.zeros((0, 2)), z, z.copy(), z.copy())

    def columns(self) -> dict[str, np.ndarray]:
        """``y,x,score,intensity,background`` (2D) or ``z,y,x,score,...`` (3D), then
        the extra columns."""
        cols = {"z": self.coords[:, 0]} if self.coords.shape[1] == 3 else {}
        cols |= {
            "y": self.coords[:, -2],
            "x": self.coords[:, -1],
            "score": self.score,
            "intensity": self.intensity,
            "background": self.background,
        }
        cols.update(self.extra)
        return cols


def spots_from_maps(
    maps: Maps, image: np.ndarray, threshold: float, radius: float = 2.0, crowded: bool = True
) -> Spots:
    """Decode cached maps at ``threshold`` and measure the spots on ``image``; with
    ``crowded``, dense clusters are fitted as :func:`detect` fits them."""
    coords, scores, _ = decode(maps.logit, maps.disp, threshold)
    coords, scores = _to_image_frame(coords, scores, maps.scale, image.shape)
    spots = _finish(image, coords, scores, radius / maps.scale, maps.noise, maps.min_snr)
    return add_crowded(image, spots, maps.noise, radius / maps.scale) if crowded else spots


def _to_image_frame(coords, scores, scale: float, shape):
    """Back from the network's frame to the image's; drop spots off the image."""
    if scale != 1.0:
        coords = (coords + 0.5) / scale - 0.5
    # Keep spots whose position lies on the image (half a pixel of slack).
    ok = np.all((coords >= -0.5) & (coords <= np.asarray(shape) - 0.5), axis=1)
    return coords[ok], scores[ok]


def _finish(image, coords, scores, radius, noise: float = 0.0, min_snr: float = 0.0) -> Spots:
    """Sort spots, measure them, and drop those under ``min_snr`` (if > 0)."""
    ok = np.all(np.isfinite(coords), axis=1)
    coords, scores = coords[ok], scores[ok]
    order = np.lexsort((coords[:, 1], coords[:, 0])) if len(coords) else np.zeros(0, int)
    coords, scores = coords[order], scores[order]
    image = np.asarray(image)
    inten, bg = spot_intensities(image, coords, radius, (radius + 1.0, radius + 3.0))
    if min_snr > 0 and noise > 0 and len(coords):
        snr = spot_significance(image, coords, bg, noise, sigma=0.75 * radius)
        keep = ~(snr < min_snr)  # a spot whose SNR cannot be measured is kept
        coords, scores, inten, bg = coords[keep], scores[keep], inten[keep], bg[keep]
    return Spots(coords, scores, inten, bg)


def clip_roi(roi, shape, name: str = "image") -> tuple[int, int, int, int]:
    """A region of interest ``(y0, x0, height, width)`` clipped to an image.

    Returns ``(y0, y1, x0, x1)``, the clipped half-open pixel ranges. A ROI may start
    at negative coordinates or reach past the image; what lies off the image is
    dropped.

    Raises
    ------
    ValueError
        The ROI is not four numbers, has a zero or negative size, or does not overlap
        the image (the message gives the ROI and the image shape).
    """
    try:
        y0, x0, h, w = (float(v) for v in roi)
    except (TypeError, ValueError):
        msg = f"{name}: ROI must be four numbers (y0, x0, height, width), got {roi!r}"
        raise ValueError(msg) from None
    if not all(np.isfinite((y0, x0, h, w))):
        raise ValueError(f"{name}: ROI {roi!r} holds a non-finite number")
    if h <= 0 or w <= 0:
        msg = f"{name}: ROI {roi!r} is empty (height {h:g}, width {w:g}); give a positive size"
        raise ValueError(msg)
    ys = max(0, math.floor(y0)), min(int(shape[0]), math.ceil(y0 + h))
    xs = max(0, math.floor(x0)), min(int(shape[1]), math.ceil(x0 + w))
    if ys[0] >= ys[1] or xs[0] >= xs[1]:
        msg = (
            f"{name}: ROI {roi!r} (y0, x0, height, width) is empty once clipped to the "
            f"image of shape {tuple(shape)}"
        )
        raise ValueError(msg)
    return ys[0], ys[1], xs[0], xs[1]


def roi_window(box, shape, net) -> tuple[int, int, int, int]:
    """The part of the image the network needs to see for a ROI ``box`` (y0, y1, x0, x1).

    The box grown by the network's receptive margin (plus the decoder's 2 px), with its
    origin on the network's size multiple, so that the maps inside the box are those of
    the whole image: a detection in a ROI is a whole-image detection.
    """
    multiple = net.multiple
    ctx = receptive_margin(net.channels) + multiple
    y0 = max(0, (box[0] - ctx) // multiple * multiple)
    x0 = max(0, (box[2] - ctx) // multiple * multiple)
    return y0, min(int(shape[0]), box[1] + ctx), x0, min(int(shape[1]), box[3] + ctx)


def in_box(coords: np.ndarray, box) -> np.ndarray:
    """Spots whose rounded pixel lies in the box (y0, y1, x0, x1): the ROI's spots."""
    pix = np.floor(np.asarray(coords, dtype=float).reshape(-1, 2) + 0.5)
    return (
        (pix[:, 0] >= box[0]) & (pix[:, 0] < box[1]) & (pix[:, 1] >= box[2]) & (pix[:, 1] < box[3])
    )


def subset(spots: Spots, keep: np.ndarray, offset=None) -> Spots:
    """The spots where ``keep``, their coordinates shifted by ``offset`` (if given)."""
    extra = {k: np.asarray(v)[keep] for k, v in spots.extra.items()}
    shift = 0.0 if offset is None else np.asarray(offset, dtype=float)
    return Spots(
        spots.coords[keep] + shift,
        spots.score[keep],
        spots.intensity[keep],
        spots.background[keep],
        extra,
    )


def detect(
    image: np.ndarray,
    model=None,
    threshold: float | None = None,
    scale: float | None = None,
    tile_size: int = DEFAULT_TILE,
    progress: Callable[[int, int], None] | None = None,
    name: str = "image",
    min_snr: float | None = None,
    roi=None,
    *,
    spacing=None,
    z_block: int | None = None,
    z_range=None,
    min_planes: int | None = None,
) -> Spots:
    """Find the spots of a 2D image or a 3D volume.

    Parameters
    ----------
    image : 2D array (Y, X) or 3D (Z, Y, X), any real dtype; non-finite pixels are
        ignored. A volume may be any array-like with ``.shape``, ``.dtype`` and plane
        indexing ``vol[z]`` (a zarr array, a memmap): it is read plane by plane.
    model : a :class:`piscis.io.LoadedModel`, a model name or folder; None
        for the default model shipped with the package.
    threshold : probability threshold; None for the model's own.
    scale : resize factor applied before the network (spots larger than
        2-3 px: use < 1); coordinates are returned in the input's frame.
        None for the model's own (usually 1).
    tile_size : core size of the tiles; memory is bounded by it.
    name : how log messages name the image (a file name, say).
    min_snr : significance floor: spots whose matched-filter signal-to-noise
        ratio (:func:`spot_significance`) is below it are dropped; None for
        the model's own (0: none). In 3D it is measured in the spot's best plane.
    roi : (y0, x0, height, width), optional; in 3D a (y, x) rectangle of every plane
        Only the spots whose rounded pixel lies in this rectangle, clipped to
        the image (it may start before it or reach past it; an empty one is a
        ValueError). Coordinates stay in the whole image's frame. The network
        sees the ROI's surroundings and the normalisation comes from the whole
        image, so at scale 1 these are exactly the whole image's spots inside
        the ROI, at the cost of the ROI only.
    spacing : 3D only: voxel size (z, y, x) in micrometres, or None; gives the
        ``fwhm_z_um`` and ``fwhm_yx_um`` columns (NaN without it).
    z_block : 3D only: process the volume in blocks of this many planes (each with
        :data:`piscis.detect3d.Z_HALO` planes of context); same spots as without.
    z_range : 3D only: (z0, z1): only the spots whose z lies in planes z0..z1-1
        (with context planes around them), for processing a volume in parts.
    min_planes : 3D only: planes a spot must be seen in (default 2; 1 for volumes
        of fewer than 3 planes).

    3D: see :mod:`piscis.detect3d` (per-plane network, peaks linked along z, split
    at clear intensity dips, 3D Gaussian fit for z and FWHMs).

    Tiles are decoded one at a time and a spot is kept only if its peak
    pixel lies in its tile's core, so memory stays bounded by the tile and
    the result does not depend on ``tile_size``.
    """
    from .io import load_model

    ndim = len(image.shape) if hasattr(image, "shape") else np.ndim(image)
    if ndim != 3:
        image = _check_2d(image)
    loaded = load_model(model)
    threshold = loaded.threshold if threshold is None else float(threshold)
    scale = loaded.scale if scale is None else float(scale)
    check_decoding(threshold, scale)
    box = None if roi is None else clip_roi(roi, image.shape[-2:], name)
    min_snr = loaded.min_snr if min_snr is None else float(min_snr)
    if ndim == 3:
        from .detect3d import detect_volume

        spots = detect_volume(
            image, loaded, threshold, scale, tile_size, progress, name, min_snr,
            spacing=spacing, z_block=z_block, z_range=z_range, min_planes=min_planes,
        )  # fmt: skip
        return spots if box is None else subset(spots, in_box(spots.coords[:, -2:], box))
    norm = model_normalization(image, loaded)
    if norm.n_nonfinite:
        logger.warning(
            "%s: %d non-finite (NaN or infinite) pixels are ignored", name, norm.n_nonfinite
        )
    origin = np.zeros(2)
    plane = image
    if box is not None:
        wy0, wy1, wx0, wx1 = roi_window(box, image.shape, loaded.net)
        plane, origin = image[wy0:wy1, wx0:wx1], np.array([wy0, wx0], dtype=float)
    coords, scores = _plane_peaks(plane, loaded.net, norm, threshold, scale, tile_size, progress)
    spots = _finish(image, coords + origin, scores, 2.0 / scale, norm.noise, min_snr)
    # Dense clusters are fitted with every detection the network saw around them.
    spots = add_crowded(image, spots, norm.noise, 2.0 / scale, name)
    return spots if box is None else subset(spots, in_box(spots.coords, box))


def _plane_peaks(image, net, norm, threshold, scale, tile_size, progress=None):
    """Spots of one 2D plane in the image's frame: (coords (N, 2), scores (N,)).

    Tiles are decoded one at a time and a spot is kept only if its peak pixel
    lies in its tile's core, so the result does not depend on ``tile_size``.
    """
    work = _rescale(image, scale)
    all_coords, all_scores = [], []
    for y0, x0, ch, cw, out, (py, px) in iter_tile_maps(work, net, norm, tile_size, progress):
        # Decode a window 2 px larger than the core (voting and NMS look 2 px out).
        win = out[:, py - 2 : py + ch + 2, px - 2 : px + cw + 2]
        coords, scores, pix = decode(win[0], win[1:], threshold)
        core = (pix[:, 0] >= 2) & (pix[:, 0] < ch + 2) & (pix[:, 1] >= 2) & (pix[:, 1] < cw + 2)
        all_coords.append(coords[core] + np.array([y0 - 2, x0 - 2]))
        all_scores.append(scores[core])
    coords = np.concatenate(all_coords) if all_coords else np.zeros((0, 2))
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    return _to_image_frame(coords, scores, scale, image.shape)


def _check_2d(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype.kind not in "uif":
        raise TypeError(f"image dtype {image.dtype} is not supported: give integer or float pixels")
    if image.ndim != 2:
        raise ValueError(
            f"detect takes a 2D (Y, X) image or a 3D (Z, Y, X) volume, got shape {image.shape}"
        )
    if image.size == 0:
        raise ValueError(f"image has a zero-size axis: shape {image.shape}")
    if image.dtype.byteorder not in "=|":
        image = image.astype(image.dtype.newbyteorder("="))
    return image
