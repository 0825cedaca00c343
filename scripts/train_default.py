"""Train the default model shipped in ``models/default``.

One command, from the synthetic generator plus the parts of
``../shared/data`` that its README allows for training:

- ``real/insta-iss``: the left half (x < width / 2) only;
- ``real/insta-beads``: the left half only;
- ``semisynthetic/insta``: the 12 ``cells_*`` images (2 held out for validation).

Never ``real/insta-smfish`` (the validation image of the shipped model), nor
the right halves or the ``tissue_*`` images (kept for reporting).

    python scripts/train_default.py -o models/default [--epochs 14] [--resume]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from piscis import synth  # noqa: E402
from piscis.data import Pair, visible_spots  # noqa: E402
from piscis.io import InputError, read_image_2d, read_spots  # noqa: E402
from piscis.train import TrainConfig, train  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def left_half(name: str, folder: Path) -> Pair:
    image = read_image_2d(folder / "image.png")
    coords = read_spots(folder / "spots.csv")
    half = image.shape[1] // 2
    keep = coords[:, 1] < half - 0.5
    return Pair(name, image[:, :half].copy(), coords[keep])


def real_pairs(data: Path) -> tuple[list[Pair], list[Pair], list[float]]:
    pairs, weights = [], []
    for name, w in (("insta-iss", 0.15), ("insta-beads", 0.1)):
        folder = data / "real" / name
        if folder.is_dir():
            pairs.append(left_half(f"{name}-left", folder))
            weights.append(w)
    semi = sorted((data / "semisynthetic" / "insta" / "images").glob("cells_*.png"))
    val = []
    for path in semi:
        p = Pair(
            path.stem,
            read_image_2d(path, channel=0),
            read_spots(path.parent.parent / "spots" / (path.stem + ".csv")),
        )
        # Hold out one SNR-5 and one SNR-10 image for validation.
        if path.stem.endswith(
            ("nspots100_spot_sig1.75_snr5_2.5", "nspots50_spot_sig1.75_snr10_2.5")
        ):
            val.append(p)
        else:
            pairs.append(p)
            weights.append(0.75 / max(1, len(semi) - 2))
    return pairs, val, weights


def cells_background_pairs(
    data: Path, n: int, seed: int = 7, snr: tuple[float, float] = (1.5, 18.0)
) -> list[Pair]:
    """Semi-synthetic images made like the ``cells_*`` ones, on their own background.

    ``semisynthetic/insta/background_cells.tif`` is the spot-free image behind the 12
    ``cells_*`` training images. Each new image is that background turned or flipped,
    plus Gaussian spots (sigma 1.4-2.1 px) at random sub-pixel places, 30-200 per
    image, with peak amplitudes of ``snr`` times the noise, plus extra Gaussian noise,
    rendered to 8 bits with a contrast stretch as the originals are. Never the
    ``tissue_*`` images (their background is not used).
    """
    import tifffile

    from piscis.detect import estimate_normalization

    path = data / "semisynthetic" / "insta" / "background_cells.tif"
    if n <= 0 or not path.exists():
        return []
    base = tifffile.imread(path).astype(np.float64)
    noise0 = estimate_normalization(base).noise
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        bg = np.rot90(base, int(rng.integers(4)))
        if rng.random() < 0.5:
            bg = bg[:, ::-1]
        h, w = bg.shape
        k = rng.uniform(0.3, 1.3)
        sd = noise0 * np.sqrt(1.0 + k * k)
        count = int(rng.integers(30, 201))
        coords = np.column_stack([rng.uniform(0, h - 1, count), rng.uniform(0, w - 1, count)])
        amp = sd * np.exp(rng.uniform(np.log(snr[0]), np.log(snr[1]), count))
        sigma = rng.uniform(1.4, 2.1)
        img = bg + rng.normal(0.0, k * noise0, bg.shape)
        yy, xx = np.arange(h)[:, None], np.arange(w)[None, :]
        for (y, x), a in zip(coords, amp):
            y0, y1 = max(int(y) - 8, 0), min(int(y) + 9, h)
            x0, x1 = max(int(x) - 8, 0), min(int(x) + 9, w)
            r2 = (yy[y0:y1] - y) ** 2 + (xx[:, x0:x1] - x) ** 2
            img[y0:y1, x0:x1] += a * np.exp(-r2 / (2 * sigma * sigma))
        lo = np.percentile(bg, rng.uniform(0.0, 1.0))
        hi = bg.max() * rng.uniform(1.05, 1.5)
        img8 = np.clip(np.rint((img - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
        out.append(Pair(f"cells-background-{i}", img8, coords))
    return out


def synthetic_val(n: int = 8, seed: int = 12345) -> list[Pair]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image, spots = synth.generate_spots(
            rng, synth.SynthConfig(shape=(256, 256), empty_fraction=0.1)
        )
        pair = Pair(f"synthetic-val-{i}", image, spots["coords"])
        pair.coords = visible_spots(spots, pair.norm)
        out.append(pair)
    return out


def set_decoding(model_dir: Path, threshold: float | None, min_snr: float | None, val) -> None:
    """Write a chosen threshold (with the validation figures at it) and significance
    floor into a model folder's config and card, through temporary files and renames."""
    from piscis.io import atomic_write_text, json_text, load_model
    from piscis.train import evaluate_pairs, model_card

    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    if threshold is not None:
        config["threshold"] = threshold
        config["training"]["threshold_tuned_on"] = "set by --threshold"
        if val:
            figures = evaluate_pairs(load_model(model_dir), val, threshold)
            config.setdefault("metrics", {})["validation"] = figures
    if min_snr is not None:
        config["min_snr"] = min_snr
    atomic_write_text(path, json_text(config))
    atomic_write_text(model_dir / "README.md", model_card(config))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default=str(ROOT / "models" / "default"))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--steps", type=int, default=200, help="steps per epoch")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default=None, help="model folder to continue from")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--synthetic-fraction", type=float, default=0.5)
    ap.add_argument(
        "--pair-fraction",
        type=float,
        default=0.0,
        help="share of synthetic images that also hold close pairs of spots (2.2 sigma-5 px)",
    )
    ap.add_argument(
        "--dense-fraction",
        type=float,
        default=0.0,
        help="share of synthetic images with a crowded patch of spots (2.2 sigma-3.2 px apart)",
    )
    ap.add_argument(
        "--cells-background",
        type=int,
        default=0,
        help="add this many semi-synthetic images made on the cells_* background",
    )
    ap.add_argument(
        "--cells-background-snr",
        type=float,
        nargs=2,
        default=(1.5, 18.0),
        metavar=("LOW", "HIGH"),
        help="their spots' peak amplitude range, times the noise (log-uniform)",
    )
    ap.add_argument(
        "--empty-fraction",
        type=float,
        default=None,
        help="share of spot-free synthetic images (default: the generator's)",
    )
    ap.add_argument(
        "--cells-background-weight",
        type=float,
        default=0.5,
        help="their share of the real-data draws (default %(default)s)",
    )
    ap.add_argument("--keep", choices=["best", "last"], default="best")
    ap.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this many epochs of the --epochs learning-rate schedule",
    )
    ap.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="the model's spot threshold (default: chosen on the validation pairs)",
    )
    ap.add_argument("--min-snr", type=float, default=None, help="the model's significance floor")
    ap.add_argument(
        "--teacher",
        default=None,
        help="a model folder whose 8-view average the network also learns (distillation)",
    )
    ap.add_argument("--teacher-weight", type=float, default=1.0)
    ap.add_argument(
        "--teacher-disp-weight",
        type=float,
        default=1.0,
        help="weight of the teacher's displacements within its term (0: the spot map only)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # One thread for the network, one worker process drawing the batches:
    # two threads on a busy 2-core machine are ten times slower, not faster.
    torch.set_num_threads(args.threads)

    data = Path(args.data)
    pairs, val, weights = real_pairs(data) if data.is_dir() else ([], [], [])
    val += synthetic_val()
    extra = cells_background_pairs(data, args.cells_background, snr=args.cells_background_snr)
    if extra:
        share = args.cells_background_weight
        weights = [w * (1.0 - share) / sum(weights) for w in weights]
        weights += [share / len(extra)] * len(extra)
        pairs += extra
    # Generator settings other than its defaults (recorded in the model's config).
    synth = {
        k: v
        for k, v in (
            ("pair_fraction", args.pair_fraction),
            ("dense_fraction", args.dense_fraction),
            ("empty_fraction", args.empty_fraction),
        )
        if v is not None and (v or k == "empty_fraction")
    }
    cfg = TrainConfig(
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        batch_size=args.batch,
        crop=args.crop,
        seed=args.seed,
        synthetic_fraction=args.synthetic_fraction,
        lr=args.lr,
        keep=args.keep,
        extra={"pair_weights": weights}
        | ({"synth": synth} if synth else {})
        | (
            {
                "teacher": {
                    "model": str(args.teacher),
                    "views": 8,
                    "weight": args.teacher_weight,
                    "disp_weight": args.teacher_disp_weight,
                }
            }
            if args.teacher
            else {}
        ),
    )
    out = Path(args.output)
    ckpt = out.with_name(out.name + ".ckpt")
    bar = tqdm(total=cfg.epochs * cfg.steps_per_epoch, desc="training", unit="step")
    t0 = time.time()

    def progress(info):
        if "step" in info:
            bar.n = info["step"]
            bar.set_postfix(loss=f"{info['loss']:.3f}")
            bar.refresh()
        elif "epoch_done" in info:
            rec = info["record"]
            val_f1 = rec.get("val", {}).get("f1_int", float("nan"))
            tqdm.write(
                f"epoch {rec['epoch']}: loss {rec['loss']:.3f} smoothF1 "
                f"{rec['smooth_f1']:.3f} val f1_int {val_f1:.3f} ({time.time() - t0:.0f}s)"
            )

    description = (
        "Synthetic images from piscis.synth (a share of every batch), and the training parts "
        "of ../shared/data: the left halves of real/insta-iss and real/insta-beads, and 10 of "
        "the 12 semisynthetic/insta cells_* images (2 held out for validation, with 8 "
        "synthetic images). Never real/insta-smfish, the right halves, nor the tissue_* images."
    )
    stop = (lambda: bar.n >= args.stop_after * cfg.steps_per_epoch) if args.stop_after else None
    try:
        train(
            pairs,
            out,
            cfg,
            val_pairs=val,
            checkpoint_dir=ckpt,
            resume=args.resume,
            init=args.init,
            overwrite=args.overwrite,
            progress=progress,
            description=description,
            tune_threshold=args.threshold is None,
            pair_weights=weights,
            should_stop=stop,
        )
    except (InputError, ValueError, FileExistsError) as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    bar.close()
    if args.threshold is not None or args.min_snr is not None:
        set_decoding(out, args.threshold, args.min_snr, val)
    shutil.rmtree(ckpt, ignore_errors=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
