"""Training data: targets from annotations, training pairs, crops and
augmentation (DESIGN.md section 2 for the targets).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from . import synth
from .detect import Normalization, estimate_normalization

logger = logging.getLogger(__name__)


def make_targets(coords: np.ndarray, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Training targets for one image.

    Returns ``label`` (float32: 1 on each rounded spot pixel dilated by a 3x3
    square), ``disp`` (float32 (2, H, W): vector from each pixel to its
    nearest spot, nearest decided on rounded positions), ``vote`` (bool: the
    rounded spot pixels) and ``n_true`` (spots whose rounded pixel is on the
    image).
    """
    h, w = shape
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    pix = np.round(coords).astype(np.int64)
    on = (pix[:, 0] >= 0) & (pix[:, 0] < h) & (pix[:, 1] >= 0) & (pix[:, 1] < w)
    pix, coords = pix[on], coords[on]
    vote = np.zeros(shape, bool)
    disp = np.zeros((2, h, w), np.float32)
    if len(pix):
        vote[pix[:, 0], pix[:, 1]] = True
        # Sub-pixel position stored at each spot pixel (last one wins on ties).
        sub = np.zeros((2, h, w))
        sub[:, pix[:, 0], pix[:, 1]] = coords.T
        _, idx = ndi.distance_transform_edt(~vote, return_indices=True)
        iy, ix = idx
        grid_y, grid_x = np.mgrid[:h, :w]
        disp[0] = sub[0, iy, ix] - grid_y
        disp[1] = sub[1, iy, ix] - grid_x
    label = ndi.binary_dilation(vote, np.ones((3, 3), bool)).astype(np.float32)
    return {"label": label, "disp": disp, "vote": vote, "n_true": np.int64(vote.sum())}


# --------------------------------------------------------------------------- training pairs


@dataclass
class Pair:
    """One annotated image: pixels, spots and (optionally) the annotated region."""

    name: str
    image: np.ndarray  # 2D
    coords: np.ndarray  # (N, 2)
    region: np.ndarray | None = None  # bool, True where fully annotated
    norm: Normalization | None = None

    def __post_init__(self):
        if self.norm is None:
            self.norm = estimate_normalization(self.image)


# The names of an image's annotation table, in the order they are looked for: the
# image's name, then the truth names piscis evaluate pairs with an image.
ANNOTATION_NAMES = ("", ".truth", ".true", ".gt")


def load_pairs(
    folder: str | Path, channel: int | None = None, columns=None, pixel_size=None
) -> list[Pair]:
    """Read a training folder: ``NAME.tif``/``.png`` + ``NAME.csv`` (+ ``NAME.mask.tif``).

    ``columns`` and ``pixel_size`` go to :func:`piscis.io.read_spots` (column names of
    header-less tables; physical units); rows within :data:`piscis.io.MERGE_DISTANCE`
    of each other are merged into one spot, with a warning.
    """
    from .io import IMAGE_SUFFIXES, MERGE_DISTANCE, read_image_2d, read_spots

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: training folder not found")
    pairs = []
    for path in sorted(folder.iterdir()):
        if path.name.lower().endswith(".mask.tif") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        stem = path.name[: -len(path.suffix)]
        # NAME.csv, or a truth table named as piscis evaluate pairs them.
        found = [path.with_name(f"{stem}{role}.csv") for role in ANNOTATION_NAMES]
        found = [c for c in found if c.exists()]
        csv = found[0] if found else path.with_name(stem + ".csv")
        if len(found) > 1:
            logger.warning(
                "%s: %s used, %s left out", path, csv.name, ", ".join(c.name for c in found[1:])
            )
        if not csv.exists():
            logger.info("%s: no %s (or %s.truth.csv) beside it, skipped", path, csv.name, stem)
            continue
        image = read_image_2d(path, channel=channel)
        coords = read_spots(csv, columns, pixel_size, merge_distance=MERGE_DISTANCE)
        coords = _on_image(coords, image.shape, csv)
        mask_path = path.with_name(stem + ".mask.tif")
        region = None
        if mask_path.exists():
            region = read_image_2d(mask_path) > 0
            if region.shape != image.shape:
                raise ValueError(
                    f"{mask_path}: region mask shape {region.shape} differs from the "
                    f"image's {image.shape}"
                )
        pairs.append(Pair(stem, image, coords, region))
    if not pairs:
        raise ValueError(
            f"{folder}: no image + CSV pairs found (expected NAME.tif and NAME.csv or "
            "NAME.truth.csv)"
        )
    if not any(len(p.coords) for p in pairs):
        # Spot-free images teach what is not a spot, but with no spot at all the network
        # learns to find none (it trained and saved such a model, validation F1 0).
        raise ValueError(
            f"{folder}: no annotations in any CSV ({len(pairs)} CSV(s), none with a spot row "
            "on its image); annotate spots, one row y,x per spot, in at least one"
        )
    return pairs


def _on_image(coords: np.ndarray, shape, csv: Path) -> np.ndarray:
    """The rows whose rounded pixel lies on the image; the others are dropped with a
    warning (a wrong pixel size, an offset, or another image's table)."""
    pix = np.floor(coords + 0.5)
    on = np.all((pix >= 0) & (pix < np.asarray(shape)), axis=1)
    if not on.all():
        logger.warning(
            "%s: %d of %d rows lie outside the %d x %d image (dropped); check the "
            "coordinates (0-based pixels, y then x) and --pixel-size",
            csv,
            int(np.count_nonzero(~on)),
            len(coords),
            *shape,
        )
    return coords[on]


def annotation_check(pair: Pair, sigmas: float = 3.0) -> tuple[int, int, int]:
    """How many annotations sit on pixels brighter than background + ``sigmas`` x noise.

    Returns (bright, total, bright_if_swapped): the same count with y and x exchanged
    tells an x/y swap (few bright as given, many swapped). Annotations off the image
    count as not bright.
    """
    level = pair.norm.background + sigmas * pair.norm.noise

    def bright(coords):
        pix = np.floor(np.asarray(coords, float).reshape(-1, 2) + 0.5).astype(np.int64)
        on = np.all((pix >= 0) & (pix < np.asarray(pair.image.shape)), axis=1)
        vals = np.full(len(pix), -np.inf)
        vals[on] = pair.image[pix[on, 0], pix[on, 1]]
        return int(np.count_nonzero(vals > level))

    return bright(pair.coords), len(pair.coords), bright(pair.coords[:, ::-1])


# --------------------------------------------------------------------------- augmentation


def _rotate_crop(
    rng: np.random.Generator,
    image: np.ndarray,
    coords: np.ndarray,
    region: np.ndarray | None,
    size: int,
    angle: float,
    zoom: float,
    flip: bool,
):
    """Cut a size x size crop at a random place, rotated by ``angle`` and
    zoomed by ``zoom`` (output px per input px), by one affine resampling."""
    h, w = image.shape
    c, s = np.cos(angle), np.sin(angle)
    # Output pixel o maps to input A @ (o - oc) + ic.
    a = np.array([[c, -s], [s, c]]) / zoom
    if flip:
        a = a @ np.array([[1, 0], [0, -1]])
    half = (size - 1) / 2.0
    # Extent of the crop in input pixels, to choose a centre that keeps most of it inside.
    ext = np.abs(a).sum(1) * half
    lo = np.minimum(ext, np.array([h, w]) / 2.0)
    centre = np.array(
        [rng.uniform(lo[0] - 0.5, h - lo[0] - 0.5), rng.uniform(lo[1] - 0.5, w - lo[1] - 0.5)]
    )
    offset = centre - a @ np.array([half, half])
    crop = ndi.affine_transform(
        image.astype(np.float32),
        a,
        offset=offset,
        output_shape=(size, size),
        order=1,
        mode="reflect",
    )
    inside = ndi.affine_transform(
        np.ones_like(image, np.float32) if region is None else region.astype(np.float32),
        a,
        offset=offset,
        output_shape=(size, size),
        order=0,
        mode="constant",
        cval=0.0,
    )
    inv = np.linalg.inv(a)
    new = (coords - offset) @ inv.T if len(coords) else coords.reshape(0, 2)
    return crop, new, inside > 0.5


def sample_real(
    rng: np.random.Generator, pair: Pair, size: int, augment: bool = True, per_crop: bool = False
):
    """A normalised crop of a real pair with its spots and region.

    The crop is normalised with its image's statistics, or with its own (``per_crop``).
    """
    if augment:
        angle = rng.uniform(0, 2 * np.pi) if rng.random() < 0.5 else rng.integers(4) * np.pi / 2
        zoom = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
        flip = bool(rng.random() < 0.5)
    else:
        angle, zoom, flip = 0.0, 1.0, False
    crop, coords, region = _rotate_crop(
        rng, pair.image, pair.coords, pair.region, size, angle, zoom, flip
    )
    norm = pair.norm
    if per_crop:
        norm = estimate_normalization(crop, pair.norm.compression)
    x = norm.apply(crop)
    if augment and rng.random() < 0.3:
        # Lower the SNR: extra Gaussian noise in units of the image's noise.
        extra = rng.uniform(0.3, 1.5)
        z = np.sinh(x) * norm.compression + rng.normal(0, extra, x.shape)
        z /= np.sqrt(1 + extra**2)
        x = np.arcsinh(z / norm.compression).astype(np.float32)
    return x, coords, region


# A synthetic spot is annotated when its matched-filter signal, in units of
# the normalisation, reaches this: amplitude * sqrt(pi) * sigma / unit.
MIN_MATCHED_SNR = 5.0


def visible_spots(spots: dict[str, np.ndarray], norm: Normalization) -> np.ndarray:
    """The spots an annotator would call: those standing out of the noise
    and not several times dimmer than the image's bright spots."""
    matched = spots["amplitude"] * np.sqrt(np.pi) * spots["sigma"] / norm.unit
    return spots["coords"][matched >= MIN_MATCHED_SNR]


def sample_synthetic(rng: np.random.Generator, size: int, config: synth.SynthConfig | None = None):
    """A normalised synthetic image with its visible spots (all of it annotated)."""
    cfg = config or synth.SynthConfig(shape=(size, size))
    image, spots = synth.generate_spots(rng, cfg)
    norm = estimate_normalization(image)
    return norm.apply(image), visible_spots(spots, norm), None


def batch_targets(items) -> dict[str, np.ndarray]:
    """Stack (x, coords, region) crops into network input and targets."""
    xs, labels, disps, votes, ns, regions = [], [], [], [], [], []
    any_region = any(r is not None for _, _, r in items)
    for x, coords, region in items:
        shape = x.shape
        if region is not None:
            c = np.asarray(coords).reshape(-1, 2)
            pix = np.round(c).astype(int)
            on = np.all((pix >= 0) & (pix < np.array(shape)), axis=1)
            keep = np.zeros(len(c), bool)
            keep[on] = region[pix[on, 0], pix[on, 1]]
            coords = c[keep]
        t = make_targets(coords, shape)
        xs.append(x)
        labels.append(t["label"])
        disps.append(t["disp"])
        votes.append(t["vote"])
        ns.append(t["n_true"])
        if any_region:
            regions.append(
                np.ones(shape, np.float32) if region is None else region.astype(np.float32)
            )
    out = {
        "x": np.stack(xs)[:, None].astype(np.float32),
        "label": np.stack(labels),
        "disp": np.stack(disps),
        "vote": np.stack(votes),
        "n_true": np.asarray(ns),
    }
    if any_region:
        out["region"] = np.stack(regions)
    return out
