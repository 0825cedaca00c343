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
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage import io as skio
from skimage.segmentation import expand_labels, find_boundaries

import piscis
import piscis.io
from piscis import cli
from piscis.batch import RECORD_NAME as RECORD
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


def _place(rng, region, n, taken, min_sep=6.0, jitter=0.45, strict=True):
    """``n`` sub-pixel positions on ``region`` pixels, ``min_sep`` from ``taken`` and each other.

    Appends them to ``taken`` and returns them; ``strict=False``: as many as fit.
    """
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
    assert len(out) == n or not strict, "could not place the spots"
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
        qk = ((dy * np.sin(t) + dx * np.cos(t)) / a) ** 2 + (
            (dy * np.cos(t) - dx * np.sin(t)) / b
        ) ** 2
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
        n_nuc = len(_place(rng, safe & (nuclei == k), n_nuc, taken, strict=False))
        n_cyto = len(_place(rng, safe & (cells == k) & (nuclei == 0), n_cyto, taken, strict=False))
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


def _write_field(folder: Path, f: Field, name="img") -> Path:
    """The image as an ImageJ CYX TIFF, cells as a TIFF, nuclei as a Cellpose _seg.npy."""
    for sub in ("masks", "nuc"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.tif"
    tifffile.imwrite(path, f.stack, imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(folder / "masks" / f"{name}_masks.tif", f.cells.astype(np.uint16))
    np.save(folder / "nuc" / f"{name}_seg.npy", {"masks": _renumber(f.nuclei), "outlines": None})
    return path


def _renumber(nuclei):
    """Nucleus ids unrelated to the cell ids (500 + a permutation)."""
    n = int(nuclei.max())
    lut = np.concatenate([[0], 500 + np.random.default_rng(7).permutation(n)])
    return lut[nuclei].astype(np.int32)


def _check_counts(f: Field, cell_id, in_nucleus, rows, mapping=None):
    """Per true cell: spots in its nucleus and its cytoplasm; and the background spots."""
    by = {int(r["cell_id"]): r for r in rows}
    mapping = mapping or {k: k for k in f.expect}
    assert len(by) == len(f.expect)
    for k, (n_nuc, n_cyto) in f.expect.items():
        r = by[mapping[k]]
        got = (int(r["n_spots"]), int(r["n_spots_nucleus"]), int(r["n_spots_cytoplasm"]))
        assert got == (n_nuc + n_cyto, n_nuc, n_cyto), k
    cell_id = np.asarray(cell_id, int)
    assert len(cell_id) == len(f.coords)
    assert (cell_id == 0).sum() == f.n_background
    assert np.asarray(in_nucleus, int).sum() == sum(v[0] for v in f.expect.values())


# ------------------------------------------------------------------- counts: given masks


def test_api_counts_exact_from_given_masks(detector):
    f = make_field(0)
    detector.register(f.spots, f.coords)
    nuclei = _renumber(f.nuclei)
    spots, rows = piscis.count_spots(f.spots, cells=f.cells, nuclei=nuclei, model=detector.model)
    assert list(spots) == [*SPOT_COLUMNS, "cell_id", "in_nucleus"]
    assert list(rows[0]) == CELL_COLUMNS
    assert [r["cell_id"] for r in rows] == list(range(1, len(f.expect) + 1))
    _check_counts(f, spots["cell_id"], spots["in_nucleus"], rows)
    for r in rows:
        assert r["area"] == int((f.cells == r["cell_id"]).sum())
        assert r["touches_border"] is False
    # Each spot's cell is the true cell of its position.
    truth = f.cells[tuple(np.round(np.c_[spots["y"], spots["x"]]).astype(int).T)]
    np.testing.assert_array_equal(spots["cell_id"], truth)


def test_cli_counts_exact_from_mask_files_and_same_as_api(tmp_path, detector, capsys):
    f = make_field(1)
    detector.register(f.spots, f.coords)
    img = _write_field(tmp_path / "in", f)
    out = tmp_path / "out"
    argv = ["count", img, "-o", out, "--model", detector.model, "--channel", "0"]
    rc, err = _run(
        capsys, *argv, "--cells", tmp_path / "in" / "masks", "--nuclei", tmp_path / "in" / "nuc"
    )
    assert rc == 0, err
    columns, rows = _table(out / "cells.csv")
    assert columns == CELLS_CSV
    assert {r["image"] for r in rows} == {str(img)}
    spot_columns, spot_rows = _table(out / "spots" / "img.csv")
    assert spot_columns == [*SPOT_COLUMNS, "cell_id", "in_nucleus"]
    _check_counts(f, [r["cell_id"] for r in spot_rows], [r["in_nucleus"] for r in spot_rows], rows)
    summary_columns, summary = _table(out / "summary.csv")
    assert summary_columns == [*SUMMARY, "n_cells", "n_spots_in_cells"]
    assert int(summary[0]["n_cells"]) == len(f.expect)
    assert int(summary[0]["n_spots"]) == len(f.coords)
    assert int(summary[0]["n_spots_in_cells"]) == len(f.coords) - f.n_background
    # The Python API gives the same numbers, byte for byte.
    spots, cell_rows = piscis.count_spots(
        f.spots, cells=f.cells, nuclei=_renumber(f.nuclei), model=detector.model
    )
    assert (out / "spots" / "img.csv").read_text() == table_text(spots)
    expected = {"image": [str(img)] * len(cell_rows)}
    expected |= {k: [r[k] for r in cell_rows] for k in CELL_COLUMNS}
    assert (out / "cells.csv").read_text() == table_text(expected)
    assert [p.name for p in out.rglob(".*")] == [RECORD]  # no temp files; the run record


# ------------------------------------------------------------- counts: our segmentation


def test_cli_counts_exact_from_own_segmentation(tmp_path, detector, capsys):
    f = make_field(2)
    detector.register(f.spots, f.coords)
    img = _write_field(tmp_path / "in", f)
    out = tmp_path / "out"
    rc, err = _run(
        capsys,
        "count",
        img,
        "-o",
        out,
        "--model",
        detector.model,
        "--channel",
        "0",
        "--nuclei-channel",
        "1",
        "--nucleus-diameter",
        f.diameter,
        "--expand",
        f.expand,
        "--save-masks",
    )
    assert rc == 0, err
    nuclei = tifffile.imread(out / "masks" / "img.nuclei.tif")
    cells = tifffile.imread(out / "masks" / "img.cells.tif")
    assert nuclei.dtype == cells.dtype == np.uint16
    n = len(f.expect)
    assert set(np.unique(nuclei)) == set(np.unique(cells)) == set(range(n + 1))
    match = _match(f.cells, cells)
    assert sorted(match) == list(f.expect)
    assert len({j for j, _ in match.values()}) == n  # one to one
    assert min(iou for _, iou in match.values()) > 0.8
    _, rows = _table(out / "cells.csv")
    _, spot_rows = _table(out / "spots" / "img.csv")
    mapping = {k: j for k, (j, _) in match.items()}
    _check_counts(
        f, [r["cell_id"] for r in spot_rows], [r["in_nucleus"] for r in spot_rows], rows, mapping
    )
    # Same numbers through the API, and the masks it used are the saved ones.
    spots, cell_rows, masks = piscis.count_spots(
        f.spots,
        nuclear_image=f.dapi,
        model=detector.model,
        nucleus_diameter=f.diameter,
        expand=f.expand,
        return_masks=True,
    )
    np.testing.assert_array_equal(masks["nuclei"], nuclei)
    np.testing.assert_array_equal(masks["cells"], cells)
    assert (out / "spots" / "img.csv").read_text() == table_text(spots)
    assert [r["n_spots"] for r in cell_rows] == [int(r["n_spots"]) for r in rows]
    assert [p.name for p in out.rglob(".*")] == [RECORD]  # no temp files; the run record


def test_tiff_and_cellpose_seg_npy_give_identical_counts(tmp_path, detector, capsys):
    f = make_field(3)
    detector.register(f.spots, f.coords)
    cells = f.cells.copy()
    cells[cells == 5] = 65000  # a large, non-consecutive id
    d = tmp_path / "in"
    (d / "m").mkdir(parents=True)
    for name in ("a", "b", "c"):
        tifffile.imwrite(d / f"{name}.tif", f.spots)
    tifffile.imwrite(d / "m" / "a.tif", cells.astype(np.uint16))
    np.save(d / "m" / "b_seg.npy", {"masks": cells.astype(np.int32), "flows": [None]})
    skio.imsave(d / "m" / "c_cp_masks.png", cells.astype(np.uint16), check_contrast=False)
    out = tmp_path / "out"
    rc, err = _run(capsys, "count", d, "-o", out, "--model", detector.model, "--cells", d / "m")
    assert rc == 0, err
    lines = (out / "cells.csv").read_text().splitlines()[1:]
    a = [line.split(",", 1)[1] for line in lines if line.startswith(str(d / "a.tif"))]
    b = [line.split(",", 1)[1] for line in lines if line.startswith(str(d / "b.tif"))]
    c = [line.split(",", 1)[1] for line in lines if line.startswith(str(d / "c.tif"))]
    assert len(a) == len(f.expect) and a == b == c
    _, rows = _table(out / "cells.csv")
    ids = sorted({int(r["cell_id"]) for r in rows})
    assert 65000 in ids and 5 not in ids
    n_a = sum(int(r["n_spots"]) for r in rows if r["image"].endswith("a.tif"))
    assert n_a == len(f.coords) - f.n_background
    assert {r["n_spots_nucleus"] for r in rows} == {""}  # no nuclei: split unknown
    _, spot_rows = _table(out / "spots" / "a.csv")
    assert {r["in_nucleus"] for r in spot_rows} == {""}


def test_cli_cytoplasm_channel_from_a_yxc_file(tmp_path, detector, capsys):
    f = make_field(4)
    detector.register(f.spots, f.coords)
    rng = np.random.default_rng(4)
    d_nuc = ndi.distance_transform_edt(f.nuclei == 0)
    cyto = np.where(f.cells > 0, 300 + 100 * (1 - d_nuc / f.expand), 100.0)
    cyto[(f.cells > 0) & (ndi.maximum_filter(f.cells, 3) != ndi.minimum_filter(f.cells, 3))] = 150
    cyto = np.clip(ndi.gaussian_filter(cyto, 1.0) + rng.normal(0, 5, cyto.shape), 0, None)
    stack = np.stack([f.spots, f.dapi, cyto.astype(np.uint16)], axis=-1)  # YXC, no metadata
    tifffile.imwrite(tmp_path / "yxc.tif", stack, photometric="minisblack")  # axes QYX
    out = tmp_path / "out"
    rc, err = _run(
        capsys,
        "count",
        tmp_path / "yxc.tif",
        "-o",
        out,
        "--model",
        detector.model,
        "--channel",
        "0",
        "--nuclei-channel",
        "1",
        "--cytoplasm-channel",
        "2",
        "--nucleus-diameter",
        f.diameter,
        "--save-masks",
    )
    assert rc == 0, err
    assert "read as YXC" in err
    nuclei = tifffile.imread(out / "masks" / "yxc.nuclei.tif")
    cells = tifffile.imread(out / "masks" / "yxc.cells.tif")
    assert nuclei.max() == len(f.expect)
    assert set(np.unique(cells)) == set(np.unique(nuclei))  # a cell per nucleus, same id
    inter = ((cells > 0) & (f.cells > 0)).sum()
    assert inter / ((cells > 0) | (f.cells > 0)).sum() > 0.9
    _, rows = _table(out / "cells.csv")
    assert len(rows) == len(f.expect)
    _, spot_rows = _table(out / "spots" / "yxc.csv")
    assert len(spot_rows) == len(f.coords)
    assert sum(r["cell_id"] == "0" for r in spot_rows) == f.n_background
    in_nuc = sum(r["in_nucleus"] == "1" for r in spot_rows)
    assert in_nuc == sum(v[0] for v in f.expect.values())


# ------------------------------------------------------------------- C16 and C01


def make_c16(seed=16):
    """CASES.md C16: 7 cells, nucleus labels that do not match the cell labels.

    Cell 1 has 3 nuclei, cell 2 none, cell 3 is cut by the image border, cell 4's nucleus
    sticks out 5 px beyond the cell, cell 5 has label 65000, cells 6 and 7 are ordinary
    (and touch). 10 spots per cell, 4 of them in nuclei where the cell has one; 8 spots in
    the background; 2 spots on cell-boundary pixels (the last column of cell 6 and the
    first of cell 7, which touch); one more on the part of cell 4's nucleus outside it.
    """
    shape = (512, 512)
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    cells = np.zeros(shape, np.int32)
    nuclei = np.zeros(shape, np.int32)

    def disk(cy, cx, r):
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r

    boxes = {  # cell id: (y0, y1, x0, x1), inclusive
        1: (20, 119, 20, 159),
        2: (20, 99, 200, 279),
        3: (150, 249, 0, 69),
        4: (150, 229, 120, 199),
        65000: (300, 379, 300, 379),
        6: (400, 469, 100, 169),
        7: (400, 469, 170, 239),
    }
    for k, (y0, y1, x0, x1) in boxes.items():
        cells[y0 : y1 + 1, x0 : x1 + 1] = k
    nuclei[170:210, 180:205] = 65000  # in cell 4; x 200..204 lie outside it
    for k, region in {
        11: disk(70, 50, 12),
        12: disk(70, 90, 12),
        13: disk(70, 130, 12),
        21: disk(200, 30, 12),
        1: disk(340, 340, 12),
        7: disk(435, 125, 10),
        6: disk(435, 215, 10),
        99: disk(480, 40, 6),
    }.items():
        nuclei[region] = k  # 99: a nucleus outside every cell
    background = [
        [8, 8],
        [10, 300],
        [140, 100],
        [260, 260],
        [500, 500],
        [8, 500],
        [495, 300],
        [290, 450],
    ]
    boundary = [[420.0, 169.0], [440.0, 170.0]]  # cell 6's last column, cell 7's first
    protruding = [[190.0, 202.0]]
    taken = [np.array(p, float) for p in background + boundary + protruding]
    plan = {
        1: {11: 2, 12: 1, 13: 1},
        3: {21: 4},
        4: {65000: 4},
        65000: {1: 4},
        6: {7: 4},
        7: {6: 4},
    }
    inner = {}
    for k in boxes:
        for nid, n in plan.get(k, {}).items():
            region = ndi.binary_erosion((nuclei == nid) & (cells == k), iterations=3)
            _place(rng, region, n, taken, jitter=0.4)
        n_cyto = 10 - sum(plan.get(k, {}).values()) - (1 if k in (6, 7) else 0)
        region = ndi.binary_erosion((cells == k) & (nuclei == 0), iterations=3)
        _place(rng, region, n_cyto, taken, jitter=0.4)
        inner[k] = n_cyto
    coords = np.array(taken)
    return _spot_image(rng, shape, coords), cells, nuclei, coords, boxes


def test_c16_through_the_cli(tmp_path, detector, capsys):
    image, cells, nuclei, coords, boxes = make_c16()
    detector.register(image, coords)
    tifffile.imwrite(tmp_path / "c16.tif", image)
    tifffile.imwrite(tmp_path / "c16_cells.tif", cells)
    tifffile.imwrite(tmp_path / "c16_nuclei.tif", nuclei)
    out = tmp_path / "out"
    rc, err = _run(
        capsys,
        "count",
        tmp_path / "c16.tif",
        "-o",
        out,
        "--model",
        detector.model,
        "--cells",
        tmp_path / "c16_cells.tif",
        "--nuclei",
        tmp_path / "c16_nuclei.tif",
    )
    assert rc == 0, err
    assert "1 nuclei lie outside every cell" in err and "99" in err
    _, rows = _table(out / "cells.csv")
    assert [int(r["cell_id"]) for r in rows] == [1, 2, 3, 4, 6, 7, 65000]  # all 7, 65000 kept
    for r in rows:
        k = int(r["cell_id"])
        y0, y1, x0, x1 = boxes[k]
        n_nuc = 0 if k == 2 else 4
        got = (int(r["n_spots"]), int(r["n_spots_nucleus"]), int(r["n_spots_cytoplasm"]))
        assert got == (10, n_nuc, 10 - n_nuc), k
        assert int(r["area"]) == (y1 - y0 + 1) * (x1 - x0 + 1)
        assert float(r["centroid_y"]) == pytest.approx((y0 + y1) / 2)
        assert float(r["centroid_x"]) == pytest.approx((x0 + x1) / 2)
        assert r["touches_border"] == ("1" if k == 3 else "0")
    _, spots = _table(out / "spots" / "c16.csv")
    assert len(spots) == 79
    outside = [
        (float(s["y"]), float(s["x"]), s["in_nucleus"]) for s in spots if s["cell_id"] == "0"
    ]
    assert len(outside) == 9
    assert sum(n == "0" for *_, n in outside) == 8  # the background spots
    ((y, x, _),) = [s for s in outside if s[2] == "1"]  # on nucleus 65000, outside cell 4
    assert (round(y), round(x)) == (190, 202)

    def cell_at(yx):
        s = min(spots, key=lambda s: np.hypot(float(s["y"]) - yx[0], float(s["x"]) - yx[1]))
        return int(s["cell_id"])

    assert (cell_at((420, 169)), cell_at((440, 170))) == (6, 7)  # the boundary spots
    _, summary = _table(out / "summary.csv")
    assert (summary[0]["n_cells"], summary[0]["n_spots_in_cells"]) == ("7", "70")


@pytest.mark.parametrize("blank", ["flat", "noise", "zeros"])
def test_c01_blank_image_with_a_mask(tmp_path, detector, capsys, blank):
    shape = (512, 512)
    image = {
        "flat": np.full(shape, 100, np.uint16),
        "noise": np.clip(np.random.default_rng(1).normal(100, 5, shape), 0, None),
        "zeros": np.zeros(shape),
    }[blank].astype(np.uint16)
    cells = np.zeros(shape, np.uint16)
    cells[10:100, 10:200] = 3
    cells[10:100, 200:300] = 17
    cells[300:512, 400:512] = 65000  # on the border
    nuclei = (ndi.binary_erosion(cells > 0, iterations=20)).astype(np.uint8)
    d = tmp_path / "in"
    (d / "m").mkdir(parents=True)
    tifffile.imwrite(d / "blank.tif", image)
    tifffile.imwrite(d / "m" / "blank_masks.tif", cells)
    tifffile.imwrite(d / "m" / "blank_nuclei.tif", nuclei)
    out = tmp_path / "out"
    rc, err = _run(
        capsys,
        "count",
        d / "blank.tif",
        "-o",
        out,
        "--model",
        detector.model,
        "--cells",
        d / "m" / "*_masks.tif",
        "--nuclei",
        d / "m" / "*_nuclei.tif",
    )
    assert rc == 0, err
    assert f"{d / 'blank.tif'}: no spots detected" in err
    _, rows = _table(out / "cells.csv")
    got = [(r["cell_id"], r["n_spots"], r["n_spots_nucleus"], r["n_spots_cytoplasm"]) for r in rows]
    assert got == [("3", "0", "0", "0"), ("17", "0", "0", "0"), ("65000", "0", "0", "0")]
    assert [r["touches_border"] for r in rows] == ["0", "0", "1"]
    columns, spots = _table(out / "spots" / "blank.csv")
    assert columns == [*SPOT_COLUMNS, "cell_id", "in_nucleus"] and spots == []
    _, summary = _table(out / "summary.csv")
    assert [summary[0][k] for k in ("n_spots", "n_cells", "n_spots_in_cells")] == ["0", "3", "0"]


def test_c01_blank_image_segmented_gives_no_cells(tmp_path, tiny_model, capsys):
    stack = np.stack([np.full((128, 128), 100, np.uint16)] * 2)
    tifffile.imwrite(tmp_path / "blank.tif", stack, imagej=True, metadata={"axes": "CYX"})
    out = tmp_path / "out"
    rc, err = _run(
        capsys,
        "count",
        tmp_path / "blank.tif",
        "-o",
        out,
        "--model",
        tiny_model,
        "--channel",
        "0",
        "--nuclei-channel",
        "1",
        "--save-masks",
    )
    assert rc == 0, err
    assert _table(out / "cells.csv") == (CELLS_CSV, [])
    _, summary = _table(out / "summary.csv")
    assert (summary[0]["n_cells"], summary[0]["n_spots_in_cells"]) == ("0", "0")
    assert not tifffile.imread(out / "masks" / "blank.nuclei.tif").any()


# ---------------------------------------------------------------- failures in a batch


def test_batch_with_a_missing_and_a_wrong_shape_mask(tmp_path, tiny_model, capsys):
    d = tmp_path / "in"
    (d / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "d"):
        tifffile.imwrite(d / f"{name}.tif", rng.normal(100, 5, (64, 64)).astype(np.uint16))
    mask = np.zeros((64, 64), np.uint16)
    mask[5:30, 5:30] = 1
    mask[30:60, 30:60] = 2
    tifffile.imwrite(d / "masks" / "a_masks.tif", mask)
    tifffile.imwrite(d / "masks" / "c_labels.tif", np.ones((40, 50), np.uint16))
    np.save(d / "masks" / "d.npy", mask)
    out = tmp_path / "out"
    rc, err = _run(capsys, "count", d, "-o", out, "--model", tiny_model, "--cells", d / "masks")
    assert rc == 1
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    missing = [line for line in errors if f"{d / 'b.tif'}: no cells mask in folder" in line]
    assert missing and str(d / "masks") in missing[0] and "'b_masks'" in missing[0]
    shape = [line for line in errors if f"{d / 'c.tif'}: cells mask" in line]
    assert shape and "(40, 50)" in shape[0] and "(64, 64)" in shape[0]
    assert "c_labels.tif" in shape[0]
    assert "2 input(s) failed" in err
    _, summary = _table(out / "summary.csv")
    assert [Path(r["image"]).name for r in summary] == ["a.tif", "d.tif"]
    _, rows = _table(out / "cells.csv")
    assert [(Path(r["image"]).name, r["cell_id"]) for r in rows] == [
        ("a.tif", "1"),
        ("a.tif", "2"),
        ("d.tif", "1"),
        ("d.tif", "2"),
    ]
    assert sorted(p.name for p in (out / "spots").iterdir()) == ["a.csv", "d.csv"]


# ------------------------------------------------------------------- matching masks


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


@pytest.mark.parametrize("suffix", cli.MASK_SUFFIXES)
@pytest.mark.parametrize("ext", [".tif", ".TIFF", ".npy", ".png"])
def test_mask_names(tmp_path, suffix, ext):
    images = [_touch(tmp_path / "img" / "Field_1.ome.tif"), _touch(tmp_path / "img" / "b.png")]
    mask = _touch(tmp_path / "m" / f"field_1{suffix.upper()}{ext}")
    _touch(tmp_path / "m" / f"field_10{suffix}{ext}")  # another image's mask
    _touch(tmp_path / "m" / f"field_1{suffix}.txt")  # not a mask file
    found = cli.match_masks(str(tmp_path / "m"), images)
    assert found[images[0]] == mask
    assert isinstance(found[images[1]], str) and "b.png: no cells mask" in found[images[1]]


def test_mask_preference_and_patterns(tmp_path, caplog):
    image = _touch(tmp_path / "a.tif")
    for name in ("a_cp_masks.png", "a_seg.npy", "a_cells.tif", "a_nuclei.tif", "ab_masks.tif"):
        _touch(tmp_path / "m" / name)
    with caplog.at_level(logging.INFO, logger="piscis"):
        assert cli.match_masks(str(tmp_path / "m"), [image])[image].name == "a_seg.npy"
    assert "also found" in caplog.text and "a_cp_masks.png" in caplog.text
    # A pattern: its '*' stands for the image name.
    found = cli.match_masks(str(tmp_path / "m" / "*_cells.tif"), [image], "cells")
    assert found[image].name == "a_cells.tif"
    found = cli.match_masks(str(tmp_path / "m" / "*_nuclei.tif"), [image], "nuclei")
    assert found[image].name == "a_nuclei.tif"
    found = cli.match_masks(str(tmp_path / "m" / "*.npy"), [image])
    assert found[image].name == "a_seg.npy"
    found = cli.match_masks(str(tmp_path / "m" / "*.tif"), [image])  # the suffix rule
    assert isinstance(found[image], str) and "files matching" in found[image]
    # One file for one image, whatever its name.
    one = tmp_path / "m" / "ab_masks.tif"
    assert cli.match_masks(str(one), [image]) == {image: one}
    with pytest.raises(InputError, match="one file but there are 2 images"):
        cli.match_masks(str(one), [image, _touch(tmp_path / "b.tif")])
    with pytest.raises(InputError, match="--nuclei .*nothing: no such file or folder"):
        cli.match_masks(str(tmp_path / "nothing"), [image], "nuclei")


def test_masks_next_to_the_images(tmp_path, tiny_model, capsys):
    """Masks in the image folder are matched, not counted as images; no image is its own mask."""
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(2)
    image = rng.normal(100, 5, (48, 48)).astype(np.uint16)
    mask = np.zeros((48, 48), np.uint16)
    mask[4:20, 4:20] = 9
    tifffile.imwrite(d / "a.tif", image)
    tifffile.imwrite(d / "a_masks.tif", mask)
    tifffile.imwrite(d / "b.tif", image)
    tifffile.imwrite(d / "b.png.tif", image)  # stem 'b.png', not a mask of b
    out = tmp_path / "out"
    rc, err = _run(capsys, "count", d, "-o", out, "--model", tiny_model, "--cells", d)
    assert rc == 1
    assert "a_masks.tif: used as a mask, not counted as an image" in err
    _, summary = _table(out / "summary.csv")
    assert [Path(r["image"]).name for r in summary] == ["a.tif"]
    assert f"{d / 'b.tif'}: no cells mask in folder {d}" in err
    _, rows = _table(out / "cells.csv")
    assert [(r["cell_id"], r["area"]) for r in rows] == [("9", "256")]


# ------------------------------------------------------------------- reading channels


def _planes(rng, shape=(5, 40, 56)):
    return rng.integers(0, 1000, shape).astype(np.uint16)


@pytest.mark.parametrize(
    "layout", ["imagej_cyx", "ome_cyx", "meta_yxc", "plain_cyx", "plain_yxc", "rgb"]
)
def test_read_channels_layouts(tmp_path, layout, caplog):
    data = _planes(np.random.default_rng(0), (3 if layout == "rgb" else 5, 40, 56))  # CYX
    path = tmp_path / "x.tif"
    if layout == "imagej_cyx":
        tifffile.imwrite(path, data, imagej=True, metadata={"axes": "CYX"})
    elif layout == "ome_cyx":
        path = tmp_path / "x.ome.tif"
        tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX"})
    elif layout == "meta_yxc":
        tifffile.imwrite(path, np.moveaxis(data, 0, -1), metadata={"axes": "YXC"})
    elif layout == "plain_cyx":
        tifffile.imwrite(path, data)
    elif layout == "plain_yxc":
        tifffile.imwrite(path, np.moveaxis(data, 0, -1), photometric="minisblack")
    else:
        tifffile.imwrite(path, np.moveaxis(data, 0, -1))  # RGB
    with caplog.at_level(logging.INFO, logger="piscis.io"):
        planes = read_channels(path, [2, 0, 1, 0])
    for plane, k in zip(planes, [2, 0, 1, 0]):
        np.testing.assert_array_equal(plane.image, data[k])
    assert ("read as" in caplog.text) == layout.startswith("plain")


def test_read_channels_z_stack_axes_and_errors(tmp_path, caplog):
    data = _planes(np.random.default_rng(1), (4, 2, 30, 40))  # ZCYX
    path = tmp_path / "zc.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZCYX"})
    a, b = read_channels(path, [0, 1])  # each channel a (Z, Y, X) stack
    np.testing.assert_array_equal(a.image, data[:, 0])
    np.testing.assert_array_equal(b.image, data[:, 1])
    a, b = read_channels(path, [0, 1], project=True)
    np.testing.assert_array_equal(a.image, data[:, 0].max(axis=0))
    np.testing.assert_array_equal(b.image, data[:, 1].max(axis=0))
    with pytest.raises(InputError, match=r"zc.tif: --channel 2 out of range; the image has 2"):
        read_channels(path, [0, 2])
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, data[0])  # (2, 30, 40) without axes
    np.testing.assert_array_equal(read_channels(plain, [1])[0].image, data[0, 1])
    yx = read_channels(plain, [0], axes="CXY")[0].image  # --axes wins
    np.testing.assert_array_equal(yx, data[0, 0].T)
    with pytest.raises(InputError, match="choose one with --channel"):
        read_channels(plain, [None, 1])
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, data[0, 0])
    with pytest.raises(InputError, match="grey.tif: --channel 1 given but the image has no"):
        read_channels(grey, [0, 1])


# ------------------------------------------------------------------- the Python API


def test_api_options_and_errors(detector):
    f = make_field(5, n_pairs=1, n_single=9, shape=(224, 224))
    detector.register(f.spots, f.coords)
    m = detector.model
    with pytest.raises(ValueError, match=r"img: cells: label shape \(10, 10\) .* \(224, 224\)"):
        piscis.count_spots(f.spots, cells=np.zeros((10, 10), int), model=m, name="img")
    with pytest.raises(ValueError, match=r"nuclear image shape \(224, 10\) .* \(224, 224\)"):
        piscis.count_spots(f.spots, nuclear_image=f.dapi[:, :10], model=m)
    with pytest.raises(ValueError, match="nuclei or nuclear_image, not both"):
        piscis.count_spots(f.spots, nuclei=f.nuclei, nuclear_image=f.dapi, model=m)
    with pytest.raises(ValueError, match="cells or cytoplasm_image, not both"):
        piscis.count_spots(f.spots, cells=f.cells, cytoplasm_image=f.dapi, model=m)
    with pytest.raises(ValueError, match="cytoplasm_image needs nuclei"):
        piscis.count_spots(f.spots, cytoplasm_image=f.dapi, model=m)
    with pytest.raises(TypeError, match="'diameter'.*nucleus_threshold"):
        piscis.count_spots(f.spots, nuclear_image=f.dapi, model=m, diameter=20)
    # Spots only: the detector's table, no cells.
    spots, rows = piscis.count_spots(f.spots, model=m)
    assert list(spots) == SPOT_COLUMNS and rows == [] and len(spots["y"]) == len(f.coords)
    # Given nuclei alone are grown into cells (expand 0: the nuclei are the cells).
    _, rows, masks = piscis.count_spots(f.spots, nuclei=f.nuclei, model=m, return_masks=True)
    np.testing.assert_array_equal(masks["cells"], f.cells)
    _check_counts(f, *_assign(f, masks), rows)
    _, rows = piscis.count_spots(f.spots, nuclei=f.nuclei, expand=0, model=m)
    assert [r["n_spots"] for r in rows] == [r["n_spots_nucleus"] for r in rows]
    assert [r["n_spots"] for r in rows] == [f.expect[k][0] for k in sorted(f.expect)]
    # Segmentation keywords reach segment_nuclei.
    _, rows = piscis.count_spots(f.spots, nuclear_image=f.dapi, model=m, nucleus_threshold=1e6)
    assert rows == []
    _, rows = piscis.count_spots(
        f.spots, nuclear_image=f.dapi, model=m, nucleus_diameter=f.diameter, expand=f.expand
    )
    assert len(rows) == len(f.expect)


def _assign(f, masks):
    from piscis.cells import assign_spots

    return assign_spots(f.coords, masks["cells"], masks["nuclei"])


# ------------------------------------------------------------------- command line


def test_without_cells_the_outputs_are_unchanged(tmp_path, tiny_model, capsys):
    tifffile.imwrite(tmp_path / "a.tif", np.full((32, 32), 100, np.uint16))
    out = tmp_path / "out"
    rc, _ = _run(capsys, "count", tmp_path / "a.tif", "-o", out, "--model", tiny_model)
    assert rc == 0
    assert _table(out / "summary.csv")[0] == SUMMARY
    assert _table(out / "spots" / "a.csv")[0] == SPOT_COLUMNS
    assert not (out / "cells.csv").exists() and not (out / "masks").exists()


def test_cell_results_are_not_overwritten(tmp_path, tiny_model, capsys):
    stack = np.stack([np.full((64, 64), 100, np.uint16)] * 2)
    tifffile.imwrite(tmp_path / "a.tif", stack, imagej=True, metadata={"axes": "CYX"})
    out = tmp_path / "out"
    argv = [
        "count",
        tmp_path / "a.tif",
        "-o",
        out,
        "--model",
        tiny_model,
        "--channel",
        "0",
        "--nuclei-channel",
        "1",
        "--save-masks",
    ]
    assert _run(capsys, *argv)[0] == 0
    (out / RECORD).unlink()  # results of a run without a record (the same command resumes)
    (out / "summary.csv").unlink()
    for p in (out / "spots").iterdir():
        p.unlink()
    rc, err = _run(capsys, *argv)
    assert rc == 2 and "cells.csv" in err and "--overwrite" in err
    (out / "cells.csv").unlink()
    rc, err = _run(capsys, *argv)
    assert rc == 2 and "a.cells.tif and 1 more" in err  # the saved masks
    assert _run(capsys, *argv, "--overwrite")[0] == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--nuclei", "x", "--nuclei-channel", "1"], "--nuclei or --nuclei-channel, not both"),
        (["--cells", "x", "--nuclei-channel", "1", "--cytoplasm-channel", "2"], "not both"),
        (["--cytoplasm-channel", "2"], "--cytoplasm-channel needs nuclei"),
        (["--nuclei-channel", "1", "--nucleus-diameter", "0"], "must be positive"),
        (["--nuclei-channel", "1", "--expand", "-1"], "--expand must be 0 or more"),
        (["--cells", "nowhere"], "--cells nowhere: no such file or folder"),
    ],
)
def test_cell_option_errors_are_usage_errors(tmp_path, tiny_model, capsys, extra, message):
    tifffile.imwrite(tmp_path / "a.tif", np.full((32, 32), 100, np.uint16))
    out = tmp_path / "out"
    rc, err = _run(capsys, "count", tmp_path / "a.tif", "-o", out, "--model", tiny_model, *extra)
    assert rc == 2 and message in err
    assert not out.exists()


def test_help_documents_the_matching_rule(capsys):
    with pytest.raises(SystemExit):
        cli.main(["count", "--help"])
    text = re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))  # wrapped at '-'
    for word in (
        "--cells",
        "--nuclei-channel",
        "--save-masks",
        "S_cp_masks",
        "-labels",
        "case-insensitive",
        "_seg.npy",
        "cells.csv",
    ):
        assert word in text
