"""Reading images and spot tables, writing results safely, and model folders
(DESIGN.md section 9).

Every error names the file and the problem. Outputs are written to a
temporary file in the same folder and renamed, so an interrupted run never
leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
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


# Columns in the image's grey levels, whose unit may be anything (a float image in 0..1,
# or 1e-7 per grey level): significant digits, not decimals (4 decimals wrote 0.0000).
SIGNIFICANT_COLUMNS = {"intensity": "{:.6g}", "background": "{:.6g}"}


def table_text(columns: dict[str, np.ndarray | list], float_format: str = "{:.4f}") -> str:
    """CSV text (with header) of equal-length columns: floats with ``float_format``
    (coordinates: 4 decimals, 0.1 nm at 1 um per pixel), those of
    :data:`SIGNIFICANT_COLUMNS` with 6 significant digits."""
    names = list(columns)
    n = len(next(iter(columns.values()))) if columns else 0
    lines = [",".join(names)]
    cols = [columns[k] for k in names]
    formats = [SIGNIFICANT_COLUMNS.get(k, float_format) for k in names]
    for i in range(n):
        cells = []
        for col, fmt in zip(cols, formats):
            v = col[i]
            if v is None:
                cells.append("")
            elif isinstance(v, (bool, np.bool_)):
                cells.append(str(int(v)))
            elif isinstance(v, (int, np.integer)):
                cells.append(str(int(v)))
            elif isinstance(v, (float, np.floating)):
                cells.append("" if not np.isfinite(v) else fmt.format(float(v)))
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
    zyx: bool = False,
) -> np.ndarray:
    """Read spot coordinates (N, 2) in (y, x) from a CSV; with ``zyx``, (N, 3) in
    (z, y, x) from a table that has a z column.

    Accepted: our own tables (columns ``y``, ``x``, ``z``, anything else ignored),
    ``x``/``y`` in either order, napari's Points export (``axis-0`` = y,
    ``axis-1`` = x; for 3D exports the last two axes are used, and with ``zyx`` the
    one before them is z). A file without a header is refused unless ``columns``
    names its columns.

    Parameters
    ----------
    path : str or Path
    columns : sequence of str, optional
        Names of the columns of a file without a header row, e.g. ``("x", "y")``
        or ``("y", "x", "class")`` (``y`` and ``x`` are needed). A file with a header
        that names its coordinate columns elsewhere is refused (the names contradict
        each other); one whose header agrees, or names no coordinates, is read with
        these names.
    pixel_size : float or sequence of float, optional
        The file holds physical units (e.g. micrometres) with this pixel size: S,
        (SY, SX) or (SZ, SY, SX); coordinates are divided by it to give pixels (and
        z to give slices: (N, 3) coordinates need SZ).
    merge_distance : float
        Rows closer than this (px) are one spot, merged to their mean with a
        warning (e.g. one row per pixel of each spot's window); 0 (default): no
        merging. Training reads its tables with :data:`MERGE_DISTANCE`.
    zyx : bool
        Read the z column too when the table has one: (N, 3) coordinates; a table
        without one still gives (N, 2).

    Notes
    -----
    Coordinates are 0-based pixel centres: the centre of the first pixel is
    (0, 0). A 1-based table (ImageJ's, say) is read as it is, one pixel off
    in y and x: subtract 1 first.
    """
    path = Path(path)
    rows, delimiter, how = csv_rows(path)
    if not rows:
        raise InputError(f"{path}: empty file, expected a header such as 'y,x'")
    header = [c.strip().lower() for c in rows[0][1]]
    if columns is not None:
        given = [str(c).strip().lower() for c in columns]
        if "y" not in given or "x" not in given:
            raise InputError(f"{path}: columns {list(columns)} must name 'y' and 'x'")
        if not _is_number(rows[0][1][0].strip(), delimiter):
            # The file has a header after all: the given names may only agree with it.
            _check_given_columns(path, header, given, zyx)
            rows = rows[1:]
        header = given
        rows = [(0, header), *rows]
    elif _is_number(header[0], delimiter):
        raise InputError(
            f"{path}: no header row; the first line must name the columns, e.g. 'y,x' "
            "(or give the column names: --columns y,x / read_spots(columns=...))"
        )
    where = _coordinate_columns(header, zyx)
    if where is None:
        raise InputError(
            f"{path}: columns {header} hold no coordinates (read as {how}); expected 'y,x' "
            "or napari's 'axis-0,axis-1', comma-separated (or ';' or tab), UTF-8 or UTF-16"
        )
    if "class" in header:
        logger.info("%s: column 'class' ignored (every row is read as a spot)", path)
    idx = list(where.values())
    out = []
    for k, r in rows[1:]:
        try:
            out.append(tuple(csv_number(r[i], delimiter) for i in idx))
        except (ValueError, IndexError):
            raise InputError(
                f"{path}: line {k} is not numeric: {','.join(r)!r} (read as {how})"
            ) from None
    coords = np.asarray(out, dtype=np.float64).reshape(-1, len(idx))
    if not np.all(np.isfinite(coords)):
        raise InputError(f"{path}: non-finite coordinates")
    if pixel_size is not None:
        coords = coords / _pixel_sizes(path, pixel_size, len(idx))
    if merge_distance > 0 and len(coords) > 1:
        coords = _merge_close(coords, merge_distance, path)
    return coords


# Delimiters other than the comma, tried first: a file whose lines all split into the
# same number (> 1) of fields on one of them uses it (a spreadsheet's ';' export, whose
# numbers may have a decimal comma, or a tab-separated table).
_OTHER_DELIMITERS = ("\t", ";")


def csv_rows(path) -> tuple[list[tuple[int, list[str]]], str, str]:
    """The non-empty rows of a CSV (with their line numbers), its delimiter and how it
    was read, in words (``"UTF-8, ',' delimiter"``): UTF-16 (with a byte-order mark, or
    without one when every other byte is NUL) and UTF-8 (a byte-order mark dropped;
    other bytes of text columns replaced), delimited by a comma, a semicolon or a tab
    (detected)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        encoding, label = "utf-16", "UTF-16"
    elif len(raw) >= 4 and raw[1::2].count(0) > 0.4 * len(raw) / 2:
        encoding, label = "utf-16-le", "UTF-16"  # Windows' 'Unicode' without a mark
    elif len(raw) >= 4 and raw[0::2].count(0) > 0.4 * len(raw) / 2:
        encoding, label = "utf-16-be", "UTF-16"
    else:
        # utf-8-sig: spreadsheet exports start with a byte-order mark; text columns in
        # another encoding must not stop the coordinates from being read.
        encoding, label = "utf-8-sig", "UTF-8"
    text = raw.decode(encoding, errors="replace").lstrip("\ufeff")
    lines = [line for line in text.splitlines() if line.strip()][:20]
    delimiter = ","
    for d in _OTHER_DELIMITERS:
        counts = {len(r) for r in csv.reader(lines, delimiter=d)}
        if len(counts) == 1 and counts.pop() > 1:
            delimiter = d
            break
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        rows = [(reader.line_num, r) for r in reader]
    except csv.Error as e:
        raise InputError(f"{path}: not a CSV table ({e})") from None
    rows = [(n, r) for n, r in rows if r and any(c.strip() for c in r)]
    how = f"{label}, {'tab' if delimiter == chr(9) else repr(delimiter)} delimiter"
    return rows, delimiter, how


def csv_number(cell: str, delimiter: str) -> float:
    """A cell as a number; with ';' or tab delimiters a decimal comma too (1,5)."""
    try:
        return float(cell)
    except ValueError:
        if delimiter == "," or cell.count(",") != 1:
            raise
        return float(cell.replace(",", "."))


def _coordinate_columns(header: list[str], zyx: bool) -> dict[str, int] | None:
    """The positions of the coordinate columns a header names, z (with ``zyx`` and when
    there is one), y, x in that order; None when it names none."""
    if "y" in header and "x" in header:
        where = {"z": header.index("z")} if zyx and "z" in header else {}
        return where | {"y": header.index("y"), "x": header.index("x")}
    axes = [h for h in header if h.startswith("axis-")]
    if len(axes) < 2:
        return None
    axes.sort(key=lambda h: int(h.split("-")[1]) if h.split("-")[1].isdigit() else 0)
    where = {"z": header.index(axes[-3])} if zyx and len(axes) >= 3 else {}
    return where | {"y": header.index(axes[-2]), "x": header.index(axes[-1])}


def _check_given_columns(path, header: list[str], given: list[str], zyx: bool) -> None:
    """Refuse column names (``--columns``) that put the coordinates elsewhere than the
    file's own header does."""
    own = _coordinate_columns(header, zyx)
    if own is None:
        return  # the header names no coordinates: the given names say which they are
    if own != _coordinate_columns(given, zyx):
        raise InputError(
            f"{path}: its header {','.join(header)!r} names the coordinate columns, and the "
            f"column names given (--columns {','.join(given)}) put them elsewhere; drop "
            "--columns (it is for files without a header row) or make it agree"
        )


def _pixel_sizes(path, pixel_size, n: int) -> np.ndarray:
    """The pixel size S, (SY, SX) or (SZ, SY, SX) for ``n`` coordinate columns."""
    size = np.asarray(pixel_size, dtype=float).ravel()
    if size.size == 0 or size.size > 3 or not np.all(size > 0):
        raise InputError(f"{path}: pixel size must be 1 to 3 positive numbers, got {pixel_size!r}")
    if n == 3 and size.size != 3:
        raise InputError(
            f"{path}: a table with z needs the z step too: pixel size SZ,SY,SX "
            f"(--pixel-size), got {pixel_size!r}"
        )
    return size[-n:] if size.size > 1 else np.repeat(size, n)


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
    merged = np.zeros((n_groups, coords.shape[1]))
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


def _is_number(s: str, delimiter: str = ",") -> bool:
    try:
        csv_number(s, delimiter)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- images

# Axes rules (README "Input formats and axes"):
# - the letters are T (time), C (channel; RGB samples too), Z, Y, X;
# - they come from --axes, else the file's metadata (ImageJ, OME, tifffile's own JSON);
# - singleton axes other than Y and X are dropped;
# - an axis the file does not name (a plain multi-page TIFF) is Z, or C with --channel
#   when it is short (MAX_GUESSED_CHANNELS at most); a 3D array whose last axis is 3 or 4
#   long is YXC; one whose last axis is otherwise much shorter than the other two is
#   refused (it looks like YXZ, see --axes);
# - every file's axes are logged (info).

SUPPORTED_AXES = "TCZYX"
SUPPORTED_ORDERS = "YX, ZYX, CYX, YXC, ZCYX, CZYX, ZYXC, TZYX, TCZYX, TZCYX"
MAX_GUESSED_CHANNELS = 8  # longest axis taken as channels when the file does not say
_UNKNOWN = "QI"  # tifffile's letters for an axis the file does not name
_UNITS_UM = {
    "um": 1.0,
    "µm": 1.0,
    "μm": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "\\u00b5m": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "å": 1e-4,
    "angstrom": 1e-4,
}


@dataclass
class ImageData:
    """An image ready for detection, with what was inferred on the way.

    ``image`` is (Y, X) or (Z, Y, X) and ``axes`` is ``"YX"`` or ``"ZYX"``; ``spacing``
    the physical pixel size in micrometres in the same order, or None when unknown.
    """

    path: Path | None
    image: np.ndarray
    axes: str
    notes: list[str] = field(default_factory=list)
    spacing: tuple[float, ...] | None = None


@dataclass
class Stack:
    """A whole file with its axes resolved: ``data`` in the order of ``axes``, a
    sub-sequence of ``TCZYX``; ``spacing`` maps Z/Y/X to micrometres where known."""

    name: str
    data: np.ndarray
    axes: str
    spacing: dict[str, float]
    source: str  # where the axes came from, for messages


@dataclass
class _Raw:
    data: np.ndarray
    axes: str  # tifffile's letters
    source: str  # "ImageJ metadata", "OME metadata", ...
    spacing: dict[str, float]


def read_image_2d(path, channel: int | None = None, axes: str | None = None) -> np.ndarray:
    """Read a file as a 2D (Y, X) image, a Z axis max-projected (see :func:`read_image`)."""
    return read_image(path, channel=channel, axes=axes, project=True).image


def read_image(
    path,
    channel: int | None = None,
    axes: str | None = None,
    project: bool = False,
    voxel_size=None,
) -> ImageData:
    """Read an image file as one (Y, X) or (Z, Y, X) image.

    Parameters
    ----------
    path : str or Path
        TIFF (ImageJ, OME, tifffile or plain) or PNG.
    channel : int, optional
        The channel to read from a multi-channel file (0-based; RGB samples are channels).
        Without it equal channels are read as grey (with a warning) and different ones
        are refused: :func:`read_planes` gives each channel.
    axes : str, optional
        The file's axes (e.g. ``"ZYX"``, ``"YXZ"``, ``"ZCYX"``, ``"YXC"``), overriding its
        metadata; letters T, C (or S), Z, Y, X, case-insensitive.
    project : bool
        Max-project a Z axis (an info line says so); the result is then (Y, X).
    voxel_size : sequence of float, optional
        ``(z, y, x)`` or ``(y, x)`` pixel size in micrometres, overriding the file's.

    Raises
    ------
    InputError
        Naming the file and the problem (axis, dtype, channel...) and what to pass.
    """
    stack = read_stack(path, axes=axes, channel_hint=channel is not None)
    planes = _split(stack, channel, project, voxel_size, every_channel=False)
    if len(planes) > 1:
        t = stack.data.shape[stack.axes.index("T")]
        raise InputError(
            f"{stack.name}: {t} time points (axes {stack.axes}); read_image reads one image: "
            "use read_planes (the CLI handles each time point)"
        )
    return planes[0][1]


def read_planes(
    path,
    channel: int | None = None,
    axes: str | None = None,
    project: bool = False,
    voxel_size=None,
) -> list[tuple[dict, ImageData]]:
    """Read a file as one image per time point and channel.

    Returns a list of ``(index, ImageData)``: ``index`` holds the positions on the T and
    C axes the file has (``{"t": 0, "c": 1}``; ``{}`` for a plain 2D or 3D image), each
    image (Y, X) or (Z, Y, X). Without ``channel`` every channel is its own entry (equal
    channels, e.g. a grey RGB file, are one grey image, with a warning); with it only
    that channel. Other parameters as for :func:`read_image`.
    """
    stack = read_stack(path, axes=axes, channel_hint=channel is not None)
    return _split(stack, channel, project, voxel_size, every_channel=True)


def read_stack(path, axes: str | None = None, channel_hint: bool = False) -> Stack:
    """Read a whole file with its axes resolved to a sub-sequence of ``TCZYX``.

    ``channel_hint``: a channel will be picked, so an axis the file does not name that
    is short (at most :data:`MAX_GUESSED_CHANNELS`) is read as channels, not as Z.
    """
    path = Path(path)
    raw = _read_raw(path)
    return resolve_axes(raw.data, raw.axes, str(path), axes, channel_hint, raw)


def to_plane(
    data: np.ndarray,
    axes: str,
    channel: int | None = None,
    name: str = "image",
    explicit: bool = False,
) -> ImageData:
    """Reduce an array with an axes string to a 2D (Y, X) plane (a Z axis max-projected)."""
    data = _check_pixels(np.asarray(data), name)
    hint = channel is not None
    if explicit:
        stack = resolve_axes(data, "", name, axes=axes, channel_hint=hint)
    else:
        raw = _Raw(data, axes or "", "the caller's axes", {})
        stack = resolve_axes(data, axes or "", name, channel_hint=hint, raw=raw)
    planes = _split(stack, channel, True, None, every_channel=False)
    if len(planes) > 1:
        raise InputError(f"{name}: axes {stack.axes} hold several images; pick one first")
    return planes[0][1]


def resolve_axes(
    data: np.ndarray,
    file_axes: str,
    name: str,
    axes: str | None = None,
    channel_hint: bool = False,
    raw: _Raw | None = None,
) -> Stack:
    """Give every axis of ``data`` a letter of ``TCZYX`` and put them in that order."""
    data = _check_pixels(np.asarray(data), name)
    spacing = dict(raw.spacing) if raw is not None else {}
    if axes is not None:
        letters, source = _parse_axes(axes, name), "--axes"
        if len(letters) != data.ndim:
            solid = [n for n in data.shape if n != 1]
            if len(letters) == len(solid):  # --axes names the non-singleton axes only
                data = data.reshape(solid)
            else:
                raise InputError(
                    f"{name}: --axes {axes.upper()!r} has {len(letters)} letters but the "
                    f"image has {data.ndim} dimensions, shape {data.shape}"
                )
    else:
        letters = (file_axes or "").upper()
        source = raw.source if raw is not None else "metadata"
        if len(letters) != data.ndim or len(set(letters)) != len(letters):
            # tifffile labels a plain (1, 1, 1) TIFF 'XYX': a repeated letter names nothing.
            letters = ""
        if not letters:
            letters = "YX" if data.ndim == 2 else "Q" * (data.ndim - 2) + "YX"
            source = "no metadata"
        letters = letters.replace("S", "C")
    # Singleton axes other than Y and X go, by position (a letter can repeat: 'QQYX').
    keep = [i for i, a in enumerate(letters) if a in "YX" or data.shape[i] != 1]
    if len(keep) != data.ndim:
        data = data.reshape([data.shape[i] for i in keep])
        letters = "".join(letters[i] for i in keep)
    if any(a in _UNKNOWN for a in letters):
        letters, source = _guess_unknown(data.shape, letters, name, channel_hint, source)
    bad = [a for a in letters if a not in SUPPORTED_AXES]
    if bad:
        i = letters.index(bad[0])
        raise InputError(
            f"{name}: axis {bad[0]!r} of size {data.shape[i]} (shape {data.shape}, axes "
            f"{letters}, from {source}) is not supported; pass --axes with the letters "
            f"T, C, Z, Y, X, e.g. one of {SUPPORTED_ORDERS}"
        )
    if "Y" not in letters or "X" not in letters or len(set(letters)) != len(letters):
        raise InputError(
            f"{name}: cannot find one Y and one X axis in shape {data.shape} (axes "
            f"{letters!r}, from {source}); pass --axes, one of {SUPPORTED_ORDERS}"
        )
    if axes is None:
        _warn_mislabelled(data.shape, letters, name, source)
    order = [letters.index(a) for a in SUPPORTED_AXES if a in letters]
    if order != sorted(order):
        data = np.transpose(data, order)
    axes_out = "".join(letters[i] for i in order)
    logger.info("%s: axes %s, shape %s (%s)", name, axes_out, tuple(data.shape), source)
    if data.dtype.byteorder not in "=|":  # '<' on a little-endian machine: relabel only
        native = data.dtype.newbyteorder("=")
        data = data.view(native) if data.dtype.isnative else data.astype(native)
    return Stack(name, data, axes_out, spacing, source)


def axes_problem(axes: str) -> str | None:
    """What is wrong with an axes text (``--axes``) whatever the image, or None."""
    letters = str(axes).strip().upper().replace("S", "C")
    bad = sorted({a for a in letters if a not in SUPPORTED_AXES})
    twice = sorted({a for a in letters if letters.count(a) > 1})
    if bad or not letters:
        what = f"unknown letter(s) {', '.join(bad) or '(none given)'}"
    elif twice:
        what = f"{', '.join(twice)} given twice"
    elif "Y" not in letters or "X" not in letters:
        what = "no Y and X axes"
    else:
        return None
    return f"{what}; use T, C, Z, Y, X, e.g. one of {SUPPORTED_ORDERS}"


def _parse_axes(axes: str, name: str) -> str:
    problem = axes_problem(axes)
    if problem:
        raise InputError(f"{name}: --axes {axes!r}: {problem}")
    return str(axes).strip().upper().replace("S", "C")


def _guess_unknown(shape, letters: str, name: str, channel_hint: bool, source: str):
    """Letters for the axes the file does not name (the documented defaults)."""
    unknown = [i for i, a in enumerate(letters) if a in _UNKNOWN]
    shape = tuple(shape)
    if len(unknown) > 1:
        raise InputError(
            f"{name}: the file does not name its axes and shape {shape} has "
            f"{len(unknown)} of them besides Y and X; pass --axes, e.g. ZCYX, CZYX or TZYX"
        )
    (i,) = unknown
    n = shape[i]
    others = [s for j, s in enumerate(shape) if j != i]
    out, why = None, ""
    if channel_hint and n <= MAX_GUESSED_CHANNELS and n < min(others):
        out, why = letters[:i] + "C" + letters[i + 1 :], "a channel was asked for"
    elif len(shape) == 3 and letters in ("QYX", "IYX"):
        # tifffile's pages of (Y, X): a small "X" is more likely a Z or channel axis last.
        first, y, last = shape
        if last in (3, 4) and min(first, y) > 4:
            out, why = "YXC", "a last axis of 3 or 4 is colour channels"
        elif channel_hint and last <= MAX_GUESSED_CHANNELS and last < min(first, y):
            out, why = "YXC", "a channel was asked for"
        elif last * 4 <= min(first, y):
            raise InputError(
                f"{name}: last axis of size {last} looks like Z (shape {shape}, no axes in "
                f"the file); pass --axes YXZ (or --axes YXC if it holds channels)"
            )
    if out is None:
        out = letters[:i] + "Z" + letters[i + 1 :]
        why = "the pages of a multi-page TIFF are z-planes"
        if n <= MAX_GUESSED_CHANNELS and n < min(others) and "C" not in letters:
            fix = letters[:i] + "C" + letters[i + 1 :]
            logger.warning(
                "%s: %d unnamed planes (shape %s) read as z-planes; if they are channels "
                "pass --axes %s or --channel N",
                name,
                n,
                shape,
                fix,
            )
    return out, f"the file does not name its axes, read as {out}: {why}; see --axes"


def _warn_mislabelled(shape, letters: str, name: str, source: str) -> None:
    """A stack the metadata calls channels or frames may be a mislabelled z-stack."""
    if "Z" in letters:
        return
    for a, what in (("C", "channels"), ("T", "time points")):
        if a in letters and shape[letters.index(a)] > MAX_GUESSED_CHANNELS:
            n = shape[letters.index(a)]
            fixed = letters.replace(a, "Z")
            logger.warning(
                "%s: %d %s and no Z axis (axes %s, from %s); each is processed as its own "
                "2D image. If this is a z-stack pass --axes %s",
                name,
                n,
                what,
                letters,
                source,
                fixed,
            )


def _split(
    stack: Stack,
    channel,
    project: bool,
    voxel_size,
    every_channel: bool,
    option="--channel",
    pick: str = "choose one with --channel N (channel=N in Python)",
):
    """One ImageData per time point and channel of a resolved stack; ``option`` names
    ``channel`` in messages (the option the user gave it with), and ``pick`` says what
    to do when one channel is needed and none was given."""
    name, data, axes = stack.name, stack.data, stack.axes
    notes: list[str] = []
    index_c: list[int | None] = [None]
    if "C" in axes:
        ci = axes.index("C")
        n_c = data.shape[ci]
        if channel is not None:
            if not (-n_c <= channel < n_c):
                raise InputError(
                    f"{name}: {option} {channel} out of range; the image has {n_c} channels "
                    f"(axes {axes})"
                )
            index_c = [channel % n_c]
        else:
            n_keep = n_c
            if n_c == 4 and _is_alpha(data.take(3, axis=ci)):
                n_keep = 3  # RGBA with an opaque alpha: the colour channels
            first = data.take(0, axis=ci)
            if all(np.array_equal(first, data.take(k, axis=ci)) for k in range(1, n_keep)):
                note = f"{n_keep} equal channels read as one grey image"
                logger.warning("%s: %s (pass --channel to pick one)", name, note)
                notes.append(note)
                data = np.expand_dims(first, ci)
                index_c = [None]
            elif every_channel:
                index_c = list(range(n_keep))
            else:
                raise InputError(
                    f"{name}: {n_c} different channels (shape {data.shape}, axes {axes}); {pick}"
                )
    elif channel not in (None, 0):
        raise InputError(
            f"{name}: {option} {channel} given but the image has no channel axis (axes "
            f"{axes}); pass --axes if the file holds channels, e.g. CYX or ZCYX"
        )
    n_t = data.shape[axes.index("T")] if "T" in axes else 1
    spacing = _spacing(stack, voxel_size, project)
    out = []
    for t in range(n_t):
        for c in index_c:
            arr, rest = data, axes
            index = {}
            if "T" in rest:
                arr = arr.take(t, axis=rest.index("T"))
                rest = rest.replace("T", "")
                index["t"] = t
            if "C" in rest:
                arr = arr.take(0 if c is None else c, axis=rest.index("C"))
                rest = rest.replace("C", "")
                if c is not None:
                    index["c"] = c
            plane_notes = list(notes)
            if "Z" in rest and project:
                note = f"{arr.shape[0]} z-planes max-projected (--project)"
                if t == 0 and c == index_c[0]:
                    logger.info("%s: %s", name, note)
                plane_notes.append(note)
                arr = arr.max(axis=0)
                rest = "YX"
            if arr.dtype.kind == "f" and not np.isfinite(arr).any():
                plane_notes.append("every pixel is NaN or infinite")
            image = ImageData(
                Path(name) if name else None, np.ascontiguousarray(arr), rest, plane_notes, spacing
            )
            out.append((index, image))
    return out


def _spacing(stack: Stack, voxel_size, project: bool):
    """(z, y, x) or (y, x) micrometres of the output images, or None when unknown."""
    spatial = "YX" if project or "Z" not in stack.axes else "ZYX"
    if voxel_size is not None:
        vs = tuple(float(v) for v in voxel_size)
        if len(vs) == 3 and spatial == "YX":
            vs = vs[1:]
        if len(vs) != len(spatial) or not all(np.isfinite(v) and v > 0 for v in vs):
            raise InputError(
                f"{stack.name}: --voxel-size {','.join(str(v) for v in voxel_size)} does not "
                f"fit a {spatial} image; give {'Z,Y,X' if spatial == 'ZYX' else 'Y,X'} "
                "positive sizes in micrometres"
            )
        return vs
    known = stack.spacing
    if all(a in known for a in spatial):
        return tuple(float(known[a]) for a in spatial)
    return None


def _check_pixels(data: np.ndarray, name: str) -> np.ndarray:
    if data.dtype.kind not in "uif":
        what = {"b": "boolean", "c": "complex"}.get(data.dtype.kind, "non-numeric")
        raise InputError(
            f"{name}: pixel type {data.dtype} ({what}) is not supported; expected integer or "
            "float pixels (convert the image, e.g. to uint16 or float32)"
        )
    if data.size == 0:
        raise InputError(f"{name}: image has a zero-size axis, shape {data.shape}")
    return data


def read_channels(
    path, channels, axes: str | None = None, project: bool = False, voxel_size=None, options=None
) -> list[ImageData]:
    """Read a multi-channel file once and return one image per requested channel.

    Parameters
    ----------
    path : str or Path
        TIFF or PNG file, as for :func:`read_image`.
    channels : sequence of int or None
        0-based channel indices, e.g. ``[spot_channel, nuclear_channel]``. ``None`` takes
        the image as :func:`read_image` does without ``channel`` (equal channels are grey,
        different ones are refused). The same index twice is read once.
    axes : str, optional
        Axes of the file (``"CYX"``, ``"YXC"``, ``"ZCYX"``...), overriding its metadata.
    project : bool
        Max-project a Z axis.
    voxel_size : sequence of float, optional
        As for :func:`read_image`.
    options : sequence of str, optional
        The option that gave each entry of ``channels`` (``"--nuclei-channel"``...), for
        the messages; default ``"--channel"`` for every one.

    Returns
    -------
    planes : list of ImageData
        One per entry of ``channels``, in that order; each (Y, X) or (Z, Y, X).

    Raises
    ------
    InputError
        Naming the file: unreadable, a channel out of range, no channel axis, time
        points, ...

    Notes
    -----
    The channel axis comes from ``axes``, else from the file's metadata (ImageJ, OME,
    tifffile's own; RGB samples count as channels). An axis the file does not name is
    read as channels when a channel is asked for and it is at most
    :data:`MAX_GUESSED_CHANNELS` long and shorter than Y and X (CYX); a 3D file whose last
    axis is 3 or 4 long is YXC; an info message says so. Otherwise pass ``axes``.
    """
    hint = any(c is not None for c in channels)
    stack = read_stack(path, axes=axes, channel_hint=hint)
    if "T" in stack.axes:
        raise InputError(
            f"{stack.name}: {stack.data.shape[0]} time points (axes {stack.axes}) with "
            "channels for nuclei or cytoplasm are not supported; split the time points"
        )
    planes: dict = {}
    options = ["--channel"] * len(channels) if options is None else list(options)
    others = " and ".join(dict.fromkeys(o for o in options if o != "--channel"))
    # Reading channels by number, every one is read so: the spot channel too.
    pick = f"pass the spot channel with --channel N (needed with {others})" if others else None
    for c, option in zip(channels, options):
        if c not in planes:
            extra = {"pick": pick} if pick else {}
            planes[c] = _split(stack, c, project, voxel_size, False, option, **extra)[0][1]
    return [planes[c] for c in channels]


def _read_raw(path: Path) -> _Raw:
    """The whole array of a TIFF or PNG file, the axes its metadata gives, pixel sizes."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    suffix = path.suffix.lower()
    if suffix == ".png":
        data, axes = _read_png(path)
        raw = _Raw(data, axes, "PNG", {})
    elif suffix in {".tif", ".tiff", ".btf", ".tf8"}:
        raw = _read_tiff(path)
    else:
        raise InputError(f"{path}: unsupported file type {path.suffix!r}; expected TIFF or PNG")
    raw.data = _check_pixels(np.asarray(raw.data), str(path))
    return raw


def _read_array(path: Path) -> tuple[np.ndarray, str]:
    """The whole array of a TIFF or PNG file and the axes its metadata gives."""
    raw = _read_raw(Path(path))
    return raw.data, raw.axes


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


@contextlib.contextmanager
def tifffile_notes(path):
    """Keep tifffile's log messages (notes on bad tags...) off stderr while reading
    ``path``: they are logged at debug level under the file's name instead."""
    tiff_log = logging.getLogger("tifffile")
    collect = _Collect()
    tiff_log.addHandler(collect)  # a handler of ours: no last-resort print to stderr
    try:
        yield
    finally:
        tiff_log.removeHandler(collect)
        for msg in dict.fromkeys(collect.messages):
            logger.debug("%s: tifffile: %s", path, msg)


def _read_tiff(path: Path) -> _Raw:
    with tifffile_notes(path):
        return _read_tiff_quietly(path)


def _read_tiff_quietly(path: Path) -> _Raw:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes
            if len(tif.series) > 1:
                logger.warning(
                    "%s: %d image series in the file; only the first (shape %s) is read",
                    path,
                    len(tif.series),
                    tuple(series.shape),
                )
            data = _mapped(tif, series, path) if series.nbytes >= MEMMAP_BYTES else None
            if data is None:
                check_memory(path, series.shape, series.dtype)
                data = series.asarray()
            kind = str(getattr(series, "kind", "")).lower()
            spacing: dict[str, float] = {}
            if tif.is_imagej:
                source = "ImageJ metadata"
                spacing = _imagej_spacing(tif)
            elif tif.is_ome:
                source = "OME metadata"
                spacing = _ome_spacing(tif.ome_metadata)
            elif kind == "shaped" and tif.shaped_metadata and "axes" in tif.shaped_metadata[0]:
                source = "tifffile metadata"
            elif "S" in axes:
                source = "TIFF colour samples"
            else:
                source = "no metadata"
    except InputError:
        raise
    except MemoryError:
        msg = f"{path}: not enough memory to read it; crop or split the image"
        raise InputError(msg) from None
    except ZeroDivisionError:
        msg = f"{path}: not a readable TIFF (its tags declare a zero width, height or strip size)"
        raise InputError(msg) from None
    except Exception as e:
        msg = tiff_error_text(e)
        codec = isinstance(e, ImportError) or "imagecodecs" in msg.lower()
        comp = _compression_of(path) if codec or isinstance(e, (KeyError, ValueError)) else None
        if comp is not None and comp != "NONE" and (codec or "compress" in msg.lower()):
            raise InputError(
                f"{path}: cannot decode its {comp} compression ({msg}); install the "
                "'imagecodecs' package (pip install imagecodecs)"
            ) from None
        raise InputError(f"{path}: not a readable TIFF ({msg})") from None
    return _Raw(np.asarray(data), axes, source, spacing)


def whole_pixels(text: str, unit: str = "pixels") -> int:
    """A count written as text (an option, an environment variable), of pixels or of
    another ``unit``: a whole number, 1 or more; ValueError saying so otherwise."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"expected a whole number of {unit}, 1 or more")
    return value


def about(name: str, text: str) -> str:
    """A message about a file or input that starts with its name (once): every line
    about an image starts with it, also when the text names it later (an OSError's
    "[Errno 5] Input/output error: 'PATH'")."""
    return text if text.startswith(name) else f"{name}: {text}"


def tiff_error_text(e: BaseException) -> str:
    """tifffile's complaint in one short line, saying so when the file ends too early."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    msg = msg if len(msg) <= 160 else msg[:157] + "..."
    if isinstance(e, (IndexError, EOFError)) or "failed to read" in msg:
        msg = f"the file ends before its data does: truncated or still being written? {msg}"
    return msg


MEMMAP_BYTES = 1 << 30  # files at least this big are mapped, not read, when they can be


def _mapped(tif, series, path: Path):
    """The series as a read-only memory map of the file (uncompressed, contiguous, in
    the machine's byte order), so a large z-stack is read plane by plane by the
    detector; None when the file cannot be mapped so."""
    dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
    if getattr(series, "dataoffset", None) is None or not dtype.isnative:
        return None
    if series.dataoffset + series.nbytes > path.stat().st_size:
        return None  # tags declaring more pixels than the file holds: not mapped
    dtype = dtype.newbyteorder("=")
    try:
        data = np.memmap(
            path, dtype=dtype, mode="r", offset=series.dataoffset, shape=tuple(series.shape)
        )
    except (ValueError, OSError):
        return None
    logger.debug("%s: memory-mapped (%d bytes)", path, series.nbytes)
    return data


def _unit_um(unit) -> float | None:
    if unit is None:
        return None
    u = str(unit).strip().lower()
    return _UNITS_UM.get(u)


def _imagej_spacing(tif) -> dict[str, float]:
    """Pixel sizes from ImageJ's unit, spacing and the X/Y resolution tags."""
    meta = tif.imagej_metadata or {}
    factor = _unit_um(meta.get("unit"))
    if factor is None:
        return {}
    out: dict[str, float] = {}
    page = tif.pages[0]
    for axis, tag in (("X", "XResolution"), ("Y", "YResolution")):
        t = page.tags.get(tag)
        if t is None:
            continue
        num, den = t.value if isinstance(t.value, tuple) else (t.value, 1)
        if num and den and (num, den) != (1, 1):
            out[axis] = factor * float(den) / float(num)
    if "spacing" in meta and float(meta["spacing"]) > 0:
        out["Z"] = factor * float(meta["spacing"])
    return out


def _ome_spacing(xml: str | None) -> dict[str, float]:
    """PhysicalSizeX/Y/Z of the first OME image (the unit defaults to micrometres)."""
    if not xml:
        return {}
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return {}
    out = {}
    for axis in "XYZ":
        value = pixels.get(f"PhysicalSize{axis}")
        factor = _unit_um(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        try:
            v = float(value) if value is not None else None
        except ValueError:
            v = None
        if v is not None and v > 0 and factor is not None:
            out[axis] = v * factor
    return out


def _is_alpha(plane: np.ndarray) -> bool:
    return plane.min() == plane.max()


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


_CACHE: dict[str, tuple[tuple, LoadedModel]] = {}  # folder -> (file stamps, model)


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


MODEL_FILES = ("config.json", "model.safetensors")


def model_fingerprint(name_or_dir) -> str:
    """The sha256 of a model folder's :data:`MODEL_FILES` (names and contents): it
    changes when the weights or the configuration do, whatever the folder is called."""
    import hashlib

    folder = model_dir(name_or_dir)
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        digest.update(name.encode() + b"\0")
        try:
            with open(folder / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except FileNotFoundError:
            digest.update(b"(missing)")
        digest.update(b"\0")
    return digest.hexdigest()


def load_model(name_or_dir=None) -> LoadedModel:
    """Load a model folder: ``config.json`` + ``model.safetensors``. No code runs."""
    if isinstance(name_or_dir, LoadedModel):
        return name_or_dir
    from safetensors.torch import load_file

    from .model import SpotNet, fuse_batchnorm

    path = model_dir(name_or_dir).resolve()
    cfg_path, w_path = path / "config.json", path / "model.safetensors"
    for p in (cfg_path, w_path):
        if not p.exists():
            raise InputError(f"{path}: not a model folder (missing {p.name})")
    # Keyed by the files' sizes and times too: a config edited while a viewer or a
    # notebook runs is read again (its threshold, views...), not served from the cache.
    key = str(path)
    stamp = tuple((st.st_size, st.st_mtime_ns) for st in (cfg_path.stat(), w_path.stat()))
    if key in _CACHE and _CACHE[key][0] == stamp:
        return _CACHE[key][1]
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_path}: invalid JSON ({e})") from None
    except UnicodeDecodeError:
        raise InputError(f"{cfg_path}: not a text file; copy the model folder again") from None
    arch = config.get("architecture", {}) if isinstance(config, dict) else None
    try:
        channels = tuple(int(c) for c in arch.get("channels", (8, 16, 32, 64)))
        net = SpotNet(channels, int(arch.get("in_channels", 1)))
    except (AttributeError, TypeError, ValueError):
        raise InputError(
            f"{path}: config.json holds no usable 'architecture' (e.g. channels [8, 16, 32, "
            "64]); copy the model folder again"
        ) from None
    try:
        state = load_file(str(w_path))
    except Exception as e:  # noqa: BLE001  (safetensors' own error type for a bad file)
        # Truncated by a copy or a download: one line, not safetensors' traceback.
        raise InputError(
            f"{path}: model.safetensors cannot be read ({e}); the file is truncated or "
            "damaged: copy the model folder again"
        ) from None
    problem = _weights_problem(net.state_dict(), state)
    if problem:
        raise InputError(
            f"{path}: model.safetensors does not fit the architecture in config.json "
            f"(channels {list(channels)}): {problem}; the two files come from different models"
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:  # a training run that diverged: it would find nothing, and say nothing
        raise InputError(
            f"{path}: model.safetensors holds NaN or infinite weights in {len(bad)} of "
            f"{len(state)} tensors (e.g. {bad[0]}); the training that wrote it diverged"
        )
    net.load_state_dict(state)
    net = fuse_batchnorm(net.eval())
    net = net.to(memory_format=__import__("torch").channels_last)
    net.views = model_views(config, path)
    loaded = LoadedModel(net, config, path)
    _CACHE[key] = (stamp, loaded)
    return loaded


def model_views(config: dict, path=None) -> int:
    """A model config's ``"views"``: 1 (the image as it is) or 2 (also transposed,
    outputs averaged: :func:`piscis.detect._forward`); 1 when absent (older models)."""
    from .detect import VIEWS

    views = config.get("views", 1)
    if isinstance(views, bool) or views not in VIEWS:
        where = f"{path}: " if path else ""
        raise InputError(f"{where}config.json 'views' is {views!r}; expected 1 or 2")
    return int(views)


def _weights_problem(expected: dict, found: dict) -> str | None:
    """How a weights file differs from a network's tensors, in a few words (torch's
    own message lists every tensor, one per line); None when it fits."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    shapes = [
        k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} of {len(expected)} tensors differ in shape (e.g. {k}: "
            f"{tuple(found[k].shape)} in the file, {tuple(expected[k].shape)} expected)"
        )
    if missing:
        parts.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} unexpected tensors (e.g. {extra[0]})")
    return ", ".join(parts) or None


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
        (tmp / "config.json").write_text(json_text(config))
        (tmp / "README.md").write_text(card)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _CACHE.pop(str(folder.resolve()), None)
    return folder


def json_text(value) -> str:
    """Indented JSON of ``value`` for a file, NaN and infinities written as null."""
    return json.dumps(_json_safe(value), indent=2) + "\n"


def _json_safe(value):
    """``value`` with NaN and infinite floats as None: JSON has no NaN (json.dumps
    writes a bare ``NaN``, which other readers refuse)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
