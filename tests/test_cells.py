"""Tests of piscis.cells: label masks, segmentation, spot assignment and per-cell tables.

Every expected number comes from how the inputs are built, not from the code under test.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels, find_boundaries

from piscis.cells import (
    CELL_COLUMNS,
    assign_spots,
    cell_table,
    check_labels,
    nuclei_outside_cells,
    read_labels,
    segment_cells,
    segment_nuclei,
    spots_per_cell,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

# ----------------------------------------------------------------------------- generator


def _ellipse_radius(a, b, theta, u):
    """Radius of an ellipse (semi-axes a, b, angle theta) along the unit vector u."""
    e1 = np.array([np.sin(theta), np.cos(theta)])
    e2 = np.array([np.cos(theta), -np.sin(theta)])
    return 1.0 / np.sqrt((u @ e1 / a) ** 2 + (u @ e2 / b) ** 2)


def make_cells(seed, shape=(448, 448), n_single=16, n_pairs=5, expand=14, margin=4):
    """Two-channel synthetic cells with spots whose cell and compartment are known.

    Nuclei are ellipses (semi-axes 9-13 px) with ``n_pairs`` pairs overlapping slightly
    (touching nuclei); cells are the nuclei expanded by ``expand`` px. Each nucleus gets
    0-5 spots, each cytoplasm 0-5 spots, and 6 spots lie in the background, every spot
    at least ``margin`` px from any nucleus, cell or image boundary, so that a
    reasonable segmentation cannot move it to another compartment.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    params = []  # (cy, cx, a, b, theta)

    def fits(cy, cx, r, others, gap):
        if min(cy, cx) < r + expand + 3 or cy > shape[0] - r - expand - 3:
            return False
        if cx > shape[1] - r - expand - 3:
            return False
        return all(np.hypot(cy - o[0], cx - o[1]) > r + max(o[2], o[3]) + gap for o in others)

    def draw():
        a, b = rng.uniform(9, 13, 2)
        return a, b, rng.uniform(0, np.pi)

    tries = 0
    while len(params) < 2 * n_pairs and tries < 10000:  # touching pairs
        tries += 1
        a1, b1, t1 = draw()
        a2, b2, t2 = draw()
        phi = rng.uniform(0, 2 * np.pi)
        u = np.array([np.sin(phi), np.cos(phi)])
        sep = 0.8 * (_ellipse_radius(a1, b1, t1, u) + _ellipse_radius(a2, b2, t2, u))
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        cy2, cx2 = cy + sep * u[0], cx + sep * u[1]
        r = 2 * 13 + 2
        mid = ((cy + cy2) / 2, (cx + cx2) / 2)
        if fits(mid[0], mid[1], r, params, 2 * expand + 4):
            params += [(cy, cx, a1, b1, t1), (cy2, cx2, a2, b2, t2)]
    while len(params) < 2 * n_pairs + n_single and tries < 20000:
        tries += 1
        a, b, t = draw()
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        if fits(cy, cx, max(a, b), params, 2 * expand + 4):
            params.append((cy, cx, a, b, t))
    assert len(params) == 2 * n_pairs + n_single, "generator could not place the nuclei"

    # Each pixel goes to the ellipse with the smallest normalised radius (<= 1).
    q = np.full(shape, np.inf)
    nuclei = np.zeros(shape, np.int64)
    for k, (cy, cx, a, b, t) in enumerate(params, start=1):
        dy, dx = yy - cy, xx - cx
        u = dy * np.sin(t) + dx * np.cos(t)
        v = dy * np.cos(t) - dx * np.sin(t)
        qk = (u / a) ** 2 + (v / b) ** 2
        better = (qk <= 1) & (qk < q)
        nuclei[better] = k
        q[better] = qk[better]
    n = len(params)
    cells = expand_labels(nuclei, distance=expand)

    # Images: nuclear channel (per-nucleus brightness, blur, noise) and cytoplasm.
    bright = rng.uniform(400, 900, n + 1)
    bright[0] = 0
    nuc_img = 100 + ndi.gaussian_filter(bright[nuclei], 1.5)
    nuc_img += rng.normal(0, 10, shape)
    d_nuc = ndi.distance_transform_edt(nuclei == 0)
    cyto = np.where(cells > 0, 200 + 150 * (1 - d_nuc / expand), 100.0)
    # Contacts between cells are dimmer (as in real cytoplasm stains).
    max_nz = ndi.maximum_filter(cells, 3)
    min_nz = ndi.minimum_filter(np.where(cells > 0, cells, n + 1), 3)
    cyto[(cells > 0) & (max_nz != min_nz)] = 150
    cyto = ndi.gaussian_filter(cyto, 1.0) + rng.normal(0, 10, shape)
    nuc_img = nuc_img.clip(0, 65535).astype(np.uint16)
    cyto = cyto.clip(0, 65535).astype(np.uint16)

    # Spots at least `margin` px from every boundary and from the image edge.
    edges = find_boundaries(cells, mode="thick") | find_boundaries(nuclei, mode="thick")
    edges[[0, -1], :] = True
    edges[:, [0, -1]] = True
    safe = ndi.distance_transform_edt(~edges) >= margin
    coords, expect = [], {}
    for k in range(1, n + 1):
        counts = []
        for region in (safe & (nuclei == k), safe & (cells == k) & (nuclei == 0)):
            pix = np.argwhere(region)
            m = int(rng.integers(0, 6)) if len(pix) else 0
            for p in pix[rng.choice(len(pix), m, replace=False)] if m else []:
                coords.append(p + rng.uniform(-0.45, 0.45, 2))
            counts.append(m)
        expect[k] = tuple(counts)  # (in nucleus, in cytoplasm)
    bg = np.argwhere(safe & (cells == 0))
    for p in bg[rng.choice(len(bg), 6, replace=False)]:
        coords.append(p + rng.uniform(-0.45, 0.45, 2))
    coords = np.array(coords)
    order = rng.permutation(len(coords))
    return {
        "nuclei": nuclei,
        "cells": cells,
        "nuc_img": nuc_img,
        "cyto": cyto,
        "coords": coords[order],
        "expect": expect,
        "n_background": 6,
        "n": n,
        "n_pairs": n_pairs,
        "diameter": 22,
        "expand": expand,
    }


def _by_id(rows):
    return {r["cell_id"]: r for r in rows}


def _match(true, pred):
    """One-to-one match of true to predicted labels by overlap; returns {true: (pred, iou)}."""
    out = {}
    for k in np.unique(true[true > 0]):
        t = true == k
        ids, counts = np.unique(pred[t], return_counts=True)
        counts = counts[ids > 0]
        ids = ids[ids > 0]
        if not len(ids):
            continue
        j = ids[np.argmax(counts)]
        p = pred == j
        out[int(k)] = (int(j), (t & p).sum() / (t | p).sum())
    return out


# ------------------------------------------------------------------- synthetic counts


@pytest.mark.parametrize("seed", [0, 1])
def test_counts_exact_from_given_masks(seed):
    s = make_cells(seed)
    # Nucleus labels unrelated to the cell labels.
    perm = np.concatenate([[0], np.random.default_rng(99).permutation(s["n"]) + 500])
    nuclei = perm[s["nuclei"]]
    cell_id, in_nucleus = assign_spots(s["coords"], s["cells"], nuclei)
    rows = cell_table(s["cells"], cell_id, in_nucleus, nuclei)
    assert [r["cell_id"] for r in rows] == list(range(1, s["n"] + 1))
    assert list(rows[0]) == CELL_COLUMNS
    by = _by_id(rows)
    for k, (n_nuc, n_cyto) in s["expect"].items():
        assert (by[k]["n_spots_nucleus"], by[k]["n_spots_cytoplasm"]) == (n_nuc, n_cyto), k
        assert by[k]["n_spots"] == n_nuc + n_cyto
        area = int((s["cells"] == k).sum())
        assert by[k]["area"] == area
        yy, xx = np.nonzero(s["cells"] == k)
        assert by[k]["centroid_y"] == pytest.approx(yy.mean())
        assert by[k]["centroid_x"] == pytest.approx(xx.mean())
        assert by[k]["touches_border"] is False
    assert (cell_id == 0).sum() == s["n_background"]
    total_nuc = sum(v[0] for v in s["expect"].values())
    assert in_nucleus.sum() == total_nuc


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_exact_from_own_segmentation(seed):
    s = make_cells(seed)
    seg = segment_nuclei(s["nuc_img"], diameter=s["diameter"])
    match = _match(s["nuclei"], seg)
    assert len(np.unique(seg[seg > 0])) == s["n"]  # touching pairs split, nothing extra
    assert sorted(match) == list(range(1, s["n"] + 1))
    assert len({j for j, _ in match.values()}) == s["n"]  # one to one
    assert min(iou for _, iou in match.values()) > 0.7
    for cyto in (None, s["cyto"]):
        cells = segment_cells(seg, cytoplasm=cyto, expand=s["expand"])
        assert set(np.unique(cells)) - {0} == set(np.unique(seg)) - {0}  # nucleus ids kept
        cell_id, in_nucleus = assign_spots(s["coords"], cells, seg)
        by = _by_id(cell_table(cells, cell_id, in_nucleus, seg))
        for k, (n_nuc, n_cyto) in s["expect"].items():
            row = by[match[k][0]]
            assert (row["n_spots_nucleus"], row["n_spots_cytoplasm"]) == (n_nuc, n_cyto), k
        assert (cell_id == 0).sum() == s["n_background"]


def test_segment_nuclei_same_for_every_image_dtype():
    s = make_cells(3, n_single=8, n_pairs=2)
    ref = segment_nuclei(s["nuc_img"], diameter=22)
    assert ref.max() == 12
    for dtype in (np.int32, np.int64, np.float32, np.float64, ">u2"):
        np.testing.assert_array_equal(segment_nuclei(s["nuc_img"].astype(dtype), 22), ref)


# -------------------------------------------------------------- label files and dtypes


def _small_mask():
    """Cells with non-consecutive ids 3, 17, 60, 120 (fits int8), one on the border."""
    m = np.zeros((40, 50), np.int64)
    m[2:12, 2:14] = 3
    m[2:12, 14:30] = 17  # touches cell 3
    m[20:35, 5:20] = 60
    m[25:40, 30:50] = 120  # on the border
    pts = np.array([[5, 5], [6, 8.2], [5, 20], [25, 10], [26, 11], [27, 12], [30, 40], [15, 45]])
    return m, pts, {3: 2, 17: 1, 60: 3, 120: 1}


def test_label_dtypes_and_byte_orders_identical(tmp_path):
    m, pts, expect = _small_mask()
    ref = None
    types = ["u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8"]
    for t in types:
        for order in "<>":
            arr = m.astype(order + t)
            cell_id, inn = assign_spots(pts, arr)
            rows = cell_table(arr, cell_id, inn)
            assert {r["cell_id"]: r["n_spots"] for r in rows} == expect, (order, t)
            assert [r["touches_border"] for r in rows] == [False, False, False, True]
            ref = ref or rows
            assert rows == ref
            np.save(tmp_path / f"m_{order}{t}.npy", arr)
            assert read_labels(tmp_path / f"m_{order}{t}.npy").dtype == np.int64
            np.testing.assert_array_equal(read_labels(tmp_path / f"m_{order}{t}.npy"), m)
            tifffile.imwrite(tmp_path / f"m_{order}{t}.tif", arr, byteorder=order)
            np.testing.assert_array_equal(read_labels(tmp_path / f"m_{order}{t}.tif"), m)


def test_tiff_npy_and_cellpose_give_identical_tables(tmp_path):
    m, pts, _expect = _small_mask()
    big = m.copy()
    big[m == 120] = 65000  # non-consecutive, beyond uint8/int16
    big = big.astype(np.uint16)
    tifffile.imwrite(tmp_path / "cells.tif", big)
    np.save(tmp_path / "cells.npy", big)
    np.save(tmp_path / "img_seg.npy", {"masks": big, "outlines": big > 0, "flows": [None]})
    tables = []
    for name in ("cells.tif", "cells.npy", "img_seg.npy"):
        labels = read_labels(tmp_path / name)
        assert labels.dtype == np.int64
        cell_id, inn = assign_spots(pts, labels)
        tables.append(cell_table(labels, cell_id, inn))
    assert tables[0] == tables[1] == tables[2]
    assert {r["cell_id"]: r["n_spots"] for r in tables[0]} == {3: 2, 17: 1, 60: 3, 65000: 1}


def test_read_labels_errors(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"masks": 1}], dtype=object))
    with pytest.raises(ValueError, match="obj.npy"):
        read_labels(tmp_path / "obj.npy")  # plain .npy never unpickles
    np.save(tmp_path / "x_seg.npy", {"outlines": np.zeros((4, 4))})
    with pytest.raises(ValueError, match="masks"):
        read_labels(tmp_path / "x_seg.npy")
    with pytest.raises(ValueError, match="missing.tif"):
        read_labels(tmp_path / "missing.tif")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ValueError, match="bad.tif"):
        read_labels(tmp_path / "bad.tif")
    (tmp_path / "m.png").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown label file type"):
        read_labels(tmp_path / "m.png")
    tifffile.imwrite(
        tmp_path / "stack.tif", np.ones((2, 3, 8, 8), np.uint16), photometric="minisblack"
    )
    with pytest.raises(ValueError, match=r"stack.tif.*2D"):
        read_labels(tmp_path / "stack.tif")
    tifffile.imwrite(tmp_path / "z.tif", np.ones((3, 8, 8), np.uint16), photometric="minisblack")
    assert read_labels(tmp_path / "z.tif").shape == (3, 8, 8)  # a 3D (Z, Y, X) mask
    tifffile.imwrite(tmp_path / "single.tif", np.ones((1, 8, 8), np.uint16))
    assert read_labels(tmp_path / "single.tif").shape == (8, 8)  # singleton squeezed
    np.save(tmp_path / "f.npy", np.full((4, 4), 1.5))
    with pytest.raises(ValueError, match=r"f.npy.*non-integral.*1.5"):
        read_labels(tmp_path / "f.npy")


def test_check_labels_messages(caplog):
    with pytest.raises(ValueError, match=r"\(10, 12\).*\(10, 10\)"):
        check_labels(np.ones((10, 12), np.int32), shape=(10, 10), name="cells.tif")
    with pytest.raises(ValueError, match="non-integral"):
        check_labels(np.array([[0, 1.25], [2, 2]]))
    with pytest.raises(ValueError, match="non-finite"):
        check_labels(np.array([[0, np.nan], [2, 2]]))
    with pytest.raises(ValueError, match=r"negative.*1 pixels.*-3"):
        check_labels(np.array([[0, -3], [2, 2]], np.int16))
    with pytest.raises(ValueError, match="negative"):
        check_labels(np.array([[0, -1.0], [2, 2]]))
    with pytest.raises(ValueError, match="complex128"):
        check_labels(np.ones((3, 3), complex))
    with pytest.raises(ValueError, match="2D"):
        check_labels(np.ones((2, 2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="needs a 3D image"):
        check_labels(np.ones((2, 3, 3), np.uint8), shape=(3, 3))
    with pytest.raises(ValueError, match="too large"):
        check_labels(np.array([[0, 2**63]], np.uint64))
    with caplog.at_level(logging.WARNING, logger="piscis.cells"):
        caplog.clear()
        out = check_labels(np.array([[0.0, 7.0], [65000.0, 7.0]], np.float32))
        assert out.dtype == np.int64 and out.tolist() == [[0, 7], [65000, 7]]
        assert "float labels" in caplog.text
        caplog.clear()
        out = check_labels(np.zeros((4, 4), np.uint16), name="empty.tif")
        assert not out.any() and "empty.tif" in caplog.text and "only 0" in caplog.text
        caplog.clear()
        out = check_labels(np.eye(3, dtype=bool))
        assert out.tolist() == np.eye(3, dtype=int).tolist()
        assert "boolean" in caplog.text and "single object" in caplog.text


def test_shape_mismatch_between_cells_and_nuclei():
    with pytest.raises(ValueError, match=r"nuclei.*\(8, 9\).*\(8, 8\)"):
        assign_spots(np.zeros((1, 2)), np.ones((8, 8), int), np.ones((8, 9), int))


# --------------------------------------------------------------------- assignment rules


def test_rounding_rule_and_out_of_image_spots():
    cells = np.zeros((10, 10), np.int64)
    cells[:, :5] = 1
    cells[:, 5:] = 2
    nuclei = np.zeros_like(cells)
    nuclei[4:6, 4:6] = 9
    pts = [
        [3.0, 4.5],  # half-way: goes to the larger index (x=5 -> cell 2)
        [3.0, 4.49],  # -> x=4, cell 1
        [-0.5, 0.0],  # rounds to row 0: inside
        [-0.51, 0.0],  # row -1: outside
        [9.49, 9.0],  # inside
        [9.5, 9.0],  # row 10: outside
        [np.nan, 3.0],
        [3.0, np.inf],
        [4.6, 4.4],  # nucleus pixel (5, 4)
        [3.5, 4.4],  # (4, 4): nucleus
        [3.49, 4.4],  # (3, 4): not nucleus
    ]
    cell_id, inn = assign_spots(pts, cells, nuclei)
    assert cell_id.tolist() == [2, 1, 1, 0, 2, 0, 0, 0, 1, 1, 1]
    assert inn.tolist() == [False] * 8 + [True, True, False]
    assert cell_id.dtype == np.int64 and inn.dtype == bool
    # (z, y, x) spots on a 2D mask use y, x
    cell_id3, _ = assign_spots([[7.0, 3.0, 4.5], [0.0, 3.0, 4.49]], cells)
    assert cell_id3.tolist() == [2, 1]
    empty_id, empty_in = assign_spots(np.zeros((0, 2)), cells, nuclei)
    assert empty_id.shape == (0,) and empty_in.shape == (0,)


def test_only_nuclei_and_only_cells():
    nuclei = np.zeros((20, 20), np.int64)
    nuclei[2:8, 2:8] = 4
    nuclei[10:18, 10:18] = 40
    pts = np.array([[3, 3], [4, 4], [12, 12], [0, 19]], float)
    cell_id, inn, rows = spots_per_cell(pts, nuclei=nuclei)
    assert cell_id.tolist() == [4, 4, 40, 0] and inn.tolist() == [True, True, True, False]
    assert [
        (r["cell_id"], r["n_spots"], r["n_spots_nucleus"], r["n_spots_cytoplasm"]) for r in rows
    ] == [
        (4, 2, 2, 0),
        (40, 1, 1, 0),
    ]
    # Only cells: the split is unknown -> None, written as empty CSV fields.
    cell_id, inn, rows = spots_per_cell(pts, cells=nuclei)
    assert not inn.any()
    assert rows[0]["n_spots"] == 2 and rows[0]["n_spots_nucleus"] is None
    assert rows[0]["n_spots_cytoplasm"] is None
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CELL_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    lines = buf.getvalue().splitlines()
    assert lines[0] == ",".join(CELL_COLUMNS)
    assert lines[1] == "4,36,2,,,4.5,4.5,False,False"
    with pytest.raises(ValueError, match="needs cells"):
        assign_spots(pts)


def test_cell_table_rejects_unknown_ids():
    cells = np.zeros((5, 5), int)
    cells[1:3, 1:3] = 2
    with pytest.raises(ValueError, match="not in the cell mask: 7"):
        cell_table(cells, np.array([2, 7]), np.array([False, False]))


# ------------------------------------------------------------------------------- C16


def _c16():
    """The C16 case: 7 cells, nucleus labels unrelated to cell labels."""
    shape = (512, 512)
    cells = np.zeros(shape, np.int32)
    nuclei = np.zeros(shape, np.int32)
    yy, xx = np.indices(shape)

    def disk(cy, cx, r):
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r

    boxes = {  # cell id: (y0, y1, x0, x1), inclusive
        1: (20, 119, 20, 159),
        2: (20, 99, 200, 279),
        3: (150, 249, 0, 69),  # cut by the left border
        4: (150, 229, 120, 199),
        65000: (300, 379, 300, 379),
        6: (400, 469, 100, 169),
        7: (400, 469, 170, 239),  # touches cell 6 along x = 169 | 170
    }
    for k, (y0, y1, x0, x1) in boxes.items():
        cells[y0 : y1 + 1, x0 : x1 + 1] = k
    # Nuclei: three in cell 1, none in cell 2, ids deliberately clash with cell ids.
    nuc = {
        11: (1, disk(70, 50, 12)),
        12: (1, disk(70, 90, 12)),
        13: (1, disk(70, 130, 12)),
        21: (3, disk(200, 30, 12)),
        65000: (4, None),  # rectangle, sticks out 5 px beyond the right edge of cell 4
        1: (65000, disk(340, 340, 12)),
        7: (6, disk(435, 125, 10)),
        6: (7, disk(435, 215, 10)),
    }
    nuclei[170:210, 180:205] = 65000  # x 200..204 lie outside cell 4
    for k, (_, region) in nuc.items():
        if region is not None:
            nuclei[region] = k
    nuclei[disk(480, 40, 6)] = 99  # a nucleus outside every cell
    rng = np.random.default_rng(16)

    def pick(region, n):
        pix = np.argwhere(ndi.binary_erosion(region, iterations=2))
        return pix[rng.choice(len(pix), n, replace=False)] + rng.uniform(-0.4, 0.4, (n, 2))

    spots = []
    in_nuc_plan = {1: {11: 2, 12: 1, 13: 1}, 3: {21: 4}, 4: {65000: 4}, 65000: {1: 4}}
    in_nuc_plan |= {6: {7: 4}, 7: {6: 4}}
    for k in boxes:
        plan = in_nuc_plan.get(k, {})
        for nid, n in plan.items():
            spots.append(pick((nuclei == nid) & (cells == k), n))
        n_cyto = 10 - sum(plan.values()) - (1 if k in (6, 7) else 0)
        spots.append(pick((cells == k) & (nuclei == 0), n_cyto))
    # Boundary spots (one of the 10 of cells 6 and 7): on cell 6's last column x = 169,
    # and half-way between x = 169 and 170, which rounds to 170 (cell 7).
    spots.append(np.array([[420.0, 169.0], [440.0, 169.5]]))
    background = np.array(
        [[5, 5], [10, 300], [140, 100], [260, 260], [511, 511], [0, 511], [500, 300], [290, 450]],
        float,
    )
    spots.append(background)
    protruding = np.array([[190.0, 202.0]])  # nucleus 65000 outside cell 4
    spots.append(protruding)
    coords = np.concatenate(spots)
    # The spot image itself (detection is not tested here; it fixes the shape).
    image = np.full(shape, 100.0) + rng.normal(0, 5, shape)
    for y, x in coords:
        image += 400 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 2.0)
    image = image.clip(0, 65535).astype(np.uint16)
    return image, cells, nuclei, coords, boxes


def test_c16_multinucleate_border_protruding_and_large_ids(caplog):
    image, cells, nuclei, coords, boxes = _c16()
    cells = check_labels(cells, image.shape, "cells")
    nuclei = check_labels(nuclei, image.shape, "nuclei")
    with caplog.at_level(logging.INFO, logger="piscis.cells"):
        cell_id, in_nucleus, rows = spots_per_cell(coords, cells, nuclei)
    assert "1 nuclei lie outside every cell" in caplog.text and "99" in caplog.text
    assert "stick out" in caplog.text and "65000" in caplog.text
    assert [r["cell_id"] for r in rows] == [1, 2, 3, 4, 6, 7, 65000]
    by = _by_id(rows)
    for k, (y0, y1, x0, x1) in boxes.items():
        r = by[k]
        assert r["n_spots"] == 10, k
        expected_nuc = 0 if k == 2 else 4
        assert (r["n_spots_nucleus"], r["n_spots_cytoplasm"]) == (expected_nuc, 10 - expected_nuc)
        assert r["area"] == (y1 - y0 + 1) * (x1 - x0 + 1)
        assert r["centroid_y"] == pytest.approx((y0 + y1) / 2)
        assert r["centroid_x"] == pytest.approx((x0 + x1) / 2)
        assert r["touches_border"] is (k == 3)
    assert cell_id[68:70].tolist() == [6, 7]  # the two boundary spots
    assert cell_id[70:78].tolist() == [0] * 8  # background
    assert not in_nucleus[70:78].any()
    assert (
        len(coords) == 79 and cell_id[78] == 0 and in_nucleus[78]
    )  # protruding nucleus: no cell, in a nucleus
    assert (cell_id == 0).sum() == 9
    assert nuclei_outside_cells(cells, nuclei).tolist() == [99]
    # Excluding border cells is opt-in and logged.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="piscis.cells"):
        kept = cell_table(cells, cell_id, in_nucleus, nuclei, drop_border=True)
    assert [r["cell_id"] for r in kept] == [1, 2, 4, 6, 7, 65000]
    assert "drop_border" in caplog.text and "ids 3" in caplog.text


# ------------------------------------------------------------------------------- C01


def test_c01_no_spots_every_cell_with_count_zero():
    m, _, _ = _small_mask()
    nuclei = (m > 0) & ndi.binary_erosion(m > 0, iterations=2)
    for coords in (np.zeros((0, 2)), [], np.zeros((0, 3))):
        cell_id, _inn, rows = spots_per_cell(coords, m, nuclei.astype(np.uint8))
        assert len(cell_id) == 0
        assert [(r["cell_id"], r["n_spots"], r["n_spots_nucleus"]) for r in rows] == [
            (3, 0, 0),
            (17, 0, 0),
            (60, 0, 0),
            (120, 0, 0),
        ]


@pytest.mark.parametrize(
    "image",
    [
        np.full((512, 512), 100, np.uint16),
        (100 + np.random.default_rng(1).normal(0, 5, (512, 512))).astype(np.uint16),
        np.zeros((512, 512), np.uint16),
    ],
    ids=["flat", "noise", "zeros"],
)
def test_c01_blank_images_give_no_nuclei(image):
    nuclei = segment_nuclei(image)
    assert nuclei.shape == image.shape and not nuclei.any()
    cells = segment_cells(nuclei)
    rows = cell_table(cells, *assign_spots(np.zeros((0, 2)), cells, nuclei), nuclei)
    assert rows == []


# ---------------------------------------------------------------------- segment_cells


def test_segment_cells_expand_is_bounded_and_keeps_ids():
    nuclei = np.zeros((60, 60), np.int64)
    nuclei[28:32, 10:14] = 5
    nuclei[28:32, 22:26] = 9  # 8 px gap to nucleus 5
    cells = segment_cells(nuclei, expand=10)
    assert set(np.unique(cells)) == {0, 5, 9}
    assert cells[30, 17] == 5 and cells[30, 18] == 9  # split half-way, no merging
    assert cells[30, 36] == 0 and cells[30, 35] == 9  # at most 10 px from the nucleus
    assert (cells[nuclei > 0] == nuclei[nuclei > 0]).all()


def test_segment_cells_cytoplasm_watershed():
    nuclei = np.zeros((60, 80), np.int64)
    nuclei[28:32, 18:22] = 1
    nuclei[28:32, 48:52] = 2
    _yy, xx = np.indices(nuclei.shape)
    cyto = np.zeros(nuclei.shape)
    cyto[10:50, 5:65] = 300 - 4 * np.minimum(np.abs(xx - 20), np.abs(xx - 50))[10:50, 5:65]
    cyto[5:10, 70:78] = 300  # bright but no nucleus: stays background
    cells = segment_cells(nuclei, cytoplasm=cyto, smooth_sigma=0)
    assert cells[30, 34] == 1 and cells[30, 36] == 2  # border at the intensity valley x = 35
    assert cells[20, 6] == 1 and cells[20, 3] == 0
    assert not cells[5:10, 70:78].any()
    bounded = segment_cells(nuclei, cytoplasm=cyto, smooth_sigma=0, max_distance=5)
    assert bounded[30, 27] == 0 and bounded[30, 26] == 1
    with pytest.raises(ValueError, match=r"\(60, 81\).*\(60, 80\)"):
        segment_cells(nuclei, cytoplasm=np.zeros((60, 81)))


# -------------------------------------------------------------------- StarDist example


def _load_eval():
    path = REPO / "scripts" / "eval_segmentation.py"
    spec = importlib.util.spec_from_file_location("eval_segmentation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_matching_counts():
    ev = _load_eval()
    true = np.zeros((10, 10), int)
    true[0:4, 0:4] = 1
    true[6:10, 6:10] = 2
    pred = np.zeros_like(true)
    pred[0:4, 0:3] = 7  # IoU 0.75 with 1
    pred[6:8, 6:8] = 8  # IoU 0.25 with 2: unmatched
    pred[5, 0] = 9
    r = ev.evaluate(true, pred)
    assert (r["n_true"], r["n_pred"], r["matched"]) == (2, 3, 1)
    assert r["fraction_matched"] == 0.5 and r["f1"] == pytest.approx(2 / 5)
    assert r["mean_iou"] == pytest.approx(0.75)


def test_stardist_example_segmentation():
    if not (DATA / "pypi" / "stardist" / "img2d.tif").exists():
        pytest.skip("StarDist example data not present")
    result = _load_eval().run(DATA)
    assert result["n_true"] == 125
    assert result["fraction_matched"] >= 0.85


@pytest.mark.parametrize("given, warned", [(20, "cut into pieces"), (90, None), (400, "merged")])
def test_segment_nuclei_warns_when_the_diameter_is_far_off(caplog, given, warned):
    """Nuclei 90 px across: a diameter of 20 cuts them into pieces with no other sign of
    it (the sample's 18 nuclei of about 100 px gave 423 at the default 30); the warning
    gives the size seen. The right diameter gives no warning."""
    rng = np.random.default_rng(31)
    yy, xx = np.mgrid[:512, :512]
    image = rng.normal(100, 5, (512, 512))
    for cy, cx in [(110, 110), (110, 390), (390, 110), (390, 390), (250, 250)]:
        image += 300 * (np.hypot(yy - cy, xx - cx) < 45)
    caplog.set_level(logging.WARNING, logger="piscis.cells")
    labels = segment_nuclei(image, given)
    if warned is None:
        assert labels.max() == 5 and "diameter" not in caplog.text
    else:
        assert warned in caplog.text and "look about 9" in caplog.text, caplog.text
