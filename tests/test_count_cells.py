"""Spots per cell through ``piscis count`` and :func:`piscis.count_spots` (issue 3).

Every expected number comes from how the inputs are built. Counting tests run twice
(the ``detector`` fixture): with a stand-in detector that returns the true spot positions
(``stub``: tests the reading, matching, assignment and tables, always runs) and with the
trained default model (``model``: real detection; skipped when ``models/default`` is not
there, or set ``PISCIS_TEST_MODEL`` to another model folder).
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels, find_boundaries

import piscis
import piscis.io
from piscis import cli
from piscis.cells import CELL_COLUMNS
from piscis.io import InputError, read_channels, table_text
from piscis.synth import render_spots

SPOT_COLUMNS = ["y", "x", "score", "intensity", "background"]
CELLS_CSV = ["image", *CELL_COLUMNS]
SUMMARY = ["image", "n_spots", "height", "width", "threshold", "model"]

_env_model = os.environ.get("PISCIS_TEST_MODEL")
REAL_MODEL = Path(_env_model) if _env_model else piscis.io.MODELS_DIR / "default"
needs_model = pytest.mark.skipif(
    not (REAL_MODEL / "model.safetensors").exists(),
    reason="needs the trained default model (models/default/model.safetensors)",
)


@pytest.fixture(autouse=True)
def _restore_piscis_logger():
    """cli.main() installs its own handler on the 'piscis' logger; undo it after each test."""
    log = logging.getLogger("piscis")
    saved = (log.handlers[:], log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]


# ------------------------------------------------------------------------- detection


def _key(image) -> str:
    image = np.ascontiguousarray(image)
    return hashlib.sha1(image.tobytes() + str((image.shape, image.dtype)).encode()).hexdigest()


@dataclass
class Detector:
    kind: str  # "stub" or "model"
    model: Path
    registry: dict

    def register(self, image, coords) -> None:
        """Tell the stub the true spots of ``image`` (ignored by the real model)."""
        self.registry[_key(image)] = np.asarray(coords, float).reshape(-1, 2)


@pytest.fixture(params=["stub", pytest.param("model", marks=needs_model)])
def detector(request, monkeypatch, tiny_model):
    if request.param == "model":
        return Detector("model", REAL_MODEL, {})
    module = importlib.import_module("piscis.detect")
    registry: dict = {}

    def fake_detect(image, model=None, threshold=None, scale=None, name="image", **_):
        coords = registry.get(_key(image), np.zeros((0, 2)))
        coords = coords[np.lexsort((coords[:, 1], coords[:, 0]))]
        inten, bg = module.spot_intensities(np.asarray(image, float), coords)
        return module.Spots(coords, np.ones(len(coords)), inten, bg)

    monkeypatch.setattr(module, "detect", fake_detect)
    return Detector("stub", tiny_model, registry)


# ------------------------------------------------------------------------- helpers


def _run(capsys, *argv) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv])
    _out, err = capsys.readouterr()
    return rc, err


def _table(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _place(rng, region, n, taken, min_sep=6.0, jitter=0.45):
    """``n`` sub-pixel positions on ``region`` pixels, ``min_sep`` from ``taken`` and each other."""
    pix = np.argwhere(region)
    out = []
    for p in pix[rng.permutation(len(pix))]:
        if len(out) == n:
            break
        q = p + rng.uniform(-jitter, jitter, 2)
        if taken and np.min(np.hypot(*(np.asarray(taken) - q).T)) < min_sep:
            continue
        taken.append(q)
        out.append(q)
    assert len(out) == n, "could not place the spots"
    return out


def _spot_image(rng, shape, coords) -> np.ndarray:
    """uint16: background 100, read noise sd 5, spots sigma 1 and amplitude 400."""
    coords = np.asarray(coords, float).reshape(-1, 2)
    img = 100 + render_spots(shape, coords, np.ones(len(coords)), np.full(len(coords), 400.0))
    img = img + rng.normal(0, 5, shape)
    return np.clip(np.round(img), 0, 65535).astype(np.uint16)


def _match(true, pred):
    """One-to-one match of true to predicted labels by overlap: {true: (pred, IoU)}."""
    out = {}
    for k in np.unique(true[true > 0]):
        t = true == k
        ids, counts = np.unique(pred[t], return_counts=True)
        keep = ids > 0
        if not keep.any():
            continue
        j = ids[keep][np.argmax(counts[keep])]
        p = pred == j
        out[int(k)] = (int(j), (t & p).sum() / (t | p).sum())
    return out


# ------------------------------------------------------------------------- the field


@dataclass
class Field:
    spots: np.ndarray  # (Y, X) uint16, channel 0
    dapi: np.ndarray  # (Y, X) uint16, channel 1
    cells: np.ndarray
    nuclei: np.ndarray
    coords: np.ndarray
    expect: dict  # cell id -> (n in nucleus, n in cytoplasm)
    n_background: int
    expand: int
    diameter: float

    @property
    def stack(self) -> np.ndarray:
        return np.stack([self.spots, self.dapi])  # CYX


def make_field(seed=0, shape=(352, 352), n_pairs=3, n_single=21, expand=15, margin=4):
    """Two-channel synthetic cells whose per-cell and per-nucleus spot counts are known.

    Nuclei are ellipses (semi-axes 10-14 px, channel 1: about 800 over a background of
    100), ``n_pairs`` pairs of them touching; cells are the nuclei grown by ``expand`` px,
    and nuclei closer than ``2 * expand`` give touching cells. Each nucleus gets 0-4
    spots, each cytoplasm 0-5, the background 6; spots are at least 6 px apart and
    ``margin`` px from every cell, nucleus and image boundary.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    params: list[tuple] = []  # (cy, cx, a, b, theta)
    edge = 14 + expand + 3

    def free(cy, cx, r, gap):
        inside = edge <= cy <= shape[0] - edge and edge <= cx <= shape[1] - edge
        return inside and all(np.hypot(cy - o[0], cx - o[1]) > r + 14 + gap for o in params)

    def draw():
        a, b = rng.uniform(10, 14, 2)
        return a, b, rng.uniform(0, np.pi)

    tries = 0
    while len(params) < 2 * n_pairs and tries < 20000:  # touching nuclei
        tries += 1
        (a1, b1, t1), (a2, b2, t2) = draw(), draw()
        phi = rng.uniform(0, 2 * np.pi)
        u = np.array([np.sin(phi), np.cos(phi)])
        r1 = 1 / np.hypot(u @ [np.sin(t1), np.cos(t1)] / a1, u @ [np.cos(t1), -np.sin(t1)] / b1)
        r2 = 1 / np.hypot(u @ [np.sin(t2), np.cos(t2)] / a2, u @ [np.cos(t2), -np.sin(t2)] / b2)
        sep = 0.8 * (r1 + r2)
        cy, cx = rng.uniform(edge, shape[0] - edge), rng.uniform(edge, shape[1] - edge)
        cy2, cx2 = cy + sep * u[0], cx + sep * u[1]
        if free(cy, cx, sep + 14, 12) and free(cy2, cx2, 14, 12):
            params += [(cy, cx, a1, b1, t1), (cy2, cx2, a2, b2, t2)]
    while len(params) < 2 * n_pairs + n_single and tries < 40000:
        tries += 1
        a, b, t = draw()
        cy, cx = rng.uniform(edge, shape[0] - edge), rng.uniform(edge, shape[1] - edge)
        if free(cy, cx, 14, 12):
            params.append((cy, cx, a, b, t))
    assert len(params) == 2 * n_pairs + n_single, "could not place the nuclei"

    q = np.full(shape, np.inf)  # each pixel: the ellipse of smallest normalised radius
    nuclei = np.zeros(shape, np.int64)
    for k, (cy, cx, a, b, t) in enumerate(params, start=1):
        dy, dx = yy - cy, xx - cx
        qk = ((dy * np.sin(t) + dx * np.cos(t)) / a) ** 2 + ((dy * np.cos(t) - dx * np.sin(t)) / b) ** 2
        better = (qk <= 1) & (qk < q)
        nuclei[better] = k
        q[better] = qk[better]
    n = len(params)
    cells = expand_labels(nuclei, distance=expand)
    bright = np.concatenate([[0.0], rng.uniform(700, 900, n)])
    dapi = 100 + ndi.gaussian_filter(bright[nuclei], 1.5) + rng.normal(0, 5, shape)
    dapi = np.clip(np.round(dapi), 0, 65535).astype(np.uint16)

    edges = find_boundaries(cells, mode="thick") | find_boundaries(nuclei, mode="thick")
    edges[[0, -1], :] = True
    edges[:, [0, -1]] = True
    safe = ndi.distance_transform_edt(~edges) >= margin
    taken: list = []
    expect = {}
    for k in range(1, n + 1):
        n_nuc, n_cyto = int(rng.integers(0, 5)), int(rng.integers(0, 6))
        _place(rng, safe & (nuclei == k), n_nuc, taken)
        _place(rng, safe & (cells == k) & (nuclei == 0), n_cyto, taken)
        expect[k] = (n_nuc, n_cyto)
    _place(rng, safe & (cells == 0), 6, taken)
    coords = np.array(taken)[rng.permutation(len(taken))]
    spots = _spot_image(rng, shape, coords)
    return Field(spots, dapi, cells, nuclei, coords, expect, 6, expand, 24.0)


def _touching(labels) -> set:
    """Pairs of labels (both > 0) that are 4-neighbours somewhere."""
    a = np.concatenate([labels[:, :-1].ravel(), labels[:-1, :].ravel()])
    b = np.concatenate([labels[:, 1:].ravel(), labels[1:, :].ravel()])
    pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], 1), axis=0)
    return {(int(i), int(j)) for i, j in pairs if 0 < i < j}


def test_the_field_is_what_the_tests_need():
    f = make_field()
    assert 20 <= len(f.expect) <= 40
    assert len(_touching(f.cells)) >= 5
    assert len(_touching(f.nuclei)) == 3  # the touching nucleus pairs
    assert sum(sum(v) for v in f.expect.values()) + f.n_background == len(f.coords)
    d = np.hypot(*(f.coords[:, None] - f.coords[None]).transpose(2, 0, 1))
    assert d[~np.eye(len(d), dtype=bool)].min() >= 6
