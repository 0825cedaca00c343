"""Shared fixtures."""

from __future__ import annotations

import contextlib
import logging

import pytest


def _small_model(folder, name: str, spot_bias: float, threshold: float, seed: int = 0):
    """A random SpotNet((4, 8)) model folder whose spot logits are offset by ``spot_bias``."""
    import torch

    from piscis.io import save_model
    from piscis.model import SpotNet

    torch.manual_seed(seed)
    net = SpotNet((4, 8))
    with torch.no_grad():
        net.head.bias.data[0] = spot_bias
    config = {
        "name": name,
        "architecture": {"type": "SpotNet", "channels": [4, 8], "in_channels": 1},
        "normalization": {"method": "noise", "compression": 3.0},
        "threshold": threshold,
        "scale": 1.0,
    }
    save_model(net, config, folder, card="test")
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random model folder that predicts no spots (its spot bias is -20).

    For tests of file handling, messages and exit codes, not detection quality.
    """
    return _small_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", -20.0, 0.5)


@pytest.fixture(scope="session")
def spotty_model(tmp_path_factory):
    """A tiny random model folder that finds 'spots' in anything (spot bias +2, threshold
    0.5): deterministic outputs to compare runs, not detection quality."""
    return _small_model(tmp_path_factory.mktemp("models") / "spotty", "spotty", 2.0, 0.5, 6)


@contextlib.contextmanager
def piscis_logger_kept():
    """cli.main() installs its own handler on the 'piscis' logger; undo it on leaving."""
    log = logging.getLogger("piscis")
    saved = (log.handlers[:], log.level, log.propagate)
    try:
        yield
    finally:
        log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]


@pytest.fixture(autouse=True)
def _restore_piscis_logger():
    with piscis_logger_kept():
        yield
