"""Field cases C07, C09, C13 and C19 (../shared/cases/CASES.md): axis orders, channels,
time points and RGB, through the Python API, the CLI and the napari reader.

Every input is built here from a seeded generator as the case states. Counts use the
shipped default model; file-handling checks that need no detection use ``tiny_model``.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy.optimize import linear_sum_assignment

import piscis
from piscis import cli, synth
from piscis.annotate import axes_choices, detect_candidates, image_array, plane, runnable_axes
from piscis.io import InputError, load_model, read_image, read_planes
from piscis.napari._io import get_reader

VOXEL = (0.3, 0.1, 0.1)  # C07: z, y, x in micrometres


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def model():
    return load_model()


def _run(capsys, *argv) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _table(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return list(reader.fieldnames or []), rows


def _coords(rows: list[dict], axes: str = "zyx") -> np.ndarray:
    return np.array([[float(r[a]) for a in axes] for r in rows]).reshape(-1, len(axes))


def _n_matched(pred: np.ndarray, true: np.ndarray, tol: float = 1.5) -> int:
    """One-to-one matches within ``tol`` px in yx and ``tol`` slices in z (CASES.md)."""
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    if not len(pred) or not len(true):
        return 0
    d = np.abs(pred[:, None, :] - true[None, :, :])
    ok = np.all(d[..., :-2] <= tol, axis=-1) if pred.shape[1] == 3 else True
    ok = ok & (np.hypot(d[..., -2], d[..., -1]) <= tol)
    cost = np.where(ok, np.linalg.norm(d, axis=-1), 1e6)
    r, c = linear_sum_assignment(cost)
    return int(np.count_nonzero(ok[r, c]))


def _volume(seed: int, shape, n: int, z_lo: float | None = None, z_hi: float | None = None):
    """uint16 ZYX, background 100, noise 5, spots (sigma_z 1.5, sigma_yx 1, amp 400)."""
    rng = np.random.default_rng(seed)
    coords = synth.random_positions(rng, shape, n, 6.0, 4.0)
    if z_lo is not None:  # C07: spots at z 3-20
        coords[:, 0] = rng.uniform(z_lo, z_hi, n)
        coords = _spread(rng, coords, shape)
    vol, coords = synth.spot_volume(rng, shape, n, (1.5, 1.0), 400.0, coords=coords)
    return vol, coords


def _spread(rng, coords, shape):
    """Re-draw yx so spots stay >= 6 px apart in 3D after z was changed."""
    for i in range(len(coords)):
        while np.any(np.linalg.norm(coords[:i] - coords[i], axis=1) < 6.0):
            coords[i, 1:] = rng.uniform(4, np.asarray(shape[1:]) - 5)
    return coords


def _imagej(path: Path, arr: np.ndarray, axes: str, voxel=None) -> Path:
    meta = {"axes": axes}
    kwargs = {}
    if voxel is not None:
        meta.update(spacing=voxel[0], unit="um")
        kwargs["resolution"] = (1 / voxel[2], 1 / voxel[1])
    tifffile.imwrite(path, arr, imagej=True, metadata=meta, **kwargs)
    return path


# --------------------------------------------------------------------------- C07


@pytest.fixture(scope="module")
def c07(tmp_path_factory):
    """The C07 volume and its four files."""
    d = tmp_path_factory.mktemp("c07")
    vol, coords = _volume(7, (24, 256, 256), 50, 3.0, 20.0)
    files = {
        "a": _imagej(d / "a.tif", vol, "ZYX", VOXEL),
        "b": d / "b.tif",
        "c": d / "c.tif",
        "c_ij": _imagej(d / "c_ij.tif", vol[:, None], "ZCYX", VOXEL),
    }
    tifffile.imwrite(files["b"], np.transpose(vol, (1, 2, 0)), metadata=None)  # YXZ
    tifffile.imwrite(files["c"], vol[:, None])  # (24, 1, 256, 256), tifffile's own JSON
    return vol, coords, files


@pytest.fixture(scope="module")
def c07_api(c07, model):
    vol, coords, files = c07
    data = read_image(files["a"])
    return data, piscis.detect_spots(data.image, model=model, spacing=data.spacing)


def test_c07a_imagej_slices_read_as_zyx_with_voxel_size(c07, caplog):
    vol, _, files = c07
    with caplog.at_level(logging.INFO, logger="piscis.io"):
        data = read_image(files["a"])
    assert data.axes == "ZYX"
    np.testing.assert_array_equal(data.image, vol)
    np.testing.assert_allclose(data.spacing, VOXEL)
    assert "a.tif: axes ZYX, shape (24, 256, 256) (ImageJ metadata)" in caplog.text
    # --voxel-size wins over the file's; --project gives one (Y, X) plane
    assert read_image(files["a"], voxel_size=(1, 2, 3)).spacing == (1.0, 2.0, 3.0)
    flat = read_image(files["a"], project=True)
    assert flat.image.shape == (256, 256) and flat.spacing == pytest.approx(VOXEL[1:])


def test_c07a_50_spots_api_and_cli(c07, c07_api, model, tmp_path, capsys):
    vol, coords, files = c07
    data, spots = c07_api
    assert spots.coords.shape[1] == 3
    assert abs(len(spots.coords) - 50) <= 2, len(spots.coords)
    assert _n_matched(spots.coords, coords) >= 48
    out = tmp_path / "out"
    rc, err = _run(capsys, "count", files["a"], "-o", out)
    assert rc == 0, err
    columns, rows = _table(out / "spots" / "a.csv")
    assert columns[:6] == ["z", "y", "x", "score", "intensity", "background"]
    np.testing.assert_allclose(_coords(rows), spots.coords, atol=1e-3)
    s_cols, summary = _table(out / "summary.csv")
    assert s_cols == [*cli.SUMMARY_COLUMNS, "depth"]
    assert summary[0]["n_spots"] == str(len(spots.coords))
    assert (summary[0]["depth"], summary[0]["height"], summary[0]["width"]) == ("24", "256", "256")


def test_c07b_yxz_without_axes_is_refused_not_zero_spots(c07, tiny_model, tmp_path, capsys):
    vol, _, files = c07
    with pytest.raises(InputError, match=r"b.tif: last axis of size 24 looks like Z.*--axes YXZ"):
        read_image(files["b"])
    out = tmp_path / "out"
    rc, err = _run(capsys, "detect", files["b"], "-o", out, "--model", tiny_model)
    assert rc == 1
    assert "last axis of size 24 looks like Z" in err and "--axes YXZ" in err
    assert not (out / "b.csv").exists()  # no empty spot table for it
    data = read_image(files["b"], axes="YXZ")
    assert data.axes == "ZYX" and data.spacing is None
    np.testing.assert_array_equal(data.image, vol)


def test_c07b_with_axes_matches_a(c07, c07_api, tmp_path, capsys):
    _, _, files = c07
    _, spots = c07_api
    out = tmp_path / "out"
    argv = ["detect", files["b"], "-o", out, "--axes", "YXZ", "--voxel-size", "0.3,0.1,0.1"]
    rc, err = _run(capsys, *argv)
    assert rc == 0, err
    assert "b.tif: axes ZYX, shape (24, 256, 256) (--axes)" in err
    rows = _table(out / "b.csv")[1]
    np.testing.assert_allclose(_coords(rows), spots.coords, atol=1e-3)
    # --voxel-size gives what (a)'s ImageJ calibration gave: sizes in micrometres
    want = spots.columns()["fwhm_z_um"]
    assert np.isfinite(want).all()
    np.testing.assert_allclose([float(r["fwhm_z_um"]) for r in rows], want, atol=1e-3)


def test_c07c_singleton_channel_is_squeezed(c07, tiny_model, tmp_path, capsys):
    """The squeezed volume is (a)'s array, so it gives (a)'s spots; the CLI reads it as a
    plain ZYX image (no channel column)."""
    vol, _, files = c07
    for key in ("c", "c_ij"):
        data = read_image(files[key])
        assert data.axes == "ZYX"
        np.testing.assert_array_equal(data.image, vol)
    assert read_image(files["c_ij"]).spacing == pytest.approx(VOXEL)
    assert [i for i, _ in read_planes(files["c"])] == [{}]
    out = tmp_path / "out"
    rc, err = _run(capsys, "count", files["c"], "-o", out, "--model", tiny_model)
    assert rc == 0, err
    assert "c.tif: axes ZYX, shape (24, 256, 256)" in err
    columns, _ = _table(out / "spots" / "c.csv")
    assert columns[:3] == ["z", "y", "x"]  # a singleton channel is no channel axis
    assert _table(out / "summary.csv")[0] == [*cli.SUMMARY_COLUMNS, "depth"]


def test_c07d_2d_model_on_a_zyx_file_runs_per_slice(c07, c07_api, model):
    """The shipped model is a 2D network; a ZYX image is processed plane by plane and
    linked along z (3D detection), never flattened or refused silently; the 2D-only
    entry point refuses the volume with its shape."""
    _, coords, _ = c07
    data, spots = c07_api
    assert model.config["architecture"].get("in_channels", 1) == 1
    assert spots.coords.shape[1] == 3
    assert spots.coords[:, 0].min() >= 2 and spots.coords[:, 0].max() <= 21
    from piscis.detect import predict_maps

    with pytest.raises(ValueError, match=r"\(24, 256, 256\)"):
        predict_maps(data.image, model)


# --------------------------------------------------------------------------- C09


def _nuclei(seed: int, shape) -> np.ndarray:
    """4 ellipsoid nuclei (yx radius 30 px, z radius 6), 800 over 100, noise 5."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape, dtype=np.float32)
    vol = np.full(shape, 100.0, np.float32)
    for cy, cx in [(64, 64), (64, 192), (192, 64), (192, 192)]:
        inside = ((z - shape[0] / 2) / 6) ** 2 + ((y - cy) / 30) ** 2 + ((x - cx) / 30) ** 2 <= 1
        vol[inside] += 800
    return (vol + rng.normal(0, 5, shape)).clip(0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def c09(tmp_path_factory):
    d = tmp_path_factory.mktemp("c09")
    spots, coords = _volume(9, (20, 256, 256), 40)
    zcyx = np.stack([spots, _nuclei(90, spots.shape)], axis=1)
    files = {
        "ZCYX": _imagej(d / "zcyx.tif", zcyx, "ZCYX", VOXEL),
        "CZYX": d / "czyx.tif",
        "ZYXC": d / "zyxc.tif",
        "CZYX_ome": d / "czyx.ome.tif",
    }
    tifffile.imwrite(files["CZYX"], np.moveaxis(zcyx, 1, 0), metadata={"axes": "CZYX"})
    tifffile.imwrite(files["ZYXC"], np.moveaxis(zcyx, 1, -1), metadata={"axes": "ZYXC"})
    tifffile.imwrite(
        files["CZYX_ome"],
        np.moveaxis(zcyx, 1, 0),
        metadata={"axes": "CZYX", "PhysicalSizeX": 100, "PhysicalSizeXUnit": "nm",
                  "PhysicalSizeY": 100, "PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 0.3},
    )  # fmt: skip
    return zcyx, coords, files


@pytest.mark.parametrize("order", ["ZCYX", "CZYX", "ZYXC", "CZYX_ome"])
def test_c09_channel_axis_found_in_every_order(c09, order, caplog):
    zcyx, _, files = c09
    with caplog.at_level(logging.INFO, logger="piscis.io"):
        planes = read_planes(files[order])
    assert [i for i, _ in planes] == [{"c": 0}, {"c": 1}]
    for (_, data), k in zip(planes, (0, 1)):
        assert data.axes == "ZYX"
        np.testing.assert_array_equal(data.image, zcyx[:, k])
    assert "axes CZYX, shape (2, 20, 256, 256)" in caplog.text
    np.testing.assert_array_equal(read_image(files[order], channel=0).image, zcyx[:, 0])
    with pytest.raises(InputError, match=r"2 different channels.*--channel"):
        read_image(files[order])


@pytest.mark.parametrize("order", ["ZCYX", "CZYX", "ZYXC", "CZYX_ome"])
def test_c09_plugin_opens_one_zyx_layer_per_channel(c09, order):
    zcyx, _, files = c09
    reader = get_reader(str(files[order]))
    assert reader is not None
    layers = reader(str(files[order]))
    assert [t for _, _, t in layers] == ["image", "image"]
    for (data, kwargs, _), k in zip(layers, (0, 1)):
        np.testing.assert_array_equal(data, zcyx[:, k])
        assert kwargs["metadata"]["piscis"]["axes"] == "ZYX"
        assert kwargs["metadata"]["piscis"]["channel"] == k
        assert kwargs["name"].endswith(f"[c{k}]")
        if order in ("ZCYX", "CZYX_ome"):  # the files that carry a voxel size
            assert kwargs["scale"] == pytest.approx(VOXEL)
        else:
            assert kwargs["scale"] == (1.0, 1.0, 1.0)


def test_c09_unnamed_4d_axes_error_names_the_axis_and_orders(tmp_path):
    path = tmp_path / "u.tif"
    arr = np.random.default_rng(0).integers(0, 1000, (20, 2, 32, 32)).astype(np.uint16)
    tifffile.imwrite(path, arr)  # tifffile's JSON: the shape, no axes
    for call in (lambda: read_image(path), lambda: get_reader(str(path))(str(path))):
        with pytest.raises(InputError, match=r"u.tif: .*shape \(20, 2, 32, 32\).*ZCYX, CZYX"):
            call()
    ok = read_planes(path, axes="ZCYX")
    assert [i for i, _ in ok] == [{"c": 0}, {"c": 1}] and ok[0][1].image.shape == (20, 32, 32)
    path2 = tmp_path / "q.ome.tif"
    tifffile.imwrite(path2, np.zeros((3, 32, 32), np.uint16), metadata={"axes": "QYX"})
    with pytest.raises(InputError, match="--axes"):
        read_image(path2, axes="EYX")


def test_c09_40_spots_at_the_right_z_plugin_and_cli(c09, model, tmp_path, capsys):
    zcyx, coords, files = c09
    (data, kwargs, _), _ = get_reader(str(files["ZCYX"]))(str(files["ZCYX"]))
    spots = piscis.detect_spots(data, model=model, spacing=kwargs["metadata"]["piscis"]["spacing"])
    assert spots.coords.shape[1] == 3
    assert _n_matched(spots.coords, coords) >= 39, (
        len(spots.coords),
        _n_matched(spots.coords, coords),
    )
    assert abs(len(spots.coords) - 40) <= 2, len(spots.coords)
    out = tmp_path / "out"
    rc, err = _run(capsys, "detect", files["CZYX"], "-o", out, "--channel", "0")
    assert rc == 0, err
    columns, rows = _table(out / "czyx.csv")
    assert columns[:3] == ["z", "y", "x"]  # --channel: one channel, no c column
    np.testing.assert_allclose(_coords(rows), spots.coords, atol=1e-3)


# --------------------------------------------------------------------------- C13


@pytest.fixture(scope="module")
def c13(tmp_path_factory):
    d = tmp_path_factory.mktemp("c13")
    vol, coords = _volume(13, (32, 256, 256), 60)
    files = {
        "a": _imagej(d / "a.tif", vol, "ZYX"),
        "b": _imagej(d / "b.tif", vol, "CYX"),
        "c": _imagej(d / "c.tif", vol, "TYX"),
        "d": d / "d.tif",
        "e": d / "e.tif",
        "f": d / "f.ome.tif",
    }
    tifffile.imwrite(files["d"], vol, metadata=None)
    tifffile.imwrite(files["e"], vol, metadata={"axes": "ZYX"})
    tifffile.imwrite(files["f"], vol, metadata={"axes": "ZYX"})
    with tifffile.TiffFile(files["f"]) as tif:
        assert tif.is_ome and 'SizeZ="32"' in tif.ome_metadata
    return vol, coords, files


@pytest.mark.parametrize(
    "key,source",
    [("a", "ImageJ metadata"), ("e", "tifffile metadata"), ("f", "OME metadata")],
)
def test_c13_aef_read_as_z(c13, key, source, caplog):
    vol, _, files = c13
    with caplog.at_level(logging.INFO, logger="piscis.io"):
        data = read_image(files[key])
    assert data.axes == "ZYX"
    np.testing.assert_array_equal(data.image, vol)
    assert f"axes ZYX, shape (32, 256, 256) ({source})" in caplog.text


def test_c13_aef_60_spots(c13, model, tmp_path, capsys):
    vol, coords, files = c13
    spots = piscis.detect_spots(vol, model=model)
    assert abs(len(spots.coords) - 60) <= 2, len(spots.coords)
    assert _n_matched(spots.coords, coords) >= 58
    out = tmp_path / "out"
    rc, err = _run(capsys, "count", files["f"], "-o", out)  # (a) and (e): same array, above
    assert rc == 0, err
    _, summary = _table(out / "summary.csv")
    assert [r["n_spots"] for r in summary] == [str(len(spots.coords))]
    np.testing.assert_allclose(_coords(_table(out / "spots" / "f.csv")[1]), spots.coords, atol=1e-3)


@pytest.mark.parametrize("key,what,letter", [("b", "channels", "c"), ("c", "time points", "t")])
def test_c13_bc_mislabelled_stack_warns_and_follows_the_metadata(
    c13, key, what, letter, tiny_model, tmp_path, capsys, caplog
):
    vol, _, files = c13
    with caplog.at_level(logging.INFO, logger="piscis.io"):
        planes = read_planes(files[key])
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert f"32 {what} and no Z axis" in warned[0].getMessage()
    assert "--axes ZYX" in warned[0].getMessage()
    # The documented default: the metadata is followed, each plane is its own 2D image.
    assert [i for i, _ in planes] == [{letter: k} for k in range(32)]
    assert all(p.axes == "YX" for _, p in planes)
    np.testing.assert_array_equal(planes[5][1].image, vol[5])
    # The override reads the z-stack.
    fixed = read_image(files[key], axes="ZYX")
    assert fixed.axes == "ZYX"
    np.testing.assert_array_equal(fixed.image, vol)
    out = tmp_path / "out"
    rc, err = _run(capsys, "count", files[key], "-o", out, "--model", tiny_model)
    assert rc == 0, err
    assert f"32 {what} and no Z axis" in err and "--axes ZYX" in err
    columns, rows = _table(out / "summary.csv")
    assert columns == [*cli.SUMMARY_COLUMNS, letter]
    assert [r[letter] for r in rows] == [str(k) for k in range(32)]


def test_c13_d_plain_multipage_default_is_z_and_logged(c13, tiny_model, tmp_path, capsys):
    vol, _, files = c13
    data = read_image(files["d"])
    assert data.axes == "ZYX"
    np.testing.assert_array_equal(data.image, vol)
    out = tmp_path / "out"
    rc, err = _run(capsys, "count", files["d"], "-o", out, "--model", tiny_model)
    assert rc == 0, err
    line = next(x for x in err.splitlines() if "d.tif: axes" in x)
    assert line.startswith("INFO: ")
    assert "axes ZYX, shape (32, 256, 256)" in line
    assert "does not name its axes, read as ZYX" in line and "z-planes" in line


C13G_COUNTS = {(0, 0): 6, (0, 1): 12, (1, 0): 18, (1, 1): 9}  # (t, c): spots


@pytest.fixture(scope="module")
def c13g(tmp_path_factory):
    """(g): an ImageJ TZCYX hyperstack 2x16x2x128x128, its spots per (t, c)."""
    stack = np.zeros((2, 16, 2, 128, 128), np.uint16)
    truth = {}
    for (t, c), n in C13G_COUNTS.items():
        stack[t, :, c], truth[t, c] = _volume(100 + 10 * t + c, (16, 128, 128), n)
    path = _imagej(tmp_path_factory.mktemp("c13g") / "g.tif", stack, "TZCYX")
    return stack, truth, path


def test_c13_g_tzcyx_each_time_point_and_channel(c13g, model, tmp_path, capsys):
    counts = C13G_COUNTS
    stack, truth, path = c13g
    planes = read_planes(path)
    assert [i for i, _ in planes] == [{"t": t, "c": c} for t in (0, 1) for c in (0, 1)]
    for i, data in planes:
        np.testing.assert_array_equal(data.image, stack[i["t"], :, i["c"]])
    layers = get_reader(str(path))(str(path))  # the plugin: one TZYX layer per channel
    assert [kw["metadata"]["piscis"]["axes"] for _, kw, _ in layers] == ["TZYX", "TZYX"]
    np.testing.assert_array_equal(layers[1][0], stack[:, :, 1])
    out = tmp_path / "out"
    rc, err = _run(capsys, "count", path, "-o", out)
    assert rc == 0, err
    assert "g.tif: axes TCZYX, shape (2, 2, 16, 128, 128) (ImageJ metadata)" in err
    columns, summary = _table(out / "summary.csv")
    assert columns == [*cli.SUMMARY_COLUMNS, "t", "c", "depth"]
    spot_cols, rows = _table(out / "spots" / "g.csv")
    assert spot_cols[:5] == ["t", "c", "z", "y", "x"]
    for r in summary:
        t, c = int(r["t"]), int(r["c"])
        mine = [s for s in rows if (s["t"], s["c"]) == (r["t"], r["c"])]
        assert int(r["n_spots"]) == len(mine)
        assert abs(len(mine) - counts[t, c]) <= 1, (t, c, len(mine))
        assert _n_matched(_coords(mine), truth[t, c]) >= counts[t, c] - 1


def test_c13_c_tyx_file_offers_time_first_and_reads_one_frame(c13):
    vol, _, files = c13
    ((data, kwargs, _),) = get_reader(str(files["c"]))(str(files["c"]))
    recorded = kwargs["metadata"]["piscis"]["axes"]
    assert recorded == "TYX"
    choices = axes_choices(data.shape, recorded=recorded)
    assert choices[0] == "TYX"  # not ZYX: 32 frames are not one 3D stack by default
    assert "ZYX" in choices  # the override for a mislabelled z-stack
    for axes in choices:  # every order offered runs
        assert runnable_axes(axes, data.shape)
        assert plane(data, axes, channel=0, time=3).shape == (256, 256)
    np.testing.assert_array_equal(plane(data, "TYX", time=5), vol[5])
    np.testing.assert_array_equal(image_array(data, "TYX"), vol[0])  # no time given: t=0
    with pytest.raises(ValueError, match=r"time point 32 is out of range \(0..31"):
        plane(data, "TYX", time=32)


def test_c13_g_tzyx_layers_offer_the_recorded_axes_and_run_one_time_point(c13g):
    pytest.importorskip("napari")
    from types import SimpleNamespace

    from napari.layers import Image

    from piscis.napari import _layers

    stack, _, path = c13g
    for data, kwargs, _ in get_reader(str(path))(str(path)):
        layer = Image(data, **kwargs)
        c = kwargs["metadata"]["piscis"]["channel"]
        choices = _layers.layer_axes_choices(layer)
        assert choices[0] == "TZYX"  # time is not read as channels
        for axes in choices:  # only orders that run
            assert runnable_axes(axes, data.shape)
            assert _layers.layer_image(layer, axes, 0, time=1).ndim == 3
        np.testing.assert_array_equal(_layers.layer_image(layer, "TZYX", 0, 1), stack[1, :, c])
        np.testing.assert_array_equal(_layers.layer_image(layer, "TZYX", 0), stack[0, :, c])
        np.testing.assert_array_equal(
            _layers.layer_plane(layer, "TZYX", 0, 1), stack[1, :, c].max(axis=0)
        )
    # The time point shown: the viewer's position along T, in the layer's frame.
    viewer = SimpleNamespace(dims=SimpleNamespace(point=(1.0, 7.0, 0.0, 0.0)))
    assert _layers.current_index(viewer, layer, 0) == 1
    assert _layers.current_index(SimpleNamespace(), layer, 0) is None  # no viewer step
    pts = _layers.points_from_voxels([[2.0, 3.0, 4.0]], layer, "TZYX", time=1)
    np.testing.assert_array_equal(pts, [[1.0, 2.0, 3.0, 4.0]])
    tyx = Image(np.zeros((4, 8, 8)), metadata={"piscis": {"axes": "TYX"}})
    pts = _layers.points_from_voxels([[3.0, 4.0]], tyx, "TYX", time=2)
    np.testing.assert_array_equal(pts, [[2.0, 3.0, 4.0]])


# --------------------------------------------------------------------------- C19


def _rgb48(seed: int = 19):
    """uint16 512x672x3: 30 spots (sigma 1, amp 4000 over 500) in green, nuclei in blue."""
    rng = np.random.default_rng(seed)
    shape = (512, 672)
    coords = synth.random_positions(rng, shape, 30, 6.0, 4.0)
    yy, xx = np.indices(shape, dtype=np.float32)
    green = np.full(shape, 500.0, np.float32)
    for y, x in coords:
        green += 4000 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 2)
    blue = np.full(shape, 500.0, np.float32)
    for cy, cx in [(128, 160), (128, 500), (380, 160), (380, 500)]:
        blue[(yy - cy) ** 2 + (xx - cx) ** 2 <= 60**2] += 3000
    red = np.full(shape, 500.0, np.float32)
    rgb = np.stack([red, green, blue], axis=-1) + rng.normal(0, 20, (*shape, 3))
    return rgb.clip(0, 65535).astype(np.uint16), coords


@pytest.fixture(scope="module")
def c19(tmp_path_factory):
    d = tmp_path_factory.mktemp("c19")
    rgb, coords = _rgb48()
    rgb8 = (rgb // 20).clip(0, 255).astype(np.uint8)
    files = {"rgb48": d / "rgb48.tif", "rgb8": d / "rgb8.tif", "rgba8": d / "rgba8.tif"}
    tifffile.imwrite(files["rgb48"], rgb, photometric="rgb")
    tifffile.imwrite(files["rgb8"], rgb8, photometric="rgb")
    rgba = np.concatenate([rgb8, np.full((*rgb8.shape[:2], 1), 255, np.uint8)], axis=-1)
    tifffile.imwrite(files["rgba8"], rgba, photometric="rgb", extrasamples=["unassalpha"])
    return rgb, rgb8, coords, files


@pytest.mark.parametrize("key", ["rgb48", "rgb8", "rgba8"])
def test_c19_last_axis_is_channels_not_z_or_x(c19, key, caplog):
    rgb, rgb8, _, files = c19
    ref = rgb if key == "rgb48" else rgb8
    with caplog.at_level(logging.INFO, logger="piscis.io"):
        planes = read_planes(files[key])
    assert "axes CYX, shape (" in caplog.text
    assert [i for i, _ in planes] == [{"c": 0}, {"c": 1}, {"c": 2}]  # an opaque alpha is dropped
    for i, data in planes:
        assert data.axes == "YX" and data.image.shape == (512, 672)
        np.testing.assert_array_equal(data.image, ref[..., i["c"]])
    with pytest.raises(InputError, match=r"3 different channels|4 different channels"):
        read_image(files[key])
    np.testing.assert_array_equal(read_image(files[key], channel=1).image, ref[..., 1])
    layers = get_reader(str(files[key]))(str(files[key]))
    assert len(layers) == 3  # as the CLI: an opaque alpha is dropped
    assert [kw["metadata"]["piscis"]["channel"] for _, kw, _ in layers] == [0, 1, 2]
    for (data, _, _), k in zip(layers, range(3)):
        assert data.shape == (512, 672)
        np.testing.assert_array_equal(data, ref[..., k])


def test_c19_unlabelled_yxc_pages_and_grey_rgb_warns(tmp_path, caplog):
    rgb, _ = _rgb48()
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, rgb, photometric="minisblack", metadata=None)  # 512 pages of 672x3
    planes = read_planes(plain)
    assert [i for i, _ in planes] == [{"c": 0}, {"c": 1}, {"c": 2}]
    np.testing.assert_array_equal(planes[1][1].image, rgb[..., 1])
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, np.repeat(rgb[..., 1:2], 3, axis=-1), photometric="rgb")
    with caplog.at_level(logging.WARNING, logger="piscis.io"):
        data = read_image(grey)
    np.testing.assert_array_equal(data.image, rgb[..., 1])
    assert "grey.tif: 3 equal channels read as one grey image" in caplog.text
    assert read_planes(grey)[0][0] == {}


def test_c19_green_30_red_0_api_and_cli(c19, model, tmp_path, capsys):
    rgb, rgb8, coords, files = c19
    green = piscis.detect_spots(read_image(files["rgb48"], channel=1).image, model=model)
    red = piscis.detect_spots(read_image(files["rgb48"], channel=0).image, model=model)
    assert abs(len(green.coords) - 30) <= 1, len(green.coords)
    assert _n_matched(green.coords, coords) >= 29
    assert len(red.coords) <= 1, len(red.coords)
    out = tmp_path / "out"
    rc, err = _run(capsys, "count", files["rgb48"], files["rgb8"], files["rgba8"], "-o", out)
    assert rc == 0, err
    columns, summary = _table(out / "summary.csv")
    assert columns == [*cli.SUMMARY_COLUMNS, "c"]
    by = {(Path(r["image"]).stem, r["c"]): int(r["n_spots"]) for r in summary}
    assert by[("rgb48", "1")] == len(green.coords)
    assert by[("rgb48", "0")] == len(red.coords)
    for key in ("rgb8", "rgba8"):
        assert abs(by[(key, "1")] - 30) <= 1, by
        assert by[(key, "0")] <= 1, by
    spot_cols, rows = _table(out / "spots" / "rgb48.csv")
    assert spot_cols[:3] == ["c", "y", "x"]
    mine = [r for r in rows if r["c"] == "1"]
    np.testing.assert_allclose(_coords(mine, "yx"), green.coords, atol=1e-3)


def test_c19_plugin_layers_green_30_red_0(c19, model):
    """The reader's layers through piscis.annotate, as the Detect widget runs them."""
    _, _, coords, files = c19
    for key in ("rgb48", "rgba8"):
        layers = get_reader(str(files[key]))(str(files[key]))
        assert len(layers) == 3, key  # RGBA: the opaque alpha is no layer
        found = []
        for data, kwargs, _ in layers[:2]:  # red, green
            axes = axes_choices(data.shape, recorded=kwargs["metadata"]["piscis"]["axes"])[0]
            assert axes == "YX"
            found.append(detect_candidates(plane(data, axes), model).at(model.threshold))
        red, green = found
        assert abs(len(green) - 30) <= 1, (key, len(green))
        assert _n_matched(green.coords, coords) >= 29, key
        assert len(red) <= 1, (key, len(red))


def _piscis_viewer(request):
    """A napari viewer (not shown) with the piscis plugin registered."""
    import os

    if not (os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM") == "offscreen"):
        pytest.skip("no display: run under `xvfb-run -a`")  # before Qt starts
    pytest.importorskip("pytestqt")
    import npe2

    viewer = request.getfixturevalue("make_napari_viewer")(show=False)
    pm = npe2.PluginManager.instance()
    try:  # napari's test support hides installed plugins
        pm.get_manifest("piscis")
    except KeyError:
        pm.register(npe2.PluginManifest.from_distribution("piscis"))
    return viewer


def test_c09_napari_viewer_opens_the_hyperstack_and_detects_40_spots(c09, request):
    viewer = _piscis_viewer(request)
    zcyx, _, files = c09
    layers = viewer.open(str(files["ZCYX"]), plugin="piscis")
    assert [type(la).__name__ for la in layers] == ["Image", "Image"]
    for layer, k in zip(layers, (0, 1)):
        assert layer.ndim == 3 and layer.data.shape == (20, 256, 256)
        np.testing.assert_allclose(layer.scale, VOXEL)
        assert layer.metadata["piscis"]["axes"] == "ZYX"
        np.testing.assert_array_equal(np.asarray(layer.data), zcyx[:, k])
    # The Detect widget on channel 0: 3D detection, 40 spots at the right z.
    qtbot = request.getfixturevalue("qtbot")
    dock, detect = viewer.window.add_plugin_dock_widget("piscis", "Detect spots")
    detect.image.set_layer(layers[0])
    assert detect.axes.currentText() == "ZYX"
    detect.run()
    qtbot.waitUntil(lambda: detect._worker is None, timeout=120_000)
    points = detect.points_layer
    assert points.ndim == 3
    _, coords, _ = c09
    n = _n_matched(points.data, coords)
    assert n >= 39 and abs(len(points.data) - 40) <= 2, (len(points.data), n)


def test_c13_g_napari_detect_runs_on_the_time_point_shown(c13g, request):
    viewer = _piscis_viewer(request)
    stack, truth, path = c13g
    layers = viewer.open(str(path), plugin="piscis")
    assert [la.metadata["piscis"]["axes"] for la in layers] == ["TZYX", "TZYX"]
    qtbot = request.getfixturevalue("qtbot")
    _, detect = viewer.window.add_plugin_dock_widget("piscis", "Detect spots")
    detect.image.set_layer(layers[1])
    assert detect.axes.currentText() == "TZYX"  # not CZYX: time read as channels
    t_axis = viewer.dims.ndim - layers[1].ndim  # the layer's T among the viewer's dims
    viewer.dims.set_current_step(t_axis, 1)  # the viewer shows time point 1
    detect.run()
    qtbot.waitUntil(lambda: detect._worker is None, timeout=120_000)
    points = detect.points_layer
    assert points.name == f"{layers[1].name} spots [t1]" and points.ndim == 4
    assert points.metadata["piscis"]["t"] == 1
    np.testing.assert_array_equal(points.data[:, 0], 1)  # shown on time point 1
    n = _n_matched(points.data[:, 1:], truth[1, 1])
    assert abs(len(points.data) - C13G_COUNTS[1, 1]) <= 1 and n >= C13G_COUNTS[1, 1] - 1, (
        len(points.data),
        n,
    )


def test_c13_c_napari_tyx_detects_the_frame_shown(c13, model, request, tmp_path):
    from piscis.napari._io import write_points

    viewer = _piscis_viewer(request)
    vol, _, files = c13
    (layer,) = viewer.open(str(files["c"]), plugin="piscis")
    qtbot = request.getfixturevalue("qtbot")
    _, detect = viewer.window.add_plugin_dock_widget("piscis", "Detect spots")
    detect.image.set_layer(layer)
    assert detect.axes.currentText() == "TYX"  # not ZYX: one frame, not a 3D stack
    viewer.dims.set_current_step(viewer.dims.ndim - layer.ndim, 5)
    detect.run()
    qtbot.waitUntil(lambda: detect._worker is None, timeout=120_000)
    points = detect.points_layer
    assert points.name == f"{layer.name} spots [t5]" and points.ndim == 3
    np.testing.assert_array_equal(points.data[:, 0], 5)
    ref = detect_candidates(vol[5], model).at(detect.threshold.value())
    assert len(points.data) == len(ref) > 0
    assert _n_matched(points.data[:, 1:], ref.coords, tol=1e-3) == len(ref)
    # Saved, the T coordinate is a t column (not z).
    data, attrs, _ = points.as_layer_data_tuple()
    (out,) = write_points(str(tmp_path / "t5.csv"), data, attrs)
    columns, rows = _table(Path(out))
    assert columns[:3] == ["y", "x", "t"] and "z" not in columns
    assert {r["t"] for r in rows} == {"5"}
    np.testing.assert_allclose(_coords(rows, "yx"), points.data[:, 1:], atol=1e-3)
