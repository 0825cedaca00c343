"""Fine-tuning from the napari Train widget on one 512x512 annotated image: how
long it takes, and what it does to integrated F1 on a held-aside image of the
same kind.

    xvfb-run -a python scripts/bench_finetune.py [--model default] [--dataset wide]
    python scripts/bench_finetune.py --no-gui   # the same training through the core only

Datasets:

- ``wide`` (the default): a kind of image the shipped model was not trained
  for: spots of sigma 2.2-2.4 px (a lower-NA objective, say; the model's own
  synthetic data stop at 2 px) at SNR 5-15 on a cellular background, from
  :mod:`piscis.synth` with fixed settings. Seed 101 is the annotated image
  (its visible spots are the annotation), seed 303 the held-aside one.
- ``iss``: the real in-situ sequencing image of ``../shared/data/real/insta-iss``
  (one expert's annotation): the 512x512 crop of its left half holding the most
  annotations is the annotated image, the right half the held-aside one. The
  shipped model was trained on that left half, so this measures no new kind.

The widget runs with its defaults (epochs, steps, learning rate, validation
share), started from --model. Before and after, the held-aside image is scored
at each model's own threshold (integrated F1, DESIGN.md section 5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "2")

from piscis.detect import detect  # noqa: E402
from piscis.io import load_model, read_image, read_spots  # noqa: E402
from piscis.metrics import score  # noqa: E402

LIMIT_S = 180.0


def iss_data(data: Path):
    folder = data / "real" / "insta-iss"
    image = read_image(folder / "image.png").image
    coords = read_spots(folder / "spots.csv")
    h, w = image.shape
    half = w // 2
    # The 512x512 window of the left half with the most annotations (step 16 px).
    best, where = -1, (0, 0)
    for y0 in range(0, h - 512 + 1, 16):
        for x0 in range(0, half - 512 + 1, 16):
            inside = np.sum(
                (coords[:, 0] >= y0 - 0.5)
                & (coords[:, 0] < y0 + 511.5)
                & (coords[:, 1] >= x0 - 0.5)
                & (coords[:, 1] < x0 + 511.5)
            )
            if inside > best:
                best, where = inside, (y0, x0)
    y0, x0 = where
    crop = image[y0 : y0 + 512, x0 : x0 + 512]
    keep = (
        (coords[:, 0] >= y0 - 0.5)
        & (coords[:, 0] < y0 + 511.5)
        & (coords[:, 1] >= x0 - 0.5)
        & (coords[:, 1] < x0 + 511.5)
    )
    train = (crop, coords[keep] - [y0, x0])
    right = coords[:, 1] >= half - 0.5
    test = (image[:, half:], coords[right] - [0, half])
    return train, test, f"insta-iss: train crop y{y0} x{x0} of the left half, test = right half"


WIDE = dict(
    shape=(512, 512),
    density=(0.0012, 0.0012),
    sigma=(2.2, 2.4),
    snr=(5.0, 15.0),
    empty_fraction=0.0,
    cell_fraction=1.0,
    cluster_fraction=0.0,
    dim_fraction=0.0,
    eight_bit_fraction=0.0,
    saturate_fraction=0.0,
    stripe_fraction=0.0,
)


def wide_data():
    from piscis.data import visible_spots
    from piscis.detect import estimate_normalization
    from piscis.synth import SynthConfig, generate_spots

    out = []
    for seed in (101, 303):
        image, spots = generate_spots(np.random.default_rng(seed), SynthConfig(**WIDE))
        out.append((image, visible_spots(spots, estimate_normalization(image))))
    return out[0], out[1], "synthetic wide spots (sigma 2.2-2.4 px, SNR 5-15, on cells)"


def f1_on(model, test) -> tuple[float, int]:
    image, truth = test
    spots = detect(image, model=model)
    return float(score(spots.coords, truth).f1_int), len(spots)


def finetune_gui(train, init: Path, out_parent: Path) -> tuple[Path, float, dict]:
    import napari
    from qtpy.QtWidgets import QApplication

    from piscis.napari._annotate import AnnotateWidget
    from piscis.napari._common import state_for
    from piscis.napari._train import TrainWidget

    viewer = napari.Viewer(show=False)
    try:
        image, coords = train
        layer = viewer.add_image(image, name="annotated")
        ann_w = AnnotateWidget(viewer)
        ann_w.image.set_layer(layer)
        ann_w.snap.setChecked(False)
        ann = ann_w.new_annotation_layer()
        ann.add(coords)
        state_for(viewer).add_model(init)
        w = TrainWidget(viewer)
        viewer.window.add_dock_widget(w)
        w.init.set_path(init)
        w.out_dir.setText(str(out_parent))
        settings = {
            "epochs": w.epochs.value(),
            "steps_per_epoch": w.steps.value(),
            "lr": w.lr.value(),
            "val_share": w.val_share.value(),
        }
        t0 = time.perf_counter()
        w.start()
        while w._worker is not None:
            QApplication.processEvents()
            time.sleep(0.02)
        secs = time.perf_counter() - t0
        if w.result_path is None:
            raise SystemExit(f"training failed: {w.status.text()}")
        settings["history"] = w.history
        return w.result_path, secs, settings
    finally:
        viewer.close()


def finetune_core(train, init: Path, out_parent: Path) -> tuple[Path, float, dict]:
    from piscis.annotate import new_model_folder, split_for_validation
    from piscis.data import Pair
    from piscis.train import TrainConfig
    from piscis.train import train as run_train

    d = _widget_defaults()
    image, coords = train
    cfg = TrainConfig(
        epochs=d["epochs"],
        steps_per_epoch=d["steps"],
        batch_size=d["batch"],
        crop=d["crop"],
        lr=d["lr"],
        synthetic_fraction=d["synthetic"],
        threshold=load_model(init).threshold,
        workers=0,
    )
    t0 = time.perf_counter()
    tr, va = split_for_validation([Pair("annotated", image, coords)], d["val_share"])
    out = run_train(tr, new_model_folder(out_parent, init.name), cfg, val_pairs=va, init=init)
    return (
        out,
        time.perf_counter() - t0,
        {"epochs": cfg.epochs, "steps_per_epoch": cfg.steps_per_epoch, "lr": cfg.lr},
    )


def _widget_defaults() -> dict:
    import ast

    src = (ROOT / "piscis" / "napari" / "_train.py").read_text()
    start = src.index("DEFAULTS = {")
    return ast.literal_eval(src[start + len("DEFAULTS = ") : src.index("}", start) + 1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--dataset", choices=("wide", "iss"), default="wide")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--no-gui", action="store_true", help="train through the core, no napari")
    ap.add_argument("--keep", default=None, help="keep the fine-tuned model in this folder")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.dataset == "iss":
        train, test, what = iss_data(Path(args.data))
    else:
        train, test, what = wide_data()
    init = load_model(args.model).path
    print(what)
    print(
        f"annotated image {train[0].shape}, {len(train[1])} spots; held-aside image "
        f"{test[0].shape}, {len(test[1])} spots; start from {init}"
    )
    before, n_before = f1_on(init, test)
    print(f"before: integrated F1 {before:.3f} on the held-aside image ({n_before} spots found)")
    parent = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="piscis_bench_"))
    run = finetune_core if args.no_gui else finetune_gui
    out, secs, settings = run(train, init, parent)
    after, n_after = f1_on(out, test)
    print(
        f"fine-tuning ({'core' if args.no_gui else 'Train widget'}, "
        f"{settings['epochs']} epochs x {settings['steps_per_epoch']} steps, lr {settings['lr']}, "
        f"{os.environ['OMP_NUM_THREADS']} threads): {secs:.1f} s -> {out}"
    )
    print(f"after:  integrated F1 {after:.3f} on the held-aside image ({n_after} spots found)")
    for h in settings.get("history", []):
        print(
            "  epoch",
            h["epoch"],
            "loss",
            round(h["loss"], 3),
            "val",
            {k: round(v, 3) for k, v in h.get("val", {}).items() if k in ("f1_int", "f1_3")},
        )
    result = {
        "data": what,
        "seconds": round(secs, 1),
        "f1_int_before": round(before, 4),
        "f1_int_after": round(after, 4),
        "model": str(out),
    }
    print("RESULT:", json.dumps(result))
    ok = secs <= LIMIT_S and after > before
    print(
        "OK"
        if ok
        else "NOT MET: "
        + ("too slow " if secs > LIMIT_S else "")
        + ("no gain" if after <= before else "")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
