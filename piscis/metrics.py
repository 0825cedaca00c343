"""Matching of predicted to true spots, F1 scores and integrated F1.

The scores follow DESIGN.md section 5: predictions and true spots are paired
one to one by the Hungarian algorithm on Euclidean distance, pairs farther
apart than the cut-off being forbidden; F1 = 2 TP / (n_pred + n_true).

In 3D, with ``cylinder=True`` (what ``piscis evaluate`` uses for tables with a z
column), a cut-off of r allows a pair within r px in yx *and* within r slices in
z, the tolerance of CASES.md (1.5 px in yx and 1.5 slices in z), rather than
within r in 3D: F1 at 1/2/3 px and the integrated F1 (cut-offs 0..3) apply each
cut-off to yx and to z alike, so z is scaled as yx is. The Hungarian cost, and
the localisation error, stay the Euclidean (z, y, x) distance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

logger = logging.getLogger(__name__)

# The integrated F1 averages F1 over these cut-offs (pixels).
INTEGRATION_CUTOFFS = np.linspace(0.0, 3.0, 50)


def _as_coords(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=float)
    if points.size == 0:
        return np.zeros((0, 2))
    if points.ndim != 2:
        raise ValueError(f"coordinates must be an (N, D) array, got shape {points.shape}")
    return points


def match(
    pred: np.ndarray, true: np.ndarray, cutoff: float, cylinder: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Pair predictions with true spots one to one, at most ``cutoff`` apart.

    Parameters
    ----------
    pred, true : (N, D) and (M, D) arrays of coordinates.
    cutoff : largest distance (pixels) allowed for a pair.
    cylinder : for (z, y, x) coordinates: a pair must lie within ``cutoff`` in yx and
        within ``cutoff`` in z (a cylinder, CASES.md's 3D tolerance) instead of within
        ``cutoff`` in 3D. No effect in 2D.

    Returns
    -------
    pred_idx, true_idx : index arrays of equal length, one entry per pair,
        chosen to maximise the number of pairs and, among those, to minimise
        the summed distance.
    """
    pred, true = _as_coords(pred), _as_coords(true)
    empty = (np.zeros(0, int), np.zeros(0, int))
    if len(pred) == 0 or len(true) == 0:
        return empty
    cylinder = cylinder and pred.shape[1] == 3
    # The cylinder lies in the ball of radius cutoff * sqrt(2): its candidates, filtered.
    radius = cutoff * np.sqrt(2.0) if cylinder else cutoff
    tree_p, tree_t = cKDTree(pred), cKDTree(true)
    sparse = tree_p.sparse_distance_matrix(tree_t, radius, output_type="coo_matrix")
    # sparse_distance_matrix drops exact-zero distances: find those separately.
    rows, cols, dist = list(sparse.row), list(sparse.col), list(sparse.data)
    for i, js in enumerate(tree_p.query_ball_tree(tree_t, 0.0)):
        for j in js:
            rows.append(i)
            cols.append(j)
            dist.append(0.0)
    if not rows:
        return empty
    rows, cols, dist = np.asarray(rows), np.asarray(cols), np.asarray(dist)
    if cylinder:
        d = pred[rows] - true[cols]
        inside = (np.hypot(d[:, 1], d[:, 2]) <= cutoff) & (np.abs(d[:, 0]) <= cutoff)
        rows, cols, dist = rows[inside], cols[inside], dist[inside]
        if not len(rows):
            return empty

    # Solve each connected group of candidates on its own (the same optimum as one
    # assignment over all of them, and a small matrix each, however large the image).
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_p = len(pred)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols + n_p)), shape=(n_p + len(true),) * 2)
    _, label = connected_components(graph, directed=False)
    group = label[rows]
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    out_p, out_t = [], []
    for idx in np.split(order, bounds):
        p, t = _assign(rows[idx], cols[idx], dist[idx], radius)
        out_p.append(p)
        out_t.append(t)
    return np.concatenate(out_p), np.concatenate(out_t)


def _assign(rows, cols, dist, cutoff):
    """The one-to-one assignment among candidate pairs (rows, cols, dist)."""
    ur, ri = np.unique(rows, return_inverse=True)
    uc, ci = np.unique(cols, return_inverse=True)
    if len(ur) == 1 or len(uc) == 1:  # one spot: its nearest candidate
        k = int(np.argmin(dist))
        return ur[ri[k : k + 1]], uc[ci[k : k + 1]]
    forbidden = 1e6 + 10.0 * cutoff * max(len(ur), len(uc))
    cost = np.full((len(ur), len(uc)), forbidden)
    # Each allowed pair is worth far more than any distance, so the number of
    # pairs is maximised first; distances break ties.
    np.minimum.at(cost, (ri, ci), dist - 1e3 * (cutoff + 1.0))
    r, c = linear_sum_assignment(cost)
    keep = cost[r, c] < forbidden
    return ur[r[keep]], uc[c[keep]]


@dataclass
class Scores:
    """Detection scores of one image (or of a pooled set)."""

    n_pred: int
    n_true: int
    f1_1: float
    f1_2: float
    f1_3: float
    f1_int: float
    precision: float
    recall: float
    loc_error: float  # mean distance of pairs matched at 3 px; nan if none


def f1_at(pred: np.ndarray, true: np.ndarray, cutoff: float, cylinder: bool = False) -> float:
    """F1 score with one-to-one matching at ``cutoff`` pixels (``cylinder``: as for
    :func:`match`)."""
    pred, true = _as_coords(pred), _as_coords(true)
    if len(pred) == 0 and len(true) == 0:
        return 1.0
    if len(pred) == 0 or len(true) == 0:
        return 0.0
    pi, _ = match(pred, true, cutoff, cylinder)
    return 2.0 * len(pi) / (len(pred) + len(true))


def integrated_f1(pred: np.ndarray, true: np.ndarray, cylinder: bool = False) -> float:
    """Mean of F1 over cut-offs 0..3 px (trapezoid rule, divided by 3; ``cylinder``: as
    for :func:`match`)."""
    pred, true = _as_coords(pred), _as_coords(true)
    if len(pred) == 0 and len(true) == 0:
        return 1.0
    if len(pred) == 0 or len(true) == 0:
        return 0.0
    f1 = [f1_at(pred, true, c, cylinder) for c in INTEGRATION_CUTOFFS]
    return float(np.trapezoid(f1, INTEGRATION_CUTOFFS) / INTEGRATION_CUTOFFS[-1])


def score(pred: np.ndarray, true: np.ndarray, cylinder: bool = False) -> Scores:
    """All the figures of DESIGN.md section 5 for one image; with ``cylinder``, (z, y, x)
    points are matched within each cut-off in yx and in z (see :func:`match`)."""
    pred, true = _as_coords(pred), _as_coords(true)
    n_p, n_t = len(pred), len(true)
    pi, ti = match(pred, true, 3.0, cylinder)
    if n_p == 0 and n_t == 0:
        precision = recall = 1.0
    else:
        precision = len(pi) / n_p if n_p else (1.0 if n_t == 0 else 0.0)
        recall = len(ti) / n_t if n_t else (1.0 if n_p == 0 else 0.0)
    loc = float(np.linalg.norm(pred[pi] - true[ti], axis=1).mean()) if len(pi) else float("nan")
    return Scores(
        n_pred=n_p,
        n_true=n_t,
        f1_1=f1_at(pred, true, 1.0, cylinder),
        f1_2=f1_at(pred, true, 2.0, cylinder),
        f1_3=f1_at(pred, true, 3.0, cylinder),
        f1_int=integrated_f1(pred, true, cylinder),
        precision=precision,
        recall=recall,
        loc_error=loc,
    )


def mean_scores(scores: list[Scores]) -> dict[str, float]:
    """Average per-image scores over a dataset (nan-aware for loc_error)."""
    if not scores:
        return {}
    out = {}
    for name in Scores.__dataclass_fields__:
        vals = np.array([getattr(s, name) for s in scores], dtype=float)
        out[name] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return out


def pooled_scores(scores: list[Scores]) -> dict[str, float]:
    """The scores of all images' spots taken together (micro-averaged).

    F1 = 2 TP / (n_pred + n_true) at each cut-off, so the pooled F1s (integrated F1
    included, a mean over cut-offs) are the per-image ones weighted by n_pred + n_true;
    precision and recall pool the 3 px matches; loc_error is weighted by them. An image
    without spots and without predictions weighs nothing (its F1 of 1 says nothing of
    the detector), where the plain mean counts it as a whole image.
    """
    if not scores:
        return {}
    n = np.array([s.n_pred + s.n_true for s in scores], dtype=float)
    n_pred = float(sum(s.n_pred for s in scores))
    n_true = float(sum(s.n_true for s in scores))
    tp3 = np.array([s.f1_3 for s in scores]) * n / 2
    out = {"n_pred": n_pred, "n_true": n_true}
    for name in ("f1_1", "f1_2", "f1_3", "f1_int"):
        vals = np.array([getattr(s, name) for s in scores], dtype=float)
        out[name] = float(np.sum(vals * n) / n.sum()) if n.sum() else 1.0
    out["precision"] = float(tp3.sum() / n_pred) if n_pred else float("nan")
    out["recall"] = float(tp3.sum() / n_true) if n_true else float("nan")
    loc = np.array([s.loc_error for s in scores], dtype=float)
    ok = np.isfinite(loc) & (tp3 > 0)
    out["loc_error"] = (
        float(np.sum(loc[ok] * tp3[ok]) / tp3[ok].sum()) if ok.any() else float("nan")
    )
    return out
