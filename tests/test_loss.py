"""SmoothF1 and the voting pool (DESIGN.md sections 3-4)."""

import numpy as np
import pytest
import torch

from piscis.data import batch_targets, make_targets
from piscis.loss import RADIUS, smooth_f1, soft_peaks, total_loss, vote_pool


def _targets(coords, shape=(64, 64), region=None):
    b = batch_targets([(np.zeros(shape, np.float32), np.asarray(coords).reshape(-1, 2), region)])
    return {k: torch.as_tensor(v) for k, v in b.items()}


@pytest.fixture
def spots():
    rng = np.random.default_rng(0)
    pts = []
    while len(pts) < 12:
        p = rng.uniform(4, 59, 2)
        if all(np.hypot(*(p - q)) > 6 for q in pts):
            pts.append(p)
    return np.array(pts)


def test_targets_mark_dilated_spot_pixels_and_point_at_centres(spots):
    t = make_targets(spots, (64, 64))
    assert t["n_true"] == len(spots)
    assert t["label"].sum() == 9 * len(spots)
    for y, x in spots:
        r = np.round([y, x]).astype(int)
        for dy in (-1, 0, 1):
            q = r + [dy, 1]
            d = t["disp"][:, q[0], q[1]]
            np.testing.assert_allclose(q + d, [y, x], atol=1e-5)


def test_perfect_prediction_scores_about_one(spots):
    t = _targets(spots)
    prob = t["label"] * 0.999
    sf1 = smooth_f1(prob, t["disp"], t["disp"], t["vote"], t["n_true"])
    assert sf1.item() > 0.99


def test_prediction_shifted_beyond_radius_scores_about_zero(spots):
    t = _targets(spots)
    shift = int(np.ceil(RADIUS)) + 1
    prob = torch.roll(t["label"] * 0.999, shift, dims=2)
    disp = torch.roll(t["disp"], shift, dims=3)
    sf1 = smooth_f1(prob, disp, t["disp"], t["vote"], t["n_true"])
    assert sf1.item() < 1e-3


def test_localisation_error_lowers_the_score(spots):
    t = _targets(spots)
    prob = t["label"] * 0.999
    good = smooth_f1(prob, t["disp"], t["disp"], t["vote"], t["n_true"]).item()
    worse = smooth_f1(prob, t["disp"] + 0.4, t["disp"], t["vote"], t["n_true"]).item()
    assert worse < good - 0.05


def test_gradients_are_finite_and_reach_both_heads(spots):
    t = _targets(spots)
    torch.manual_seed(0)
    logit = torch.randn(1, 64, 64, requires_grad=True)
    disp = torch.randn(1, 2, 64, 64, requires_grad=True)
    loss, _ = total_loss(logit, disp, t)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logit.grad).all() and logit.grad.abs().sum() > 0
    assert torch.isfinite(disp.grad).all() and disp.grad.abs().sum() > 0


def test_image_without_spots_punishes_every_prediction():
    t = _targets(np.zeros((0, 2)))
    logit = torch.full((1, 64, 64), -2.0)
    logit[0, 10, 10] = 3.0  # one confident false spot
    logit[0, 40, 30] = 0.0  # and an unsure one
    logit.requires_grad_(True)
    loss, sf1 = total_loss(logit, torch.zeros(1, 2, 64, 64), t)
    assert sf1.item() < 0.9
    loss.backward()
    # Raising any prediction raises the loss.
    assert logit.grad[0, 10, 10] > 0 and logit.grad[0, 40, 30] > 0
    nothing, _ = total_loss(torch.full((1, 64, 64), -30.0), torch.zeros(1, 2, 64, 64), t)
    assert nothing.item() < loss.item()
    assert nothing.item() == pytest.approx(-1.0, abs=1e-3)


def test_region_mask_ignores_unannotated_spots(spots):
    region = np.zeros((64, 64), bool)
    region[:, :32] = True
    t = _targets(spots, region=region)
    inside = spots[np.round(spots[:, 1]) < 32]
    assert t["n_true"].item() == len(inside)
    # Predicting every spot (also the unannotated ones) is still perfect.
    full = _targets(spots)
    prob = full["label"] * 0.999
    masked = smooth_f1(prob, full["disp"], t["disp"], t["vote"], t["n_true"], t["region"])
    assert masked.item() > 0.99
    unmasked = smooth_f1(prob, full["disp"], t["disp"], t["vote"], t["n_true"])
    assert unmasked.item() < masked.item() - 0.1


def test_vote_pool_takes_the_max_of_the_voters():
    prob = torch.zeros(1, 5, 5)
    disp = torch.zeros(1, 2, 5, 5)
    prob[0, 1, 2], disp[0, :, 1, 2] = 0.6, torch.tensor([1.0, 0.0])  # votes for (2, 2)
    prob[0, 2, 3], disp[0, :, 2, 3] = 0.8, torch.tensor([0.0, -1.0])  # votes for (2, 2)
    prob[0, 2, 2], disp[0, :, 2, 2] = 0.3, torch.tensor([0.2, 0.1])  # itself
    pooled = vote_pool(prob, disp)
    assert pooled[0, 2, 2].item() == pytest.approx(0.8)
    assert pooled[0, 1, 2].item() == 0.0 and pooled[0, 2, 3].item() == 0.0


def test_soft_peaks_keep_maxima_and_drop_their_neighbours():
    pooled = torch.zeros(1, 7, 7)
    pooled[0, 3, 3], pooled[0, 3, 4] = 0.9, 0.5
    pi = soft_peaks(pooled)
    assert pi[0, 3, 3].item() == pytest.approx(0.9, rel=1e-3)
    assert pi[0, 3, 4].item() < 1e-3
