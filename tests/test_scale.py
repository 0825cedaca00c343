"""Large images streamed from their files, batches on a Dask cluster, resumed runs
(issue #5; CASES.md C18 for the 2D part)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import piscis_logger_kept

from piscis import batch, cli, lazy
from piscis.batch import RECORD_NAME, output_files
from piscis.detect import detect
from piscis.io import InputError, load_model, read_image
from piscis.synth import spot_image
from piscis.synth_large import jittered_grid, render_field, write_large

zarr = pytest.importorskip("zarr")

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("coords", "score", "intensity", "background")


def _same_spots(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(getattr(a, k), getattr(b, k)) for k in FIELDS)


@pytest.fixture(scope="module")
def model():
    return load_model()


# --------------------------------------------------------------------------- lazy reading


def test_lazy_zarr_ome_zarr_and_tiff_give_the_in_memory_spots(tmp_path, model):
    img, _ = spot_image(np.random.default_rng(0), (700, 520), n_spots=120)
    z = zarr.open_array(
        tmp_path / "a.zarr", mode="w", shape=img.shape, chunks=(200, 256), dtype=img.dtype
    )
    z[:] = img
    # OME-Zarr: a multiscale group; the first dataset is the full resolution.
    g = zarr.open_group(tmp_path / "b.ome.zarr", mode="w")
    g.attrs["multiscales"] = [
        {"axes": [{"name": "y"}, {"name": "x"}], "datasets": [{"path": "0"}, {"path": "1"}]}
    ]
    g.create_array("0", shape=img.shape, chunks=(256, 256), dtype=img.dtype)[:] = img
    g.create_array("1", shape=(350, 260), chunks=(256, 256), dtype=img.dtype)[:] = img[::2, ::2]
    tifffile.imwrite(tmp_path / "c.tif", img.astype(">u2"), tile=(128, 128))  # big-endian too
    ref = detect(img, model, tile_size=256)
    assert len(ref) >= 110
    for name in ("a.zarr", "b.ome.zarr", "c.tif"):
        plane = lazy.open_lazy(tmp_path / name)
        assert plane.shape == img.shape
        assert _same_spots(lazy.detect_lazy(plane, model, tile_size=256), ref), name


def test_lazy_float_image_with_nan_pixels(tmp_path, model, caplog):
    img, _ = spot_image(np.random.default_rng(8), (300, 280), n_spots=30, dtype=np.float32)
    img[5:9, 100:140] = np.nan
    img[200, 3] = np.inf
    zarr.open_array(
        tmp_path / "f.zarr", mode="w", shape=img.shape, chunks=(128, 128), dtype=img.dtype
    )[:] = img
    with caplog.at_level("WARNING", logger="piscis"):
        got = lazy.detect_lazy(lazy.open_lazy(tmp_path / "f.zarr"), model, tile_size=128, name="f")
    assert "f: 161 non-finite (NaN or infinite) pixels are ignored" in caplog.text
    assert _same_spots(got, detect(img, model, tile_size=128)) and len(got) >= 28


def test_lazy_sample_rule_on_an_image_larger_than_the_sample(tmp_path, model):
    """Above SAMPLE_PIXELS the statistics come from a grid of blocks, read from the file."""
    from piscis.detect import SAMPLE_PIXELS, estimate_normalization

    shape = (2064, 2000)  # 4.1 Mpx > 4 Mpx
    assert shape[0] * shape[1] > SAMPLE_PIXELS
    tile = render_field(jittered_grid(shape, 400, seed=3), seed=4)
    write_large(tmp_path / "big.tif", shape, tile, tile=256)
    img = tifffile.imread(tmp_path / "big.tif")
    plane = lazy.open_lazy(tmp_path / "big.tif")
    norm = lazy.lazy_normalization(plane, model.compression, model.contrast_ratio)
    assert norm == estimate_normalization(img, model.compression, model.contrast_ratio)
    # With the tiles cut as in memory (the test above), the spots are the same.


def test_lazy_zyx_volume_reads_plane_by_plane_and_projects(tmp_path):
    vol = np.random.default_rng(1).integers(0, 1000, (5, 64, 80)).astype(np.uint16)
    zarr.open_array(tmp_path / "v.zarr", mode="w", shape=vol.shape, dtype=vol.dtype)[:] = vol
    tifffile.imwrite(tmp_path / "v.tif", vol, metadata={"axes": "ZYX"})
    for name in ("v.zarr", "v.tif"):
        plane = lazy.open_lazy(tmp_path / name)
        assert plane.volume.shape == vol.shape
        np.testing.assert_array_equal(plane.volume[3], vol[3])
        np.testing.assert_array_equal(plane.volume[2, 10:20, 5:9], vol[2, 10:20, 5:9])
        np.testing.assert_array_equal(plane[10:30, 7:70], vol.max(0)[10:30, 7:70])
        np.testing.assert_array_equal(
            np.asarray(plane), read_image(tmp_path / "v.tif", project=True).image
        )


def test_lazy_channels_and_bad_input_name_the_file(tmp_path):
    cyx = np.random.default_rng(2).integers(0, 100, (3, 40, 50)).astype(np.uint16)
    zarr.open_array(tmp_path / "c.zarr", mode="w", shape=cyx.shape, dtype=cyx.dtype)[:] = cyx
    plane = lazy.open_lazy(tmp_path / "c.zarr", channel=1, axes="CYX")
    np.testing.assert_array_equal(plane[:, :], cyx[1])
    with pytest.raises(InputError, match=r"c\.zarr.*--channel"):
        lazy.open_lazy(tmp_path / "c.zarr", axes="CYX")
    with pytest.raises(InputError, match=r"c\.zarr.*--axes"):
        lazy.open_lazy(tmp_path / "c.zarr", axes="YX")
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(InputError, match=r"bad\.tif.*not a readable TIFF"):
        lazy.open_lazy(tmp_path / "bad.tif")


def test_too_little_memory_stops_cleanly_with_a_smaller_tile_size(tmp_path, monkeypatch, capsys):
    """The suggested size fits, and is never under the smallest core the tiles use (it
    said 128 for a 256 px core, which tiling raised back to 256: the same failure)."""
    img, _ = spot_image(np.random.default_rng(5), (512, 512), n_spots=10)
    zarr.open_array(tmp_path / "a.zarr", mode="w", shape=img.shape, dtype=img.dtype)[:] = img
    monkeypatch.setattr(lazy, "_available_memory", lambda: 40 * 2**20)  # 256 px tiles: 29 MB
    argv = ["count", str(tmp_path / "a.zarr"), "-o", str(tmp_path / "out"), "--tile-size"]
    rc = cli.main([*argv, "4096"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "a.zarr" in err and "smaller --tile-size (e.g." in err
    suggested = int(err.split("smaller --tile-size (e.g. ")[1].split(")")[0])
    assert suggested == 256  # the smallest core of the default network
    lazy.check_memory(suggested)  # the suggestion fits
    monkeypatch.setattr(lazy, "_available_memory", lambda: 20 * 2**20)
    rc = cli.main([*argv, "256", "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 1 and "--tile-size 256 is already the smallest useful" in err
    assert "(e.g." not in err


# --------------------------------------------------------------------------- C18


def _peak_rss_mb(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m piscis ARGS`` in a fresh process, and its own peak resident memory."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("bench_scale", ROOT / "scripts" / "bench_scale.py")
    bench = module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = subprocess.run(
        [sys.executable, "-c", bench.PEAK, *args], capture_output=True, text=True, env=env
    )
    return r, float(r.stderr.rsplit("PEAK_RSS_MB ", 1)[1].split()[0])


@pytest.mark.slow
def test_c18_large_field_streamed_with_bounded_memory(tmp_path):
    """C18 at 2048 x 2048 with 500 spots (the full 16384 x 16384, 20000 spots, is in
    scripts/bench_scale.py): tile by tile, count within 0.5%, two tile sizes agree."""
    shape, n = (2048, 2048), 500
    truth = jittered_grid(shape, n, seed=18)
    write_large(tmp_path / "field.tif", shape, render_field(truth, seed=18), tile=512)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env["PISCIS_STREAM_PIXELS"] = str(1024 * 1024)  # stream this one (the default: 8192^2)
    peaks = []
    results = {}
    for tile in (512, 1024):
        out = tmp_path / f"out{tile}"
        cmd = ["count", str(tmp_path / "field.tif"), "-o", str(out)]
        r, peak = _peak_rss_mb([*cmd, "--tile-size", str(tile)], env)
        assert r.returncode == 0, r.stderr
        # No progress bar in a pipe (test_cli checks the tile bar on a terminal).
        assert "tiles:" not in r.stderr and "\r" not in r.stderr
        results[tile] = (out / "spots" / "field.csv").read_bytes()
        peaks.append(peak)
    assert max(peaks) < 1000, f"peak RSS {peaks} MB"
    assert results[512] == results[1024]
    got = np.loadtxt(tmp_path / "out512" / "spots" / "field.csv", delimiter=",", skiprows=1)
    assert abs(len(got) - n) <= 0.005 * n, len(got)
    from piscis.metrics import match

    found, _ = match(got[:, :2], truth, 1.5)
    assert len(found) >= n - 0.005 * n


def test_streamed_spots_equal_tiles_cut_by_hand(tmp_path, model):
    """The streamed run against the image cut into overlapping crops by hand, each
    detected in memory with the whole image's normalisation: within 0.1 px."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("bench_scale", ROOT / "scripts" / "bench_scale.py")
    bench = module_from_spec(spec)
    spec.loader.exec_module(bench)
    shape = (1536, 1280)
    write_large(tmp_path / "f.zarr", shape, render_field(jittered_grid(shape, 300, seed=7), seed=7))
    plane = lazy.open_lazy(tmp_path / "f.zarr")
    streamed = lazy.detect_lazy(plane, model, tile_size=512)
    by_hand = bench.by_hand(plane, model, crop=640, overlap=96)
    worst, unmatched = bench.compare(streamed.coords, by_hand)
    assert len(streamed) >= 290 and unmatched == 0 and worst < 0.1, (worst, unmatched)


# --------------------------------------------------------------------------- Dask


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("distributed")
    from piscis.batch import local_cluster

    with local_cluster(2, silence_logs=50) as c:
        yield c


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    rng = np.random.default_rng(11)
    for i in range(12):
        img, _ = spot_image(rng, (384, 384), n_spots=40)
        tifffile.imwrite(d / f"img{i:02d}.tif", img)
    (d / "broken.tif").write_bytes(b"II*\x00 truncated")
    return d


@pytest.fixture(scope="module")
def serial(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "out"
    with piscis_logger_kept():  # a module fixture: before the per-test restore
        rc = cli.main(["count", str(folder), "-o", str(out), "-q"])
    assert rc == 1  # the broken file
    return out


def test_scheduler_run_gives_the_serial_files(cluster, folder, serial, tmp_path, capsys):
    from distributed import Client

    out = tmp_path / "out"
    rc = cli.main(["count", str(folder), "-o", str(out), "--scheduler", cluster.scheduler_address])
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.tif" in err
    assert output_files(out) == output_files(serial)
    assert len(output_files(serial)) == 14  # 12 spot tables, the summary, the record
    with Client(cluster.scheduler_address) as client:
        loads = client.run(lambda: __import__("piscis.batch").batch.MODEL_LOADS)
    assert sorted(loads.values()) in ([1, 1], [0, 1])  # once per worker, not per task


def test_local_cluster_workers_keep_the_adaptive_malloc_thresholds(cluster):
    """Dask's nanny fixes MALLOC_TRIM_THRESHOLD_ (and so glibc's mmap threshold),
    which slows detection in a worker by about a quarter; piscis's clusters unset it."""
    from distributed import Client

    with Client(cluster.scheduler_address) as client:
        env = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        threads = client.run(lambda: os.environ.get("OMP_NUM_THREADS"))
    assert set(env.values()) == {None}
    assert set(threads.values()) == {"1"}


def test_local_cluster_opens_no_dashboard_or_http_port(cluster):
    """--workers: no dashboard (dask's scheduler opens one on 8787 even with
    dashboard_address=None) and no HTTP port of the workers; only the comm ports."""
    psutil = pytest.importorskip("psutil")
    from distributed import Client

    def listening(pid: int) -> set[int]:
        conns = psutil.Process(pid).net_connections(kind="inet")
        return {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}

    assert not cluster.dashboard_link
    assert getattr(cluster.scheduler, "http_server", None) is None
    assert "dashboard" not in cluster.scheduler.services
    nannies = {int(w.port) for w in cluster.workers.values()}
    assert listening(os.getpid()) == {int(cluster.scheduler.port), *nannies}
    with Client(cluster.scheduler_address) as client:
        seen = client.run(
            lambda dask_worker: (dask_worker.services, dask_worker.port, listening(os.getpid()))
        )
    assert len(seen) == 2
    for services, port, ports in seen.values():
        assert services == {} and ports == {int(port)}


def test_killed_worker_mid_run_every_result_is_there(cluster, folder, serial, tmp_path):
    from distributed import Client

    out = tmp_path / "out"
    argv = ["count", str(folder), "-o", str(out), "-q", "--scheduler", cluster.scheduler_address]
    rc = {}
    runner = threading.Thread(target=lambda: rc.setdefault("rc", cli.main(argv)))
    with Client(cluster.scheduler_address) as client:
        pids = client.run(os.getpid)
        runner.start()
        deadline = time.time() + 120
        while time.time() < deadline:  # wait for the first finished image
            rec = out / RECORD_NAME
            if rec.exists() and len(rec.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        assert runner.is_alive()  # mid-run
        os.kill(next(iter(pids.values())), signal.SIGKILL)
        runner.join(300)
    assert rc["rc"] == 1  # only the broken file failed
    assert output_files(out) == output_files(serial)


def test_per_cell_counts_and_saved_masks_through_the_cluster(cluster, tmp_path):
    rng = np.random.default_rng(12)
    d = tmp_path / "in"
    d.mkdir()
    yy, xx = np.mgrid[:256, :256]
    for i in range(3):
        spots, _ = spot_image(rng, (256, 256), n_spots=40)
        dapi = np.full((256, 256), 100.0) + rng.normal(0, 5, (256, 256))
        for cy, cx in rng.uniform(40, 216, (4, 2)):
            dapi[(yy - cy) ** 2 + (xx - cx) ** 2 < 18**2] += 600
        stack = np.stack([spots, np.clip(dapi, 0, None).astype(np.uint16)])
        tifffile.imwrite(d / f"c{i}.tif", stack, imagej=True, metadata={"axes": "CYX"})
    args = ["count", str(d), "-q", "--channel", "0", "--nuclei-channel", "1", "--save-masks"]
    assert cli.main([*args, "-o", str(tmp_path / "s")]) == 0
    assert (
        cli.main([*args, "-o", str(tmp_path / "c"), "--scheduler", cluster.scheduler_address]) == 0
    )
    files = output_files(tmp_path / "s")
    assert "cells.csv" in files and "masks/c2.nuclei.tif" in files
    assert output_files(tmp_path / "c") == files


def test_huge_image_is_split_into_band_tasks(cluster, tmp_path, monkeypatch, model):
    shape = (1100, 900)
    write_large(tmp_path / "h.zarr", shape, render_field(jittered_grid(shape, 150, seed=9), seed=9))
    monkeypatch.setattr(batch, "SPLIT_PIXELS", 0)  # split anything streamed
    monkeypatch.setattr(batch, "BAND_ROWS", 1)
    out_c, out_s = tmp_path / "c", tmp_path / "s"
    args = ["count", str(tmp_path / "h.zarr"), "-q", "--tile-size", "256"]
    assert cli.main([*args, "-o", str(out_c), "--scheduler", cluster.scheduler_address]) == 0
    assert cli.main([*args, "-o", str(out_s)]) == 0
    # The band tasks run torch on one thread, this process on two: a position may round
    # the other way in its 4th decimal (seen: 276.6490 against 276.6489).
    files_c, files_s = output_files(out_c), output_files(out_s)
    table_c, table_s = files_c.pop("spots/h.csv"), files_s.pop("spots/h.csv")
    assert files_c == files_s
    a = np.loadtxt(table_c.decode().splitlines(), delimiter=",", skiprows=1)
    b = np.loadtxt(table_s.decode().splitlines(), delimiter=",", skiprows=1)
    assert a.shape == b.shape and np.max(np.abs(a - b)) <= 2e-4
    ref = detect(np.asarray(lazy.open_lazy(tmp_path / "h.zarr")), model, tile_size=256)
    assert int(_summary(out_s)[0]["n_spots"]) == len(ref) >= 145


def _summary(out: Path) -> list[dict]:
    import csv

    with open(out / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_missing_dask_is_one_line_naming_the_extra(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)
    rc = cli.main(["count", str(folder), "-o", str(tmp_path / "o"), "--workers", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'piscis[dask]'" in err
    assert not (tmp_path / "o" / RECORD_NAME).exists()  # nothing written: a later run is new


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumed_gives_the_same_files(folder, serial, tmp_path, sig):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "piscis", "count", str(folder), "-o", str(out), "-q"]
    # Ctrl-C as at a terminal, also when pytest itself runs with SIGINT ignored (a
    # background job), which the child would inherit.
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    rec = out / RECORD_NAME
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if rec.exists() and len(rec.read_text().splitlines()) >= 4:  # 3 images done
            break
        time.sleep(0.02)
    p.send_signal(sig)
    p.communicate(timeout=60)
    done = len(rec.read_text().splitlines()) - 1
    assert 3 <= done < 12, done  # stopped mid-run
    r = subprocess.run(cmd[:-1], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr  # the broken file, again
    assert f"{done} of 13 image(s) already done" in r.stderr
    assert output_files(out) == output_files(serial)
    lines = [json.loads(x) for x in rec.read_text().splitlines()]
    assert len({x["name"] for x in lines[1:]}) == 12 == len(lines) - 1


@pytest.mark.slow
def test_address_space_cap_stops_cleanly_and_the_suggestion_runs(tmp_path):
    """C18: a tile size too large for the memory left is an error naming the file and a
    smaller --tile-size, not an out-of-memory kill; the suggested size runs."""
    import resource

    rng = np.random.default_rng(6)
    img = np.clip(rng.normal(100, 5, (2048, 1536)), 0, None).astype(np.uint16)
    arr = zarr.open_array(
        tmp_path / "m.zarr", mode="w", shape=img.shape, chunks=(512, 512), dtype=img.dtype
    )
    arr[:] = img

    def cap():  # 1.6 GB of address space for the piscis process (the interpreter, torch
        # and dask take most of it before any pixel; at 1.5 GB the image's statistics
        # stopped fitting, whatever the tile size, after a few MB more were used there)
        resource.setrlimit(resource.RLIMIT_AS, (1600 * 2**20, resource.RLIM_INFINITY))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "piscis", "count", str(tmp_path / "m.zarr"), "-q"]

    def run(tile: int, out: str):
        return subprocess.run(
            [*cmd, "-o", str(tmp_path / out), "--tile-size", str(tile)],
            env=env,
            capture_output=True,
            text=True,
            preexec_fn=cap,
            timeout=300,
        )

    r = run(2048, "big")
    assert r.returncode == 1, r.stderr
    line = next(x for x in r.stderr.splitlines() if "smaller --tile-size" in x)
    assert "m.zarr" in line and "MB are available" in line  # refused before any tile
    # Follow the suggestions: each failure is the same clean message (the check before
    # the tiles, or torch's own allocation failure caught), until a size runs.
    tile, k = 2048, 0
    while r.returncode != 0 and k < 4:
        line = next(x for x in r.stderr.splitlines() if "smaller --tile-size" in x)
        assert "Traceback" not in r.stderr and r.returncode == 1
        tile, k = int(line.split("(e.g. ")[1].split(")")[0]), k + 1
        r = run(tile, f"try{k}")
    assert r.returncode == 0 and tile >= 256, (tile, r.stderr)
