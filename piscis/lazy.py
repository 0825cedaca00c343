"""Images larger than memory: lazy readers and streamed, tiled detection.

:func:`open_lazy` opens a Zarr array, an OME-Zarr image (its full-resolution level)
or a TIFF (through tifffile's Zarr view) without reading its pixels; the result,
a :class:`LazyPlane`, reads only the windows asked of it (``plane[y0:y1, x0:x1]``).
A ZYX volume gives a 2D plane that is the maximum projection, window by window,
as :func:`piscis.io.read_image` does in memory, and :attr:`LazyPlane.volume`, an
array-like read plane by plane (``volume[z]``) for a 3D detector.

:func:`detect_lazy` gives the spots :func:`piscis.detect.detect` gives for the same
pixels, to the last bit: the normalisation comes from the same sample of blocks
(:func:`piscis.detect._sample`), each tile is cut, normalised and padded as the
in-memory path does, a spot belongs to the tile whose core holds its peak pixel,
and its intensity is measured on the tile's window, which holds every pixel the
measurement looks at. Peak memory is set by the tile size, not by the image size.
:func:`detect_blocks` runs a band of tile rows only, so a huge image can be split
into tasks (:mod:`piscis.batch`) and merged with :func:`merge_parts`.

Zarr is optional (``pip install 'piscis[dask]'``); TIFFs need only tifffile.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "LazyPlane",
    "Part",
    "detect_blocks",
    "detect_lazy",
    "is_zarr",
    "lazy_normalization",
    "merge_parts",
    "open_lazy",
    "tile_rows",
]

# Planes larger than this are streamed from the file by `piscis count`; smaller ones are
# read whole (the results are the same either way).
STREAM_PIXELS = 8192 * 8192
# Memory per pixel of a tile (with its margin) that inference needs at most: the
# network's activations (8 channels at full resolution, several alive at once) and
# the decoding maps. Measured on the shipped model at tile size 2048: 172 bytes per pixel
# above the peak of the normalisation (which needs about 0.4 GB whatever the image).
BYTES_PER_TILE_PIXEL = 200
EXTRA = "dask"  # the optional dependencies: pip install 'piscis[EXTRA]'


def _need_zarr():
    try:
        import zarr
    except ImportError:
        msg = "reading Zarr needs the zarr package: pip install 'piscis[dask]'"
        raise InputError(msg) from None
    return zarr


def is_zarr(path) -> bool:
    """True for a Zarr store folder (``.zarr`` suffix, or Zarr metadata inside)."""
    p = Path(path)
    if not p.is_dir():
        return False
    if p.name.lower().endswith(".zarr"):
        return True
    return any((p / m).exists() for m in ("zarr.json", ".zarray", ".zgroup"))


# --------------------------------------------------------------------------- readers


class LazyPlane:
    """A 2D (Y, X) view of a lazy array: reads only the windows asked of it.

    Parameters
    ----------
    array : array-like
        A Zarr array (or anything sliced like one) with axes ``axes``.
    axes : str
        One letter per axis of ``array``: Y and X, and optionally Z (max-projected
        window by window), C (``channel`` picks one) and singleton T/Q axes.
    channel : int, optional
        The channel index, required when there is a C axis of more than one.
    name : str
        How messages name the image.
    """

    def __init__(self, array, axes: str, channel: int | None = None, name: str = "image"):
        axes = axes.upper().replace("S", "C")
        shape = tuple(int(n) for n in array.shape)
        if len(axes) != len(shape):
            msg = (
                f"{name}: axes {axes!r} have {len(axes)} letters but the array has "
                f"{len(shape)} dimensions, shape {shape}; pass --axes"
            )
            raise InputError(msg)
        if "Y" not in axes or "X" not in axes or len(set(axes)) != len(axes):
            msg = f"{name}: cannot find the Y and X axes in shape {shape} (axes {axes!r}); "
            msg += "pass --axes"
            raise InputError(msg)
        if axes.index("Y") > axes.index("X"):
            msg = (
                f"{name}: axes {axes!r} put X before Y; streaming needs Y before X (re-save as YX)"
            )
            raise InputError(msg)
        dtype = np.dtype(array.dtype)
        if dtype.kind not in "uif":
            msg = f"{name}: pixel type {dtype} is not supported; expected integer or float pixels"
            raise InputError(msg)
        fixed: dict[int, int] = {}
        for i, a in enumerate(axes):
            if a == "C":
                if channel is None and shape[i] > 1:
                    msg = f"{name}: {shape[i]} channels (shape {shape}, axes {axes}); "
                    msg += "choose one with --channel N"
                    raise InputError(msg)
                c = 0 if channel is None else channel
                if not -shape[i] <= c < shape[i]:
                    msg = f"{name}: --channel {c} out of range; the image has {shape[i]} channels"
                    raise InputError(msg)
                fixed[i] = c % shape[i]
            elif a not in "ZYX":
                if shape[i] != 1:
                    msg = f"{name}: axis {a!r} of size {shape[i]} (shape {shape}, axes {axes}) "
                    msg += "is not supported; pass --axes"
                    raise InputError(msg)
                fixed[i] = 0
        if channel not in (None, 0) and "C" not in axes:
            msg = f"{name}: --channel {channel} given but the image has no channel axis"
            raise InputError(msg)
        self.array, self.axes, self.name, self._fixed = array, axes, name, fixed
        self.dtype = dtype if dtype.byteorder in "=|" else dtype.newbyteorder("=")
        self._iz = axes.index("Z") if "Z" in axes else None
        self.depth = shape[self._iz] if self._iz is not None else 1
        self.shape = (shape[axes.index("Y")], shape[axes.index("X")])
        self.ndim, self.size = 2, self.shape[0] * self.shape[1]

    def _key(self, z, ys: slice, xs: slice) -> tuple:
        key = []
        for i, a in enumerate(self.axes):
            key.append(self._fixed.get(i, {"Z": z, "Y": ys, "X": xs}.get(a)))
        return tuple(key)

    def __getitem__(self, key) -> np.ndarray:
        if not (
            isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) for k in key)
        ):
            raise TypeError("LazyPlane takes a window: plane[y0:y1, x0:x1]")
        ys, xs = (slice(*k.indices(n)[:2]) for k, n in zip(key, self.shape))
        if self._iz is None:
            out = np.asarray(self.array[self._key(None, ys, xs)])
        else:
            # The window of every plane, max-projected (the reader's rule for a Z stack);
            # plane by plane, so a deep stack never needs the whole window column.
            out = None
            for z in range(self.depth):
                plane = np.asarray(self.array[self._key(z, ys, xs)])
                out = plane if out is None else np.maximum(out, plane)
        return out.astype(self.dtype, copy=False)

    def __array__(self, dtype=None, copy=None):
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)

    @property
    def volume(self) -> _LazyVolume | None:
        """The ZYX volume, read plane by plane (``volume[z]``); None for a 2D image."""
        return None if self._iz is None else _LazyVolume(self)


class _LazyVolume:
    """(Z, Y, X) view of a :class:`LazyPlane`'s array: ``vol[z]`` reads one plane."""

    def __init__(self, plane: LazyPlane):
        self._plane = plane
        self.shape = (plane.depth, *plane.shape)
        self.dtype, self.ndim = plane.dtype, 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        p = self._plane
        if isinstance(key, (int, np.integer)):
            z = int(key) % p.depth
            return np.asarray(p.array[p._key(z, slice(None), slice(None))]).astype(p.dtype)
        if isinstance(key, tuple) and len(key) == 3 and isinstance(key[0], (int, np.integer)):
            z = int(key[0]) % p.depth
            return np.asarray(p.array[p._key(z, key[1], key[2])]).astype(p.dtype)
        raise TypeError("the lazy volume takes vol[z] or vol[z, y0:y1, x0:x1]")


def _ome_axes(attrs: dict) -> tuple[str | None, str | None]:
    """(path of the full-resolution level, axes) from OME-Zarr multiscales metadata."""
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not ms:
        return None, None
    first = ms[0]
    path = first["datasets"][0]["path"]
    axes = first.get("axes")
    if axes is None:
        return path, None
    letters = "".join((a["name"] if isinstance(a, dict) else str(a))[0] for a in axes)
    return path, letters.upper()


def _guess_axes(shape) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        return "YXC" if shape[-1] in (3, 4) else "ZYX"
    return "Q" * (len(shape) - 2) + "YX"


def _open_zarr(path: Path):
    zarr = _need_zarr()
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = f"{path}: not a readable Zarr store ({first})"
        raise InputError(msg) from None
    axes = None
    if not hasattr(node, "shape"):  # a group: OME-Zarr, its full-resolution level
        level, axes = _ome_axes(dict(node.attrs))
        if level is None:
            arrays = sorted(k for k, _ in node.arrays())
            if len(arrays) != 1:
                msg = f"{path}: a Zarr group without OME multiscales metadata and "
                msg += f"{len(arrays)} arrays; give the array's folder"
                raise InputError(msg)
            level = arrays[0]
        node = node[level]
    return node, axes


def _open_tiff(path: Path):
    import tifffile

    from .io import tiff_error_text, tifffile_notes

    zarr = _need_zarr()
    try:
        with tifffile_notes(path):
            tif = tifffile.TiffFile(path)
            series = tif.series[0]
            store = series.aszarr(level=0)
            array = zarr.open(store, mode="r")
    except Exception as e:
        raise InputError(f"{path}: not a readable TIFF ({tiff_error_text(e)})") from None
    if not hasattr(array, "shape"):  # a multiscale group: its first level
        array = array["0"]
    return array, series.axes


def open_lazy(path, channel: int | None = None, axes: str | None = None) -> LazyPlane:
    """Open a Zarr, OME-Zarr or TIFF image without reading its pixels.

    Parameters
    ----------
    path : str or Path
        A Zarr array folder, an OME-Zarr image folder (the first, full-resolution
        dataset of its multiscales), or a TIFF (its first series, full resolution).
    channel : int, optional
        Channel of a multi-channel image.
    axes : str, optional
        The array's axes, overriding its metadata (``"YX"``, ``"ZYX"``, ``"CYX"``...).

    Returns
    -------
    LazyPlane
        A (Y, X) array-like read window by window; ``.volume`` is the ZYX volume.

    Raises
    ------
    InputError
        The file cannot be read, or its axes cannot be told (the message says which
        ``--axes`` to pass).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if is_zarr(path):
        array, meta_axes = _open_zarr(path)
    elif path.suffix.lower() in {".tif", ".tiff", ".btf", ".tf8"}:
        array, meta_axes = _open_tiff(path)
    else:
        raise InputError(f"{path}: not a Zarr store or TIFF; it cannot be read lazily")
    shape = tuple(array.shape)
    use = axes or meta_axes
    if not use or len(use) != len(shape):
        if axes is not None:
            msg = f"{path}: --axes {axes!r} has {len(axes)} letters but the image has "
            msg += f"{len(shape)} dimensions, shape {shape}"
            raise InputError(msg)
        use = _guess_axes(shape)
    use = "".join("Z" if a in "QI" and n > 1 else a for a, n in zip(use.upper(), shape))
    return LazyPlane(array, use, channel=channel, name=str(path))


# --------------------------------------------------------------------------- normalisation


def lazy_normalization(plane, compression: float, contrast_ratio: float):
    """The normalisation :func:`piscis.detect.estimate_normalization` gives in memory.

    The statistics come from the same sample (the whole image when it is small, a
    regular grid of 64 x 64 blocks otherwise), read from the file block by block; the
    count of non-finite pixels is left to the tile pass (:func:`detect_blocks`).
    """
    from .detect import _sample, estimate_normalization

    sample = _sample(plane)
    return dataclasses.replace(
        estimate_normalization(np.asarray(sample), compression, contrast_ratio), n_nonfinite=0
    )


# --------------------------------------------------------------------------- detection


@dataclass
class Part:
    """The spots of a band of tile rows: coordinates in the image's frame."""

    coords: np.ndarray
    score: np.ndarray
    intensity: np.ndarray
    background: np.ndarray
    n_nonfinite: int = 0
    n_tiles: int = 0


def tile_rows(shape, model, tile_size: int) -> int:
    """Number of tile rows of an image of ``shape`` (for splitting it into bands)."""
    from .detect import tile_cores
    from .io import load_model

    return len(tile_cores(shape, load_model(model).net, tile_size)[0])


def check_memory(tile: int | tuple[int, int], name: str = "image", margin: int = 64) -> None:
    """Refuse tiles (``tile`` px, or (height, width) of the core) whose inference would
    not fit in the memory available.

    Raises :class:`MemoryError` with a message suggesting a smaller ``--tile-size``.
    """
    ty, tx = (tile, tile) if isinstance(tile, int) else tile
    need = (ty + 2 * margin) * (tx + 2 * margin) * BYTES_PER_TILE_PIXEL
    avail = _available_memory()
    if avail is not None and need > avail:
        raise MemoryError(_memory_message(name, max(ty, tx), avail, margin, need))


def _memory_message(name: str, tile: int, avail: float, margin: int, need=None) -> str:
    """Suggest a tile size that fits ``avail`` bytes, never one under the smallest core
    that tiling uses (4 margins: :func:`piscis.detect.smallest_core`), which would be
    raised to it and fail again."""
    from .detect import CORE_MARGINS

    smallest = CORE_MARGINS * margin
    side = math.sqrt(max(avail, 1) / BYTES_PER_TILE_PIXEL) - 2 * margin
    smaller = max(smallest, min(tile // 2, 2 ** int(math.log2(max(side, 64)))))
    what = "ran out of memory"
    if need is not None:
        what = f"need about {need / 2**20:.0f} MB but {avail / 2**20:.0f} MB are available"
    if tile <= smallest:
        return (
            f"{name}: tiles of {tile} px {what}; --tile-size {tile} is already the smallest "
            "useful; free memory, or crop or split the image"
        )
    return f"{name}: tiles of {tile} px {what}; pass a smaller --tile-size (e.g. {smaller})"


# What torch, numpy and the C library say when an allocation fails (lower case).
_NO_MEMORY_WORDS = (
    "can't allocate",
    "cannot allocate",
    "unable to allocate",
    "failed to allocate",
    "not enough memory",
    "out of memory",
)


def out_of_memory(e: BaseException) -> bool:
    """True for an allocation failure: a MemoryError, an OSError ENOMEM, or an error
    (torch's RuntimeError) whose text says that memory could not be allocated."""
    import errno

    if isinstance(e, MemoryError):
        return True
    if isinstance(e, OSError) and e.errno == errno.ENOMEM:
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in _NO_MEMORY_WORDS)


def _available_memory() -> int | None:
    """Bytes this process may still allocate: free memory, or the address-space limit."""
    avail = None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
        try:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_AS)
            if soft != resource.RLIM_INFINITY:
                left = soft - psutil.Process().memory_info().vms
                avail = min(avail, max(0, int(left)))
        except (ImportError, OSError, ValueError):
            pass
    except ImportError:
        pass
    return avail


def detect_blocks(
    plane,
    model,
    norm,
    threshold: float,
    rows: range | None = None,
    tile_size: int = 1024,
    min_snr: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> Part:
    """Spots of the tiles in tile rows ``rows`` (all by default) of a lazy plane.

    Each tile is read with its margin from ``plane``, normalised with ``norm``,
    padded with the background (0 after normalisation) beyond the image border,
    run through the network and decoded; a spot is kept if its peak pixel lies in the
    tile's core, and measured on the tile's window. Scale 1 only.
    """
    from .detect import _finish, _forward, _to_image_frame, decode, tile_cores
    from .io import load_model

    net = load_model(model).net
    h, w = plane.shape
    ys, xs, core_y, core_x, margin = tile_cores(plane.shape, net, tile_size)
    rows = range(len(ys)) if rows is None else rows
    check_memory((core_y, core_x), plane.name if hasattr(plane, "name") else "image", margin)
    total = len(rows) * len(xs)
    parts, n_nonfinite, done = [], 0, 0
    for r in rows:
        y0 = ys[r]
        for x0 in xs:
            # The window the network sees, clipped to the image; offsets are even, so
            # shifting coordinates by them changes no rounding (round half to even).
            wy0, wx0 = max(0, y0 - margin), max(0, x0 - margin)
            wy1, wx1 = min(h, y0 + core_y + margin), min(w, x0 + core_x + margin)
            raw = plane[wy0:wy1, wx0:wx1]
            ch, cw = min(core_y, h - y0), min(core_x, w - x0)
            if raw.dtype.kind == "f":
                core = raw[y0 - wy0 : y0 - wy0 + ch, x0 - wx0 : x0 - wx0 + cw]
                n_nonfinite += int(core.size - np.count_nonzero(np.isfinite(core)))
            tile = np.zeros((core_y + 2 * margin, core_x + 2 * margin), np.float32)
            oy, ox = wy0 - (y0 - margin), wx0 - (x0 - margin)
            tile[oy : oy + raw.shape[0], ox : ox + raw.shape[1]] = norm.apply(raw)
            try:
                out = _forward(net, tile[None])[0]
            except (MemoryError, RuntimeError) as e:  # torch: "can't allocate memory"
                if not out_of_memory(e):
                    raise
                name = getattr(plane, "name", "image")
                avail = _available_memory() or 0
                raise MemoryError(
                    _memory_message(name, max(core_y, core_x), avail, margin)
                ) from None

            # Decode a window 2 px larger than the core (voting and NMS look 2 px out).
            win = out[:, margin - 2 : margin + ch + 2, margin - 2 : margin + cw + 2]
            coords, scores, pix = decode(win[0], win[1:], threshold)
            inside = (
                (pix[:, 0] >= 2) & (pix[:, 0] < ch + 2) & (pix[:, 1] >= 2) & (pix[:, 1] < cw + 2)
            )
            coords = coords[inside] + np.array([y0 - 2, x0 - 2])
            coords, scores = _to_image_frame(coords, scores[inside], 1.0, plane.shape)
            spots = _finish(raw, coords - [wy0, wx0], scores, 2.0, norm.noise, min_snr)
            parts.append(
                (spots.coords + [wy0, wx0], spots.score, spots.intensity, spots.background)
            )
            done += 1
            if progress is not None:
                progress(done, total)
    if not parts:
        z = np.zeros(0)
        return Part(np.zeros((0, 2)), z, z.copy(), z.copy(), n_nonfinite, 0)
    cols = [np.concatenate([p[i] for p in parts]) for i in range(4)]
    return Part(*cols, n_nonfinite=n_nonfinite, n_tiles=done)


def merge_parts(parts: list[Part], plane=None, noise: float = 0.0, name: str = "image"):
    """One :class:`piscis.detect.Spots` table from bands of tiles, sorted as detect sorts.

    With the ``plane`` and its ``noise``, dense clusters are fitted as
    :func:`piscis.detect.detect` fits them, reading only windows around them.
    """
    from .crowding import add_crowded
    from .detect import Spots

    coords = np.concatenate([p.coords for p in parts]).reshape(-1, 2)
    cols = [
        np.concatenate([getattr(p, k) for p in parts]) for k in ("score", "intensity", "background")
    ]
    order = np.lexsort((coords[:, 1], coords[:, 0])) if len(coords) else np.zeros(0, int)
    spots = Spots(coords[order], *(c[order] for c in cols))
    return spots if plane is None else add_crowded(plane, spots, noise, 2.0, name)


def detect_lazy(
    plane,
    model=None,
    threshold: float | None = None,
    scale: float | None = None,
    tile_size: int = 1024,
    min_snr: float | None = None,
    name: str = "image",
    progress: Callable[[int, int], None] | None = None,
):
    """Find the spots of a lazy 2D plane (:func:`open_lazy`), tile by tile.

    The same spots as :func:`piscis.detect.detect` on the plane read whole; memory is
    bounded by ``tile_size``. Only ``scale`` 1 is streamed.

    Raises
    ------
    NotImplementedError
        ``scale`` other than 1 (resample the image, or read it whole).
    MemoryError
        The tile size does not fit in the memory available (the message suggests a
        smaller ``--tile-size``).
    """
    from .detect import check_decoding, tile_cores
    from .io import load_model

    loaded = load_model(model)
    threshold = loaded.threshold if threshold is None else float(threshold)
    scale = loaded.scale if scale is None else float(scale)
    check_decoding(threshold)
    if scale != 1.0:
        msg = (
            f"{name}: --scale {scale:g} is not available for images streamed from the file (only 1)"
        )
        raise NotImplementedError(msg)
    _, _, core_y, core_x, margin = tile_cores(plane.shape, loaded.net, tile_size)
    check_memory((core_y, core_x), name, margin)  # before the normalisation's reads
    norm = lazy_normalization(plane, loaded.compression, loaded.contrast_ratio)
    min_snr = loaded.min_snr if min_snr is None else float(min_snr)
    part = detect_blocks(plane, loaded, norm, threshold, None, tile_size, min_snr, progress)
    if part.n_nonfinite:
        logger.warning(
            "%s: %d non-finite (NaN or infinite) pixels are ignored", name, part.n_nonfinite
        )
    return merge_parts([part], plane, norm.noise, name)
