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
