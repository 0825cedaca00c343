"""Fuzz test of ``piscis count`` on a folder of malformed and unusual image files
(issue #6): truncated TIFFs, broken tags, zero-size axes, huge declared sizes, every
dtype and byte order, random shapes of 1 to 5 dimensions, PNGs. Every file must be
either counted or named in one error line with its reason; no traceback; the good files'
results must be those of a run on them alone. Seeded; a small random model keeps it fast.
"""

from __future__ import annotations

import csv
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ["u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8"]
RUN_LIMIT_S = 90


def _random_array(rng, max_elements=60_000) -> np.ndarray:
    ndim = int(rng.integers(1, 6))
    while True:
        shape = [int(rng.integers(1, 5)) for _ in range(ndim - 2)]
        shape += [int(rng.integers(1, 80)) for _ in range(min(ndim, 2))]
        if np.prod(shape) <= max_elements:
            break
    dtype = np.dtype(rng.choice(DTYPES)).newbyteorder(rng.choice(["<", ">"]))
    if dtype.kind == "f":
        data = rng.normal(100, 20, shape)
        if rng.random() < 0.3:
            data.flat[rng.integers(0, data.size, 3)] = rng.choice([np.nan, np.inf, -np.inf])
    else:
        info = np.iinfo(dtype)
        lo, hi = max(info.min, -1000), min(info.max, 5000)
        data = rng.integers(lo, hi, shape, endpoint=True)
    return data.astype(dtype)


def _patch_tag(raw: bytearray, tag: int, value: int) -> bytearray:
    """Set a SHORT/LONG tag of the first IFD of a little-endian classic TIFF."""
    (ifd,) = struct.unpack_from("<I", raw, 4)
    (n,) = struct.unpack_from("<H", raw, ifd)
    for k in range(n):
        pos = ifd + 2 + 12 * k
        code, typ = struct.unpack_from("<HH", raw, pos)
        if code == tag:
            if typ == 3:
                struct.pack_into("<HHIH", raw, pos, code, 3, 1, value & 0xFFFF)
            else:
                struct.pack_into("<HHII", raw, pos, code, 4, 1, value)
    return raw


def _png_bytes(data: np.ndarray) -> bytes:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(data).save(buf, format="PNG")
    return buf.getvalue()


def _make_files(folder: Path, seed: int = 6) -> dict[str, str]:
    """Write the fuzz corpus; returns name -> kind."""
    rng = np.random.default_rng(seed)
    kinds: dict[str, str] = {}

    def put(name, kind, raw=None, array=None, **opts):
        path = folder / name
        if array is not None:
            tifffile.imwrite(path, array, **opts)
        else:
            path.write_bytes(bytes(raw))
        kinds[name] = kind

    def good_tiff() -> bytes:
        data = rng.normal(100, 5, (int(rng.integers(8, 64)), int(rng.integers(8, 64))))
        tmp = folder / ".tmp.tif"
        tifffile.imwrite(tmp, data.astype("<u2"))
        raw = tmp.read_bytes()
        tmp.unlink()
        return raw

    for k in range(80):  # every dtype and byte order, 1 to 5 dimensions
        opts = {}
        if rng.random() < 0.3:
            opts["compression"] = str(rng.choice(["zlib", "lzw", "packbits"]))
        if rng.random() < 0.2:
            opts["bigtiff"] = True
        put(f"shape{k:03d}.tif", "random", array=_random_array(rng), **opts)
    for k in range(30):  # cut at a random place
        raw = good_tiff()
        put(f"trunc{k:03d}.tif", "truncated", raw=raw[: int(rng.integers(1, len(raw)))])
    for k in range(30):  # random bytes in the header and first IFD
        raw = bytearray(good_tiff())
        for pos in rng.integers(0, min(len(raw), 300), int(rng.integers(1, 12))):
            raw[pos] = int(rng.integers(0, 256))
        put(f"tags{k:03d}.tif", "corrupt", raw=raw)
    for k in range(10):  # zero-size axes: width or height 0 in the tags, or an empty array
        raw = bytearray(good_tiff())
        put(f"zero{k:03d}.tif", "zero-size", raw=_patch_tag(raw, 256 + k % 2, 0))
    for k in range(20):  # huge declared sizes, data of a few bytes
        raw = bytearray(good_tiff())
        big = int(rng.integers(200_000, 4_000_000_000))
        raw = _patch_tag(_patch_tag(raw, 256, big), 257, big)
        put(f"huge{k:03d}.tif", "huge", raw=raw)
    for k in range(30):  # PNGs: grey 8/16 bit, RGB, RGBA, some broken
        h, w = int(rng.integers(4, 64)), int(rng.integers(4, 64))
        kind = ["grey8", "grey16", "rgb", "rgba"][k % 4]
        top, dtype, samples = {
            "grey8": (255, np.uint8, ()),
            "grey16": (5000, np.uint16, ()),
            "rgb": (255, np.uint8, (3,)),
            "rgba": (255, np.uint8, (4,)),
        }[kind]
        data = rng.integers(0, top, (h, w, *samples)).astype(dtype)
        raw = bytearray(_png_bytes(data))
        if k >= 20:
            raw = raw[: int(rng.integers(8, len(raw)))]
            kind = "truncated png"
        put(f"png{k:03d}.png", kind, raw=raw)
    for k in range(4):  # a PNG declaring a huge size
        raw = bytearray(_png_bytes(np.zeros((4, 4), np.uint8)))
        struct.pack_into(">II", raw, 16, 1_000_000 + k, 1_000_000)
        put(f"hugepng{k}.png", "huge", raw=raw)
    for k in range(10):  # noise with an image suffix, empty files
        n = 0 if k < 3 else int(rng.integers(1, 4000))
        put(f"junk{k:03d}{'.tif' if k % 2 else '.png'}", "junk", raw=rng.bytes(n))
    (folder / "notes.txt").write_text("not an image\n")
    return kinds


def _count(folder: Path, out: Path, model: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "piscis", "count", str(folder), "-o", str(out)]
    t0 = time.time()
    proc = subprocess.run(
        [*argv, "--model", str(model), "-q"],
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT_S,
        env=env,
    )
    return proc, time.time() - t0


def _summary(out: Path) -> dict[str, str]:
    with open(out / "summary.csv", newline="") as f:
        return {Path(r["image"]).name: r["n_spots"] for r in csv.DictReader(f)}


def test_fuzz_count_folder_of_malformed_files(tmp_path, spotty_model):
    folder = tmp_path / "fuzz"
    folder.mkdir()
    kinds = _make_files(folder)
    assert len(kinds) >= 200

    proc, seconds = _count(folder, tmp_path / "out", spotty_model)
    err = proc.stderr
    assert "Traceback" not in err, err[-3000:]
    assert proc.returncode == 1, err[-2000:]  # some inputs failed, the run finished
    assert seconds < RUN_LIMIT_S
    lines = err.splitlines()
    assert lines and all(line.startswith("ERROR: ") for line in lines), [
        line for line in lines if not line.startswith("ERROR: ")
    ][:5]
    counted = _summary(tmp_path / "out")
    failed = {}
    for line in lines:
        text = line[len("ERROR: ") :].strip()
        name = Path(text.split(": ", 1)[0]).name
        if name in kinds and ": " in text:
            failed[name] = text.split(": ", 1)[1]
    for name, kind in kinds.items():
        assert (name in counted) != (name in failed), (name, kind)
        if name in failed:
            assert failed[name].strip(), name  # a reason
    # Huge declared sizes are refused before reading, with what to do.
    for name, kind in kinds.items():
        if kind == "huge":
            assert "declares a" in failed[name] and "crop or split" in failed[name], failed[name]
    # Truncated and zero-byte files are failures, not images of zeros.
    for name, kind in kinds.items():
        if kind in ("truncated", "truncated png") or (kind == "junk" and name < "junk003"):
            assert name in failed, (name, kind)
    assert sum(1 for k in kinds.values() if k == "random") > 0
    assert any(kinds[n] == "random" for n in counted) and any(n.endswith(".png") for n in counted)

    # The good files alone give the same results, file by file.
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in counted:
        shutil.copy2(folder / name, alone / name)
    proc2, _ = _count(alone, tmp_path / "out2", spotty_model)
    assert proc2.returncode == 0, proc2.stderr[-2000:]
    assert _summary(tmp_path / "out2") == counted
    for csv_path in sorted((tmp_path / "out" / "spots").glob("*.csv")):
        _same_table(csv_path, tmp_path / "out2" / "spots" / csv_path.name)
    assert sum(int(v) for v in counted.values()) > 0  # the model did find 'spots'


def _same_table(a: Path, b: Path) -> None:
    """Byte-identical, or for a z-stack (its 3D fit of noise 'spots' in random data is
    ill-conditioned) the same rows and columns with values within 1e-3."""
    if a.read_bytes() == b.read_bytes():
        return
    ra, rb = a.read_text().splitlines(), b.read_text().splitlines()
    assert ra[0] == rb[0] and "z" in ra[0].split(","), (a.name, ra[0])
    assert len(ra) == len(rb), a.name
    for la, lb in zip(ra[1:], rb[1:]):
        for va, vb in zip(la.split(","), lb.split(",")):
            if va != vb:
                assert abs(float(va) - float(vb)) <= 1e-3, (a.name, la, lb)


def test_memory_guard_refuses_before_reading(tmp_path, monkeypatch):
    """A declared size over the limit is refused with the size and what to do; the
    limit is half the free memory, or $PISCIS_MAX_IMAGE_BYTES."""
    from piscis.io import InputError, memory_limit, read_image

    tifffile.imwrite(tmp_path / "a.tif", np.zeros((64, 64), np.uint16))
    (tmp_path / "b.png").write_bytes(_png_bytes(np.zeros((64, 64, 3), np.uint8)))
    assert read_image(tmp_path / "a.tif").image.shape == (64, 64)
    monkeypatch.setenv("PISCIS_MAX_IMAGE_BYTES", "40000")
    assert memory_limit() == 40000
    need = 64 * 64 * 2 + 12 * 64 * 64
    with pytest.raises(
        InputError, match=rf"a\.tif: declares a 64x64 uint16 image \({need / 1e9:.3g} GB"
    ):
        read_image(tmp_path / "a.tif")
    with pytest.raises(InputError, match=r"b\.png: declares a 64x64x3 uint8 image.*crop or split"):
        read_image(tmp_path / "b.png")
