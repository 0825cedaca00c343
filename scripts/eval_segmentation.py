"""Evaluate :func:`piscis.cells.segment_nuclei` on the StarDist 2D example image.

Reads ``pypi/stardist/img2d.tif`` (nuclei, 512x512) and its truth ``mask2d.tif`` (125
nuclei) from the shared data folder, segments with the documented defaults (or the
options given), matches predicted to true nuclei one to one at IoU >= 0.5 and prints the
number of true and predicted nuclei, the number matched, the fraction of true nuclei
matched (target >= 0.85), the F1 of the matching and the mean IoU of matched pairs.

Usage: ``python scripts/eval_segmentation.py [--data DIR] [--diameter 30] [--threshold li]``.
Exits 0 without evaluating (and says so) when the data are absent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import tifffile
from scipy.optimize import linear_sum_assignment

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
TARGET = 0.85


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every (true, pred) label pair; returns (iou, true_ids, pred_ids)."""
    true_ids = np.unique(true[true > 0])
    pred_ids = np.unique(pred[pred > 0])
    ti = np.searchsorted(true_ids, true.ravel())
    pi = np.searchsorted(pred_ids, pred.ravel())
    t_in = true.ravel() > 0
    p_in = pred.ravel() > 0
    inter = np.zeros((len(true_ids), len(pred_ids)))
    both = t_in & p_in
    np.add.at(inter, (ti[both], pi[both]), 1)
    t_area = np.bincount(ti[t_in], minlength=len(true_ids))
    p_area = np.bincount(pi[p_in], minlength=len(pred_ids))
    union = t_area[:, None] + p_area[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou, true_ids, pred_ids


def evaluate(true: np.ndarray, pred: np.ndarray, min_iou: float = 0.5) -> dict:
    """Match one to one (Hungarian on IoU, pairs below ``min_iou`` forbidden) and score."""
    iou, true_ids, pred_ids = iou_matrix(true, pred)
    n_true, n_pred = len(true_ids), len(pred_ids)
    matched = np.zeros(0)
    if n_true and n_pred:
        cost = np.where(iou >= min_iou, -iou, 1.0)
        r, c = linear_sum_assignment(cost)
        ok = iou[r, c] >= min_iou
        matched = iou[r[ok], c[ok]]
    tp = len(matched)
    total = n_true + n_pred
    return {
        "n_true": n_true,
        "n_pred": n_pred,
        "matched": tp,
        "fraction_matched": tp / n_true if n_true else float("nan"),
        "f1": 2 * tp / total if total else 1.0,
        "mean_iou": float(matched.mean()) if tp else float("nan"),
    }


def run(data: Path = DATA, **kwargs) -> dict | None:
    """Segment the StarDist image and score it; None when the files are absent."""
    folder = Path(data) / "pypi" / "stardist"
    img_path, mask_path = folder / "img2d.tif", folder / "mask2d.tif"
    if not (img_path.exists() and mask_path.exists()):
        return None
    if str(REPO) not in sys.path:  # run as a script from a checkout
        sys.path.insert(0, str(REPO))
    from piscis.cells import segment_nuclei

    image = tifffile.imread(img_path)
    true = tifffile.imread(mask_path).astype(np.int64)
    pred = segment_nuclei(image, **kwargs)
    return evaluate(true, pred)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="shared data folder")
    parser.add_argument("--diameter", type=float, default=None, help="nucleus diameter, px")
    parser.add_argument("--smooth-sigma", type=float, default=None)
    parser.add_argument("--threshold", default=None, help="'otsu', 'li' or a number")
    args = parser.parse_args(argv)
    kwargs = {}
    if args.diameter is not None:
        kwargs["diameter"] = args.diameter
    if args.smooth_sigma is not None:
        kwargs["smooth_sigma"] = args.smooth_sigma
    if args.threshold is not None:
        try:
            kwargs["threshold"] = float(args.threshold)
        except ValueError:
            kwargs["threshold"] = args.threshold
    result = run(args.data, **kwargs)
    if result is None:
        print(f"skipped: no pypi/stardist/img2d.tif and mask2d.tif under {args.data}")
        return 0
    print(f"parameters        {kwargs or 'defaults'}")
    print(f"true nuclei       {result['n_true']}")
    print(f"predicted nuclei  {result['n_pred']}")
    print(f"matched (IoU>=.5) {result['matched']}")
    frac = result["fraction_matched"]
    print(f"fraction matched  {frac:.3f} (target >= {TARGET})")
    print(f"F1                {result['f1']:.3f}")
    print(f"mean IoU matched  {result['mean_iou']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
