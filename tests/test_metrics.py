"""Matching and F1 scores (DESIGN.md section 5)."""

import numpy as np
import pytest

from piscis.metrics import f1_at, integrated_f1, match, score


def test_both_empty_scores_one_and_one_empty_scores_zero():
    e = np.zeros((0, 2))
    p = np.array([[1.0, 2.0]])
    assert integrated_f1(e, e) == 1.0 and f1_at(e, e, 3) == 1.0
    assert integrated_f1(p, e) == 0.0 and integrated_f1(e, p) == 0.0


def test_matching_is_one_to_one_and_respects_the_cutoff():
    true = np.array([[0.0, 0.0], [0.0, 2.0]])
    pred = np.array([[0.0, 1.0]])  # equidistant from both
    pi, ti = match(pred, true, 1.5)
    assert len(pi) == 1
    assert len(match(pred, true, 0.9)[0]) == 0


def test_hungarian_maximises_pairs_where_greedy_would_not():
    # Greedy nearest pairing takes (p0, t1) and leaves p1 alone.
    true = np.array([[0.0, 0.0], [0.0, 1.0]])
    pred = np.array([[0.0, 0.9], [0.0, 1.95]])
    pi, ti = match(pred, true, 1.0)
    assert len(pi) == 2
    assert f1_at(pred, true, 1.0) == 1.0


def test_exact_hits_count():
    pts = np.array([[3.0, 4.0], [10.0, 10.0]])
    assert f1_at(pts, pts, 0.5) == 1.0
    assert integrated_f1(pts, pts) == pytest.approx(1.0)


def test_integrated_f1_rewards_localisation():
    rng = np.random.default_rng(1)
    true = rng.uniform(0, 500, (200, 2))
    near = true + rng.normal(0, 0.2, true.shape)
    far = true + rng.normal(0, 0.6, true.shape)
    assert integrated_f1(near, true) > integrated_f1(far, true) + 0.1
    assert f1_at(near, true, 3) == f1_at(far, true, 3) == 1.0
    # A shift of exactly d px gives F1 1 for cut-offs >= d: integrated = 1 - d / 3.
    shifted = true + np.array([0.0, 1.5])
    assert integrated_f1(shifted, true) == pytest.approx(0.5, abs=0.04)


def test_score_reports_precision_recall_and_error():
    true = np.array([[0.0, 0.0], [10.0, 10.0], [20.0, 20.0], [30.0, 30.0]])
    pred = np.array([[0.0, 0.5], [10.0, 10.5], [50.0, 50.0]])
    s = score(pred, true)
    assert s.precision == pytest.approx(2 / 3)
    assert s.recall == pytest.approx(0.5)
    assert s.loc_error == pytest.approx(0.5)
    assert s.f1_3 == pytest.approx(2 * 2 / 7)


def _global_match(pred, true, cutoff):
    """One assignment over every candidate at once (the reference for small sets)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    d = cdist(pred, true)
    big = 1e6 + 10.0 * cutoff * max(d.shape)
    cost = np.where(d <= cutoff, d - 1e3 * (cutoff + 1.0), big)
    r, c = linear_sum_assignment(cost)
    keep = cost[r, c] < big
    return r[keep], c[keep]


def test_match_by_groups_equals_one_global_assignment():
    rng = np.random.default_rng(31)
    for trial in range(20):
        true = rng.uniform(0, 40, (rng.integers(5, 120), 2))
        pred = np.concatenate([true[: len(true) // 2] + rng.normal(0, 1.0, (len(true) // 2, 2)),
                               rng.uniform(0, 40, (rng.integers(0, 60), 2))])  # fmt: skip
        for cutoff in (1.0, 3.0):
            p, t = match(pred, true, cutoff)
            gp, gt = _global_match(pred, true, cutoff)
            assert len(p) == len(gp), (trial, cutoff)
            d = np.hypot(*(pred[p] - true[t]).T).sum()
            gd = np.hypot(*(pred[gp] - true[gt]).T).sum()
            assert abs(d - gd) < 1e-9, (trial, cutoff)
            assert len(set(p)) == len(p) and len(set(t)) == len(t)


def test_match_scales_to_a_whole_slide():
    """44,500 spots 4.5 px apart on a 2000 x 450 px field: the matching works group by
    group instead of one 44,500^2 matrix (16 GB)."""
    g = np.arange(0, 2000, 4.5)
    true = np.stack(np.meshgrid(g, g[:100], indexing="ij"), -1).reshape(-1, 2)
    pred = true + 0.3
    p, t = match(pred, true, 3.0)
    assert len(p) == len(true) and np.all(p == t)


def test_cylinder_matches_within_the_cutoff_in_yx_and_in_z():
    """CASES.md's 3D tolerance: 1.5 px in yx and 1.5 slices in z, not 1.5 in 3D."""
    true = np.array([[10.0, 10.0, 10.0], [10.0, 40.0, 40.0], [10.0, 70.0, 70.0]])
    pred = true + np.array([[1.4, 1.4, 0.0], [1.6, 0.0, 0.0], [0.0, 1.0, 1.1]])
    pi, ti = match(pred, true, 1.5, cylinder=True)
    assert sorted(pi) == [0, 2] and sorted(ti) == [0, 2]  # dz 1.6 is out, dyx 1.49 in
    assert list(match(pred, true, 1.5)[0]) == [2]  # in 3D, 1.98 px is out
    s = score(pred, true, cylinder=True)
    assert s.f1_1 == 0.0 and s.f1_2 == 1.0 and s.f1_3 == 1.0
    assert s.loc_error == pytest.approx(np.linalg.norm(pred - true, axis=1).mean())
    # 2D points are not changed by it.
    flat = pred[:, 1:]
    assert f1_at(flat, true[:, 1:], 1.5, cylinder=True) == f1_at(flat, true[:, 1:], 1.5)


def test_pooled_scores_are_those_of_all_spots_taken_together():
    """Pooled = the score of the concatenated spots (images far apart): a blank image
    with one false spot costs one spot, not half of a two-image mean."""
    from piscis.metrics import mean_scores, pooled_scores, score

    rng = np.random.default_rng(9)
    truth_a = rng.uniform(0, 100, (40, 2))
    pred_a = truth_a + rng.normal(0, 0.8, truth_a.shape)
    pred_a = np.vstack([pred_a[:35], rng.uniform(0, 100, (3, 2))])
    blank_pred, blank_true = np.array([[50.0, 50.0]]), np.zeros((0, 2))
    a, b = score(pred_a, truth_a), score(blank_pred, blank_true)
    together = score(np.vstack([pred_a, blank_pred + 1000]), truth_a)
    pooled = pooled_scores([a, b])
    for name in ("f1_1", "f1_2", "f1_3", "f1_int", "precision", "recall", "loc_error"):
        assert pooled[name] == pytest.approx(getattr(together, name), abs=1e-12), name
    assert mean_scores([a, b])["f1_3"] < pooled["f1_3"] - 0.4  # the mean halves it
    empty = score(np.zeros((0, 2)), np.zeros((0, 2)))
    assert pooled_scores([a, empty])["f1_int"] == pytest.approx(a.f1_int)
