"""The ``piscis`` command: detect, count, train, evaluate.

Only this module configures logging handlers; the library logs through
``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import argparse
import errno
import glob
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .io import IMAGE_SUFFIXES, InputError, about, whole_pixels

logger = logging.getLogger("piscis")

SUMMARY_COLUMNS = ["image", "n_spots", "height", "width", "threshold", "model"]
SUMMARY_CELL_COLUMNS = ["n_cells", "n_spots_in_cells"]
# After SUMMARY_COLUMNS, when some image of the run has them: the time point and channel of
# the row (one row per time point and channel), and the number of z-planes of a z-stack.
PLANE_COLUMNS = ["t", "c"]
SUMMARY_3D_COLUMNS = ["depth"]
# A mask for image stem S is named S or S + one of these (case-insensitive), in this order
# of preference, with one of MASK_EXTENSIONS.
MASK_SUFFIXES = (
    "",
    "_seg",
    "_masks",
    "_mask",
    "_labels",
    "_cp_masks",
    ".labels",
    ".mask",
    "-labels",
)
MASK_EXTENSIONS = (".tif", ".tiff", ".npy", ".png")


# --------------------------------------------------------------------------- inputs


def is_image_name(path: Path) -> bool:
    """True for the image suffixes we read, case-insensitive (``.ome.tif`` too)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.lower().endswith(".mask.tif")


def image_stem(path: Path) -> str:
    """``a.ome.tiff`` -> ``a``; ``b.TIF`` -> ``b``."""
    name = path.name[: -len(path.suffix)] if path.suffix else path.name
    if name.lower().endswith(".ome"):
        name = name[:-4]
    return name


# Image formats met in microscopy that piscis does not read (JPEG loses the intensities;
# the vendor formats need their own readers): in a folder, each gets a warning.
OTHER_IMAGE_SUFFIXES = {
    ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".jp2", ".czi", ".nd2", ".lif", ".lsm",
    ".oib", ".oif", ".ims", ".vsi", ".dv", ".mrc", ".h5", ".hdf5", ".npy", ".npz",
}  # fmt: skip


def _not_regular(path: Path) -> str:
    """Why ``path`` (which exists, or is a dangling link) cannot be read as an image."""
    if path.is_symlink() and not path.exists():
        return "a link to a missing file"
    if path.is_dir():
        return "a folder (not a Zarr array)"
    return "not a regular file (a pipe, socket or device)"


def expand_inputs(
    inputs: list[str], empty: list[str] | None = None
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (their image files, not recursive) and glob patterns.

    Returns (images, failures); a path that does not exist is a failure.
    Non-image files in a folder are skipped with an info message. A folder without
    images is a warning, or, given ``empty``, its message is appended there instead.
    """
    images: list[Path] = []
    failures: list[tuple[str, str]] = []
    from .lazy import is_zarr

    for item in inputs:
        p = Path(item)
        if is_zarr(p):
            images.append(p)
        elif p.is_dir():
            found = []
            for f in sorted(p.iterdir()):
                if (f.is_file() and is_image_name(f)) or is_zarr(f):
                    found.append(f)
                elif f.is_file() and f.suffix.lower() in OTHER_IMAGE_SUFFIXES:
                    # An image piscis cannot read: said louder than a stray text file.
                    logger.warning(
                        "%s: %s images are not read (TIFF, PNG or Zarr only); convert it "
                        "to TIFF to count it, skipped",
                        f,
                        f.suffix.lower().lstrip(".").upper(),
                    )
                elif f.is_file():
                    logger.info("%s: not an image file, skipped", f)
                elif is_image_name(f):
                    logger.info("%s: %s, skipped", f, _not_regular(f))
            if not found:
                note = _empty_folder(p)
                if empty is None:
                    logger.warning("%s", note)
                else:
                    empty.append(note)
            images.extend(found)
        elif p.is_file():
            images.append(p)
        elif p.exists():
            failures.append((item, _not_regular(p)))
        elif any(c in item for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item))
            if not matches:
                failures.append((item, "no file matches this pattern"))
            images.extend(m for m in matches if (m.is_file() and is_image_name(m)) or is_zarr(m))
        else:
            failures.append((item, "no such file or folder"))
    # The same file named twice is read once.
    seen, unique = set(), []
    for f in images:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, failures


def _empty_folder(folder: Path) -> str:
    """Why a folder gives no image: none in it, or only in its sub-folders (folders
    are not searched recursively)."""
    from .lazy import is_zarr

    subs = [f for f in folder.iterdir() if f.is_dir() and not is_zarr(f)]
    if subs:
        return (
            f"{folder}: no image files (.tif, .tiff, .png) in this folder, only {len(subs)} "
            "sub-folder(s), which are not searched (folders are not read recursively): "
            f"give the sub-folders, or a pattern such as '{folder / '*' / '*.tif'}'"
        )
    return f"{folder}: no image files (.tif, .tiff, .png) in this folder"


def output_names(images: list[Path]) -> dict[Path, str]:
    """A distinct output stem per image (``a.tif`` and ``a.png`` -> ``a``, ``a_png``)."""
    names: dict[Path, str] = {}
    used: set[str] = set()
    for f in images:
        stem = image_stem(f)
        name = stem
        if name.lower() in used:
            name = f"{stem}_{f.suffix.lstrip('.').lower()}"
            k = 2
            while name.lower() in used:
                name = f"{stem}_{f.suffix.lstrip('.').lower()}{k}"
                k += 1
            logger.warning(
                "%s: another image is also named %r; its results go to %r", f, stem, name
            )
        used.add(name.lower())
        names[f] = name
    return names


# --------------------------------------------------------------------------- commands


@dataclass
class _Plane:
    """The result of one time point / channel of an image."""

    index: dict  # {"t": 0, "c": 1}: positions on the T and C axes the file has
    shape: tuple  # (Y, X) or (Z, Y, X)
    table: dict  # the spot columns of count_spots
    cell_rows: list
    segmented: dict = field(default_factory=dict)


def _count_one(path: Path, args, model, masks: dict) -> list[_Plane]:
    """Read one image (its time points and channels, and masks) and run
    :func:`piscis.api.count_spots` on each image in it."""
    from .api import count_spots, read_mask
    from .io import read_channels, read_planes

    nuc_ch = getattr(args, "nuclei_channel", None)
    cyto_ch = getattr(args, "cytoplasm_channel", None)
    project = getattr(args, "project", False)
    voxel = getattr(args, "voxel_size", None)
    extra = {}
    # The reader logs its notes (axes, projection) itself; all-NaN images are reported by
    # detect.
    if nuc_ch is None and cyto_ch is None:
        planes = read_planes(
            path, channel=args.channel, axes=args.axes, project=project, voxel_size=voxel
        )
        if args.channel is not None:  # one channel, the one asked for: no c column
            planes = [({k: v for k, v in i.items() if k != "c"}, d) for i, d in planes]
    else:
        wanted = {"nuclear_image": nuc_ch, "cytoplasm_image": cyto_ch}
        wanted = {k: c for k, c in wanted.items() if c is not None}
        option = {"nuclear_image": "--nuclei-channel", "cytoplasm_image": "--cytoplasm-channel"}
        data = read_channels(
            path, [args.channel, *wanted.values()], axes=args.axes, project=project,
            voxel_size=voxel, options=["--channel", *(option[k] for k in wanted)],
        )  # fmt: skip
        # count_spots segments a (Z, Y, X) nucleus/cytoplasm channel on its max projection.
        extra = {k: d.image for k, d in zip(wanted, data[1:])}
        planes = [({}, data[0])]
    shape = planes[0][1].image.shape
    labels = {}
    for kind, found in masks.items():
        where = found[path]
        if isinstance(where, str):  # no mask for this image: the reason
            raise InputError(where)
        try:
            mask = read_mask(where)
        except ValueError as e:
            raise InputError(f"{path}: {kind} mask: {e}") from None
        if mask.shape != shape and mask.shape != shape[-2:]:
            raise InputError(
                f"{path}: {kind} mask {where} has shape {mask.shape}, the image {shape}"
                + (" (a z-stack takes a (Y, X) or a (Z, Y, X) mask)" if len(shape) == 3 else "")
            )
        labels[kind] = mask
    seg = {}
    if getattr(args, "cells_mode", False):
        seg = {
            "nucleus_diameter": args.nucleus_diameter,
            "min_nucleus_area": args.min_nucleus_area,
            "expand": args.expand,
        }
    out = []
    for index, plane in planes:
        where = "".join(f" [{k}={v}]" for k, v in index.items())
        table, cell_rows, used = count_spots(
            plane.image,
            **labels,
            **extra,
            model=model,
            threshold=args.threshold,
            scale=args.scale,
            tile_size=args.tile_size,
            min_snr=args.min_snr,
            min_planes=getattr(args, "min_planes", None),
            spacing=plane.spacing,
            name=f"{path}{where}",
            return_masks=True,
            roi=getattr(args, "roi", None),
            **seg,
        )
        segmented = {}
        if "nuclear_image" in extra:
            segmented["nuclei"] = used["nuclei"]
        if "cells" not in labels and used["cells"] is not None:
            segmented["cells"] = used["cells"]
        out.append(_Plane(index, plane.image.shape, table, cell_rows, segmented))
    return out


def _merged_table(planes: list[_Plane]) -> dict[str, list]:
    """The spot tables of an image's planes as one: ``t`` and ``c`` columns first when
    the image has those axes."""
    keys = [k for k in PLANE_COLUMNS if any(k in p.index for p in planes)]
    names = list(planes[0].table)
    out: dict[str, list] = {}
    for k in keys:
        out[k] = [p.index.get(k) for p in planes for _ in range(len(p.table["y"]))]
    for name in names:
        out[name] = [v for p in planes for v in p.table[name]]
    return out


def _mask_files(spec: str, kind: str) -> tuple[list[Path], str | None, str, bool]:
    """The candidate files of ``--cells``/``--nuclei``.

    Returns (files, the pattern's file name or None, where we looked, one file given).
    """
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and _mask_ext(f))
        return files, None, f"folder {p}", False
    if p.is_file():
        return [p], None, str(p), True
    if any(c in spec for c in "*?["):
        files = sorted(Path(m) for m in glob.glob(spec) if Path(m).is_file())
        return [f for f in files if _mask_ext(f)], p.name, f"files matching {spec!r}", False
    raise InputError(f"--{kind} {spec}: no such file or folder")


def _mask_ext(f: Path) -> bool:
    return f.suffix.lower() in MASK_EXTENSIONS


def _mask_rank(stem: str, f: Path, pattern: str | None) -> int | None:
    """How well ``f`` names a mask for image stem ``stem`` (lower is better; None: not)."""
    if not _mask_ext(f):
        return None
    name = f.name.lower()
    if pattern is not None and pattern.count("*") == 1 and not any(c in pattern for c in "?["):
        head, tail = pattern.lower().split("*")
        if name == head + stem.lower() + tail:
            return -1  # the pattern's '*' stands for the image name
    base = name[: -len(f.suffix)]
    for rank, suffix in enumerate(MASK_SUFFIXES):
        if base == (stem + suffix).lower():
            return rank
    return None


def match_masks(spec: str, images: list[Path], kind: str = "cells") -> dict[Path, Path | str]:
    """Find the mask of each image for ``--cells`` / ``--nuclei`` ``spec``.

    ``spec`` is a folder, a glob pattern or (with one image) one file. For image stem S
    (:func:`image_stem`) a candidate's name, case-insensitive, must be S or S + one of
    :data:`MASK_SUFFIXES`, with an extension of :data:`MASK_EXTENSIONS`; with a pattern
    holding one ``*`` the name the pattern gives with ``*`` = S also matches (and is
    preferred). Several matches: the first suffix in that order wins (info message). A
    file that is itself an input image is not its own (or a same-stem image's) mask.

    Returns
    -------
    dict: image -> mask path, or the reason (a message naming the image and where we
    looked) when there is none.

    Raises
    ------
    InputError
        ``spec`` does not exist, or is one file while there are several images.
    """
    files, pattern, where, single = _mask_files(spec, kind)
    if single:
        if len(images) > 1:
            raise InputError(
                f"--{kind} {spec} is one file but there are {len(images)} images; "
                "give a folder or a pattern, matched by image name (see --help)"
            )
        return {f: files[0] for f in images}
    inputs = {f.resolve() for f in images}
    out: dict[Path, Path | str] = {}
    for image in images:
        stem = image_stem(image)
        found = []
        for f in files:
            rank = _mask_rank(stem, f, pattern)
            key = f.resolve()
            if rank is None or key == image.resolve() or (rank == 0 and key in inputs):
                continue
            found.append((rank, MASK_EXTENSIONS.index(f.suffix.lower()), f))
        if not found:
            tried = ", ".join(repr(stem + x) for x in MASK_SUFFIXES[1:])
            out[image] = (
                f"{image}: no {kind} mask in {where} (looked for {stem!r} or {tried} + "
                f"{'/'.join(MASK_EXTENSIONS)}, case-insensitive)"
            )
            continue
        found.sort(key=lambda t: t[:2])
        out[image] = found[0][2]
        if len(found) > 1:
            others = ", ".join(str(t[2]) for t in found[1:])
            logger.info("%s: %s mask %s (also found: %s)", image, kind, found[0][2], others)
        else:
            logger.debug("%s: %s mask %s", image, kind, found[0][2])
    return out


def _check_cell_options(args) -> str | None:
    """Fill in defaults of the cell options; return a usage error or None."""
    if not hasattr(args, "cells"):  # `piscis detect`: no cell options
        args.cells_mode = False
        return None
    if args.nuclei is not None and args.nuclei_channel is not None:
        return "give --nuclei or --nuclei-channel, not both"
    if args.cells is not None and args.cytoplasm_channel is not None:
        return "give --cells or --cytoplasm-channel, not both"
    if args.cytoplasm_channel is not None and args.nuclei is None and args.nuclei_channel is None:
        return "--cytoplasm-channel needs nuclei (--nuclei-channel or --nuclei) as seeds"
    if args.nucleus_diameter is not None and not args.nucleus_diameter > 0:
        return f"--nucleus-diameter must be positive, got {args.nucleus_diameter}"
    if args.expand is not None and not args.expand >= 0:
        return f"--expand must be 0 or more, got {args.expand}"
    args.cells_mode = any(v is not None for v in (args.cells, args.nuclei, args.nuclei_channel))
    segmenting = args.nuclei_channel is not None
    growing = args.cells is None and args.cytoplasm_channel is None and args.cells_mode
    if not segmenting and (args.nucleus_diameter is not None or args.min_nucleus_area is not None):
        logger.warning(
            "--nucleus-diameter and --min-nucleus-area are only used with --nuclei-channel"
        )
    if not growing and args.expand is not None:
        logger.warning("--expand is only used when cells are grown from nuclei")
    if args.save_masks and not (segmenting or growing or args.cytoplasm_channel is not None):
        logger.warning("--save-masks: no masks are segmented, nothing to save")
    args.nucleus_diameter = 30.0 if args.nucleus_diameter is None else args.nucleus_diameter
    args.expand = 15.0 if args.expand is None else args.expand
    return None


def _write_labels(path: Path, labels: np.ndarray) -> None:
    """Write a label image as a TIFF through a temporary file and a rename."""
    import os
    import tempfile

    import tifffile

    top = int(labels.max()) if labels.size else 0
    dtype = np.uint16 if top <= 0xFFFF else np.uint32 if top <= 0xFFFFFFFF else np.int64
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes the file private
        tifffile.imwrite(tmp, labels.astype(dtype), photometric="minisblack", compression="zlib")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _run_batch(args, spots_dir: Path, summary_path: Path | None) -> int:
    import contextlib

    with contextlib.ExitStack() as held:  # the output folder's lock, released on any exit
        return _batch(args, spots_dir, summary_path, held)


def _batch(args, spots_dir: Path, summary_path: Path | None, held) -> int:
    from . import batch
    from .cells import CELL_COLUMNS
    from .io import atomic_write_text, load_model, model_dir, table_text

    problem = _check_cell_options(args)
    if problem is None and getattr(args, "workers", None) is not None and args.workers < 1:
        problem = f"--workers must be 1 or more, got {args.workers}"
    if problem:
        logger.error("%s", problem)
        return 2
    empty: list[str] = []
    images, failures = expand_inputs(args.inputs, empty)
    if not images:
        # Nothing to run (README: exit 2): one line with every input's reason, and no
        # output folder or empty summary is made.
        reasons = empty + [about(item, why) for item, why in failures]
        logger.error("no image in the input(s) given, nothing was run: %s", "; ".join(reasons))
        return 2
    for note in empty:
        logger.warning("%s", note)
    masks: dict[str, dict] = {}
    for kind in ("cells", "nuclei"):
        spec = getattr(args, kind, None)
        if spec is None:
            continue
        try:
            masks[kind] = match_masks(spec, images, kind)
        except InputError as e:
            logger.error("%s", e)
            return 2
    # Masks in the input folder are masks, not images.
    used = {p.resolve() for found in masks.values() for p in found.values() if isinstance(p, Path)}
    for f in [f for f in images if f.resolve() in used]:
        logger.info("%s: used as a mask, not counted as an image", f)
    images = [f for f in images if f.resolve() not in used]
    if not images:
        logger.error("no image left to count: every input image is a --cells/--nuclei mask")
        return 2
    cells_mode = args.cells_mode
    save_masks = cells_mode and getattr(args, "save_masks", False)
    out_dir = summary_path.parent if summary_path is not None else spots_dir
    cells_path = out_dir / "cells.csv" if cells_mode else None
    names = output_names(images)
    targets = {f: spots_dir / f"{names[f]}.csv" for f in images}
    try:
        model_path = str(model_dir(args.model).resolve())
    except InputError as e:
        logger.error("%s", e)
        return 2
    if args.scheduler is not None or args.workers is not None:
        try:  # before anything is written to the output folder
            batch.require_dask()
        except InputError as e:
            logger.error("%s", e)
            return 2
    try:
        model = load_model(model_path)
    except (InputError, OSError) as e:
        logger.error("%s", e)
        return 2
    threshold = model.threshold if args.threshold is None else args.threshold
    # Checked once here, not image by image: a bad value is the same for every image.
    from .detect import check_decoding

    try:
        check_decoding(threshold, getattr(args, "scale", None))
    except ValueError as e:
        logger.error("--%s", e)
        return 2
    min_snr = getattr(args, "min_snr", None)
    if min_snr is not None and not 0 <= min_snr < float("inf"):
        logger.error("--min-snr must be 0 or more (0: no significance floor), got %s", min_snr)
        return 2
    try:
        opts = batch.task_options(args, model_path)
    except InputError as e:
        logger.error("%s", e)
        return 2
    # One run at a time in an output folder: the checks below and the writes are its own.
    lock = batch.OutputLock(out_dir)
    try:
        lock.acquire()
    except batch.FolderBusy as e:
        logger.error("%s", e)
        return 2
    held.callback(lock.release)
    state = batch.RunState(out_dir)
    record = batch.run_record(args.command, args, images, model_path)
    resume = False
    if not args.overwrite:
        existing = [t for t in targets.values() if t.exists()]
        # The tables of a recorded run that finished no image hold no results (a run
        # where every input failed): a corrected command may replace them.
        tables_hold_results = state.finished() > 0 or not state.exists()
        for extra in (cells_path, summary_path):
            if extra is not None and extra.exists() and tables_hold_results:
                existing.insert(0, extra)
        if save_masks:
            for n in names.values():
                existing += sorted((out_dir / "masks").glob(f"{glob.escape(n)}.*.tif"))
        resume = state.matches(record)
        if existing and not resume:
            why = state.mismatch(record)
            logger.error(
                "%s already holds results%s (%s%s); pass --overwrite or choose another output "
                "folder (the same command resumes a stopped run)",
                args.output,
                why,
                existing[0].name,
                f" and {len(existing) - 1} more" if len(existing) > 1 else "",
            )
            return 2
        if not resume and state.exists() and not state.finished():
            state.clear()  # its empty tables: this run writes its own
    else:
        # The earlier run's results go, also those this run will not write again (its
        # failures, images not among these inputs); the user's own files stay.
        removed = sum(batch.RunState(d).clear() for d in dict.fromkeys([out_dir, spots_dir]))
        if removed:
            logger.info("--overwrite: removed %d file(s) of the earlier run", removed)
        state.reset()
    batch.remove_temporaries([spots_dir, out_dir, out_dir / "masks"])

    from tqdm import tqdm

    cell_columns = ["image", *CELL_COLUMNS]
    # input index -> the image's summary rows (one per time point / channel) and cell
    # rows; written in input order
    rows: dict[int, list[dict]] = {}
    cell_rows: dict[int, list[dict]] = {}
    jobs = []
    # Each image's size and modification time before it is read: recorded with its
    # results, so that a file replaced after that is counted again on resuming.
    stamps = {path: batch.file_stamp(path) for path in images}
    for i, path in enumerate(images):
        done = state.done(names[path], targets[path], path) if resume else None
        if done is not None:
            rows[i], cell_rows[i] = done["rows"], done["cell_rows"]
            continue
        where = tuple(
            (kind, isinstance(found[path], Path), str(found[path])) for kind, found in masks.items()
        )
        jobs.append(batch.Job(i, str(path), names[path], where))
    if resume and not jobs:
        logger.info(
            "%s: all %d image(s) already done; nothing to do (pass --overwrite to run again)",
            args.output,
            len(images),
        )
        return 1 if failures else 0
    if resume:
        logger.info(
            "resuming the run in %s: %d of %d image(s) already done",
            out_dir,
            len(rows),
            len(images),
        )
    state.start(record, keep=resume)

    def present(names, table_rows):
        return [k for k in names if any(r.get(k) is not None for r in table_rows)]

    def write_tables():  # rewritten after each image: an interrupted run keeps them
        # The same columns for every row: the optional ones when any row has them.
        order = sorted(rows)
        summary = [r for i in order for r in rows[i]]
        if summary_path is not None:
            columns = (
                SUMMARY_COLUMNS
                + present(PLANE_COLUMNS + SUMMARY_3D_COLUMNS, summary)
                + (SUMMARY_CELL_COLUMNS if cells_mode else [])
            )
            atomic_write_text(summary_path, table_text(_columns(summary, columns)))
        if cells_path is not None:
            cells = [r for i in order for r in cell_rows[i]]
            columns = cell_columns[:1] + present(PLANE_COLUMNS, cells) + cell_columns[1:]
            atomic_write_text(cells_path, table_text(_columns(cells, columns)))

    t0 = time.time()
    n_total = sum(r["n_spots"] for rs in rows.values() for r in rs)
    n_new = 0
    bar = tqdm(
        total=len(images),
        initial=len(rows),
        desc="images",
        unit="image",
        disable=not _progress_bars(args) or len(images) < 2,
    )
    failed: dict[int, tuple[str, str]] = {}
    client = None
    if args.scheduler is not None or args.workers is not None:
        try:
            client = batch.dask_client(args.scheduler, args.workers)
        except InputError as e:
            bar.close()
            logger.error("%s", e)
            return 2
        logger.info("running on the Dask cluster %s", client.scheduler.address)
        results = batch.run_dask(jobs, opts, client)
    else:
        results = batch.run_serial(jobs, opts, show_tiles=_progress_bars(args))
    try:
        for result in results:
            path = Path(result.path)
            if result.error is not None:
                logger.error("%s", result.error)
                failed[result.index] = (result.path, result.error)
                bar.update(1)
                continue
            atomic_write_text(targets[path], result.spots_text)
            written = []
            if save_masks:
                for kind in ("cells", "nuclei"):
                    if kind in result.segmented:
                        written.append(out_dir / "masks" / f"{names[path]}.{kind}.tif")
                        _write_labels(written[-1], result.segmented[kind])
            state.finish(result, written, stamps[path])
            rows[result.index], cell_rows[result.index] = result.rows, result.cell_rows
            n_total += result.n_spots
            n_new += 1
            write_tables()
            bar.update(1)
            rate = n_new / max(time.time() - t0, 1e-9)
            bar.set_postfix(spots=n_total, img_per_s=f"{rate:.2f}")
    finally:
        results.close()
        if client is not None:
            batch.close_client(client)
    bar.close()
    failures += [failed[i] for i in sorted(failed)]  # in input order, whatever ran first
    # Also when every input failed: a summary with its header and no rows says so (the
    # same command, or a corrected one, can simply be run again).
    write_tables()
    dt = time.time() - t0
    if rows:
        logger.info(
            "%d image(s), %d spots in %.1f s; results in %s", len(rows), n_total, dt, args.output
        )
    if failures:
        logger.error("%d input(s) failed:", len(failures))
        for item, why in failures:
            logger.error("  %s", about(item, why))
        return 1
    return 0


def _columns(rows: list[dict], names: list[str] = SUMMARY_COLUMNS) -> dict[str, list]:
    return {k: [r.get(k) for r in rows] for k in names}


def cmd_detect(args) -> int:
    out = Path(args.output)
    return _run_batch(args, out, None)


def cmd_count(args) -> int:
    out = Path(args.output)
    return _run_batch(args, out / "spots", out / "summary.csv")


def cmd_train(args) -> int:
    import torch

    from .data import load_pairs
    from .train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.init is not None:
        from .io import load_model

        try:  # a damaged model is said before the data are read (and cached for train)
            load_model(args.init)
        except (InputError, OSError) as e:
            logger.error("%s", e)
            return 2
    try:
        pairs = load_pairs(
            args.data, channel=args.channel, columns=args.columns, pixel_size=args.pixel_size
        )
    except (InputError, ValueError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 2
    _preflight(pairs)
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        logger.error("%s exists; choose another folder or pass --overwrite", out)
        return 2
    cfg = TrainConfig(
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        batch_size=args.batch,
        crop=args.crop,
        lr=args.lr,
        seed=args.seed,
        synthetic_fraction=args.synthetic_fraction,
        val_fraction=args.val_fraction,
        workers=args.workers,
        normalization=args.normalization,
    )
    if args.init is None and args.synthetic_fraction == 0 and len(pairs) < 3:
        logger.warning("training from scratch on %d image(s): consider --init default", len(pairs))

    from tqdm import tqdm

    bar = tqdm(
        total=cfg.epochs * cfg.steps_per_epoch,
        desc="training",
        unit="step",
        disable=not _progress_bars(args),
    )

    def progress(info):
        if "step" in info:
            bar.n = info["step"]
            bar.set_postfix(loss=f"{info['loss']:.3f}")
            bar.refresh()
        elif "epoch_done" in info and not args.quiet:
            rec = info["record"]
            val = rec.get("val", {})
            tqdm.write(
                f"epoch {rec['epoch'] + 1}/{cfg.epochs}: loss {rec['loss']:.3f}"
                + (
                    f", validation F1@3 {val['f1_3']:.3f}, integrated F1 {val['f1_int']:.3f}"
                    if val
                    else ""
                )
            )

    try:
        path = train(
            pairs,
            out,
            cfg,
            init=args.init,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=progress,
            description=f"Trained with `piscis train {args.data}`.",
        )
    except (InputError, FileExistsError, ValueError) as e:
        bar.close()
        logger.error("%s", e)
        return 2
    bar.close()
    logger.info("wrote model %s", path)
    return 0


def _preflight(pairs) -> None:
    """Report how many annotations sit on bright pixels: catches x/y swaps and offsets."""
    from .data import annotation_check

    n_bright = n_all = 0
    for pair in pairs:
        bright, total, swapped = annotation_check(pair)
        n_bright, n_all = n_bright + bright, n_all + total
        if total and bright < 0.5 * total:
            hint = (
                "; with y and x exchanged "
                f"{swapped}/{total} would be: are the columns x,y? name them in the header"
                if swapped > max(2 * bright, 0.5 * total)
                else "; check the coordinates (0-based pixels, y then x) and --pixel-size"
            )
            logger.warning(
                "%s: only %d/%d annotations on pixels above background + 3 sigma%s",
                pair.name,
                bright,
                total,
                hint,
            )
    logger.info(
        "pre-flight: %d/%d annotations on pixels above background + 3 sigma", n_bright, n_all
    )


def _pixel_size_arg(text: str) -> tuple[float, ...]:
    """``S``, ``SY,SX`` or ``SZ,SY,SX`` -> the pixel size (the one number, or per axis),
    positive."""
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) not in (1, 2, 3) or not all(0 < v < float("inf") for v in vals):
        msg = f"expected a positive pixel size S, SY,SX or SZ,SY,SX, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return tuple(vals)


def _columns_arg(text: str) -> tuple[str, ...]:
    names = tuple(c.strip().lower() for c in text.split(","))
    if "y" not in names or "x" not in names:
        raise argparse.ArgumentTypeError(f"the columns must name y and x, got {text!r}")
    return names


def _csv_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pixel-size",
        type=_pixel_size_arg,
        default=None,
        metavar="S|SY,SX|SZ,SY,SX",
        help="the spot CSVs are in physical units (e.g. um) with this pixel size: "
        "coordinates are divided by it (tables with a z column need SZ,SY,SX)",
    )
    p.add_argument(
        "--columns",
        type=_columns_arg,
        default=None,
        metavar="NAMES",
        help="column names of spot CSVs without a header row, e.g. y,x, x,y,class or "
        "z,y,x (a header row naming the coordinates elsewhere is refused)",
    )


EVALUATE_HELP = """\
Matching: predictions and true spots are paired one to one (Hungarian) on Euclidean
distance; F1@r = 2 TP / (n_pred + n_true) at r = 1, 2, 3 px;
F1int is F1 averaged over cut-offs 0..3 px; prec, recall and loc_err (mean distance of
the pairs) are at 3 px. 3D: when both tables have a z column (in slices), a pair at
cut-off r must lie within r px in yx and within r slices in z (the tolerance of the
field cases, 1.5 px and 1.5 slices, at r = 1.5), for every figure; loc_err is then the
(z, y, x) distance. A z column in one table only: matched in yx, with a warning.
Folders are paired by image name; a file without its partner is reported and left
out; a CSV that cannot be read is reported and the others are scored (exit 1).
With several images, 'mean' averages the images' rows and 'pooled' scores all their
spots together (an image with no spot and no prediction weighs nothing there)."""


def cmd_evaluate(args) -> int:
    """Score predicted against true spots, one line per image (and their mean).

    Tables with a z column on both sides are matched in 3D with the cylinder tolerance
    of :func:`piscis.metrics.match` (cut-off r: r px in yx and r slices in z), see
    :data:`EVALUATE_HELP`. Exit 0; 1 when some pair could not be read (the others are
    scored); 2 when nothing could be scored.
    """
    from .metrics import mean_scores, pooled_scores

    pred, true = Path(args.pred), Path(args.truth)
    for path in (pred, true):
        if not path.exists():
            logger.error("%s: no such file or folder", path)
            return 2
    if pred.is_dir() != true.is_dir():
        logger.error("PRED and TRUTH must both be CSV files or both folders")
        return 2
    if pred.is_dir():
        # Paired by image name: "cells.csv" with "cells.csv", "cells.truth.csv" or
        # "cells.spots.csv" (the name piscis count gives, and a common truth name).
        preds, truths = _csvs_by_image(pred, "prediction"), _csvs_by_image(true, "truth")
        for name in sorted(set(truths) - set(preds)):
            logger.warning("%s: no prediction for %s in %s", truths[name], name, pred)
        for name in sorted(set(preds) - set(truths)):
            logger.warning("%s: no truth for %s in %s", preds[name], name, true)
        pairs = [(name, preds[name], truths[name]) for name in sorted(set(preds) & set(truths))]
    else:
        pairs = [(_image_name(pred), pred, true)]
    if not pairs:
        logger.error("no prediction/truth pairs to compare")
        return 2
    scores, n_failed = [], 0
    for name, p, t in pairs:
        try:
            s = _score_pair(name, p, t, args)
        except InputError as e:
            logger.error("%s", e)  # this pair only: the others are scored
            n_failed += 1
            continue
        if not scores:
            print(
                f"{'image':30s} {'n_pred':>6s} {'n_true':>6s} {'F1@1':>6s} {'F1@2':>6s} "
                f"{'F1@3':>6s} {'F1int':>6s} {'prec':>6s} {'recall':>6s} {'loc_err':>7s}"
            )
        scores.append(s)
        print(_score_line(name[:30], vars(s)))
    if len(scores) > 1:
        print(_score_line("mean", mean_scores(scores)))
        print(_score_line("pooled", pooled_scores(scores)))
    if n_failed:
        logger.error("%d of %d pair(s) could not be scored", n_failed, len(pairs))
        return 1 if scores else 2
    return 0


def _csvs_by_image(folder: Path, role: str) -> dict[str, Path]:
    """The CSVs of a folder by image name; a second one for the same image is reported
    and left out."""
    found: dict[str, Path] = {}
    for f in sorted(folder.glob("*.csv")):
        name = _image_name(f)
        if name in found:
            logger.warning(
                "%s: another %s for %s (%s is used), left out", f, role, name, found[name]
            )
            continue
        found[name] = f
    return found


def _score_pair(name: str, pred: Path, true: Path, args):
    """The scores of one prediction/truth pair: in 3D (cylinder) when both have z."""
    from .io import read_spots
    from .metrics import score

    opts = {"columns": args.columns, "pixel_size": args.pixel_size, "zyx": True}
    p, t = read_spots(pred, **opts), read_spots(true, **opts)
    if p.shape[1] != t.shape[1]:
        with_z = pred if p.shape[1] == 3 else true
        logger.warning("%s: only %s has a z column; matched in yx", name, with_z)
        p, t = p[:, -2:], t[:, -2:]
    return score(p, t, cylinder=p.shape[1] == 3)


def _image_name(path: Path) -> str:
    """The image a spot CSV belongs to: its name less ``.csv`` and a ``.truth``,
    ``.true``, ``.gt``, ``.spots`` or ``.pred`` before it."""
    stem = path.stem
    head, dot, tail = stem.rpartition(".")
    return head if dot and head and tail.lower() in _CSV_ROLES else stem


_CSV_ROLES = {"truth", "true", "gt", "spots", "pred"}


def _score_line(name, s) -> str:
    return (
        f"{name:30s} {s['n_pred']:6.0f} {s['n_true']:6.0f} {s['f1_1']:6.3f} {s['f1_2']:6.3f} "
        f"{s['f1_3']:6.3f} {s['f1_int']:6.3f} {s['precision']:6.3f} {s['recall']:6.3f} "
        f"{s['loc_error']:7.3f}"
    )


# --------------------------------------------------------------------------- parser


def _voxel_size(text: str) -> tuple[float, ...]:
    """``--voxel-size 0.3,0.1,0.1`` (Z,Y,X) or ``0.1,0.1`` (Y,X), in micrometres."""
    parts = [t for t in text.replace("x", ",").replace(" ", ",").split(",") if t]
    try:
        values = tuple(float(t) for t in parts)
    except ValueError:
        values = ()
    if len(values) not in (2, 3) or not all(np.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give 3 (Z,Y,X) or 2 (Y,X) positive sizes in micrometres, e.g. 0.3,0.1,0.1"
        )
    return values


def _detection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders of images, or glob patterns ('data/*.tif')",
    )
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument(
        "--model",
        default=None,
        help="a shipped model name or a model folder (default: the shipped 'default')",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="spot probability threshold (default: the model's own)",
    )
    p.add_argument(
        "--channel",
        type=_channel_arg,
        default=None,
        help="channel of the spots in multi-channel images (0-based; default: every "
        "channel separately, with a c column)",
    )
    p.add_argument(
        "--axes",
        type=_axes_arg,
        default=None,
        help="axes of the file, overriding its metadata: letters T, C, Z, Y, X, e.g. ZYX, "
        "YXZ, CYX, YXC, ZCYX, TZCYX (see the README on input axes)",
    )
    p.add_argument(
        "--project",
        action="store_true",
        help="max-project z-stacks and detect in 2D (default: 3D detection in z-stacks)",
    )
    p.add_argument(
        "--voxel-size",
        type=_voxel_size,
        default=None,
        metavar="Z,Y,X",
        help="pixel size in micrometres, Z,Y,X (or Y,X for 2D images), overriding the "
        "file's ImageJ/OME calibration",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        help="resize factor before detection; < 1 for spots larger than 2-3 px",
    )
    p.add_argument(
        "--tile-size",
        type=_tile_size_arg,
        default=1024,
        help="tile core size in pixels; memory is bounded by it (default 1024; smaller "
        "than 256 counts as 256, as it would only cost time)",
    )
    p.add_argument(
        "--min-snr",
        type=float,
        default=None,
        help="drop spots whose matched-filter signal-to-noise ratio is below this "
        "(default: the model's own, 5; 0 keeps every spot above the threshold)",
    )
    p.add_argument(
        "--min-planes",
        type=_min_planes_arg,
        default=None,
        metavar="N",
        help="z-stacks: planes a spot must be seen in (default 2; 1 for stacks of fewer "
        "than 3 planes); 1 when the z step is as coarse as the spots are deep",
    )
    p.add_argument(
        "--roi",
        type=_roi_arg,
        default=None,
        metavar="Y0,X0,H,W",
        help="only the spots in this rectangle (pixels; clipped to each image; the "
        "network still sees its surroundings, so the spots are the whole image's)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing results: the earlier run's files (those its run record "
        "names) are removed first (without it, the same command resumes a stopped run)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        default=None,
        help="run one task per image on this dask.distributed scheduler (tcp://HOST:PORT); "
        "needs pip install 'piscis[dask]'",
    )
    g.add_argument(
        "--workers",
        type=int,
        metavar="N",
        default=None,
        help="run on a local Dask cluster of N worker processes of one thread each; "
        "needs pip install 'piscis[dask]'",
    )


def _tile_size_arg(text: str) -> int:
    try:
        return whole_pixels(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}, got {text!r}") from None


def _channel_arg(text: str) -> int:
    """A channel number, 0-based; a negative one is refused (as a Python index, -1 would
    silently be the last channel)."""
    try:
        n = int(text)
    except ValueError:
        msg = f"expected a channel number, 0 or more, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if n < 0:
        raise argparse.ArgumentTypeError(
            f"channels are numbered from 0 (the first), got {text!r}; negative numbers are "
            "not taken"
        )
    return n


def _min_planes_arg(text: str) -> int:
    try:
        return whole_pixels(text, "planes")
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}, got {text!r}") from None


def _axes_arg(text: str) -> str:
    """``--axes``: letters wrong for any image (unknown, repeated, no Y or X) are refused
    here, once; the text itself is kept (the run record holds it as given)."""
    from .io import axes_problem

    problem = axes_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def _roi_arg(text: str) -> tuple[float, float, float, float]:
    """``Y0,X0,H,W`` -> four numbers; a zero or negative size, or a number that is not
    finite, is refused here (once, not image by image)."""
    try:
        y0, x0, h, w = (float(v) for v in text.split(","))
    except ValueError:
        msg = f"expected Y0,X0,H,W (four numbers, pixels), got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not all(np.isfinite(v) for v in (y0, x0, h, w)):
        msg = f"the ROI {text!r} holds a number that is not finite; give four numbers, pixels"
        raise argparse.ArgumentTypeError(msg)
    if not (h > 0 and w > 0):
        msg = f"the ROI {text!r} is empty (height {h:g}, width {w:g}); give a positive size"
        raise argparse.ArgumentTypeError(msg)
    return y0, x0, h, w


CELLS_HELP = """\
Spots per cell: give label masks (0 = background, one id per cell; TIFF, .npy, Cellpose
_seg.npy or PNG) with --cells/--nuclei, or segment nuclei with --nuclei-channel (cells are
then the nuclei grown by --expand px, or a watershed on --cytoplasm-channel); with
--nuclei alone the cells are the given nuclei grown by --expand. Masks are matched to
images by name: for image S.tif (S.ome.tif...) a mask in the folder named S or S_seg,
S_masks, S_mask, S_labels, S_cp_masks, S.labels, S.mask or S-labels (case-insensitive),
.tif/.tiff/.npy/.png, preferred in that order; with a pattern such as 'm/*_cells.tif' the
'*' also stands for S. A single file is allowed when there is one image. An image whose
mask is missing or of another shape fails (the others go on; exit code 1). A spot belongs
to the cell at its rounded pixel (.5 rounds up). Channels of multi-channel files (CYX,
YXC, ZCYX...) come from the ImageJ/OME metadata or --axes; --channel is the spot channel.
Adds cell_id,in_nucleus to the spot tables, DIR/cells.csv (one row per cell, every
labelled cell) and n_cells,n_spots_in_cells to DIR/summary.csv."""


def _cell_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cells", CELLS_HELP)
    g.add_argument(
        "--cells",
        metavar="DIR_OR_PATTERN",
        default=None,
        help="cell masks: a folder, a glob pattern, or one file for one image",
    )
    g.add_argument(
        "--nuclei",
        metavar="DIR_OR_PATTERN",
        default=None,
        help="nucleus masks, matched as for --cells",
    )
    g.add_argument(
        "--nuclei-channel",
        type=_channel_arg,
        metavar="N",
        default=None,
        help="segment nuclei in channel N (e.g. DAPI) of each image",
    )
    g.add_argument(
        "--cytoplasm-channel",
        type=_channel_arg,
        metavar="N",
        default=None,
        help="cells by a watershed on channel N, seeded by the nuclei",
    )
    g.add_argument(
        "--nucleus-diameter",
        type=float,
        metavar="PX",
        default=None,
        help="expected nucleus diameter in pixels (default 30)",
    )
    g.add_argument(
        "--min-nucleus-area",
        type=float,
        metavar="PX",
        default=None,
        help="smallest nucleus area in pixels (default 10%% of a disk of that diameter)",
    )
    g.add_argument(
        "--expand",
        type=float,
        metavar="PX",
        default=None,
        help="grow nuclei into cells by at most PX pixels (default 15; 0: the "
        "nuclei are the cells)",
    )
    g.add_argument(
        "--save-masks",
        action="store_true",
        help="write the masks we segment to DIR/masks/<image>.cells.tif and <image>.nuclei.tif",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="piscis", description="Spot detection for fluorescence microscopy."
    )
    ap.add_argument("--version", action="version", version=f"piscis {__version__}")
    # -v / -q work before or after the command name.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="more log messages"
    )
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="errors only, no progress bar",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="more log messages")
    ap.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress bar")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "detect", parents=[common], help="write DIR/<image>.csv of spots for each image"
    )
    _detection_options(p)
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser(
        "count",
        parents=[common],
        help="spots per image (and cell): DIR/spots/<image>.csv, DIR/summary.csv, DIR/cells.csv",
    )
    _detection_options(p)
    _cell_options(p)
    p.set_defaults(func=cmd_count)

    p = sub.add_parser(
        "train", parents=[common], help="train or fine-tune a model on image + CSV pairs"
    )
    p.add_argument("data", help="folder of NAME.tif/.png + NAME.csv (+ NAME.mask.tif) pairs")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="new model folder (an existing one is refused unless --overwrite)",
    )
    p.add_argument(
        "--init",
        default=None,
        help="model to fine-tune (name or folder), e.g. 'default'; without it the network "
        "starts from random weights and needs far more data and epochs",
    )
    p.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    p.add_argument("--steps", type=int, default=100, help="steps per epoch (default 100)")
    p.add_argument("--batch", type=int, default=16, help="crops per step (default 16)")
    p.add_argument("--crop", type=int, default=96, help="crop size in pixels (default 96)")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of the pairs held out for validation (default 0.2)",
    )
    p.add_argument(
        "--synthetic-fraction",
        type=float,
        default=0.3,
        help="share of each batch drawn from the synthetic generator (default 0.3)",
    )
    p.add_argument(
        "--channel",
        type=_channel_arg,
        default=None,
        help="channel of multi-channel training images (0-based)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=1, help="processes drawing training crops")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on 2 cores)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    p.add_argument(
        "--normalization",
        choices=["image", "crop"],
        default="image",
        help="statistics of the network input in training: each training image's own "
        "(default, as at inference) or each crop's; saved in the model",
    )
    _csv_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate",
        parents=[common],
        help="F1 at 1/2/3 px, integrated F1, precision, recall",
        description="F1 at 1/2/3 px, integrated F1, precision and recall of predicted "
        "against true spots.",
        epilog=EVALUATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pred", help="predicted spots: a CSV or a folder of CSVs")
    p.add_argument(
        "truth",
        help="true spots: a CSV or a folder of CSVs, paired by image name (NAME.csv, "
        "NAME.truth.csv, NAME.gt.csv and NAME.spots.csv all belong to image NAME)",
    )
    _csv_options(p)
    p.set_defaults(func=cmd_evaluate)
    return ap


def _in_output(e: OSError, args) -> bool:
    """Whether the file of an error is an output: in the output folder (``-o``) or
    beside it (the folder itself, a model's temporary folder), not an input."""
    out = getattr(args, "output", None)
    if not e.filename or out is None:
        return False
    path, out = Path(os.fsdecode(e.filename)).absolute(), Path(out).absolute()
    return path == out or path.is_relative_to(out) or path.parent == out.parent


def _progress_bars(args) -> bool:
    """Progress bars only on a terminal: in a file (``2> log.txt``) or a pipe they are
    lines of carriage returns that log lines glue to. ``-q`` hides them too."""
    isatty = getattr(sys.stderr, "isatty", None)
    return not args.quiet and bool(isatty and isatty())


class _LogHandler(logging.StreamHandler):
    """Log lines through tqdm.write: on a terminal a line goes above the progress bar,
    never glued to it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001  (logging must not raise)
            self.handleError(record)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.ERROR if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    handler = _LogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("piscis")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        logger.error(
            "interrupted; finished outputs are complete, the others were not written "
            "(the same command again resumes the run)"
        )
        return 130
    except OSError as e:
        # The machine refused (a read-only or full disk, an output path that is a file,
        # no permission): one line that names the path, not a traceback.
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        what = e.strerror or str(e) or type(e).__name__
        if isinstance(e, (FileExistsError, NotADirectoryError)):
            what = "a file is in the way of an output folder (give another -o)"
        elif isinstance(e, IsADirectoryError):
            what = "a folder is in the way of an output file"
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and _in_output(e, args):
            # Creating a file (a lock, a temporary file) in the folder failed: name the
            # folder, not a temporary file's name the user never chose.
            folder = Path(e.filename).parent
            where = f"{folder}: "
            what = (
                f"this folder is not writable ({what}); make it writable or choose another "
                "output folder (-o)"
            )
        logger.error("%s%s; outputs finished before this are complete", where, what)
        return 1


if __name__ == "__main__":
    sys.exit(main())
