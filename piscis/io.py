"""Reading images and spot tables, writing results safely, and model folders
(DESIGN.md section 9).

Every error names the file and the problem. Outputs are written to a
temporary file in the same folder and renamed, so an interrupted run never
leaves a half-written file.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import stat
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".tif", ".tiff", ".btf", ".tf8", ".png"}


def _models_dir() -> Path:
    """The shipped models: the ``piscis.models`` package (``models/`` in the source tree)."""
    try:
        from importlib.resources import files

        return Path(str(files("piscis.models")))
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parents[1] / "models"


MODELS_DIR = _models_dir()
DEFAULT_MODEL = "default"


class InputError(ValueError):
    """A file that cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------- atomic writes


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600): give it the mode a plain open() would.
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def table_text(columns: dict[str, np.ndarray | list], float_format: str = "{:.4f}") -> str:
    """CSV text (with header) of equal-length columns."""
    names = list(columns)
    n = len(next(iter(columns.values()))) if columns else 0
    lines = [",".join(names)]
    cols = [columns[k] for k in names]
    for i in range(n):
        cells = []
        for col in cols:
            v = col[i]
            if v is None:
                cells.append("")
            elif isinstance(v, (bool, np.bool_)):
                cells.append(str(int(v)))
            elif isinstance(v, (int, np.integer)):
                cells.append(str(int(v)))
            elif isinstance(v, (float, np.floating)):
                cells.append("" if not np.isfinite(v) else float_format.format(float(v)))
            else:
                cells.append(_csv_cell(str(v)))
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def _csv_cell(s: str) -> str:
    if any(c in s for c in ',"\n'):
        return '"' + s.replace('"', '""') + '"'
    return s


def write_table(path, columns, overwrite: bool = True) -> None:
    atomic_write_text(path, table_text(columns), overwrite=overwrite)


# --------------------------------------------------------------------------- spot tables


MERGE_DISTANCE = 1.0  # rows of a spot table closer than this (px) are one spot


def read_spots(
    path: str | Path,
    columns=None,
    pixel_size=None,
    merge_distance: float = 0.0,
) -> np.ndarray:
    """Read spot coordinates (N, 2) in (y, x) from a CSV.

    Accepted: our own tables (columns ``y``, ``x``, anything else ignored),
    ``x``/``y`` in either order, napari's Points export (``axis-0`` = y,
    ``axis-1`` = x; for 3D exports the last two axes are used). A file
    without a header is refused unless ``columns`` names its columns.

    Parameters
    ----------
    path : str or Path
    columns : sequence of str, optional
        Names of the columns of a file without a header row, e.g. ``("x", "y")``
        or ``("y", "x", "class")`` (``y`` and ``x`` are needed).
    pixel_size : float or (float, float), optional
        The file holds physical units (e.g. micrometres) with this pixel size
        (y, x): coordinates are divided by it to give pixels.
    merge_distance : float
        Rows closer than this (px) are one spot, merged to their mean with a
        warning (e.g. one row per pixel of each spot's window); 0 (default): no
        merging. Training reads its tables with :data:`MERGE_DISTANCE`.

    Notes
    -----
    Coordinates are 0-based pixel centres: the centre of the first pixel is
    (0, 0). A 1-based table (ImageJ's, say) is read as it is, one pixel off
    in y and x: subtract 1 first.
    """
    path = Path(path)
    try:
        # utf-8-sig: spreadsheet exports start with a byte-order mark; text columns in
        # another encoding must not stop the coordinates from being read.
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, r) for r in reader]
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    except csv.Error as e:
        raise InputError(f"{path}: not a CSV table ({e})") from None
    rows = [(n, r) for n, r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise InputError(f"{path}: empty file, expected a header such as 'y,x'")
    header = [c.strip().lower() for c in rows[0][1]]
    if columns is not None:
        header = [str(c).strip().lower() for c in columns]
        if "y" not in header or "x" not in header:
            raise InputError(f"{path}: columns {list(columns)} must name 'y' and 'x'")
        if not _is_number(rows[0][1][0].strip()):
            rows = rows[1:]  # the file has a header after all: the given names win
        rows = [(0, header), *rows]
    elif _is_number(header[0]):
        raise InputError(
            f"{path}: no header row; the first line must name the columns, e.g. 'y,x' "
            "(or give the column names: --columns y,x / read_spots(columns=...))"
        )
    if "y" in header and "x" in header:
        iy, ix = header.index("y"), header.index("x")
    else:
        axes = [h for h in header if h.startswith("axis-")]
        if len(axes) >= 2:
            axes.sort(key=lambda h: int(h.split("-")[1]) if h.split("-")[1].isdigit() else 0)
            iy, ix = header.index(axes[-2]), header.index(axes[-1])
        else:
            raise InputError(
                f"{path}: columns {header} hold no coordinates; "
                "expected 'y,x' or napari's 'axis-0,axis-1'"
            )
    if "class" in header:
        logger.info("%s: column 'class' ignored (every row is read as a spot)", path)
    out = []
    for k, r in rows[1:]:
        try:
            out.append((float(r[iy]), float(r[ix])))
        except (ValueError, IndexError):
            raise InputError(f"{path}: line {k} is not numeric: {','.join(r)!r}") from None
    coords = np.asarray(out, dtype=np.float64).reshape(-1, 2)
    if not np.all(np.isfinite(coords)):
        raise InputError(f"{path}: non-finite coordinates")
    if pixel_size is not None:
        size = np.broadcast_to(np.asarray(pixel_size, dtype=float), (2,))
        if not np.all(size > 0):
            raise InputError(f"{path}: pixel size must be positive, got {pixel_size!r}")
        coords = coords / size
    if merge_distance > 0 and len(coords) > 1:
        coords = _merge_close(coords, merge_distance, path)
    return coords


def _merge_close(coords: np.ndarray, distance: float, path) -> np.ndarray:
    """Merge groups of rows linked by distances <= ``distance`` into their mean."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    pairs = cKDTree(coords).query_pairs(distance + 1e-9, output_type="ndarray")
    if len(pairs) == 0:
        return coords
    n = len(coords)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    n_groups, lab = connected_components(graph, directed=False)
    merged = np.zeros((n_groups, 2))
    np.add.at(merged, lab, coords)
    sizes = np.bincount(lab, minlength=n_groups)
    merged /= sizes[:, None]
    logger.warning(
        "%s: %d rows lie within %g px of another row; merged into %d spots "
        "(one row per spot expected)",
        path,
        int(sizes[sizes > 1].sum()),
        distance,
        int(np.count_nonzero(sizes > 1)),
    )
    return merged


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- images


@dataclass
class ImageData:
    """A 2D image ready for detection, with what was inferred on the way."""

    path: Path | None
    image: np.ndarray
    axes: str
    notes: list[str] = field(default_factory=list)


def read_image_2d(path, channel: int | None = None, axes: str | None = None) -> np.ndarray:
    """Read a file as a 2D image (see :func:`read_image`)."""
    return read_image(path, channel=channel, axes=axes).image


def read_image(path, channel: int | None = None, axes: str | None = None) -> ImageData:
    """Read an image file and reduce it to one 2D plane (Y, X).

    TIFF (ImageJ and OME axes from the metadata) and PNG. Grey, RGB and
    RGBA: equal channels are grey, otherwise ``channel`` picks one. A ``Z``
    axis is max-projected with a warning. ``axes`` (e.g. ``"ZYX"``,
    ``"YXC"``) overrides the metadata.
    """
    path = Path(path)
    data, meta_axes = _read_array(path)
    return to_plane(
        data, axes or meta_axes, channel=channel, name=str(path), explicit=axes is not None
    )


MEMORY_ENV = "PISCIS_MAX_IMAGE_BYTES"  # overrides the memory guard's limit, in bytes
WORK_BYTES_PER_PIXEL = 12  # what detection adds per pixel of the plane (float32 copies)


def memory_limit() -> int:
    """Bytes an image may take: ``$PISCIS_MAX_IMAGE_BYTES``, else half the free memory."""
    env = os.environ.get(MEMORY_ENV)
    if env:
        try:
            return int(float(env))
        except ValueError:
            logger.warning("%s=%r is not a number of bytes; ignored", MEMORY_ENV, env)
    try:
        import psutil

        return int(psutil.virtual_memory().available // 2)
    except Exception:  # no psutil, or no /proc: a fixed 8 GB
        return 8 << 30


def check_memory(path, shape, dtype, plane: int | None = None) -> None:
    """Refuse, before reading it, an image whose declared size does not fit in memory.

    ``plane`` is the number of pixels of the plane detection works on (default: the
    product of the last two axes).

    Raises
    ------
    InputError
        Naming the file, its declared shape and size, the limit, and what to do.
    """
    shape = tuple(int(n) for n in shape)
    itemsize = np.dtype(dtype).itemsize
    n = int(np.prod(shape, dtype=object)) if shape else 0
    if plane is None:
        plane = int(shape[-2]) * int(shape[-1]) if len(shape) >= 2 else n
    need = n * itemsize + WORK_BYTES_PER_PIXEL * plane
    limit = memory_limit()
    if need > limit:
        msg = (
            f"{path}: declares a {'x'.join(map(str, shape))} {np.dtype(dtype)} image "
            f"({need / 1e9:.3g} GB to read and process), more than the {limit / 1e9:.3g} GB "
            f"this run may use; crop or split it (or set {MEMORY_ENV} to raise the limit)"
        )
        raise InputError(msg)


def _png_size(path: Path) -> tuple[int, int, int] | None:
    """(height, width, bytes per pixel) from a PNG's IHDR chunk, or None if not a PNG."""
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 33 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    depth, colour = head[24], head[25]
    samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 4)
    return height, width, samples * max(depth // 8, 1)


def _read_png(path: Path):
    from skimage import io as skio

    size = _png_size(path)
    if size is None:
        raise InputError(f"{path}: not a readable PNG (no PNG signature and header)")
    check_memory(path, size, np.uint8, plane=size[0] * size[1])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = np.asarray(skio.imread(path))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a readable PNG ({first})") from None
    if data.ndim == 3 and data.shape[-1] == 2 and _is_alpha(data[..., 1]):
        data = data[..., 0]  # grey + alpha (PNG colour type 4) with an opaque alpha
    axes = {2: "YX", 3: "YXS"}.get(data.ndim, "")
    return data, axes


def _compression_of(path: Path) -> str | None:
    """The name of a TIFF's compression (its first page's tag), None if unreadable."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            comp = tif.pages.first.compression
    except Exception:
        return None
    return getattr(comp, "name", str(comp))


class _Collect(logging.Handler):
    """Keeps tifffile's log records of one read, to report them under the file's name."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().splitlines()[0] if record.msg else "")


def _read_tiff(path: Path):
    tiff_log = logging.getLogger("tifffile")
    collect = _Collect()
    saved = tiff_log.propagate
    tiff_log.addHandler(collect)
    tiff_log.propagate = False
    try:
        return _read_tiff_quietly(path)
    finally:
        tiff_log.removeHandler(collect)
        tiff_log.propagate = saved
        for msg in dict.fromkeys(collect.messages):  # tifffile's notes on bad tags
            logger.debug("%s: tifffile: %s", path, msg)


def _read_tiff_quietly(path: Path):
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes
            check_memory(path, series.shape, series.dtype)
            data = series.asarray()
    except InputError:
        raise
    except MemoryError:
        msg = f"{path}: not enough memory to read it; crop or split the image"
        raise InputError(msg) from None
    except ZeroDivisionError:
        msg = f"{path}: not a readable TIFF (its tags declare a zero width, height or strip size)"
        raise InputError(msg) from None
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = msg if len(msg) <= 160 else msg[:157] + "..."
        codec = isinstance(e, ImportError) or "imagecodecs" in msg.lower()
        comp = _compression_of(path) if codec or isinstance(e, (KeyError, ValueError)) else None
        if comp is not None and comp != "NONE" and (codec or "compress" in msg.lower()):
            raise InputError(
                f"{path}: cannot decode its {comp} compression ({msg}); install the "
                "'imagecodecs' package (pip install imagecodecs)"
            ) from None
        raise InputError(f"{path}: not a readable TIFF ({msg})") from None
    return np.asarray(data), axes


def to_plane(
    data: np.ndarray,
    axes: str,
    channel: int | None = None,
    name: str = "image",
    explicit: bool = False,
) -> ImageData:
    """Reduce an array with an axes string to a 2D (Y, X) plane."""
    notes: list[str] = []
    data = np.asarray(data)
    if data.dtype.kind == "b" or data.dtype.kind == "c" or data.dtype.kind not in "uif":
        raise InputError(
            f"{name}: pixel type {data.dtype} is not supported; expected integer or float pixels"
        )
    if data.size == 0:
        raise InputError(f"{name}: image has a zero-size axis, shape {data.shape}")
    axes = (axes or "").upper().replace("S", "C")
    if len(axes) != data.ndim:
        if explicit:
            raise InputError(
                f"{name}: --axes {axes!r} has {len(axes)} letters but the image has "
                f"{data.ndim} dimensions, shape {data.shape}"
            )
        axes = _guess_axes(data.shape)
    # Drop singleton axes other than Y and X (tifffile's Q/I/T of size 1...), by position:
    # a letter can repeat (a guessed 'QQYX').
    keep = [i for i, a in enumerate(axes) if a in "YX" or data.shape[i] != 1]
    if len(keep) != data.ndim:
        data = data.reshape([data.shape[i] for i in keep])
        axes = "".join(axes[i] for i in keep)
    # Unknown axes (Q, I): with --channel and no channel axis, the first short
    # one (at most 8) is the channel axis; otherwise a plain multi-page TIFF is
    # a Z stack.
    if channel is not None and "C" not in axes:
        for i, a in enumerate(axes):
            if a in "QI" and data.shape[i] <= 8:
                axes = axes[:i] + "C" + axes[i + 1 :]
                logger.info(
                    "%s: axis %d of size %d read as channels (--channel given)",
                    name,
                    i,
                    data.shape[i],
                )
                break
    axes = "".join("Z" if a in "QI" else a for a in axes)
    if "Y" not in axes or "X" not in axes or len(set(axes)) != len(axes):
        raise InputError(
            f"{name}: cannot find the Y and X axes in shape {data.shape} (axes {axes!r}); "
            "pass --axes, e.g. --axes ZYX or --axes YXC"
        )
    if "C" in axes:
        ci = axes.index("C")
        n_c = data.shape[ci]
        if channel is not None:
            if not (-n_c <= channel < n_c):
                raise InputError(
                    f"{name}: --channel {channel} out of range; the image has {n_c} channels"
                )
            data = data.take(channel, axis=ci)
        else:
            planes = np.moveaxis(data, ci, 0)
            if n_c == 4 and _is_alpha(planes[3]):
                planes = planes[:3]
            if all(np.array_equal(planes[0], p) for p in planes[1:]):
                data = planes[0]
            else:
                raise InputError(
                    f"{name}: {n_c} different channels (shape {data.shape}, axes {axes}); "
                    "choose one with --channel N"
                )
        axes = axes[:ci] + axes[ci + 1 :]
    elif channel not in (None, 0):
        raise InputError(f"{name}: --channel {channel} given but the image has no channel axis")
    for ax in [a for a in axes if a not in "YX"]:
        i = axes.index(ax)
        if ax == "Z":
            notes.append(
                f"{data.shape[i]} z-planes max-projected (3D detection is not available yet)"
            )
            logger.warning("%s: %s", name, notes[-1])
            data = data.max(axis=i)
        else:
            raise InputError(
                f"{name}: axis {ax!r} of size {data.shape[i]} (shape {data.shape}, axes {axes}) "
                "is not supported; pass --axes to say what it is (Z, C, Y, X)"
            )
        axes = axes[:i] + axes[i + 1 :]
    if axes == "XY":
        data = data.T
    if data.dtype.byteorder not in "=|":
        data = data.astype(data.dtype.newbyteorder("="))
    if data.dtype.kind == "f" and not np.isfinite(data).any():
        notes.append("every pixel is NaN or infinite")
    return ImageData(Path(name) if name else None, np.ascontiguousarray(data), "YX", notes)


MAX_GUESSED_CHANNELS = 8  # longest axis taken as channels when the file does not say


def read_channels(path, channels, axes: str | None = None) -> list[ImageData]:
    """Read a multi-channel file once and return one 2D plane per requested channel.

    Parameters
    ----------
    path : str or Path
        TIFF or PNG file, as for :func:`read_image`.
    channels : sequence of int or None
        0-based channel indices, e.g. ``[spot_channel, nuclear_channel]``. ``None`` takes
        the image as :func:`read_image` does without ``channel`` (equal channels are grey,
        different ones are refused). The same index twice is reduced once.
    axes : str, optional
        Axes of the file (``"CYX"``, ``"YXC"``, ``"ZCYX"``...), overriding its metadata.

    Returns
    -------
    planes : list of ImageData
        One per entry of ``channels``, in that order; each (Y, X), a Z axis max-projected
        (warned once per file).

    Raises
    ------
    InputError
        Naming the file: unreadable, a channel out of range, no channel axis, ...

    Notes
    -----
    The channel axis comes from ``axes``, else from the file's metadata (ImageJ, OME,
    tifffile's own; RGB samples count as channels). A 3D file whose metadata does not
    name its axes (tifffile reports ``QYX``) is read as CYX when its first axis is the
    shortest and at most :data:`MAX_GUESSED_CHANNELS` long, or as YXC when its last one
    is; an info message says so. Otherwise pass ``axes``.
    """
    path = Path(path)
    data, meta_axes = _read_array(path)
    explicit = axes is not None
    use = axes if explicit else meta_axes
    if not explicit and any(c is not None for c in channels):
        use = _guess_channel_axes(data.shape, use, str(path))
    planes: dict = {}
    quiet = _DropWarnings()
    try:
        for c in channels:
            if c not in planes:
                planes[c] = to_plane(data, use, channel=c, name=str(path), explicit=explicit)
                logger.addFilter(quiet)  # the z-projection warning: once per file
    finally:
        logger.removeFilter(quiet)
    return [planes[c] for c in channels]


class _DropWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno != logging.WARNING


def _read_array(path: Path) -> tuple[np.ndarray, str]:
    """The whole array of a TIFF or PNG file and the axes its metadata gives."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    suffix = path.suffix.lower()
    if suffix == ".png":
        return _read_png(path)
    if suffix in {".tif", ".tiff", ".btf", ".tf8"}:
        return _read_tiff(path)
    raise InputError(f"{path}: unsupported file type {path.suffix!r}; expected TIFF or PNG")


def _guess_channel_axes(shape, axes: str, name: str) -> str:
    """CYX or YXC for a 3D array whose metadata names no axis but Y and X."""
    axes = (axes or "").upper()
    known = len(axes) == len(shape) and any(a not in "QIYX" for a in axes)
    if len(shape) != 3 or known:
        return axes
    guess = None
    if shape[0] <= MAX_GUESSED_CHANNELS and shape[0] < min(shape[1:]):
        guess = "CYX"
    elif shape[2] <= MAX_GUESSED_CHANNELS and shape[2] < min(shape[:2]):
        guess = "YXC"
    if guess is None:
        return axes
    msg = "%s: the file does not name its axes; shape %s read as %s (see --axes)"
    logger.info(msg, name, tuple(shape), guess)
    return guess


def _is_alpha(plane: np.ndarray) -> bool:
    return plane.min() == plane.max()


def _guess_axes(shape) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        return "YXC" if shape[-1] in (3, 4) else "ZYX"
    return "".join("Q" for _ in shape[:-2]) + "YX"


# --------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    """A network ready for inference, with its configuration."""

    net: object
    config: dict
    path: Path | None = None

    @property
    def threshold(self) -> float:
        return float(self.config.get("threshold", 0.5))

    @property
    def scale(self) -> float:
        return float(self.config.get("scale", 1.0))

    @property
    def compression(self) -> float:
        return float(self.config.get("normalization", {}).get("compression", 3.0))

    @property
    def min_snr(self) -> float:
        return float(self.config.get("min_snr", 0.0))

    @property
    def contrast_ratio(self) -> float:
        # Models from before the contrast unit have none (0: the noise alone).
        return float(self.config.get("normalization", {}).get("contrast_ratio", 0.0))

    @property
    def name(self) -> str:
        return str(self.config.get("name", self.path.name if self.path else "model"))


_CACHE: dict[str, LoadedModel] = {}


def model_dir(name_or_dir: str | os.PathLike | None) -> Path:
    """Resolve a model name (a folder under the package's models/) or a path."""
    if name_or_dir is None:
        name_or_dir = DEFAULT_MODEL
    p = Path(name_or_dir)
    if p.is_dir():
        return p
    cand = MODELS_DIR / str(name_or_dir)
    if cand.is_dir():
        return cand
    known = []
    if MODELS_DIR.is_dir():
        known = sorted(d.name for d in MODELS_DIR.iterdir() if (d / "config.json").is_file())
    raise InputError(
        f"{name_or_dir}: no such model folder; shipped models: {', '.join(known) or 'none'}"
    )


def load_model(name_or_dir=None) -> LoadedModel:
    """Load a model folder: ``config.json`` + ``model.safetensors``. No code runs."""
    if isinstance(name_or_dir, LoadedModel):
        return name_or_dir
    from safetensors.torch import load_file

    from .model import SpotNet, fuse_batchnorm

    path = model_dir(name_or_dir).resolve()
    key = str(path)
    if key in _CACHE:
        return _CACHE[key]
    cfg_path, w_path = path / "config.json", path / "model.safetensors"
    for p in (cfg_path, w_path):
        if not p.exists():
            raise InputError(f"{path}: not a model folder (missing {p.name})")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_path}: invalid JSON ({e})") from None
    arch = config.get("architecture", {})
    net = SpotNet(tuple(arch.get("channels", (8, 16, 32, 64))), int(arch.get("in_channels", 1)))
    state = load_file(str(w_path))
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise InputError(
            f"{w_path}: weights do not fit the architecture in config.json ({e})"
        ) from None
    net = fuse_batchnorm(net.eval())
    net = net.to(memory_format=__import__("torch").channels_last)
    loaded = LoadedModel(net, config, path)
    _CACHE[key] = loaded
    return loaded


def save_model(net, config: dict, folder: str | Path, card: str, overwrite: bool = False) -> Path:
    """Write a model folder (weights, config, model card) without overwriting.

    The folder is assembled under a temporary name and renamed into place.
    """
    import shutil

    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; choose another folder or pass --overwrite")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes the folder private (0700)
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        os.chmod(tmp / "model.safetensors", 0o666 & ~_umask())
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(card)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _CACHE.pop(str(folder.resolve()), None)
    return folder
