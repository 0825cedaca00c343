"""Large test images written tile by tile, so that making them needs little memory.

:func:`jittered_grid` places spots on a jittered grid (CASES.md C18);
:func:`write_large` renders an image tile by tile into a tiled BigTIFF or a Zarr
array: Gaussian spots over a flat background with Gaussian read noise
(:func:`render_field`), or a smaller image repeated mirror-wise
(:func:`mirror_tiles`). Each tile's noise comes from its own seeded generator, so the
image does not depend on the order the tiles are written in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .synth import render_spots

__all__ = [
    "jittered_grid",
    "mirror_tiles",
    "render_field",
    "render_volume_plane",
    "write_large",
    "write_volume",
]


def jittered_grid(shape, n: int, seed: int = 0, jitter: float = 0.25, margin: float = 4.0):
    """``n`` spot centres (N, 2) on a regular grid, each moved by up to ``jitter`` x
    the grid step, at least ``margin`` px from the border; sorted by (y, x)."""
    h, w = shape
    rng = np.random.default_rng(seed)
    ny = max(1, int(np.ceil(np.sqrt(n * h / w))))
    nx = max(1, int(np.ceil(n / ny)))
    sy, sx = (h - 2 * margin) / ny, (w - 2 * margin) / nx
    gy, gx = np.meshgrid(margin + (np.arange(ny) + 0.5) * sy, margin + (np.arange(nx) + 0.5) * sx)
    pts = np.stack([gy.ravel(), gx.ravel()], 1)
    pts = pts[np.sort(rng.choice(len(pts), n, replace=False))]
    pts += rng.uniform(-jitter, jitter, pts.shape) * [sy, sx]
    pts = np.clip(pts, margin, [h - 1 - margin, w - 1 - margin])
    return pts[np.lexsort((pts[:, 1], pts[:, 0]))]


def _noisy_tile(shape, coords, sigmas, amps, background, noise_sd, key) -> np.ndarray:
    """Spots over a flat background plus Gaussian noise from a generator seeded by
    ``key`` (the tile's own), rounded to uint16."""
    img = background + render_spots(shape, coords, sigmas, amps)
    img += np.random.default_rng(key).normal(0, noise_sd, img.shape)
    return np.clip(np.round(img), 0, 65535).astype(np.uint16)


def render_field(
    coords: np.ndarray,
    seed: int = 0,
    sigma: float = 1.0,
    amp: float = 400.0,
    background: float = 100.0,
    noise_sd: float = 5.0,
) -> Callable[[int, int, int, int], np.ndarray]:
    """A tile function for :func:`write_large`: spots at ``coords`` over background and
    noise, uint16; tile (y0, x0) of size (th, tw) renders only the spots near it."""
    coords = np.asarray(coords, float).reshape(-1, 2)
    order = np.argsort(coords[:, 0])
    coords = coords[order]
    reach = int(np.ceil(4 * sigma)) + 2

    def tile(y0: int, x0: int, th: int, tw: int) -> np.ndarray:
        lo, hi = np.searchsorted(coords[:, 0], [y0 - reach, y0 + th + reach])
        near = coords[lo:hi]
        near = near[(near[:, 1] >= x0 - reach) & (near[:, 1] < x0 + tw + reach)]
        local = near - [y0, x0]
        sigmas, amps = np.full(len(local), sigma), np.full(len(local), amp)
        return _noisy_tile((th, tw), local, sigmas, amps, background, noise_sd, [seed, y0, x0])

    return tile


def mirror_tiles(source: np.ndarray, dtype=np.uint16) -> Callable[[int, int, int, int], np.ndarray]:
    """A tile function repeating ``source`` mirror-wise (no seams) over any size."""
    source = np.asarray(source)
    sh, sw = source.shape

    def fold(i: np.ndarray, n: int) -> np.ndarray:
        i = i % (2 * n)
        return np.where(i < n, i, 2 * n - 1 - i)

    def tile(y0: int, x0: int, th: int, tw: int) -> np.ndarray:
        iy, ix = fold(np.arange(y0, y0 + th), sh), fold(np.arange(x0, x0 + tw), sw)
        return source[np.ix_(iy, ix)].astype(dtype)

    return tile


def _tiles(shape, tile: int, make) -> Iterator[np.ndarray]:
    h, w = shape
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            th, tw = min(tile, h - y0), min(tile, w - x0)
            out = np.zeros((tile, tile), np.uint16)  # TIFF tiles are whole: pad the edge ones
            out[:th, :tw] = make(y0, x0, th, tw)
            yield out


def write_large(path, shape, make, tile: int = 512) -> Path:
    """Write a (Y, X) uint16 image tile by tile: a tiled BigTIFF, or a Zarr array when
    ``path`` ends with ``.zarr`` (chunks of ``tile``). ``make(y0, x0, th, tw)`` gives
    one tile. Memory: a few tiles."""
    path = Path(path)
    h, w = shape
    if path.name.endswith(".zarr"):
        import zarr

        z = zarr.open_array(str(path), mode="w", shape=(h, w), chunks=(tile, tile), dtype=np.uint16)
        for y0 in range(0, h, tile):
            for x0 in range(0, w, tile):
                th, tw = min(tile, h - y0), min(tile, w - x0)
                z[y0 : y0 + th, x0 : x0 + tw] = make(y0, x0, th, tw)
        return path
    import tifffile

    tifffile.imwrite(
        path,
        _tiles(shape, tile, make),
        shape=(h, w),
        dtype=np.uint16,
        tile=(tile, tile),
        bigtiff=True,
        photometric="minisblack",
        compression="zlib",
        metadata={"axes": "YX"},
    )
    return path


def render_volume_plane(
    coords: np.ndarray,
    seed: int = 0,
    sigma_z: float = 1.5,
    sigma_yx: float = 1.0,
    amp: float = 400.0,
    background: float = 100.0,
    noise_sd: float = 5.0,
) -> Callable[[int, int, int, int, int], np.ndarray]:
    """A plane-tile function for :func:`write_volume`: 3D Gaussian spots at ``coords``
    (N, 3) in (z, y, x) over background and noise, uint16. Tile (z, y0, x0) of size
    (th, tw) renders the spots within 4 ``sigma_z`` of plane z and near the tile."""
    coords = np.asarray(coords, float).reshape(-1, 3)
    coords = coords[np.argsort(coords[:, 0])]
    reach_z, reach = 4 * sigma_z, int(np.ceil(4 * sigma_yx)) + 2

    def tile(z: int, y0: int, x0: int, th: int, tw: int) -> np.ndarray:
        lo, hi = np.searchsorted(coords[:, 0], [z - reach_z, z + reach_z])
        near = coords[lo:hi]
        near = near[
            (near[:, 1] >= y0 - reach)
            & (near[:, 1] < y0 + th + reach)
            & (near[:, 2] >= x0 - reach)
            & (near[:, 2] < x0 + tw + reach)
        ]
        amps = amp * np.exp(-((near[:, 0] - z) ** 2) / (2 * sigma_z**2))
        local, sigmas = near[:, 1:] - [y0, x0], np.full(len(near), sigma_yx)
        return _noisy_tile((th, tw), local, sigmas, amps, background, noise_sd, [seed, z, y0, x0])

    return tile


def write_volume(path, shape, make, tile: int = 512) -> Path:
    """Write a (Z, Y, X) uint16 Zarr array plane tile by plane tile (chunks of one plane
    and ``tile`` px); ``make(z, y0, x0, th, tw)`` gives one tile. Memory: one tile."""
    import zarr

    path = Path(path)
    nz, h, w = shape
    arr = zarr.open_array(str(path), mode="w", shape=shape, chunks=(1, tile, tile), dtype=np.uint16)
    for z in range(nz):
        for y0 in range(0, h, tile):
            for x0 in range(0, w, tile):
                th, tw = min(tile, h - y0), min(tile, w - x0)
                arr[z, y0 : y0 + th, x0 : x0 + tw] = make(z, y0, x0, th, tw)
    return path
