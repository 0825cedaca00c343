"""Shared fixtures."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random model folder that predicts no spots (its spot bias is -20).

    For tests of file handling, messages and exit codes, not detection quality.
    """
    import torch

    from piscis.io import save_model
    from piscis.model import SpotNet

    torch.manual_seed(0)
    net = SpotNet((4, 8))
    with torch.no_grad():
        net.head.bias.data[0] = -20.0
    config = {
        "name": "tiny",
        "architecture": {"type": "SpotNet", "channels": [4, 8], "in_channels": 1},
        "normalization": {"method": "noise", "compression": 3.0},
        "threshold": 0.5,
        "scale": 1.0,
    }
    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_model(net, config, folder, card="test")
    return folder


@pytest.fixture(autouse=True)
def _restore_piscis_logger():
    """cli.main() installs its own handler on the 'piscis' logger; undo it after each test."""
    log = logging.getLogger("piscis")
    saved = (log.handlers[:], log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]
