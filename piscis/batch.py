"""Many images: one pure function per image, run in this process or on a Dask cluster,
and a run record that lets a stopped run resume.

:func:`run_image` turns one image into its results (the spot table as CSV text, the
summary row, the cell rows and any segmented masks) without writing anything; the
serial loop, a local cluster (``--workers N``) and a remote dask.distributed scheduler
(``--scheduler ADDRESS``) all call it, so their files are byte for byte the same. Only
the calling process writes, each file through a temporary file and a rename, in this
order: the spot table, the masks, then the image's completion record. The run record
(:class:`RunState`, ``OUTPUT/.piscis-run.jsonl``) holds the options of the run and one line per
finished image; the same command run again skips the images whose record is there.

A huge image streamed from its file (:mod:`piscis.lazy`) is split on a cluster into
bands of tile rows, one task each, after one task has measured its normalisation.

dask, distributed and zarr are optional: ``pip install 'piscis[dask]'``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .io import InputError, about, whole_pixels
from .lazy import out_of_memory

logger = logging.getLogger(__name__)

__all__ = [
    "FolderBusy",
    "Job",
    "OutputLock",
    "Plan",
    "Result",
    "RunState",
    "dask_client",
    "local_cluster",
    "require_dask",
    "run_band",
    "run_dask",
    "run_image",
    "run_serial",
]

RECORD_NAME = ".piscis-run.jsonl"  # the run record, inside the output folder
LOCK_NAME = ".piscis.lock"  # held by the run writing to the output folder
SPLIT_PIXELS = 4096 * 4096  # streamed images larger than this are split into bands on a cluster
BAND_ROWS = 2  # tile rows per band task
# The options that make two runs the same command (-q, -v, --scheduler, --workers,
# --overwrite do not change the results).
RECORD_OPTIONS = (
    "threshold",
    "scale",
    "tile_size",
    "min_snr",
    "min_planes",
    "channel",
    "axes",
    "project",
    "voxel_size",
    "roi",
    "cells",
    "nuclei",
    "nuclei_channel",
    "cytoplasm_channel",
    "nucleus_diameter",
    "min_nucleus_area",
    "expand",
    "save_masks",
    "cells_mode",
)
# Errors that fail one image (the others go on). RuntimeError: torch's own
# out-of-memory error on a CPU.
IMAGE_ERRORS = (InputError, ValueError, TypeError, OSError, MemoryError, RuntimeError)
MODEL_LOADS = 0  # how many times this process loaded a model (once per worker)
_MODELS: dict[str, object] = {}


@dataclass(frozen=True)
class Job:
    """One image of a run: its place in the input order, file, output stem and masks."""

    index: int
    path: str  # as the user gave it: how results and messages name the image
    name: str
    masks: tuple = ()  # ((kind, found, the mask's path or the reason there is none), ...)
    file: str | None = None  # where a worker reads it (an absolute path); None: ``path``


@dataclass
class Result:
    """What one image gives; ``error`` set when it failed."""

    index: int
    path: str
    name: str
    error: str | None = None
    spots_text: str = ""
    rows: list = field(default_factory=list)  # summary rows, one per time point / channel
    cell_rows: list = field(default_factory=list)
    n_spots: int = 0
    segmented: dict = field(default_factory=dict)
    logs: list = field(default_factory=list)  # (level, message) from a worker


@dataclass
class Plan:
    """A huge streamed image to split: its normalisation and number of tile rows."""

    norm: object
    n_rows: int
    shape: tuple


# --------------------------------------------------------------------------- the work


def _model(spec: str):
    """The model, loaded once per process (a worker keeps it for all its tasks)."""
    global MODEL_LOADS
    if spec not in _MODELS:
        from .io import load_model

        _MODELS[spec] = load_model(spec)
        MODEL_LOADS += 1
    return _MODELS[spec]


def _worker_setup() -> None:
    """One torch thread per Dask worker (each worker is one process of one thread)."""
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


class _Capture(logging.Handler):
    """Collects the 'piscis' log records of a task (its own thread's), for the client."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.thread = threading.get_ident()
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.records.append((record.levelno, record.getMessage()))


# Tasks of an in-process cluster run in threads at once: the 'piscis' logger stops
# propagating while any of them captures, and is put back when the last one ends.
_CAPTURE_LOCK = threading.Lock()
_CAPTURING = [0, True]  # tasks capturing now, the logger's own propagate


def _start_capture(log: logging.Logger) -> _Capture:
    handler = _Capture()
    with _CAPTURE_LOCK:
        if _CAPTURING[0] == 0:
            _CAPTURING[1] = log.propagate
            log.propagate = False
        _CAPTURING[0] += 1
        log.addHandler(handler)
    return handler


def _stop_capture(log: logging.Logger, handler: _Capture) -> None:
    with _CAPTURE_LOCK:
        log.removeHandler(handler)
        _CAPTURING[0] -= 1
        if _CAPTURING[0] == 0:
            log.propagate = _CAPTURING[1]


def _streamed(path: Path, opts) -> object | None:
    """The lazy plane when the image is to be streamed from its file, else None."""
    from .lazy import is_zarr, open_lazy

    if is_zarr(path):
        if opts.cells_mode:
            msg = f"{path}: per-cell counts are not available for Zarr input; convert to TIFF"
            raise InputError(msg)
        if getattr(opts, "roi", None) is not None:
            msg = f"{path}: --roi is not available for Zarr input; convert to TIFF or crop it"
            raise InputError(msg)
        return open_lazy(path, channel=opts.channel, axes=opts.axes)
    if opts.cells_mode or getattr(opts, "roi", None) is not None:
        return None  # whole-image reading (a ROI crops with its context there)
    if path.suffix.lower() not in {".tif", ".tiff", ".btf", ".tf8"}:
        return None
    scale = opts.scale if opts.scale is not None else _model(opts.model).scale
    if scale != 1.0:
        return None
    try:
        plane = open_lazy(path, channel=opts.channel, axes=opts.axes)
    except InputError:
        return None  # the in-memory reader gives the message (or reads what this cannot)
    if plane.size <= opts.stream_pixels or _short_of_pixels(path):
        return None  # small, or a corrupt size: the in-memory reader and its checks
    return plane


def _short_of_pixels(path: Path) -> bool:
    """An uncompressed TIFF smaller than the pixels its tags declare (corrupt tags)."""
    import tifffile

    from .io import tifffile_notes

    try:
        with tifffile_notes(path), tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            raw = all(int(p.compression) == 1 for p in series.pages if p is not None)
            return raw and series.nbytes > path.stat().st_size
    except Exception:
        return True


def _result(job: Job, opts, planes: list) -> Result:
    """The result of an image from its planes (:class:`piscis.cli._Plane`, one per time
    point and channel): one summary row per plane, the spot table, the cell rows."""
    from .cli import _merged_table
    from .io import table_text

    model = _model(opts.model)
    threshold = model.threshold if opts.threshold is None else opts.threshold
    rows, cell_rows = [], []
    for p in planes:
        row = {
            "image": job.path,
            "n_spots": len(p.table["y"]),
            "height": int(p.shape[-2]),
            "width": int(p.shape[-1]),
            "threshold": threshold,
            "model": model.name,
            **p.index,
        }
        if len(p.shape) == 3:
            row["depth"] = int(p.shape[0])
        if opts.cells_mode:
            row["n_cells"] = len(p.cell_rows)
            row["n_spots_in_cells"] = int(np.count_nonzero(np.asarray(p.table["cell_id"]) > 0))
            cell_rows.extend({"image": job.path, **p.index, **r} for r in p.cell_rows)
        rows.append(row)
    return Result(
        job.index,
        job.path,
        job.name,
        spots_text=table_text(_merged_table(planes)),
        rows=rows,
        cell_rows=cell_rows,
        n_spots=sum(r["n_spots"] for r in rows),
        segmented=planes[0].segmented if planes else {},
    )


def _spots_result(job: Job, opts, spots, shape) -> Result:
    from .cli import _Plane

    if len(spots) == 0:
        logger.warning("%s: no spots detected", job.path)
    return _result(job, opts, [_Plane({}, tuple(shape), dict(spots.columns()), [])])


def run_image(
    job: Job,
    opts,
    *,
    capture: bool = False,
    split: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Result | Plan:
    """Count the spots of one image; write nothing. The same in every process.

    ``opts`` holds the command's options (:func:`task_options`). With ``capture`` the
    log messages come back in the result instead of being emitted here (for a
    worker). With ``split`` a huge streamed image is not run but returned as a
    :class:`Plan` for :func:`run_band` tasks.
    """
    _worker_setup()
    log = logging.getLogger("piscis")
    handler = _start_capture(log) if capture else None
    try:
        out = _run_image(job, opts, split, progress)
    except (*IMAGE_ERRORS, NotImplementedError) as e:
        msg = _as_given(job, str(e) or type(e).__name__)
        if out_of_memory(e) and "--tile-size" not in msg:
            msg = _memory_advice(job, opts, msg)
        msg = about(job.path, msg)
        out = Result(job.index, job.path, job.name, error=msg)
    finally:
        if handler is not None:
            _stop_capture(log, handler)
    if handler is not None and isinstance(out, Result):
        out.logs = [(level, _as_given(job, m)) for level, m in handler.records]
    return out


def _memory_advice(job: Job, opts, text: str) -> str:
    """The message of an image whose detection ran out of memory (C18): the tiles bound
    the memory, so it suggests half the tile size, or the smallest that is not raised
    (:func:`piscis.detect.smallest_core`)."""
    from .detect import smallest_core

    smallest = smallest_core(_model(opts.model).net)
    current = max(int(opts.tile_size), smallest)
    if current > smallest:
        # The wording of lazy.check_memory's message, whose "(e.g. N)" scripts may read.
        advice = f"pass a smaller --tile-size (e.g. {max(current // 2, smallest)})"
    else:
        advice = (
            f"--tile-size {current} is already the smallest useful; free memory, or crop "
            "or split the image"
        )
    return f"{job.path}: memory ran out during detection ({text}); {advice}"


def _as_given(job: Job, message: str) -> str:
    """A message naming the image as the user named it (not by a worker's absolute path)."""
    return message if job.file is None else message.replace(job.file, job.path)


def _image_task(job: Job, opts) -> Result | Plan:
    """:func:`run_image` as a cluster task: messages come back, huge images are split."""
    return run_image(job, opts, capture=True, split=True)


def _run_image(job: Job, opts, split: bool, progress) -> Result | Plan:
    from .cli import _count_one
    from .lazy import detect_lazy, lazy_normalization, tile_rows

    path = Path(job.file or job.path)
    model = _model(opts.model)
    plane = _streamed(path, opts)
    if plane is not None and plane.volume is not None and not getattr(opts, "project", False):
        from .detect import detect

        volume = plane.volume  # 3D detection, read plane by plane
        voxel = getattr(opts, "voxel_size", None)
        spots = detect(
            volume,
            model,
            threshold=opts.threshold,
            scale=opts.scale,
            tile_size=opts.tile_size,
            min_snr=opts.min_snr,
            name=str(path),
            progress=progress,
            spacing=tuple(voxel) if voxel is not None and len(voxel) == 3 else None,
            min_planes=getattr(opts, "min_planes", None),
        )
        return _spots_result(job, opts, spots, volume.shape)
    if plane is not None:
        if split and plane.size > opts.split_pixels:
            n_rows = tile_rows(plane.shape, model, opts.tile_size)
            if n_rows > BAND_ROWS:
                norm = lazy_normalization(plane, model.compression, model.contrast_ratio)
                return Plan(norm, n_rows, plane.shape)
        spots = detect_lazy(
            plane,
            model,
            threshold=opts.threshold,
            scale=opts.scale,
            tile_size=opts.tile_size,
            min_snr=opts.min_snr,
            name=str(path),
            progress=progress,
        )
        return _spots_result(job, opts, spots, plane.shape)
    masks = {kind: {path: Path(where) if found else where} for kind, found, where in job.masks}
    return _result(job, opts, _count_one(path, opts, model, masks))


def run_band(job: Job, opts, plan: Plan, rows: tuple[int, int]):
    """The spots of tile rows ``rows`` (start, stop) of a planned image (a task)."""
    from .lazy import detect_blocks, open_lazy

    _worker_setup()
    model = _model(opts.model)
    plane = open_lazy(job.file or job.path, channel=opts.channel, axes=opts.axes)
    threshold = model.threshold if opts.threshold is None else opts.threshold
    min_snr = model.min_snr if opts.min_snr is None else opts.min_snr
    return detect_blocks(plane, model, plan.norm, threshold, range(*rows), opts.tile_size, min_snr)


def merge_bands(job: Job, opts, plan: Plan, parts: list) -> Result:
    """The result of a split image from its bands (in the calling process)."""
    from .lazy import merge_parts

    n_nonfinite = sum(p.n_nonfinite for p in parts)
    if n_nonfinite:
        logger.warning(
            "%s: %d non-finite (NaN or infinite) pixels are ignored", job.path, n_nonfinite
        )
    from .lazy import open_lazy

    plane = open_lazy(job.file or job.path, channel=opts.channel, axes=opts.axes)
    spots = merge_parts(parts, plane, plan.norm.noise, job.path)
    return _spots_result(job, opts, spots, plan.shape)


def stream_pixels(default: int) -> int:
    """The environment's PISCIS_STREAM_PIXELS (a plane size in pixels), else ``default``."""
    text = os.environ.get("PISCIS_STREAM_PIXELS")
    if text is None:
        return int(default)
    try:
        return whole_pixels(text)
    except ValueError as e:
        raise InputError(f"PISCIS_STREAM_PIXELS={text!r}: {e}") from None


def task_options(args, model_path: str) -> argparse.Namespace:
    """The options a task needs (picklable), from the command's arguments."""
    keep = {k: getattr(args, k, None) for k in RECORD_OPTIONS}
    keep["tile_size"] = args.tile_size
    keep["cells_mode"] = bool(getattr(args, "cells_mode", False))
    # When to stream an image from its file, and to split it on a cluster: they change
    # memory and tasks, never the results.
    from . import lazy

    keep["stream_pixels"] = stream_pixels(lazy.STREAM_PIXELS)
    keep["split_pixels"] = SPLIT_PIXELS
    return argparse.Namespace(model=model_path, **keep)


# --------------------------------------------------------------------------- executors


def run_serial(jobs: list[Job], opts, show_tiles: bool = False) -> Iterator[Result]:
    """Run the jobs one after the other in this process, in order.

    With ``show_tiles`` a streamed image gets a progress bar of its tiles.
    """
    for job in jobs:
        tiles = _TileBar(show_tiles)
        try:
            yield run_image(job, opts, progress=tiles)
        finally:
            tiles.close()


class _TileBar:
    """A second progress bar, for the tiles of a streamed image."""

    def __init__(self, show: bool):
        self.show, self.bar = show, None

    def __call__(self, done: int, total: int) -> None:
        if not self.show or total < 2:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="tiles", unit="tile", leave=False)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def local_cluster(n_workers: int | None = None, **kwargs):
    """A dask.distributed LocalCluster as piscis runs one: ``n_workers`` processes of
    one thread each, bound to 127.0.0.1, without a dashboard: neither the scheduler nor
    the workers open an HTTP port (:mod:`piscis._cluster`; dask's own classes open one
    even with ``dashboard_address=None``), unless ``dashboard_address`` is given.

    Dask's nanny starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536``; fixing that
    glibc setting also fixes its mmap threshold, so that every array over 128 kB is
    mapped and unmapped afresh, which made detection about 25% slower in a worker
    (measured: 30 images of 1024 x 1024, 36.1 s against 28.7 s). The workers here get
    glibc's own adaptive thresholds.
    """
    import functools

    import dask
    from distributed import LocalCluster, Nanny

    from ._cluster import QuietCluster, QuietWorker

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the workers inherit it
    options = (
        dict(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        )
        | kwargs
    )
    cls = LocalCluster
    if options["dashboard_address"] is None:
        cls = QuietCluster
        quiet = functools.partial(Nanny, worker_class=QuietWorker)
        options.setdefault("worker_class", quiet if options["processes"] else QuietWorker)
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return cls(**options)


def require_dask() -> None:
    """Raise :class:`InputError` naming the extra to install when dask.distributed is
    missing."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        msg = "--scheduler and --workers need dask.distributed: pip install 'piscis[dask]'"
        raise InputError(msg) from None


def dask_client(scheduler: str | None = None, workers: int | None = None):
    """A dask.distributed client: of a running scheduler, or of a new local cluster
    (:func:`local_cluster`)."""
    require_dask()
    from distributed import Client

    if scheduler is not None:
        try:
            return Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as e:
            raise InputError(f"--scheduler {scheduler}: cannot connect ({e})") from None
    cluster = local_cluster(workers, silence_logs=logging.ERROR)
    client = Client(cluster)
    client._piscis_cluster = cluster  # closed with the client by run_dask's caller
    return client


def close_client(client) -> None:
    cluster = getattr(client, "_piscis_cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


def run_dask(jobs: list[Job], opts, client, retries: int = 1) -> Iterator[Result]:
    """Run the jobs on a Dask cluster, one task per image (per band of a huge image).

    Results come as they finish; a task that raises or loses its worker is submitted
    again up to ``retries`` times, then its image is reported as failed.
    """
    from distributed import as_completed

    def submit(func, *a, key_prefix):
        return client.submit(func, *a, pure=False, key=f"{key_prefix}-{time.monotonic_ns()}")

    tasks: dict = {}  # future -> (kind, job, extra, attempt)
    for job in jobs:
        # Workers may run elsewhere: absolute paths for the image and its masks.
        masks = tuple((k, f, str(Path(w).resolve()) if f else w) for k, f, w in job.masks)
        job = dataclasses.replace(job, file=str(Path(job.file or job.path).resolve()), masks=masks)
        fut = submit(_image_task, job, opts, key_prefix=f"piscis-image-{job.index}")
        tasks[fut] = ("image", job, None, 0)
    bands: dict[int, dict] = {}  # job index -> {"plan", "parts": {start: Part}, "n"}
    queue = as_completed(list(tasks))
    for fut in queue:
        kind, job, extra, attempt = tasks.pop(fut)
        try:
            out = fut.result()
        except Exception as e:  # noqa: BLE001  (any task failure: retry, then report)
            fut.release()
            if attempt < retries:
                logger.warning("%s: task failed (%s: %s); retrying", job.path, type(e).__name__, e)
                if kind == "image":
                    new = submit(
                        run_image,
                        job,
                        opts,
                        True,
                        True,
                        None,
                        key_prefix=f"piscis-image-{job.index}",
                    )
                else:
                    new = submit(
                        run_band,
                        job,
                        opts,
                        bands[job.index]["plan"],
                        extra,
                        key_prefix=f"piscis-band-{job.index}",
                    )
                tasks[new] = (kind, job, extra, attempt + 1)
                queue.add(new)
                continue
            bands.pop(job.index, None)
            failed = {f for f, t in tasks.items() if t[1].index == job.index}
            for f in failed:
                tasks.pop(f)
                f.cancel()
            msg = f"{job.path}: failed twice on the cluster ({type(e).__name__}: {e})"
            yield Result(job.index, job.path, job.name, error=msg)
            continue
        fut.release()
        if kind == "image" and isinstance(out, Plan):
            starts = list(range(0, out.n_rows, BAND_ROWS))
            bands[job.index] = {"plan": out, "parts": {}, "n": len(starts)}
            for s in starts:
                rows = (s, min(out.n_rows, s + BAND_ROWS))
                new = submit(run_band, job, opts, out, rows, key_prefix=f"piscis-band-{job.index}")
                tasks[new] = ("band", job, rows, 0)
                queue.add(new)
            continue
        if kind == "band":
            if job.index not in bands:  # the image already failed
                continue
            entry = bands[job.index]
            entry["parts"][extra[0]] = out
            if len(entry["parts"]) < entry["n"]:
                continue
            del bands[job.index]
            parts = [entry["parts"][k] for k in sorted(entry["parts"])]
            yield merge_bands(job, opts, entry["plan"], parts)
            continue
        for level, message in out.logs:
            logging.getLogger("piscis.batch").log(level, "%s", message)
        yield out


# --------------------------------------------------------------------------- run record


class RunState:
    """The run record ``OUTPUT/.piscis-run.jsonl``: the run's options, then one line per
    finished image (its summary row and cell rows), appended and flushed to disk after
    the image's outputs are renamed into place.

    A line cut short by a killed run is ignored; :meth:`start` rewrites the file with
    the complete lines only, through a temporary file and a rename.
    """

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / RECORD_NAME
        self._lines: list[dict] | None = None

    def _read(self) -> list[dict]:
        if self._lines is None:
            self._lines = []
            try:
                text = self.path.read_text()
            except OSError:
                return self._lines
            for line in text.splitlines():
                try:
                    self._lines.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # cut short by a killed run
        return self._lines

    def exists(self) -> bool:
        return self.path.exists()

    def matches(self, record: dict) -> bool:
        lines = self._read()
        return bool(lines) and lines[0].get("run") == json.loads(json.dumps(record))

    def finished(self) -> int:
        """How many images the record holds as finished."""
        return max(0, len(self._read()) - 1)

    def mismatch(self, record: dict) -> str:
        """Why the recorded run is not the command of ``record``, as words for a message:
        '' without a record."""
        lines = self._read()
        if not lines:
            return " from a run with other options or inputs" if self.exists() else ""
        old, new = lines[0].get("run") or {}, json.loads(json.dumps(record))
        key = "model_sha256"
        same_else = {k: v for k, v in old.items() if k != key} == {
            k: v for k, v in new.items() if k != key
        }
        if same_else and key in old and old[key] != new.get(key):
            return (
                f" made with another version of the model (the files of {new['model']} "
                "changed since)"
            )
        return " from a run with other options or inputs"

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)
        self._lines = []

    def outputs(self) -> list[Path]:
        """The files the recorded run wrote, as its record names them: the spot table and
        masks of each finished image, and ``piscis count``'s summary.csv (and cells.csv in
        cells mode). Only paths inside the output folder."""
        lines = self._read()
        run = lines[0].get("run") if lines else None
        if not isinstance(run, dict):
            return []
        folder = self.path.parent
        count = run.get("command") == "count"
        files = [folder / "summary.csv"] if count else []
        if count and (run.get("options") or {}).get("cells_mode"):
            files.append(folder / "cells.csv")
        spots = folder / "spots" if count else folder
        for rec in lines[1:]:
            name = rec.get("name")
            if isinstance(name, str) and name and Path(name).name == name:
                files.append(spots / f"{name}.csv")
            files += [folder / f for f in rec.get("files", []) if isinstance(f, str)]
        top = folder.resolve()
        return [f for f in files if f.resolve().is_relative_to(top) and f.resolve() != top]

    def clear(self) -> int:
        """Remove the recorded run's outputs (:meth:`outputs`) and the record, for a run
        with ``--overwrite``: the folder then holds only the new run's results, never an
        old table of an image that fails or is left out this time. Files the record does
        not name (the user's) stay. Returns the number of files removed."""
        removed = 0
        for f in self.outputs():
            if f.is_file() or f.is_symlink():
                f.unlink()
                removed += 1
                if f.parent != self.path.parent:
                    try:  # an emptied masks/ or spots/ folder
                        f.parent.rmdir()
                    except OSError:
                        pass
        self.reset()
        return removed

    def done(self, name: str, target: Path, image: Path | None = None) -> dict | None:
        """The record of an image whose outputs are all there and whose file (``image``)
        has the size and modification time recorded when it was read, else None."""
        for rec in reversed(self._read()[1:]):
            if rec.get("name") == name:
                files = [target, *(self.path.parent / f for f in rec.get("files", []))]
                if not all(f.exists() for f in files):
                    return None
                was, now = rec.get("stamp"), file_stamp(image) if image is not None else None
                if was is not None and was != now:
                    now = now or {}
                    what = [
                        f"size {was.get('size')} -> {now.get('size')} bytes"
                        if was.get("size") != now.get("size")
                        else "",
                        "modified" if was.get("mtime_ns") != now.get("mtime_ns") else "",
                    ]
                    logger.info(
                        "%s: the file changed since its results were written (%s); counted again",
                        image,
                        ", ".join(w for w in what if w),
                    )
                    return None
                return rec
        return None

    def start(self, record: dict, keep: bool) -> None:
        """Begin the record: the options, and with ``keep`` the finished images so far."""
        from .io import atomic_write_text

        lines = [{"run": record}] + (self._read()[1:] if keep else [])
        self._lines = lines
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))

    def finish(self, result: Result, files: list[Path], stamp: dict | None = None) -> None:
        """Record a finished image: its rows, output files and the :func:`file_stamp`
        of its file as it was read (a file replaced since is counted again)."""
        rec = {
            "name": result.name,
            "rows": result.rows,
            "cell_rows": result.cell_rows,
            "n_spots": result.n_spots,
            "files": [Path(os.path.relpath(f, self.path.parent)).as_posix() for f in files],
            "stamp": stamp,
        }
        with open(self.path, "a", newline="") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._read().append(rec)


def file_stamp(path: Path) -> dict | None:
    """An image file's size and modification time (ns), as the run record keeps them
    (for a Zarr folder, the folder's own); None when it cannot be read."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def run_record(command: str, args, images: list[Path], model_path: str) -> dict:
    """What makes two runs the same command: the options, the model (its folder and the
    fingerprint of its files, :func:`piscis.io.model_fingerprint`) and the images."""
    from .io import model_fingerprint

    opts = {k: getattr(args, k, None) for k in RECORD_OPTIONS}
    opts["tile_size"] = args.tile_size
    return {
        "command": command,
        "model": model_path,
        "model_sha256": model_fingerprint(model_path),
        "options": opts,
        "images": [str(f) for f in images],
    }


class FolderBusy(InputError):
    """Another run holds the output folder's lock; the message names the folder and it."""


def _pid_alive(pid: int) -> bool:
    """True when process ``pid`` runs on this machine (or may: not ours to signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    return True


class OutputLock:
    """The lock file ``FOLDER/.piscis.lock`` of the run writing to an output folder.

    Taken with ``O_CREAT | O_EXCL`` (atomic, also on NFS v3+), it holds the pid and host
    of its run. A lock whose pid no longer runs on this host is stale (a killed run):
    it is taken over with a warning. A lock of another host, or of a live pid, makes
    :meth:`acquire` raise :class:`FolderBusy`. Use as a context manager, or call
    :meth:`release` in a ``finally``.
    """

    STALE_EMPTY_S = 10.0  # a lock without its pid (cut short) older than this is stale

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False
        self.created_folder = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _owner(self) -> dict | None:
        """The lock's content; None when it is gone; {} when it cannot be read."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            owner = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return owner if isinstance(owner, dict) else {}

    def _stale(self, owner: dict) -> bool:
        import socket

        if not owner:  # written by a run killed between creating and filling it
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                return False
            return age > self.STALE_EMPTY_S
        pid = owner.get("pid")
        if owner.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False  # another machine's process: we cannot tell
        return not _pid_alive(pid)

    def _take_over(self, owner: dict) -> bool:
        """Move a stale lock aside; False when another run changed it meanwhile."""
        aside = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # gone already: try to create it again
        moved = self._read_aside(aside)
        if moved != owner:  # another run's fresh lock: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        pid = owner.get("pid", "?")
        logger.warning(
            "%s: taking over the lock of an earlier piscis run (pid %s on %s) that is no "
            "longer running",
            self.folder,
            pid,
            owner.get("host", "this machine"),
        )
        return True

    @staticmethod
    def _read_aside(path: Path) -> dict:
        try:
            owner = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def acquire(self) -> None:
        """Take the lock, creating the folder if needed; :class:`FolderBusy` if held."""
        import socket

        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            self.created_folder = True
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released meanwhile
                if not self._stale(owner):
                    raise FolderBusy(self._busy_message(owner)) from None
                self._take_over(owner)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.held = True
            return
        raise FolderBusy(self._busy_message(self._owner() or {}))

    def _busy_message(self, owner: dict) -> str:
        pid, host = owner.get("pid", "unknown"), owner.get("host", "unknown host")
        return (
            f"{self.folder}: another piscis run (pid {pid} on {host}) is writing to this "
            f"folder; wait for it to end or choose another output folder (if no such run "
            f"is left, delete {self.path})"
        )

    def release(self) -> None:
        """Remove the lock (if this run holds it), and the folder if :meth:`acquire`
        made it and nothing was written to it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        if self.created_folder:
            try:
                self.folder.rmdir()
            except OSError:
                pass  # holds results


def output_files(folder: Path) -> dict[str, bytes]:
    """Every file of an output folder by relative path, to compare two runs: the run
    record's lines sorted (they come in the order the images finished)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == RECORD_NAME:
                data = b"".join(sorted(data.splitlines(keepends=True)))
            out[str(p.relative_to(folder))] = data
    return out


def remove_temporaries(folders: list[Path]) -> None:
    """Temporary files left by a killed run (``.NAME.*.tmp``): never results, removed."""
    for folder in folders:
        if folder.is_dir():
            for f in folder.glob(".*.tmp"):
                f.unlink(missing_ok=True)
