"""The voting pool and the SmoothF1 loss (DESIGN.md sections 3 and 4).

All maps are batched tensors of shape (B, H, W); displacements (B, 2, H, W)
in pixels, (dy, dx). Nine shifted copies of a map stand for the 3x3
neighbourhood N3: ``_neighbours(x)[:, k]`` at p holds x(p + o_k); the
shifts are one-hot 3x3 convolutions, cheap forwards and backwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TAU = 0.05
RADIUS = 3.0
EPS = 1e-7
DISP_WEIGHT = 0.1

# The 3x3 offsets (dy, dx), row by row.
OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def _kernels(gather: bool, dtype, device) -> torch.Tensor:
    """(9, 1, 3, 3) one-hot kernels: gather x(p + o), or move x(q) to q + o."""
    k = torch.zeros(9, 1, 3, 3, dtype=dtype, device=device)
    for i, (dy, dx) in enumerate(OFFSETS):
        if gather:
            k[i, 0, 1 + dy, 1 + dx] = 1.0
        else:
            k[i, 0, 1 - dy, 1 - dx] = 1.0
    return k


def _neighbours(x: torch.Tensor) -> torch.Tensor:
    """x(p + o) for the nine offsets o, stacked on dim 1: (B, 9, H, W); 0 outside."""
    return F.conv2d(x.unsqueeze(1), _kernels(True, x.dtype, x.device), padding=1)


def _offset_index(disp: torch.Tensor) -> torch.Tensor:
    """Index into OFFSETS of round(d) per pixel (B, H, W); -1 when |round(d)| > 1."""
    off = torch.round(disp.detach())
    inside = (off.abs() <= 1).all(dim=1)
    idx = ((off[:, 0] + 1) * 3 + (off[:, 1] + 1)).long()
    return torch.where(inside, idx, torch.full_like(idx, -1))


def _one_hot(idx: torch.Tensor, dtype) -> torch.Tensor:
    """(B, 9, H, W) indicator of idx == k (all zero where idx is -1)."""
    return (idx.unsqueeze(1) == torch.arange(9, device=idx.device).view(1, 9, 1, 1)).to(dtype)


def _neighbours_int(idx: torch.Tensor) -> torch.Tensor:
    """Like :func:`_neighbours` for an integer map; -1 outside the image."""
    h, w = idx.shape[-2:]
    padded = F.pad(idx, (1, 1, 1, 1), value=-1)
    return torch.stack(
        [padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in OFFSETS], dim=1
    )


def vote_pool(prob: torch.Tensor, disp: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """l(p) = max of prob(q) over q in N3(p) voting for p; ``fill`` where none does.

    A pixel q votes for p = round(q + d(q)); since pixel centres are
    integers, p - q = round(d(q)). ``prob`` may be probabilities or logits
    (pass ``fill=-inf`` for logits). The rounding carries no gradient; the
    gradient flows through ``prob``.
    """
    votes = _one_hot(_offset_index(disp), prob.dtype)  # (B, 9, H, W) at q
    if fill == 0.0 and bool((prob >= 0).all()):
        cand = votes * prob.unsqueeze(1)
        moved = F.conv2d(cand, _kernels(False, prob.dtype, prob.device), padding=1, groups=9)
        return moved.max(dim=1).values
    # General fill (logits): shift the values and the vote masks separately.
    finite = torch.where(torch.isfinite(prob), prob, torch.zeros_like(prob))
    kern = _kernels(False, prob.dtype, prob.device)
    moved = F.conv2d(votes * finite.unsqueeze(1), kern, padding=1, groups=9)
    has = F.conv2d(votes, kern, padding=1, groups=9) > 0.5
    moved = torch.where(has, moved, torch.full_like(moved, fill))
    return moved.max(dim=1).values


def soft_peaks(pooled: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """pi(p) = l(p) exp(l(p)/tau) / sum over N3(p) of exp(l(q)/tau)."""
    e = torch.exp((pooled - 1.0) / tau)  # shifted by the maximum, 1, for stability
    denom = _neighbours(e).sum(1)
    return pooled * e / denom


def smooth_f1(
    prob: torch.Tensor,
    disp: torch.Tensor,
    true_disp: torch.Tensor,
    true_vote: torch.Tensor,
    n_true: torch.Tensor,
    region: torch.Tensor | None = None,
    tau: float = TAU,
    radius: float = RADIUS,
) -> torch.Tensor:
    """Per-image SmoothF1 estimate (B,), between 0 and 1 (higher is better).

    An image without annotated spots scores 1 / (1 + sum of pi) instead of
    the F1 formula, whose value there jumps from 1 to 0 without a gradient.

    Parameters
    ----------
    prob : (B, H, W) spot probabilities s(q).
    disp : (B, 2, H, W) predicted displacements.
    true_disp : (B, 2, H, W) displacement from each pixel to its nearest
        annotated spot.
    true_vote : (B, H, W) bool, True at the rounded pixel of an annotated spot.
    n_true : (B,) number of annotated spots P (inside ``region``).
    region : optional (B, H, W) 0/1 mask of the annotated region.
    """
    pooled = vote_pool(prob, disp)
    pi = soft_peaks(pooled, tau)
    if region is not None:
        pi = pi * region

    # Localisation quality of each pixel's own prediction.
    m = torch.clamp(1.0 - torch.linalg.vector_norm(disp - true_disp, dim=1) / radius, min=0.0)

    # S(p): the pixels q = p + o of N3(p) whose true vote round(q + d(q)) is p,
    # i.e. whose true offset is -o. member[:, k](p) = [p + o_k in S(p)].
    true_idx = _offset_index(true_disp)
    member = _neighbours_int(true_idx) == (8 - torch.arange(9, device=prob.device)).view(1, 9, 1, 1)
    member = (member & true_vote.unsqueeze(1)).to(prob.dtype)

    pi_n = _neighbours(pi)
    m_n = _neighbours(m)
    claims = torch.clamp((pi_n * member).sum(1), max=1.0)  # A(p)

    # w(p): softmax over the members of S(p) of pi(q) / tau.
    logits = torch.where(member > 0, pi_n / tau, torch.full_like(pi_n, -1e4))
    weights = torch.softmax(logits, dim=1) * member
    quality = (weights * m_n).sum(1)  # M(p)

    tp = (claims * quality).flatten(1).sum(1)
    n_pred = pi.flatten(1).sum(1)
    n_true = n_true.to(prob.dtype)
    sf1 = 2.0 * (tp + EPS) / (n_pred + n_true + 2.0 * EPS)
    # Without annotated spots F1 is 1 for no prediction and 0 for any: that
    # cliff has no gradient. 1 / (1 + soft count) has the same end points
    # and punishes every soft prediction.
    return torch.where(n_true > 0, sf1, 1.0 / (1.0 + n_pred))


def displacement_loss(
    disp: torch.Tensor, true_disp: torch.Tensor, label: torch.Tensor
) -> torch.Tensor:
    """Mean of |d_hat - d| (not squared) over the target label pixels."""
    err = torch.linalg.vector_norm(disp - true_disp, dim=1)
    n = label.sum()
    return (err * label).sum() / torch.clamp(n, min=1.0)


def total_loss(
    logit: torch.Tensor,
    disp: torch.Tensor,
    targets: dict[str, torch.Tensor],
    disp_weight: float = DISP_WEIGHT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-SmoothF1 (batch mean) + disp_weight * displacement loss.

    ``targets`` holds ``disp``, ``vote``, ``label``, ``n_true`` and
    optionally ``region`` (see :func:`piscis.data.make_targets`).
    Returns (loss, smooth F1 per image).
    """
    prob = torch.sigmoid(logit)
    region = targets.get("region")
    sf1 = smooth_f1(prob, disp, targets["disp"], targets["vote"], targets["n_true"], region)
    label = targets["label"]
    if region is not None:
        label = label * region
    loss = -sf1.mean() + disp_weight * displacement_loss(disp, targets["disp"], label)
    return loss, sf1.detach()
