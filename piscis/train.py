"""Training: the loop, validation, checkpoints and resume, and model folders
with their cards.

Training data mix annotated pairs (random crops with flips, 90-degree and
free rotations, zoom and noise) and, optionally, synthetic images from
:mod:`piscis.synth`. Crops without spots are kept: they teach the network
that noise is not a spot.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .data import Pair, batch_targets, sample_real, sample_synthetic
from .detect import (
    BAND,
    COMPRESSION,
    CONTRAST_RATIO,
    NORMALIZATION_MODES,
    Maps,
    predict_maps,
    spots_from_maps,
)
from .io import LoadedModel, load_model, model_views, save_model
from .loss import total_loss
from .metrics import mean_scores, score
from .model import SpotNet, fuse_batchnorm
from .synth import SynthConfig

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of a training run (all saved in the model's config)."""

    epochs: int = 10
    steps_per_epoch: int = 200
    batch_size: int = 16
    crop: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-5
    synthetic_fraction: float = 0.5  # share of each batch drawn from the generator
    val_fraction: float = 0.2  # share of pairs held out when no validation set is given
    threshold: float = 0.5
    seed: int = 0
    channels: tuple[int, ...] = (8, 16, 32, 64)
    workers: int = 1
    keep: str = "best"  # "best" (validation integrated F1) or "last" epoch
    normalization: str = "image"  # statistics from each training image ("image") or crop
    extra: dict = field(default_factory=dict)


class _Batches(torch.utils.data.IterableDataset):
    """Endless batches of crops; each worker has its own seeded generator."""

    def __init__(self, pairs: list[Pair], cfg: TrainConfig, weights=None):
        self.pairs, self.cfg = pairs, cfg
        w = np.ones(len(pairs)) if weights is None else np.asarray(weights, float)
        self.weights = w / w.sum() if len(pairs) else w
        # Settings of the generator other than its defaults (config "extra"/"synth").
        options = dict(cfg.extra.get("synth", {}))
        self.synth = SynthConfig(shape=(cfg.crop, cfg.crop), **options) if options else None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        seed = self.cfg.seed * 1000 + wid + int(self.cfg.extra.get("epoch_offset", 0)) * 7919
        rng = np.random.default_rng(seed)
        cfg = self.cfg
        synth_frac = cfg.synthetic_fraction if self.pairs else 1.0
        while True:
            items = []
            for _ in range(cfg.batch_size):
                if rng.random() < synth_frac:
                    items.append(sample_synthetic(rng, cfg.crop, self.synth))
                else:
                    pair = self.pairs[rng.choice(len(self.pairs), p=self.weights)]
                    items.append(
                        sample_real(rng, pair, cfg.crop, per_crop=cfg.normalization == "crop")
                    )
            yield batch_targets(items)


def _views(x: torch.Tensor, k: int) -> torch.Tensor:
    """View k of 8 of a square batch (B, C, H, W): bit 0 flips rows, bit 1 columns,
    bit 2 transposes (applied first)."""
    if k & 4:
        x = x.transpose(-1, -2)
    if k & 1:
        x = x.flip(-2)
    if k & 2:
        x = x.flip(-1)
    return x


def _unview(out: torch.Tensor, k: int) -> torch.Tensor:
    """Maps (B, 3, H, W) of view k back to the batch's frame, displacements included."""
    sign = torch.ones(3, dtype=out.dtype, device=out.device)
    if k & 2:
        out, sign[2] = out.flip(-1), -1.0
    if k & 1:
        out, sign[1] = out.flip(-2), -1.0
    out = out * sign.view(1, 3, 1, 1)
    if k & 4:
        out = out.transpose(-1, -2)[:, [0, 2, 1]]
    return out


class Teacher:
    """A fixed model whose maps, averaged over the 8 rotations and flips of each
    crop, the network in training also learns (distillation): the average makes
    fewer errors than any one view, and a network that matches it gains part of
    that at the cost of one view."""

    def __init__(self, model, views: int = 8, weight: float = 1.0, disp_weight: float = 1.0):
        if isinstance(views, bool) or views not in range(1, 9):
            raise ValueError(
                f"teacher views must be 1 to 8 (the rotations and flips), got {views!r}"
            )
        for name, w in (("weight", weight), ("disp_weight", disp_weight)):
            if (
                isinstance(w, bool)
                or not isinstance(w, (int, float))
                or not w >= 0
                or w == math.inf
            ):
                raise ValueError(f"teacher {name} must be a number >= 0, got {w!r}")
        loaded = load_model(model)
        self.net, self.views, self.weight = loaded.net, int(views), float(weight)
        self.disp_weight = float(disp_weight)

    @torch.no_grad()
    def maps(self, x: torch.Tensor) -> torch.Tensor:
        outs = [
            _unview(self.net(_views(x, k).contiguous(memory_format=torch.channels_last)), k)
            for k in range(self.views)
        ]
        return torch.stack(outs).mean(0)

    def loss(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Soft-label cross-entropy on the spot map and squared displacement error,
        both weighted by the teacher's probability, per expected spot pixel."""
        t = self.maps(x)
        p = torch.sigmoid(t[:, 0])
        norm = p.sum() + 1.0
        bce = torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], p, reduction="sum")
        disp = (p * ((out[:, 1:] - t[:, 1:]) ** 2).sum(1)).sum()
        return self.weight * (bce + self.disp_weight * disp) / norm


def _to_torch(batch: dict) -> dict:
    return {k: torch.as_tensor(v) for k, v in batch.items()}


def evaluate_pairs(model: LoadedModel, pairs: list[Pair], threshold: float) -> dict[str, float]:
    """Mean scores of ``model`` on whole validation images (regions respected)."""
    scores = []
    for pair in pairs:
        maps, _ = predict_maps(pair.image, model.net, pair.norm)
        spots = spots_from_maps(maps, pair.image, threshold)
        pred, true = spots.coords, pair.coords
        if pair.region is not None:
            pred = pred[_in_region(pred, pair.region)]
            true = true[_in_region(true, pair.region)]
        scores.append(score(pred, true))
    return mean_scores(scores)


def _in_region(coords: np.ndarray, region: np.ndarray) -> np.ndarray:
    pix = np.clip(np.round(coords).astype(int), 0, np.array(region.shape) - 1)
    return region[pix[:, 0], pix[:, 1]] if len(pix) else np.zeros(0, bool)


def _inference_copy(net: SpotNet, config: dict) -> LoadedModel:
    fresh = SpotNet(net.channels, net.in_channels)
    fresh.load_state_dict(net.state_dict())
    fused = fuse_batchnorm(fresh.eval()).to(memory_format=torch.channels_last)
    fused.views = model_views(config)
    return LoadedModel(fused, config)


def choose_threshold(model: LoadedModel, pairs: list[Pair]) -> tuple[float, dict]:
    """The threshold that maximises mean integrated F1 on ``pairs``; maps are cached."""
    cached: list[tuple[Pair, Maps]] = []
    for pair in pairs:
        maps, _ = predict_maps(pair.image, model.net, pair.norm)
        cached.append((pair, maps))
    best = (-1.0, 0.5, {})
    for t in np.round(np.arange(0.2, 0.91, 0.05), 2):
        sc = []
        for pair, maps in cached:
            pred = spots_from_maps(maps, pair.image, float(t)).coords
            true = pair.coords
            if pair.region is not None:
                pred, true = (
                    pred[_in_region(pred, pair.region)],
                    true[_in_region(true, pair.region)],
                )
            sc.append(score(pred, true))
        m = mean_scores(sc)
        if m["f1_int"] > best[0] + 1e-9:
            best = (m["f1_int"], float(t), m)
    return best[1], best[2]


def check_config(cfg: TrainConfig, multiple: int) -> None:
    """Refuse settings that cannot train (a ValueError that says which and why)."""
    for name in ("epochs", "steps_per_epoch", "batch_size"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    crop = cfg.crop
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < multiple or crop % multiple:
        lo = max(multiple, crop // multiple * multiple) if isinstance(crop, int) else multiple
        raise ValueError(
            f"crop {crop!r} must be a multiple of {multiple} (the network halves it "
            f"{multiple.bit_length() - 1} times): try {lo} or {lo + multiple}"
        )
    if (
        isinstance(cfg.lr, bool)
        or not isinstance(cfg.lr, (int, float))
        or not 0 < cfg.lr < math.inf
    ):
        raise ValueError(f"the learning rate must be a number > 0, got {cfg.lr!r}")


def train(
    pairs: list[Pair],
    out_dir: str | Path,
    cfg: TrainConfig | None = None,
    val_pairs: list[Pair] | None = None,
    init: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    description: str = "",
    tune_threshold: bool = False,
    pair_weights: list[float] | None = None,
) -> Path:
    """Train (or fine-tune from ``init``) and write a new model folder.

    Parameters
    ----------
    pairs : annotated training pairs (may be empty with synthetic_fraction 1).
    out_dir : the new model folder; refused if it exists unless ``overwrite``.
    val_pairs : validation pairs; default: ``cfg.val_fraction`` of ``pairs``.
    init : a model name or folder to start from (fine-tuning).
    checkpoint_dir : where ``last.pt``/``best.pt`` go (default: ``out_dir`` + ``.ckpt``).
    resume : continue from ``checkpoint_dir/last.pt``.
    progress : called with a dict after every step (``step``, ``loss``...) and
        every epoch (``epoch``, ``val``...).
    should_stop : polled every step; True stops cleanly and keeps the best model.
    """
    cfg = cfg or TrainConfig()
    if cfg.normalization not in NORMALIZATION_MODES[:2]:
        msg = f"normalization must be 'image' or 'crop' in training, got {cfg.normalization!r}"
        raise ValueError(msg)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; choose another folder or pass --overwrite")
    base = None if init is None else load_model(init)
    init_cfg: dict = {} if base is None else base.config
    channels = tuple(init_cfg["architecture"]["channels"]) if init_cfg else tuple(cfg.channels)
    check_config(cfg, 2 ** (len(channels) - 1))
    # The teacher first: a missing one is said before any folder is made.
    spec = cfg.extra.get("teacher")
    teacher = Teacher(**spec) if spec else None
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    pairs = list(pairs)
    val_given = val_pairs is not None
    if val_pairs is None:
        order = rng.permutation(len(pairs))
        n_val = int(round(cfg.val_fraction * len(pairs))) if len(pairs) > 1 else 0
        val_pairs = [pairs[i] for i in order[:n_val]]
        pairs = [pairs[i] for i in order[n_val:]]
    logger.info("training on %d pairs, validating on %d", len(pairs), len(val_pairs))

    net = SpotNet(channels)
    if base is not None:
        from safetensors.torch import load_file

        net.load_state_dict(load_file(str(base.path / "model.safetensors")))
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * cfg.steps_per_epoch

    def lr_at(step):
        warm = min(1.0, (step + 1) / 100)
        return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir.with_name(out_dir.name + ".ckpt")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    start_epoch, history, best = 0, [], {"score": -1.0, "epoch": -1}
    if resume and (ckpt_dir / "last.pt").exists():
        state = torch.load(ckpt_dir / "last.pt", weights_only=True)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        start_epoch = int(state["epoch"]) + 1
        history = json.loads(state["history"])
        best = json.loads(state["best"])
        logger.info("resumed from %s at epoch %d", ckpt_dir / "last.pt", start_epoch)

    # A fine-tuned model keeps its parent's decoding (threshold, significance floor)
    # unless the threshold is chosen again on validation: the parent's were chosen on
    # validation data, and a model without a floor finds spots in pure noise.
    threshold = cfg.threshold if init is None else float(init_cfg.get("threshold", cfg.threshold))
    model_config = {
        "name": out_dir.name,
        "piscis_version": __version__,
        "architecture": {"type": "SpotNet", "channels": list(net.channels), "in_channels": 1},
        "normalization": {
            "method": "noise or contrast",
            "compression": COMPRESSION,
            "contrast_ratio": CONTRAST_RATIO,
            "band": list(BAND),
            "statistics": "whole image" if cfg.normalization == "image" else "each crop",
            "mode": cfg.normalization,
        },
        "threshold": threshold,
        "scale": float(init_cfg.get("scale", 1.0)),
        # One pass per tile unless the parent averages two (detect._forward).
        "views": int(init_cfg.get("views", 1)),
        "training": {
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "pairs": [p.name for p in pairs],
            "validation": [p.name for p in val_pairs],
            "init": str(init) if init else None,
            "description": description,
        },
    }
    if init_cfg.get("min_snr") is not None:
        model_config["min_snr"] = float(init_cfg["min_snr"])

    stopped = False
    step = start_epoch * cfg.steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        cfg.extra["epoch_offset"] = epoch
        loader = torch.utils.data.DataLoader(
            _Batches(pairs, cfg, pair_weights if val_given else None),
            batch_size=None,
            num_workers=cfg.workers,
            persistent_workers=False,
        )
        it = iter(loader)
        net.train()
        t0, losses, sf1s = time.time(), [], []
        for _ in range(cfg.steps_per_epoch):
            if should_stop is not None and should_stop():
                stopped = True
                break
            batch = _to_torch(next(it))
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            out = net(batch["x"].contiguous(memory_format=torch.channels_last))
            loss, sf1 = total_loss(out[:, 0], out[:, 1:], batch)
            if teacher is not None:
                loss = loss + teacher.loss(out, batch["x"])
            if not torch.isfinite(loss):  # saved, the weights would be NaN: 0 spots, silently
                raise ValueError(
                    f"training diverged at step {step + 1}: the loss is {float(loss)}; "
                    f"try a smaller learning rate (now {cfg.lr:g})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            losses.append(float(loss.detach()))
            sf1s.append(float(sf1.mean()))
            step += 1
            if progress is not None:
                progress({"step": step, "total": total_steps, "epoch": epoch, "loss": losses[-1]})
        del it, loader
        net.eval()
        if stopped and not losses:  # stopped before this epoch's first step: nothing to record
            break
        record = {
            "epoch": epoch,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "smooth_f1": float(np.mean(sf1s)) if sf1s else float("nan"),
            "seconds": time.time() - t0,
        }
        if val_pairs and (losses or stopped):
            val = evaluate_pairs(_inference_copy(net, model_config), val_pairs, threshold)
            record["val"] = val
            val_score = val["f1_int"]
        else:
            val_score = record["smooth_f1"]
        history.append(record)
        logger.info("epoch %d: %s", epoch, json.dumps(record))
        if val_score > best["score"] and losses:
            best = {"score": float(val_score), "epoch": epoch}
            torch.save({"net": net.state_dict()}, ckpt_dir / "best.pt")
            # A usable model folder of the best epoch so far, for long runs.
            snap = dict(model_config, training=dict(model_config["training"], history=history))
            save_model(net, snap, ckpt_dir / "best_model", model_card(snap), overwrite=True)
        torch.save(
            {
                "net": net.state_dict(),
                "opt": opt.state_dict(),
                "epoch": epoch,
                "history": json.dumps(history),
                "best": json.dumps(best),
            },
            ckpt_dir / "last.pt",
        )
        if progress is not None:
            progress({"epoch_done": epoch, "record": record, "total_epochs": cfg.epochs})
        if stopped:
            break

    if cfg.keep == "best" and (ckpt_dir / "best.pt").exists():
        net.load_state_dict(torch.load(ckpt_dir / "best.pt", weights_only=True)["net"])
    net.eval()
    model_config["training"]["history"] = history
    model_config["training"]["best_epoch"] = best["epoch"]
    model_config["training"]["stopped_early"] = stopped
    if tune_threshold and val_pairs:
        thr, metrics = choose_threshold(_inference_copy(net, model_config), val_pairs)
        model_config["threshold"] = thr
        model_config["training"]["threshold_tuned_on"] = "validation pairs"
        logger.info("threshold %.2f chosen on the validation pairs", thr)
    final = (
        evaluate_pairs(_inference_copy(net, model_config), val_pairs, model_config["threshold"])
        if val_pairs
        else {}
    )
    model_config["metrics"] = {"validation": final}
    card = model_card(model_config)
    return save_model(net, model_config, out_dir, card, overwrite=overwrite)


def model_card(config: dict) -> str:
    """A short human-readable description of a model folder."""
    tr = config["training"]
    val = config.get("metrics", {}).get("validation", {})
    lines = [
        f"# {config['name']}",
        "",
        f"piscis spot model (SpotNet, channels {config['architecture']['channels']}), "
        f"threshold {config['threshold']}, scale {config['scale']}.",
        "",
        "## Training data",
        "",
        tr.get("description") or "",
        f"- pairs: {len(tr['pairs'])} ({', '.join(tr['pairs'][:20])}"
        + (" ...)" if len(tr["pairs"]) > 20 else ")"),
        f"- validation pairs: {', '.join(tr['validation']) or 'none'}",
        f"- synthetic share of each batch: {tr['config']['synthetic_fraction']}",
        f"- started from: {tr['init'] or 'random initialisation'}",
        f"- epochs run: {len(tr.get('history', []))}, best epoch {tr.get('best_epoch')}",
        "",
        "## Validation figures",
        "",
    ]
    if val:
        lines += [f"- {k}: {v:.3f}" for k, v in val.items() if isinstance(v, float)]
    else:
        lines.append("- none (no validation pairs)")
    for k, v in config.get("metrics", {}).items():
        if k != "validation" and isinstance(v, dict):
            lines += ["", f"### {k}", ""] + [f"- {a}: {b}" for a, b in v.items()]
    return "\n".join(lines) + "\n"
