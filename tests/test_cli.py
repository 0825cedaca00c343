"""Tests of the ``piscis`` command: file handling, messages, exit codes and outputs.

The model is the tiny random ``tiny_model`` of conftest.py, which finds no spots: real
detection counts are tested elsewhere. Every input is generated here from a seeded
generator.
"""

from __future__ import annotations

import csv
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage import io as skio

import piscis
from piscis import cli
from piscis.batch import LOCK_NAME
from piscis.batch import RECORD_NAME as RECORD

SPOT_COLUMNS = ["y", "x", "score", "intensity", "background"]


def _image(seed: int, shape=(32, 40)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (100 + rng.normal(0, 5, shape)).clip(0, None).astype(np.uint16)


def _images(folder: Path, seed: int, n: int = 2) -> list[Path]:
    """``n`` noise images ``i0.tif``... in ``folder``, from seeds ``seed``, ``seed + 1``..."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        tifffile.imwrite(folder / f"i{k}.tif", _image(seed + k))
    return [folder / f"i{k}.tif" for k in range(n)]


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _table(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def mixed_folder(tmp_path):
    """3 good images of known shapes, 2 broken TIFFs, and files that are not images."""
    d = tmp_path / "in"
    d.mkdir()
    shapes = {"a": (32, 40), "b": (24, 33), "c": (40, 16)}
    for i, (stem, shape) in enumerate(shapes.items()):
        tifffile.imwrite(d / f"{stem}.tif", _image(i, shape))
    (d / "x.tif").write_bytes(b"")
    raw = (d / "a.tif").read_bytes()
    (d / "y.tif").write_bytes(raw[: len(raw) // 2])
    (d / "notes.txt").write_text("imaged on Tuesday\n")
    (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (d / "photo.JPG").write_bytes(b"\xff\xd8\xff\xe0" + bytes(60))  # an image we do not read
    return d, shapes


# --------------------------------------------------------------------------- count


def test_count_folder_with_bad_files(tmp_path, mixed_folder, tiny_model, capsys):
    d, shapes = mixed_folder
    out = tmp_path / "out"
    missing = tmp_path / "missing.tif"
    rc, _, err = _run(capsys, "count", d, missing, "-o", out, "--model", tiny_model)
    assert rc == 1

    columns, rows = _table(out / "summary.csv")
    assert columns == ["image", "n_spots", "height", "width", "threshold", "model"]
    assert len(rows) == 3
    by_stem = {Path(r["image"]).stem: r for r in rows}
    assert set(by_stem) == set(shapes)
    for stem, (h, w) in shapes.items():
        r = by_stem[stem]
        assert Path(r["image"]) == d / f"{stem}.tif"
        assert (int(r["height"]), int(r["width"])) == (h, w)
        assert int(r["n_spots"]) == 0
        assert float(r["threshold"]) == 0.5  # the model's own
        assert r["model"] == "tiny"

    assert sorted(p.name for p in (out / "spots").iterdir()) == ["a.csv", "b.csv", "c.csv"]
    for stem in shapes:
        assert _table(out / "spots" / f"{stem}.csv")[0] == SPOT_COLUMNS
    assert [p.name for p in out.rglob(".*")] == [RECORD]  # no temp files; the run record

    error_lines = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert any("x.tif" in line and "0 bytes" in line for line in error_lines)
    assert any("y.tif" in line and "not a readable TIFF" in line for line in error_lines)
    assert any("missing.tif" in line and "no such file" in line for line in error_lines)
    assert "3 input(s) failed" in err
    assert not any("notes.txt" in line or ".DS_Store" in line for line in error_lines)
    assert "notes.txt: not an image file, skipped" in err  # said, at INFO, not an error
    jpg = [line for line in err.splitlines() if "photo.JPG" in line]
    assert len(jpg) == 1 and jpg[0].startswith("WARNING") and "JPG" in jpg[0], jpg


def test_every_input_failing_still_writes_the_summary_header(tmp_path, tiny_model, capsys):
    d = tmp_path / "in"
    d.mkdir()
    raw = {}
    for k in range(2):
        tifffile.imwrite(d / f"i{k}.tif", _image(100 + k))
        raw[k] = (d / f"i{k}.tif").read_bytes()
        (d / f"i{k}.tif").write_bytes(raw[k][: len(raw[k]) // 3])  # truncated
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "count", d, "-o", out, "--model", tiny_model)
    assert rc == 1 and "2 input(s) failed" in err
    assert _table(out / "summary.csv") == (cli.SUMMARY_COLUMNS, [])
    assert not any((out / "spots").glob("*.csv"))
    # An empty summary is no result: a corrected command runs without --overwrite.
    for k in range(2):
        (d / f"i{k}.tif").write_bytes(raw[k])
    rc, _, err = _run(capsys, "count", d, "-o", out, "--model", tiny_model, "--min-snr", "3")
    assert rc == 0, err
    assert [Path(r["image"]).name for r in _table(out / "summary.csv")[1]] == ["i0.tif", "i1.tif"]


def test_count_blank_image(tmp_path, tiny_model, capsys):
    img = tmp_path / "blank.tif"
    tifffile.imwrite(img, np.zeros((32, 32), np.uint16))
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "count", img, "-o", out, "--model", tiny_model)
    assert rc == 0
    spots = out / "spots" / "blank.csv"
    assert spots.read_text() == ",".join(SPOT_COLUMNS) + "\n"
    _, rows = _table(out / "summary.csv")
    assert len(rows) == 1 and rows[0]["n_spots"] == "0"
    assert f"WARNING: {img}: no spots detected" in err
    assert "ERROR" not in err


def test_count_again_needs_overwrite(tmp_path, mixed_folder, tiny_model, capsys):
    d, _ = mixed_folder
    good = [d / "a.tif", d / "b.tif"]
    out = tmp_path / "out"
    assert _run(capsys, "count", *good, "-o", out, "--model", tiny_model)[0] == 0
    before = _snapshot(out)
    assert set(before) == {RECORD, "summary.csv", "spots/a.csv", "spots/b.csv"}

    # The same command again: a finished run, nothing to do, nothing written.
    rc, _, err = _run(capsys, "count", *good, "-o", out, "--model", tiny_model)
    assert rc == 0
    assert "already done" in err and "--overwrite" in err
    assert _snapshot(out) == before  # same files, same bytes, same mtimes

    # Other options on the same folder: refused.
    rc, _, err = _run(capsys, "count", *good, "-o", out, "--model", tiny_model, "--min-snr", "3")
    assert rc == 2
    assert "--overwrite" in err and "summary.csv" in err and "other options" in err
    assert _snapshot(out) == before

    # Only one of the spot tables would be replaced: still refused.
    rc, _, _ = _run(capsys, "detect", d / "a.tif", "-o", out / "spots", "--model", tiny_model)
    assert rc == 2
    assert _snapshot(out) == before

    rc, _, err = _run(capsys, "count", *good, "-o", out, "--model", tiny_model, "--overwrite")
    assert rc == 0, err
    _, rows = _table(out / "summary.csv")
    assert [Path(r["image"]).name for r in rows] == ["a.tif", "b.tif"]
    assert set(_snapshot(out)) == set(before)


def test_overwrite_leaves_only_this_runs_results(tmp_path, tiny_model, capsys):
    """--overwrite removes what the earlier run wrote and this one does not write again (a
    failed image's table, images left out, masks, cells.csv); the user's files stay."""
    d = tmp_path / "in"
    d.mkdir()
    for k, stem in enumerate("abc"):
        two = np.stack([_image(70 + k), _image(80 + k)])
        tifffile.imwrite(d / f"{stem}.tif", two, metadata={"axes": "CYX"})
    out = tmp_path / "out"
    cells = ["--channel", "0", "--nuclei-channel", "1", "--save-masks"]
    rc, _, err = _run(capsys, "count", d, "-o", out, "--model", tiny_model, *cells)
    assert rc == 0, err
    first = set(_snapshot(out))
    assert {"spots/c.csv", "cells.csv", "masks/c.nuclei.tif", "masks/c.cells.tif"} <= first
    mine = ["notes.txt", "spots/mine.csv", "masks/mine.tif", "c.csv"]
    for name in mine:  # the user's own files, named like results or not
        (out / name).write_text("mine\n")
    (d / "c.tif").write_bytes((d / "c.tif").read_bytes()[:300])  # c fails this time

    argv = ["count", d / "a.tif", d / "c.tif", "-o", out, "--model", tiny_model, "--overwrite"]
    rc, _, err = _run(capsys, *argv, "--channel", "0")
    assert rc == 1
    assert f"ERROR: {d / 'c.tif'}: not a readable TIFF" in err
    left = set(_snapshot(out))
    assert left == {RECORD, "summary.csv", "spots/a.csv", *mine}, left
    assert [Path(r["image"]).name for r in _table(out / "summary.csv")[1]] == ["a.tif"]
    assert all((out / name).read_text() == "mine\n" for name in mine)


@pytest.mark.parametrize("change", ["weights", "config"])
def test_resume_is_refused_when_the_model_changed(tmp_path, tiny_model, capsys, change):
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    images = _images(tmp_path, 90)
    out = tmp_path / "out"
    argv = ["count", *images, "-o", out, "--model", model]
    assert _run(capsys, *argv)[0] == 0
    before = _snapshot(out)
    if change == "weights":  # retrained in place: the same names, other numbers
        weights = load_file(model / "model.safetensors")
        first = sorted(weights)[0]
        weights[first] = weights[first] + np.float32(0.01)
        save_file(weights, model / "model.safetensors")
    else:
        config = json.loads((model / "config.json").read_text())
        config["normalization"]["compression"] = 2.0
        (model / "config.json").write_text(json.dumps(config))

    rc, _, err = _run(capsys, *argv)
    assert rc == 2
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, err
    assert "already holds results" in errors[0] and "--overwrite" in errors[0]
    assert "model" in errors[0] and "changed" in errors[0] and str(model) in errors[0]
    assert _snapshot(out) == before
    assert _run(capsys, *argv, "--overwrite")[0] == 0


def test_count_threshold_is_recorded(tmp_path, tiny_model, capsys):
    img = tmp_path / "i.tif"
    tifffile.imwrite(img, _image(3))
    out = tmp_path / "out"
    rc, _, _ = _run(capsys, "count", img, "-o", out, "--model", tiny_model, "--threshold", "0.3")
    assert rc == 0
    assert float(_table(out / "summary.csv")[1][0]["threshold"]) == pytest.approx(0.3)


@pytest.mark.parametrize("host", ["this", "other"])
def test_a_folder_locked_by_a_live_run_is_refused_and_untouched(tmp_path, tiny_model, capsys, host):
    import json
    import socket

    img = tmp_path / "i.tif"
    tifffile.imwrite(img, _image(60))
    out = tmp_path / "out"
    out.mkdir()
    name = socket.gethostname() if host == "this" else socket.gethostname() + "-elsewhere"
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": name}))
    before = _snapshot(out)
    rc, _, err = _run(capsys, "count", img, "-o", out, "--model", tiny_model)
    assert rc == 2
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, err
    assert str(out) in errors[0] and f"pid {os.getpid()}" in errors[0] and name in errors[0]
    assert _snapshot(out) == before  # the other run's lock stays; nothing written


def test_the_lock_of_a_dead_run_is_taken_over_and_released(tmp_path, tiny_model, capsys):
    import json
    import socket

    img = tmp_path / "i.tif"
    tifffile.imwrite(img, _image(61))
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)  # its pid is now free
    lock = {"pid": child.pid, "host": socket.gethostname()}
    (out / LOCK_NAME).write_text(json.dumps(lock))
    rc, _, err = _run(capsys, "count", img, "-o", out, "--model", tiny_model)
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "taking over the lock" in line]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING")
    assert f"pid {child.pid}" in warnings[0]
    assert not (out / LOCK_NAME).exists()  # released at the end
    assert len(_table(out / "summary.csv")[1]) == 1


# --------------------------------------------------------------------------- detect


def test_detect_writes_dir_stem_csv(tmp_path, tiny_model, capsys):
    d = tmp_path / "in"
    d.mkdir()
    tifffile.imwrite(d / "one.tif", _image(4))
    tifffile.imwrite(d / "two.ome.tiff", _image(5), metadata={"axes": "YX"})
    tifffile.imwrite(d / "three.TIF", _image(6))
    skio.imsave(d / "four.png", (_image(7) // 4).astype(np.uint8), check_contrast=False)
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "detect", d, "-o", out, "--model", tiny_model)
    assert rc == 0, err
    names = sorted(p.name for p in out.iterdir() if p.name != RECORD)
    assert names == ["four.csv", "one.csv", "three.csv", "two.csv"]
    for name in names:
        assert _table(out / name)[0] == SPOT_COLUMNS
    assert not (out / "summary.csv").exists()


def test_detect_same_stem_does_not_overwrite(tmp_path, tiny_model, capsys):
    d = tmp_path / "in"
    d.mkdir()
    tifffile.imwrite(d / "a.tif", _image(8))
    skio.imsave(d / "a.png", (_image(9) // 4).astype(np.uint8), check_contrast=False)
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "detect", d / "a.tif", d / "a.png", "-o", out, "--model", tiny_model)
    assert rc == 0, err
    names = sorted(p.name for p in out.iterdir() if p.name != RECORD)
    assert len(names) == 2 and names[0] == "a.csv", names
    assert repr(names[1].removesuffix(".csv")) in err  # the renamed output is announced
    assert "also named 'a'" in err


def test_count_same_stem_gets_two_rows(tmp_path, tiny_model, capsys):
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.mkdir(), d2.mkdir()
    tifffile.imwrite(d1 / "a.tif", _image(10))
    tifffile.imwrite(d2 / "a.tif", _image(11, (20, 20)))
    out = tmp_path / "out"
    rc, _, _ = _run(capsys, "count", d1, d2, "-o", out, "--model", tiny_model)
    assert rc == 0
    assert len(list((out / "spots").iterdir())) == 2
    assert len(_table(out / "summary.csv")[1]) == 2


@pytest.mark.parametrize("threshold", ["1.5", "1", "0", "-0.2"])
def test_threshold_outside_0_1_is_refused(tmp_path, tiny_model, capsys, threshold):
    img = tmp_path / "i.tif"
    tifffile.imwrite(img, _image(12))
    out = tmp_path / "out"
    rc, _, err = _run(
        capsys, "detect", img, "-o", out, "--model", tiny_model, "--threshold", threshold
    )
    assert rc == 2
    assert "--threshold" in err
    assert not out.exists()


def test_channel_on_grey_image_fails_for_that_file(tmp_path, tiny_model, capsys):
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, _image(13))
    colour = tmp_path / "colour.tif"
    planes = np.stack([_image(s) for s in (14, 15, 16, 17, 18, 19)])
    tifffile.imwrite(colour, planes, metadata={"axes": "CYX"})
    out = tmp_path / "out"
    rc, _, err = _run(
        capsys, "detect", grey, colour, "-o", out, "--model", tiny_model, "--channel", "5"
    )
    assert rc == 1
    assert any(
        "grey.tif" in line and "--channel 5" in line and "no channel axis" in line
        for line in err.splitlines()
    )
    assert sorted(p.name for p in out.iterdir()) == [RECORD, "colour.csv"]  # 6 channels: fine


def test_colour_image_without_channel_gives_every_channel(tmp_path, tiny_model, capsys):
    rgb = np.stack([(_image(s) // 4).astype(np.uint8) for s in (20, 21, 22)], axis=-1)
    img = tmp_path / "rgb.png"
    skio.imsave(img, rgb, check_contrast=False)
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "count", img, "-o", out, "--model", tiny_model)
    assert rc == 0, err
    columns, rows = _table(out / "summary.csv")
    assert columns == [*cli.SUMMARY_COLUMNS, "c"]
    assert [r["c"] for r in rows] == ["0", "1", "2"]
    assert _table(out / "spots" / "rgb.csv")[0] == ["c", *SPOT_COLUMNS]
    out = tmp_path / "out2"
    rc, _, err = _run(capsys, "count", img, "-o", out, "--model", tiny_model, "--channel", "1")
    assert rc == 0, err
    assert _table(out / "summary.csv")[0] == cli.SUMMARY_COLUMNS  # --channel: one image
    assert _table(out / "spots" / "rgb.csv")[0] == SPOT_COLUMNS


def test_z_stack_projected_with_project(tmp_path, tiny_model, capsys):
    img = tmp_path / "stack.tif"
    z = np.stack([_image(s) for s in (23, 24, 25)])
    tifffile.imwrite(img, z, imagej=True, metadata={"axes": "ZYX"})
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "count", img, "-o", out, "--model", tiny_model, "--project")
    assert rc == 0, err
    assert err.count("3 z-planes max-projected (--project)") == 1
    columns, rows = _table(out / "summary.csv")
    assert columns == cli.SUMMARY_COLUMNS  # a projected stack is a 2D image
    assert (rows[0]["height"], rows[0]["width"]) == ("32", "40")


def test_axes_option(tmp_path, tiny_model, capsys):
    img = tmp_path / "yxz.tif"
    yxz = np.stack([_image(s, (24, 30)) for s in (26, 27, 28, 29, 30)], axis=-1)
    tifffile.imwrite(img, yxz, metadata=None, photometric="minisblack")
    out = tmp_path / "out"
    argv = ["count", img, "-o", out, "--model", tiny_model, "--axes", "YXZ", "--project"]
    rc, _, err = _run(capsys, *argv)
    assert rc == 0, err
    row = _table(out / "summary.csv")[1][0]
    assert (row["height"], row["width"]) == ("24", "30")
    assert "axes ZYX, shape (5, 24, 30) (--axes)" in err
    assert "5 z-planes" in err


def test_summary_columns_are_the_same_for_every_row_of_a_mixed_run(tmp_path, tiny_model, capsys):
    d = tmp_path / "in"
    d.mkdir()
    tifffile.imwrite(d / "a.tif", _image(40))
    two = np.stack([_image(41), _image(42)])
    tifffile.imwrite(d / "b.tif", two, metadata={"axes": "CYX"})
    tifffile.imwrite(d / "c.tif", two, imagej=True, metadata={"axes": "TYX"})
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "count", d, "-o", out, "--model", tiny_model)
    assert rc == 0, err
    for name, axes in (("a", "YX"), ("b", "CYX"), ("c", "TYX")):
        assert f"{name}.tif: axes {axes}, shape " in err  # every file's axes are logged
    columns, rows = _table(out / "summary.csv")
    assert columns == [*cli.SUMMARY_COLUMNS, "t", "c"]
    got = [(Path(r["image"]).name, r["t"], r["c"]) for r in rows]
    assert got == [("a.tif", "", ""), ("b.tif", "", "0"), ("b.tif", "", "1"),
                   ("c.tif", "0", ""), ("c.tif", "1", "")]  # fmt: skip
    assert all(len(r) == len(columns) for r in rows)
    assert _table(out / "spots" / "a.csv")[0] == SPOT_COLUMNS
    assert _table(out / "spots" / "b.csv")[0] == ["c", *SPOT_COLUMNS]
    assert _table(out / "spots" / "c.csv")[0] == ["t", *SPOT_COLUMNS]
    rc, _, err = _run(
        capsys, "detect", d / "a.tif", "-o", tmp_path / "spots", "--model", tiny_model
    )
    assert rc == 0, err  # detect: spot tables only, the same columns
    assert _table(tmp_path / "spots" / "a.csv")[0] == SPOT_COLUMNS


def test_cells_table_per_channel_and_2d_mask_on_a_z_stack(tmp_path, tiny_model, capsys):
    d = tmp_path / "in"
    d.mkdir()
    mask = np.zeros((32, 40), np.uint16)
    mask[2:12, 3:20], mask[15:30, 22:38] = 7, 65000
    two = np.stack([_image(50), _image(51)])
    tifffile.imwrite(d / "two.tif", two, metadata={"axes": "CYX"})
    tifffile.imwrite(d / "two_masks.tif", mask)
    tifffile.imwrite(d / "vol.tif", np.stack([_image(52), _image(53)]), metadata={"axes": "ZYX"})
    tifffile.imwrite(d / "vol_masks.tif", mask)  # a (Y, X) mask for every plane
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "count", d, "-o", out, "--model", tiny_model, "--cells", d)
    assert rc == 0, err
    columns, rows = _table(out / "summary.csv")
    assert columns == [*cli.SUMMARY_COLUMNS, "c", "depth", *cli.SUMMARY_CELL_COLUMNS]
    got = [(Path(r["image"]).name, r["c"], r["depth"], r["n_cells"]) for r in rows]
    assert got == [("two.tif", "0", "", "2"), ("two.tif", "1", "", "2"), ("vol.tif", "", "2", "2")]
    cell_cols, cells = _table(out / "cells.csv")
    assert cell_cols[:3] == ["image", "c", "cell_id"]
    assert [(Path(r["image"]).name, r["c"], r["cell_id"]) for r in cells] == [
        ("two.tif", "0", "7"), ("two.tif", "0", "65000"), ("two.tif", "1", "7"),
        ("two.tif", "1", "65000"), ("vol.tif", "", "7"), ("vol.tif", "", "65000"),
    ]  # fmt: skip
    assert _table(out / "spots" / "vol.csv")[0][:3] == ["z", "y", "x"]


@pytest.mark.parametrize("bad", ["abc", "0.1", "0.1,0,0.1", "1,2,3,4", "0.1,-1"])
def test_voxel_size_option_is_checked(tmp_path, tiny_model, capsys, bad):
    img = tmp_path / "a.tif"
    tifffile.imwrite(img, _image(43))
    with pytest.raises(SystemExit) as e:
        cli.main(["detect", str(img), "-o", str(tmp_path / "o"), "--voxel-size", bad])
    assert e.value.code == 2
    assert "--voxel-size" in capsys.readouterr().err


def test_voxel_size_that_does_not_fit_fails_that_image(tmp_path, tiny_model, capsys):
    flat, stack = tmp_path / "flat.tif", tmp_path / "stack.tif"
    tifffile.imwrite(flat, _image(44))
    tifffile.imwrite(stack, np.stack([_image(45), _image(46)]), metadata={"axes": "ZYX"})
    out = tmp_path / "o"
    argv = ["detect", flat, stack, "-o", out, "--model", tiny_model, "--voxel-size", "0.1,0.1"]
    rc, _, err = _run(capsys, *argv)
    assert rc == 1
    assert "stack.tif: --voxel-size 0.1,0.1 does not fit a ZYX image; give Z,Y,X" in err
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == ["flat.csv"]


def test_an_error_inside_detection_does_not_stop_the_batch(
    tmp_path, tiny_model, capsys, monkeypatch
):
    import piscis.detect

    real = piscis.detect.detect

    def flaky(image, **kwargs):
        if image.shape == (20, 20):
            raise RuntimeError("DefaultCPUAllocator: not enough memory")
        return real(image, **kwargs)

    monkeypatch.setattr(piscis.detect, "detect", flaky)
    tifffile.imwrite(tmp_path / "big.tif", _image(31, (20, 20)))
    tifffile.imwrite(tmp_path / "ok.tif", _image(32))
    out = tmp_path / "out"
    rc, _, err = _run(
        capsys, "count", tmp_path / "big.tif", tmp_path / "ok.tif", "-o", out, "--model", tiny_model
    )
    assert rc == 1
    line = next(x for x in err.splitlines() if x.startswith(f"ERROR: {tmp_path / 'big.tif'}: "))
    assert "memory ran out during detection (DefaultCPUAllocator: not enough memory)" in line
    assert "smaller --tile-size (e.g. 512)" in line  # half the default 1024 (C18)
    assert [Path(r["image"]).name for r in _table(out / "summary.csv")[1]] == ["ok.tif"]


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                     "memory: you tried to allocate 1073741824 bytes. Error code 12"),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ],
)  # fmt: skip
def test_out_of_memory_suggests_half_the_tile(tmp_path, tiny_model, capsys, monkeypatch, error):
    """C18: memory running out in one image's detection is one line naming the image and
    a smaller --tile-size (half the current one; the smallest useful one says so); the
    next image runs."""
    import piscis.detect
    from piscis.io import load_model
    from piscis.model import receptive_margin

    real = piscis.detect.detect

    def short_of_memory(image, **kwargs):
        if image.shape == (20, 20):
            raise error
        return real(image, **kwargs)

    monkeypatch.setattr(piscis.detect, "detect", short_of_memory)
    big = tmp_path / "in" / "big.tif"
    big.parent.mkdir()
    tifffile.imwrite(big, _image(120, (20, 20)))
    ok = _images(tmp_path / "in", 121, 1)[0]
    smallest = 4 * receptive_margin(load_model(tiny_model).net.channels)
    for tile, advice in [
        (3 * smallest, f"smaller --tile-size (e.g. {3 * smallest // 2})"),
        (smallest + 1, f"smaller --tile-size (e.g. {smallest})"),
        (smallest, f"--tile-size {smallest} is already the smallest useful"),
        (1, f"--tile-size {smallest} is already the smallest useful"),
    ]:
        out = tmp_path / f"out{tile}"
        argv = ["count", big, ok, "-o", out, "--model", tiny_model, "--tile-size", tile]
        rc, _, err = _run(capsys, *argv)
        assert rc == 1
        lines = [x for x in err.splitlines() if "memory ran out" in x]
        assert len(lines) == 2, err  # when it happened, and in the list of failures
        assert lines[0].startswith(f"ERROR: {big}: memory ran out during detection")
        assert advice in lines[0] and "Traceback" not in err
        assert [Path(r["image"]).name for r in _table(out / "summary.csv")[1]] == ["i0.tif"]


def test_every_error_about_an_image_starts_with_it_and_names_the_option_given(
    tmp_path, tiny_model, capsys, monkeypatch
):
    import errno

    d = tmp_path / "in"
    d.mkdir()
    tifffile.imwrite(d / "grey.tif", _image(130))  # no channel axis
    two = np.stack([_image(131), _image(132)])
    tifffile.imwrite(d / "two.tif", two, metadata={"axes": "CYX"})  # 2 channels
    three = np.stack([_image(133), _image(134), _image(135)])
    tifffile.imwrite(d / "three.tif", three, metadata={"axes": "CYX"}, photometric="minisblack")
    tifffile.imwrite(d / "flaky.tif", two, metadata={"axes": "CYX"})
    (d / "empty.tif").write_bytes(b"")
    real = cli._count_one

    def flaky_drive(path, *a, **k):  # a network drive failing while the file is read
        if path.name == "flaky.tif":
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(cli, "_count_one", flaky_drive)
    out = tmp_path / "out"
    argv = ["count", d, "-o", out, "--model", tiny_model, "--channel", "0"]
    rc, _, err = _run(capsys, *argv, "--nuclei-channel", "2")
    assert rc == 1
    paths = [str(d / n) for n in ("grey.tif", "two.tif", "flaky.tif", "empty.tif")]
    errors = [x.split("ERROR: ", 1)[1] for x in err.splitlines() if "ERROR: " in x]
    per_image = [x.strip() for x in errors if "input(s) failed" not in x]
    assert len(per_image) == 2 * len(paths), err  # when it happened, and in the list
    for line in per_image:
        assert any(line.startswith(f"{p}: ") for p in paths), line
    grey = [x for x in per_image if x.startswith(paths[0])]
    two = [x for x in per_image if x.startswith(paths[1])]
    assert all("--nuclei-channel 2 given but the image has no channel axis" in x for x in grey)
    assert all("--nuclei-channel 2 out of range; the image has 2 channels" in x for x in two)
    assert "--channel 2" not in err
    assert [Path(r["image"]).name for r in _table(out / "summary.csv")[1]] == ["three.tif"]

    cyto = ["--nuclei-channel", "1", "--cytoplasm-channel", "3", "--overwrite"]
    rc, _, err = _run(capsys, *argv, *cyto)
    assert f"{d / 'two.tif'}: --cytoplasm-channel 3 out of range" in err and rc == 1


def test_glob_patterns(tmp_path, tiny_model, capsys):
    for i in range(2):
        tifffile.imwrite(tmp_path / f"g{i}.tif", _image(40 + i))
    out = tmp_path / "out"
    rc, _, err = _run(
        capsys,
        "count",
        tmp_path / "g*.tif",
        tmp_path / "nomatch*.tif",
        "-o",
        out,
        "--model",
        tiny_model,
    )
    assert rc == 1
    assert "nomatch*.tif: no file matches this pattern" in err
    assert len(_table(out / "summary.csv")[1]) == 2


def test_missing_model_is_exit_2(tmp_path, capsys):
    img = tmp_path / "i.tif"
    tifffile.imwrite(img, _image(33))
    rc, _, err = _run(capsys, "detect", img, "-o", tmp_path / "o", "--model", tmp_path / "nomodel")
    assert rc == 2
    assert "nomodel" in err and "no such model" in err


def test_outputs_are_not_private(tmp_path, tiny_model, capsys):
    img = tmp_path / "i.tif"
    tifffile.imwrite(img, _image(34))
    old = os.umask(0o022)
    try:
        assert _run(capsys, "count", img, "-o", tmp_path / "o", "--model", tiny_model)[0] == 0
    finally:
        os.umask(old)
    for p in [tmp_path / "o" / "summary.csv", tmp_path / "o" / "spots" / "i.csv"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    assert "usage: piscis" in capsys.readouterr().err


# --------------------------------------------------------------------------- evaluate

TRUTH = np.array([[10.0, 10.0], [10.0, 30.0], [30.0, 10.0], [30.0, 30.0]])


def _write_spots(path: Path, coords) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("y,x,score\n" + "".join(f"{y},{x},0.9\n" for y, x in coords))
    return path


def _parse(out: str) -> tuple[list[str], dict[str, dict[str, float]]]:
    lines = out.strip().splitlines()
    header = lines[0].split()
    rows = {}
    for line in lines[1:]:
        cells = line.split()
        rows[cells[0]] = {k: float(v) for k, v in zip(header[1:], cells[1:])}
    return header, rows


def test_evaluate_files(tmp_path, capsys):
    truth = _write_spots(tmp_path / "t" / "img.csv", TRUTH)
    pred = _write_spots(tmp_path / "p" / "img.csv", TRUTH + [0.5, 0.0])
    rc, out, _ = _run(capsys, "evaluate", pred, truth)
    assert rc == 0
    header, rows = _parse(out)
    assert header[:6] == ["image", "n_pred", "n_true", "F1@1", "F1@2", "F1@3"]
    r = rows["img"]
    assert (r["n_pred"], r["n_true"]) == (4, 4)
    assert r["F1@1"] == 1.0 and r["F1@3"] == 1.0
    assert r["prec"] == 1.0 and r["recall"] == 1.0
    assert r["loc_err"] == pytest.approx(0.5, abs=1e-3)
    assert "mean" not in rows


def test_evaluate_folders(tmp_path, capsys):
    t, p = tmp_path / "t", tmp_path / "p"
    _write_spots(t / "a.csv", TRUTH)
    _write_spots(p / "a.csv", TRUTH + [0.5, 0.0])  # every spot 0.5 px off
    _write_spots(t / "b.csv", TRUTH)
    _write_spots(p / "b.csv", TRUTH + [0.0, 2.5])  # 2.5 px off: found at 3 px, not at 1 or 2
    _write_spots(t / "c.csv", TRUTH)
    _write_spots(p / "c.csv", np.vstack([TRUTH[:3], [[50.0, 50.0]]]))  # 3 of 4, 1 false
    _write_spots(t / "d.csv", TRUTH)  # no prediction: warned, left out
    rc, out, err = _run(capsys, "evaluate", p, t)
    assert rc == 0
    _, rows = _parse(out)
    assert set(rows) == {"a", "b", "c", "mean", "pooled"}
    assert [rows[k]["F1@1"] for k in "abc"] == [1.0, 0.0, 0.75]
    assert [rows[k]["F1@2"] for k in "abc"] == [1.0, 0.0, 0.75]
    assert [rows[k]["F1@3"] for k in "abc"] == [1.0, 1.0, 0.75]
    assert rows["c"]["prec"] == 0.75 and rows["c"]["recall"] == 0.75
    assert rows["mean"]["F1@1"] == pytest.approx((1 + 0 + 0.75) / 3, abs=1e-3)
    assert rows["mean"]["F1@3"] == pytest.approx((1 + 1 + 0.75) / 3, abs=1e-3)
    assert "d.csv: no prediction" in err


def test_evaluate_napari_truth_against_our_table(tmp_path, capsys):
    truth = tmp_path / "truth.csv"
    truth.write_text(
        "index,axis-0,axis-1\n" + "".join(f"{i},{y},{x}\n" for i, (y, x) in enumerate(TRUTH))
    )
    pred = _write_spots(tmp_path / "pred.csv", TRUTH[::-1])  # order does not matter
    rc, out, _ = _run(capsys, "evaluate", pred, truth)
    assert rc == 0
    assert _parse(out)[1]["pred"]["F1@1"] == 1.0  # named after the prediction's image


def test_evaluate_pairs_truth_files_by_image_name(tmp_path, capsys):
    t, p = tmp_path / "t", tmp_path / "p"
    _write_spots(t / "cells.truth.csv", TRUTH)  # as in sample_data/
    _write_spots(p / "cells.csv", TRUTH)  # as piscis count writes it
    _write_spots(t / "a.b.gt.csv", TRUTH)  # dots in the image name stay
    _write_spots(p / "a.b.csv", TRUTH[:2])
    rc, out, err = _run(capsys, "evaluate", p, t)
    assert rc == 0, err
    rows = _parse(out)[1]
    assert set(rows) == {"cells", "a.b", "mean", "pooled"}
    assert rows["cells"]["F1@1"] == 1.0 and rows["a.b"]["recall"] == 0.5


def test_evaluate_missing_path_is_one_line_before_any_table(tmp_path, capsys):
    truth = _write_spots(tmp_path / "t.csv", TRUTH)
    rc, out, err = _run(capsys, "evaluate", tmp_path / "nothere.csv", truth)
    assert rc == 2 and out == ""
    assert "nothere.csv: no such file" in err


def test_evaluate_file_against_folder_is_refused(tmp_path, capsys):
    truth = _write_spots(tmp_path / "t" / "a.csv", TRUTH)
    rc, _, err = _run(capsys, "evaluate", tmp_path / "t", truth)
    assert rc == 2
    assert "both" in err


def test_evaluate_bad_csv_names_the_file(tmp_path, capsys):
    truth = _write_spots(tmp_path / "t.csv", TRUTH)
    pred = tmp_path / "p.csv"
    pred.write_text("1,2\n3,4\n")
    rc, _, err = _run(capsys, "evaluate", pred, truth)
    assert rc == 2
    assert "p.csv" in err and "header" in err


def test_evaluate_no_pairs(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    _write_spots(tmp_path / "t" / "a.csv", TRUTH)
    rc, _, err = _run(capsys, "evaluate", tmp_path / "p", tmp_path / "t")
    assert rc == 2
    assert "no prediction/truth pairs" in err


def test_evaluate_columns_must_agree_with_a_real_header(tmp_path, capsys):
    cases = [
        ("y,x,score", "x,y", False),  # the header says y first: --columns contradicts it
        ("index,axis-0,axis-1", "y,x,index", False),  # napari's export: y is axis-0
        ("y,x,score", "y,x,score", True),  # they agree
        ("a,b", "y,x", True),  # a header naming no coordinates: the names say which
    ]
    for k, (header, columns, ok) in enumerate(cases):
        rows = {
            "y,x,score": [(y, x, 0.9) for y, x in TRUTH],
            "index,axis-0,axis-1": [(i, y, x) for i, (y, x) in enumerate(TRUTH)],
            "a,b": [(y, x) for y, x in TRUTH],
        }[header]
        truth = tmp_path / f"t{k}.csv"
        truth.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
        pred = _write_spots(tmp_path / f"p{k}.csv", TRUTH)
        rc, out, err = _run(capsys, "evaluate", pred, truth, "--columns", columns)
        if ok:
            assert rc == 0, err
            assert _parse(out)[1][pred.stem]["F1@1"] == 1.0
        else:
            assert rc == 2 and out == ""
            errors = [line for line in err.splitlines() if line.startswith("ERROR")]
            assert errors[0].startswith((f"ERROR: {pred}: ", f"ERROR: {truth}: ")), err
            assert f"its header {header.split(',')[0]}" in errors[0].replace("'", "")
            assert f"--columns {columns}" in errors[0]


def _write_spots_3d(path: Path, coords) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("z,y,x,score\n" + "".join(f"{z},{y},{x},0.9\n" for z, y, x in coords))
    return path


def test_evaluate_matches_z_stacks_in_3d(tmp_path, capsys):
    """r px in yx and r slices in z at each cut-off r (CASES.md: 1.5 and 1.5)."""
    true = np.array([[5.0, 10, 10], [5, 10, 30], [5, 30, 10], [5, 30, 30], [5, 50, 50]])
    shift = np.array([[0.0, 0, 0], [0.8, 0, 0], [2.5, 0, 0], [0, 0.5, 0], [0.9, 0.9, 0]])
    truth = _write_spots_3d(tmp_path / "t" / "v.csv", true)
    pred = _write_spots_3d(tmp_path / "p" / "v.csv", true + shift)
    rc, out, err = _run(capsys, "evaluate", pred, truth)
    assert rc == 0, err
    r = _parse(out)[1]["v"]
    # 2.5 slices off: found at 3 only. 0.9 px and 0.9 slices (1.27 in 3D): found at 1.
    assert (r["F1@1"], r["F1@2"], r["F1@3"]) == (0.8, 0.8, 1.0)
    assert r["loc_err"] == pytest.approx(np.linalg.norm(shift, axis=1).mean(), abs=1e-3)
    # Tables in micrometres: the pixel size in z too, or one line.
    size = np.array([0.3, 0.1, 0.1])
    um = [_write_spots_3d(tmp_path / d / "v.csv", c * size) for d, c in
          (("p_um", true + shift), ("t_um", true))]  # fmt: skip
    rc, out, err = _run(capsys, "evaluate", *um, "--pixel-size", "0.3,0.1,0.1")
    assert rc == 0 and _parse(out)[1]["v"] == r, err
    rc, out, err = _run(capsys, "evaluate", *um, "--pixel-size", "0.1")
    assert rc == 2 and "needs the z step too" in err and out == ""
    # z in one table only: matched in yx, said once.
    flat = _write_spots(tmp_path / "p2" / "v.csv", true[:, 1:] + shift[:, 1:])
    rc, out, err = _run(capsys, "evaluate", flat, truth)
    assert rc == 0 and _parse(out)[1]["v"]["F1@1"] == 1.0
    assert [line for line in err.splitlines() if "z column" in line] == [
        f"WARNING: v: only {truth} has a z column; matched in yx"
    ]


def test_evaluate_folders_go_on_past_a_bad_csv_and_report_unpaired_files(tmp_path, capsys):
    t, p = tmp_path / "t", tmp_path / "p"
    for name in "abc":
        _write_spots(t / f"{name}.csv", TRUTH)
        _write_spots(p / f"{name}.csv", TRUTH)
    (p / "b.csv").write_text("1,2\n3,4\n")  # no header
    _write_spots(p / "extra.csv", TRUTH)  # no truth
    _write_spots(t / "a.gt.csv", TRUTH[:1])  # a second truth for a
    rc, out, err = _run(capsys, "evaluate", p, t)
    assert rc == 1
    assert set(_parse(out)[1]) == {"a", "c", "mean", "pooled"}
    assert _parse(out)[1]["a"]["F1@1"] == 1.0  # a.csv, the first truth for a
    lines = err.splitlines()
    assert len([x for x in lines if str(p / "b.csv") in x]) == 1
    assert f"ERROR: {p / 'b.csv'}: no header row" in err
    assert f"WARNING: {p / 'extra.csv'}: no truth for extra in {t}" in lines
    assert [x for x in lines if "a.gt.csv" in x] == [
        f"WARNING: {t / 'a.gt.csv'}: another truth for a ({t / 'a.csv'} is used), left out"
    ]


# --------------------------------------------------------------------------- version


def test_version_in_process(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"piscis {piscis.__version__}"


def test_python_m_piscis(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "piscis", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"piscis {piscis.__version__}"

    pred = tmp_path / "nothere.csv"
    r = subprocess.run(
        [sys.executable, "-m", "piscis", "evaluate", str(pred), str(pred)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 2
    assert "ERROR:" in r.stderr and "nothere.csv" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("bad", ["0", "-3", "big"])
def test_bad_tile_size_is_one_line(tmp_path, capsys, bad):
    img = tmp_path / "a.tif"
    tifffile.imwrite(img, np.zeros((32, 32), np.uint16))
    with pytest.raises(SystemExit) as e:
        cli.main(["count", str(img), "-o", str(tmp_path / "out"), "--tile-size", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--tile-size" in err and repr(bad) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("blocker", ["out", "out/spots"])
def test_output_path_taken_by_a_file_is_one_line(tmp_path, capsys, tiny_model, blocker):
    img = tmp_path / "a.tif"
    tifffile.imwrite(img, np.zeros((32, 32), np.uint16))
    (tmp_path / blocker).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / blocker).write_text("not a folder")
    rc, _, err = _run(capsys, "count", img, "-o", tmp_path / "out", "--model", tiny_model)
    assert rc == 1
    lines = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert any("a file is in the way" in line and blocker in line for line in lines), err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "option", [("--scale", "0"), ("--scale", "nan"), ("--min-snr", "-1"), ("--min-snr", "inf")]
)
def test_bad_scale_or_min_snr_is_refused_once_before_any_work(tmp_path, tiny_model, capsys, option):
    images = _images(tmp_path, 20)
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "count", *images, "-o", out, "--model", tiny_model, *option)
    assert rc == 2
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and option[0] in errors[0], err
    assert not (out / "spots").exists() or not any((out / "spots").iterdir())


@pytest.mark.parametrize(
    "option",
    [
        ("--roi", "nan,0,10,10"),
        ("--roi", "0,-inf,10,10"),
        ("--roi", "0,0,inf,10"),
        ("--axes", "Q"),
        ("--axes", "YYX"),
        ("--axes", "ZC"),
    ],
)
def test_bad_roi_or_axes_is_refused_once_before_any_image(tmp_path, tiny_model, capsys, option):
    images = _images(tmp_path, 110)
    out = tmp_path / "out"
    argv = ["count", *images, "-o", out, "--model", tiny_model, *option]
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and option[0] in errors[0] and repr(option[1]) in errors[0], err
    assert "i0.tif" not in err and "i1.tif" not in err  # no image was read
    assert not out.exists()


def _broken_model(tmp_path: Path, tiny_model, how: str) -> Path:
    """A copy of ``tiny_model`` whose weights are cut short, or whose config.json names
    another architecture than its weights."""
    import json
    import shutil

    folder = tmp_path / f"model_{how}"
    shutil.copytree(tiny_model, folder)
    weights = folder / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["architecture"]["channels"] = [8, 16, 32, 64]
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("how", ["truncated", "mismatched"])
@pytest.mark.parametrize("command", ["count", "detect", "train"])
def test_a_damaged_model_folder_is_one_line_and_exit_2(tmp_path, tiny_model, capsys, how, command):
    model = _broken_model(tmp_path, tiny_model, how)
    data = tmp_path / "data"
    _images(data, 40, n=1)
    (data / "i0.csv").write_text("y,x\n10,12\n")
    if command == "train":
        argv = ["train", data, "-o", tmp_path / "new", "--init", model, "--epochs", "1"]
    else:
        argv = [command, data / "i0.tif", "-o", tmp_path / "o", "--model", model]
    rc, _, err = _run(capsys, *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ERROR: {model.resolve()}: model.safetensors")
    what = "cannot be read" if how == "truncated" else "does not fit the architecture"
    assert what in lines[0]
    assert "Traceback" not in err and "size mismatch" not in err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("how", ["truncated", "mismatched"])
def test_a_damaged_model_folder_raises_input_error_in_the_api(tmp_path, tiny_model, how):
    from piscis.io import InputError

    model = _broken_model(tmp_path, tiny_model, how)
    with pytest.raises(InputError, match="model.safetensors") as e:
        piscis.detect_spots(_image(41), model=model)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("unit", [1 / 65535, 1e-4 / 65535])
def test_spot_tables_keep_the_intensity_of_float_images_in_any_unit(
    tmp_path, spotty_model, capsys, unit
):
    from piscis.annotate import read_spot_table
    from piscis.io import read_spots

    img = (_image(42, (48, 48)).astype(np.float64) * unit).astype(np.float32)  # 0..1 or less
    tifffile.imwrite(tmp_path / "f.tif", img)
    argv = ["detect", tmp_path / "f.tif", "-o", tmp_path / "o", "--model", spotty_model]
    assert _run(capsys, *argv)[0] == 0
    spots = piscis.detect.detect(img, spotty_model)
    assert len(spots) > 0 and np.all(spots.background > 0)
    names, rows = _table(tmp_path / "o" / "f.csv")
    assert names == SPOT_COLUMNS
    for col, want in (("intensity", spots.intensity), ("background", spots.background)):
        got = np.array([float(r[col]) for r in rows])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
    assert all(len(r["y"].split(".")[1]) == 4 for r in rows)  # coordinates as before
    # The readers of these tables: the napari plugin's, read_spots and evaluate.
    table = read_spot_table(tmp_path / "o" / "f.csv")
    np.testing.assert_allclose(table.features["intensity"], spots.intensity, rtol=1e-5)
    np.testing.assert_allclose(read_spots(tmp_path / "o" / "f.csv"), spots.coords, atol=1e-4)
    rc, out, _ = _run(capsys, "evaluate", tmp_path / "o" / "f.csv", tmp_path / "o" / "f.csv")
    assert rc == 0 and " 1.000 " in out


@pytest.mark.parametrize("change", ["other_image", "same_size"])
def test_resume_counts_again_an_image_whose_file_changed(tmp_path, spotty_model, capsys, change):
    images = _images(tmp_path / "in", 95, n=3)
    out = tmp_path / "out"
    argv = ["count", tmp_path / "in", "-o", out, "--model", spotty_model]
    assert _run(capsys, *argv)[0] == 0
    first = {p: (out / "spots" / f"{p.stem}.csv").read_text() for p in images}
    st = images[1].stat()
    if change == "other_image":  # another image saved under the same name
        tifffile.imwrite(images[1], _image(99, (36, 44)))
    else:  # the same bytes' size, other pixels, a later modification time
        data = tifffile.imread(images[1])
        tifffile.imwrite(images[1], data[::-1].copy())
        os.utime(images[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rc, _, err = _run(capsys, *argv)
    assert rc == 0, err
    assert "all 3 image(s) already done" not in err
    assert f"INFO: {images[1]}: the file changed since its results were written" in err
    assert "resuming the run" in err and "2 of 3 image(s) already done" in err
    rows = _table(out / "summary.csv")[1]
    assert [Path(r["image"]).name for r in rows] == ["i0.tif", "i1.tif", "i2.tif"]
    if change == "other_image":
        assert (rows[1]["height"], rows[1]["width"]) == ("36", "44")
    assert (out / "spots" / "i1.csv").read_text() != first[images[1]]
    for p in (images[0], images[2]):
        assert (out / "spots" / f"{p.stem}.csv").read_text() == first[p]
    # Once counted again, the run is finished.
    rc, _, err = _run(capsys, *argv)
    assert rc == 0 and "all 3 image(s) already done" in err


@pytest.mark.parametrize("inputs", ["empty", "subfolders", "nomatch", "empty+nomatch"])
def test_inputs_without_any_image_are_one_line_and_exit_2(tmp_path, tiny_model, capsys, inputs):
    d = tmp_path / "in"
    d.mkdir()
    (d / "notes.txt").write_text("no images here\n")
    if inputs == "subfolders":
        for sub in ("day1", "day2"):
            _images(d / sub, 50)
    argv = {
        "empty": [d],
        "subfolders": [d],
        "nomatch": [tmp_path / "nothing*.tif"],
        "empty+nomatch": [d, tmp_path / "nothing*.tif"],
    }[inputs]
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "count", *argv, "-o", out, "--model", tiny_model)
    assert rc == 2
    lines = [line for line in err.splitlines() if not line.startswith("INFO")]
    assert len(lines) == 1 and lines[0].startswith("ERROR: no image in the input(s) given"), err
    if inputs != "nomatch":
        assert f"{d}: no image files" in lines[0]
    if "nomatch" in inputs:
        assert "nothing*.tif: no file matches this pattern" in lines[0]
    if inputs == "subfolders":
        assert "only 2 sub-folder(s), which are not searched" in lines[0]
        assert str(d / "*" / "*.tif") in lines[0]
    assert not out.exists()  # no header-only summary.csv


@pytest.mark.parametrize(
    "argv",
    [
        ["count", "--channel", "-1"],
        ["detect", "--channel", "-2"],
        ["count", "--channel", "0", "--nuclei-channel", "-1"],
        ["count", "--channel", "0", "--nuclei-channel", "1", "--cytoplasm-channel", "-1"],
        ["train", "--channel", "-1"],
    ],
)
def test_negative_channel_numbers_are_refused_when_the_options_are_read(tmp_path, capsys, argv):
    img = tmp_path / "rgb.tif"
    tifffile.imwrite(img, np.stack([_image(k) for k in range(3)], -1), photometric="rgb")
    command, *options = argv
    where = [tmp_path] if command == "train" else [img]
    with pytest.raises(SystemExit) as e:
        cli.main([command, *map(str, where), "-o", str(tmp_path / "o"), *options])
    assert e.value.code == 2
    err = capsys.readouterr().err
    option = options[-2]
    assert f"argument {option}: channels are numbered from 0 (the first), got '-" in err
    assert not (tmp_path / "o").exists()


def test_a_folder_that_is_not_writable_is_named_not_a_temporary_file(
    tmp_path, tiny_model, capsys, monkeypatch
):
    import errno
    import tempfile

    out = tmp_path / "out"
    out.mkdir()
    mkstemp = tempfile.mkstemp

    def refused(*a, dir=None, **kw):  # what a read-only (immutable) folder answers
        if Path(dir) == out:
            name = os.path.join(dir, f"{kw.get('prefix', '')}zpq7434g{kw.get('suffix', '')}")
            raise PermissionError(errno.EPERM, "Operation not permitted", name)
        return mkstemp(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    rc, _, err = _run(capsys, "count", _images(tmp_path / "in", 60, 1)[0], "-o", out,
                      "--model", tiny_model)  # fmt: skip
    assert rc == 1
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert errors == [
        f"ERROR: {out}: this folder is not writable (Operation not permitted); make it "
        "writable or choose another output folder (-o); outputs finished before this are "
        "complete"
    ]
    assert ".tmp" not in err


def test_a_missing_spot_channel_says_what_this_command_needs(tmp_path, tiny_model, capsys):
    rgb = np.stack([_image(k, (40, 40)) for k in range(3)], -1).astype(np.uint8)
    data = tmp_path / "data"
    data.mkdir()
    tifffile.imwrite(data / "rgb.tif", rgb, photometric="rgb")
    (data / "rgb.csv").write_text("y,x\n10,12\n")
    rc, _, err = _run(capsys, "count", data / "rgb.tif", "-o", tmp_path / "o",
                      "--model", tiny_model, "--nuclei-channel", "1")  # fmt: skip
    assert rc == 1
    assert "3 different channels" in err
    assert "pass the spot channel with --channel N (needed with --nuclei-channel)" in err
    rc, _, err = _run(capsys, "train", data, "-o", tmp_path / "m", "--epochs", "1")
    assert rc == 2 and "3 different channels" in err and "choose one with --channel N" in err
    # Neither says the CLI would detect every channel: these two do not.
    assert "every channel separately" not in err


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, tiny_model, capsys, monkeypatch):
    images = _images(tmp_path / "in", 61, 3)
    tifffile.imwrite(images[0], _image(62, (600, 600)))  # streamed in tiles, below
    monkeypatch.setenv("PISCIS_STREAM_PIXELS", "1024")
    argv = ["count", *images, "-o", tmp_path / "o", "--model", tiny_model, "--tile-size", 256]
    rc, _, err = _run(capsys, *argv)
    assert rc == 0
    assert "\r" not in err and "images:" not in err and "tiles:" not in err
    lines = err.splitlines()
    assert lines and all(line.split(":")[0] in ("INFO", "WARNING") for line in lines), err
    # On a terminal: the bars of the images and of a streamed image's tiles.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc, _, err = _run(capsys, *argv, "--overwrite")
    assert rc == 0 and "images:" in err and "tiles:" in err
