"""The ``piscis`` command: detect, count, train, evaluate.

Only this module configures logging handlers; the library logs through
``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import argparse
import glob
import logging
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .io import IMAGE_SUFFIXES, InputError

logger = logging.getLogger("piscis")

SUMMARY_COLUMNS = ["image", "n_spots", "height", "width", "threshold", "model"]
SKIPPED_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}


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


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (their image files, not recursive) and glob patterns.

    Returns (images, failures); a path that does not exist is a failure.
    Non-image files in a folder are skipped with an info message.
    """
    images: list[Path] = []
    failures: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = []
            for f in sorted(p.iterdir()):
                if f.is_file() and is_image_name(f):
                    found.append(f)
                elif f.is_file():
                    level = logging.DEBUG if f.name.lower() in SKIPPED_NAMES else logging.INFO
                    logger.log(level, "%s: not an image file, skipped", f)
            if not found:
                logger.warning("%s: no image files (.tif, .tiff, .png) in this folder", p)
            images.extend(found)
        elif p.exists():
            images.append(p)
        elif any(c in item for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item))
            if not matches:
                failures.append((item, "no file matches this pattern"))
            images.extend(m for m in matches if m.is_file() and is_image_name(m))
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


def _detect_one(path: Path, args, model):
    from .detect import detect
    from .io import read_image

    # The reader logs its notes (z-projection) itself; all-NaN images are reported below.
    data = read_image(path, channel=args.channel, axes=args.axes)
    image = data.image
    n_bad = int(image.size - np.count_nonzero(np.isfinite(image))) if image.dtype.kind == "f" else 0
    if n_bad:
        logger.warning("%s: %d non-finite (NaN or infinite) pixels are ignored", path, n_bad)
    spots = detect(image, model=model, threshold=args.threshold, scale=args.scale,
                   tile_size=args.tile_size)
    if len(spots) == 0:
        logger.warning("%s: no spots detected", path)
    return image, spots


def _run_batch(args, spots_dir: Path, summary_path: Path | None) -> int:
    from .io import atomic_write_text, load_model, table_text, write_table

    images, failures = expand_inputs(args.inputs)
    names = output_names(images)
    targets = [spots_dir / f"{names[f]}.csv" for f in images]
    if not args.overwrite:
        existing = [t for t in targets if t.exists()]
        if summary_path is not None and summary_path.exists():
            existing.insert(0, summary_path)
        if existing:
            logger.error(
                "%s already holds results (%s%s); pass --overwrite or choose another output folder",
                args.output,
                existing[0].name,
                f" and {len(existing) - 1} more" if len(existing) > 1 else "",
            )
            return 2
    try:
        model = load_model(args.model)
    except (InputError, OSError) as e:
        logger.error("%s", e)
        return 2
    threshold = model.threshold if args.threshold is None else args.threshold
    if not 0 < threshold < 1:
        logger.error("--threshold must be a probability between 0 and 1, got %s", threshold)
        return 2

    from tqdm import tqdm

    rows: list[dict] = []
    t0 = time.time()
    n_total = 0
    bar = tqdm(images, desc="images", unit="image", disable=args.quiet or len(images) < 2)
    for path, target in zip(images, targets):
        bar.set_postfix_str(path.name[-30:])
        try:
            image, spots = _detect_one(path, args, model)
            write_table(target, spots.columns())
        # RuntimeError: torch's own out-of-memory error on a CPU; one image must not end the run.
        except (InputError, ValueError, TypeError, OSError, MemoryError, RuntimeError) as e:
            msg = str(e) if str(path) in str(e) else f"{path}: {e}"
            logger.error("%s", msg)
            failures.append((str(path), msg))
            bar.update(1)
            continue
        n_total += len(spots)
        rows.append({"image": str(path), "n_spots": len(spots), "height": image.shape[0],
                     "width": image.shape[1], "threshold": threshold, "model": model.name})
        if summary_path is not None:  # rewritten after each image: an interrupted run keeps it
            atomic_write_text(summary_path, table_text(_columns(rows)))
        bar.update(1)
        bar.set_postfix(spots=n_total)
    bar.close()
    if summary_path is not None:
        atomic_write_text(summary_path, table_text(_columns(rows)))
    dt = time.time() - t0
    logger.info(
        "%d image(s), %d spots in %.1f s; results in %s", len(rows), n_total, dt, args.output
    )
    if failures:
        logger.error("%d input(s) failed:", len(failures))
        for item, why in failures:
            logger.error("  %s", why if item in why else f"{item}: {why}")
        return 1
    return 0


def _columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in SUMMARY_COLUMNS}


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
    try:
        pairs = load_pairs(args.data, channel=args.channel)
    except (InputError, ValueError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 2
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        logger.error("%s exists; choose another folder or pass --overwrite", out)
        return 2
    cfg = TrainConfig(epochs=args.epochs, steps_per_epoch=args.steps, batch_size=args.batch,
                      crop=args.crop, lr=args.lr, seed=args.seed,
                      synthetic_fraction=args.synthetic_fraction, val_fraction=args.val_fraction,
                      workers=args.workers)
    if args.init is None and args.synthetic_fraction == 0 and len(pairs) < 3:
        logger.warning("training from scratch on %d image(s): consider --init default", len(pairs))

    from tqdm import tqdm

    bar = tqdm(total=cfg.epochs * cfg.steps_per_epoch, desc="training", unit="step",
               disable=args.quiet)

    def progress(info):
        if "step" in info:
            bar.n = info["step"]
            bar.set_postfix(loss=f"{info['loss']:.3f}")
            bar.refresh()
        elif "epoch_done" in info:
            rec = info["record"]
            val = rec.get("val", {})
            tqdm.write(f"epoch {rec['epoch'] + 1}/{cfg.epochs}: loss {rec['loss']:.3f}"
                       + (f", validation F1@3 {val['f1_3']:.3f}, integrated F1 {val['f1_int']:.3f}"
                          if val else ""))

    try:
        path = train(pairs, out, cfg, init=args.init, resume=args.resume,
                     overwrite=args.overwrite, progress=progress,
                     description=f"Trained with `piscis train {args.data}`.")
    except (InputError, FileExistsError, ValueError) as e:
        bar.close()
        logger.error("%s", e)
        return 2
    bar.close()
    logger.info("wrote model %s", path)
    return 0


def cmd_evaluate(args) -> int:
    from .io import read_spots
    from .metrics import mean_scores, score

    pred, true = Path(args.pred), Path(args.truth)
    if pred.is_dir() != true.is_dir():
        logger.error("PRED and TRUTH must both be CSV files or both folders")
        return 2
    if pred.is_dir():
        pairs = []
        for t in sorted(true.glob("*.csv")):
            p = pred / t.name
            if p.exists():
                pairs.append((t.stem, p, t))
            else:
                logger.warning("%s: no prediction %s", t, p)
    else:
        pairs = [(true.stem, pred, true)]
    if not pairs:
        logger.error("no prediction/truth pairs to compare")
        return 2
    header = (
        f"{'image':30s} {'n_pred':>6s} {'n_true':>6s} {'F1@1':>6s} {'F1@2':>6s} {'F1@3':>6s} "
        f"{'F1int':>6s} {'prec':>6s} {'recall':>6s} {'loc_err':>7s}"
    )
    print(header)
    scores = []
    for name, p, t in pairs:
        try:
            s = score(read_spots(p), read_spots(t))
        except InputError as e:
            logger.error("%s", e)
            return 2
        scores.append(s)
        print(_score_line(name[:30], vars(s)))
    if len(scores) > 1:
        print(_score_line("mean", mean_scores(scores)))
    return 0


def _score_line(name, s) -> str:
    return (f"{name:30s} {s['n_pred']:6.0f} {s['n_true']:6.0f} {s['f1_1']:6.3f} {s['f1_2']:6.3f} "
            f"{s['f1_3']:6.3f} {s['f1_int']:6.3f} {s['precision']:6.3f} {s['recall']:6.3f} "
            f"{s['loc_error']:7.3f}")


# --------------------------------------------------------------------------- parser


def _detection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders of images, or glob patterns ('data/*.tif')")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--model", default=None,
                   help="a shipped model name or a model folder (default: the shipped 'default')")
    p.add_argument("--threshold", type=float, default=None,
                   help="spot probability threshold (default: the model's own)")
    p.add_argument("--channel", type=int, default=None,
                   help="channel index for multi-channel images (0-based)")
    p.add_argument("--axes", default=None,
                   help="axes of the file, overriding its metadata, e.g. YX, ZYX, YXC, CYX")
    p.add_argument("--scale", type=float, default=None,
                   help="resize factor before detection; < 1 for spots larger than 2-3 px")
    p.add_argument("--tile-size", type=int, default=1024,
                   help="tile core size in pixels; memory is bounded by it (default 1024)")
    p.add_argument("--overwrite", action="store_true", help="replace existing results")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="piscis", description="Spot detection for fluorescence microscopy."
    )
    ap.add_argument("--version", action="version", version=f"piscis {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="more log messages")
    ap.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress bar")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("detect", help="write DIR/<image>.csv of spots for each image")
    _detection_options(p)
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("count", help="spots per image: DIR/spots/<image>.csv and DIR/summary.csv")
    _detection_options(p)
    p.set_defaults(func=cmd_count)

    p = sub.add_parser("train", help="train or fine-tune a model on image + CSV pairs")
    p.add_argument("data", help="folder of NAME.tif/.png + NAME.csv (+ NAME.mask.tif) pairs")
    p.add_argument("-o", "--output", required=True, help="new model folder (never overwritten)")
    p.add_argument("--init", default=None, help="model to start from (name or folder)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, default=100, help="steps per epoch")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=96)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--synthetic-fraction", type=float, default=0.3,
                   help="share of each batch drawn from the synthetic generator")
    p.add_argument("--channel", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes drawing training crops")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on 2 cores)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="F1 at 1/2/3 px, integrated F1, precision, recall")
    p.add_argument("pred", help="predicted spots: a CSV or a folder of CSVs")
    p.add_argument("truth", help="true spots: a CSV or a folder of CSVs with the same names")
    p.set_defaults(func=cmd_evaluate)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.ERROR if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("piscis")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        logger.error("interrupted; finished outputs are complete, the others were not written")
        return 130


if __name__ == "__main__":
    sys.exit(main())
