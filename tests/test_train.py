"""Training writes a loadable model folder, never overwrites one, resumes,
and actually learns."""

import json

import numpy as np
import pytest
import tifffile
import torch

from piscis.data import Pair, load_pairs
from piscis.detect import detect
from piscis.io import LoadedModel, load_model
from piscis.metrics import f1_at
from piscis.synth import spot_image
from piscis.train import Teacher, TrainConfig, _unview, _views, train


def _pairs(n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img, coords = spot_image(rng, (128, 128), n_spots=15, sigma=1.2, amp=300)
        out.append(Pair(f"p{i}", img, coords))
    return out


def _tiny(**kw):
    base = dict(
        epochs=1,
        steps_per_epoch=3,
        batch_size=4,
        crop=64,
        channels=(4, 8),
        workers=0,
        synthetic_fraction=0.5,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_train_writes_a_model_folder_and_refuses_to_overwrite(tmp_path):
    pairs = _pairs()
    out = train(pairs[:2], tmp_path / "m", _tiny(), val_pairs=pairs[2:])
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "README.md"} <= files
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"]["channels"] == [4, 8]
    assert cfg["training"]["pairs"] == ["p0", "p1"]
    assert "f1_int" in cfg["metrics"]["validation"]
    assert "Validation figures" in (out / "README.md").read_text()
    model = load_model(out)
    assert len(detect(pairs[0].image, model).coords.shape) == 2
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        train(pairs[:2], out, _tiny(), val_pairs=pairs[2:])
    assert (out / "model.safetensors").read_bytes() == before


def test_resume_continues_from_the_last_epoch(tmp_path):
    pairs = _pairs()
    ckpt = tmp_path / "ckpt"
    train(pairs[:2], tmp_path / "a", _tiny(epochs=1), val_pairs=pairs[2:], checkpoint_dir=ckpt)
    out = train(
        pairs[:2],
        tmp_path / "b",
        _tiny(epochs=2),
        val_pairs=pairs[2:],
        checkpoint_dir=ckpt,
        resume=True,
    )
    hist = json.loads((out / "config.json").read_text())["training"]["history"]
    assert [h["epoch"] for h in hist] == [0, 1]


def test_stop_request_keeps_a_model(tmp_path):
    pairs = _pairs()
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 2

    out = train(
        pairs[:2], tmp_path / "m", _tiny(steps_per_epoch=50), val_pairs=pairs[2:], should_stop=stop
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["stopped_early"] is True
    assert (out / "model.safetensors").exists()


def test_training_folder_pairs_with_region_masks(tmp_path):
    rng = np.random.default_rng(3)
    img, coords = spot_image(rng, (96, 96), n_spots=10)
    tifffile.imwrite(tmp_path / "a.tif", img)
    (tmp_path / "a.csv").write_text("y,x\n" + "".join(f"{y},{x}\n" for y, x in coords))
    mask = np.zeros((96, 96), np.uint8)
    mask[:, :48] = 1
    tifffile.imwrite(tmp_path / "a.mask.tif", mask)
    tifffile.imwrite(tmp_path / "lonely.tif", img)  # no CSV: skipped
    pairs = load_pairs(tmp_path)
    assert [p.name for p in pairs] == ["a"]
    assert pairs[0].region.sum() == 96 * 48
    np.testing.assert_allclose(pairs[0].coords, coords)


@pytest.mark.slow
def test_short_training_learns_to_find_spots(tmp_path):
    """From scratch, 150 steps on simple spots: far better than chance."""
    import torch

    torch.set_num_threads(1)
    pairs = _pairs(4, seed=1)
    cfg = _tiny(
        epochs=1,
        steps_per_epoch=150,
        batch_size=8,
        crop=64,
        channels=(8, 16),
        synthetic_fraction=0.0,
        lr=5e-3,
    )
    out = train(pairs[:3], tmp_path / "m", cfg, val_pairs=pairs[3:])
    spots = detect(pairs[3].image, load_model(out))
    assert f1_at(spots.coords, pairs[3].coords, 2.0) > 0.7


def test_fine_tuning_keeps_the_parents_threshold_and_significance_floor(tmp_path):
    """A model fine-tuned from the default keeps its threshold and min_snr (they were
    saved as 0.5 and none: the fine-tuned model then found spots in pure noise)."""
    parent = load_model("default")
    if parent.config.get("min_snr") is None:
        pytest.skip("the default model has no significance floor")
    pairs = _pairs()
    cfg = _tiny(channels=tuple(parent.config["architecture"]["channels"]))
    out = train(pairs[:2], tmp_path / "ft", cfg, val_pairs=pairs[2:], init="default")
    child = load_model(out)
    assert child.threshold == parent.threshold and child.min_snr == parent.min_snr
    scratch = load_model(train(pairs[:2], tmp_path / "new", _tiny(), val_pairs=pairs[2:]))
    assert scratch.threshold == TrainConfig().threshold  # from scratch: the set value


def test_training_folder_without_any_annotation_is_refused(tmp_path, capsys):
    from piscis import cli

    rng = np.random.default_rng(12)
    for stem in ("a", "b"):
        img, _ = spot_image(rng, (64, 64), n_spots=5)
        tifffile.imwrite(tmp_path / f"{stem}.tif", img)
        (tmp_path / f"{stem}.csv").write_text("y,x\n")  # a header, no rows
    with pytest.raises(ValueError, match="no annotations in any CSV"):
        load_pairs(tmp_path)
    rc = cli.main(["train", str(tmp_path), "-o", str(tmp_path / "m"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "m").exists()
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "no annotations in any CSV (2 CSV(s)" in errors[0]
    assert str(tmp_path) in errors[0]
    # One annotated image is enough: the other is a spot-free example.
    (tmp_path / "b.csv").write_text("y,x\n10,12\n")
    assert [len(p.coords) for p in load_pairs(tmp_path)] == [0, 1]


def test_rows_outside_the_image_are_dropped_with_a_warning(tmp_path, caplog):
    import logging

    rng = np.random.default_rng(13)
    img, coords = spot_image(rng, (128, 128), n_spots=6)
    tifffile.imwrite(tmp_path / "a.tif", img)
    rows = [*coords, (500, 500), (-3, 10), (127.4, 5), (127.6, 60)]
    (tmp_path / "a.csv").write_text("y,x\n" + "".join(f"{y},{x}\n" for y, x in rows))
    with caplog.at_level(logging.WARNING, logger="piscis"):
        (pair,) = load_pairs(tmp_path)
    np.testing.assert_allclose(pair.coords, [*coords, (127.4, 5)])
    said = [r.getMessage() for r in caplog.records if "outside" in r.getMessage()]
    assert said == [
        f"{tmp_path / 'a.csv'}: 3 of 10 rows lie outside the 128 x 128 image "
        "(dropped); check the coordinates (0-based pixels, y then x) and --pixel-size"
    ]


def test_training_folder_takes_the_truth_names_evaluate_takes(tmp_path, caplog):
    """sample_data's NAME.truth.csv (as `piscis evaluate` pairs them) is an annotation
    table for training too (train said 'no image + CSV pairs found'); NAME.csv wins
    over it, with a warning."""
    rng = np.random.default_rng(44)
    for name in ("a", "b"):
        img, coords = spot_image(rng, (96, 96), n_spots=6)
        tifffile.imwrite(tmp_path / f"{name}.tif", img)
        table = "y,x\n" + "".join(f"{y},{x}\n" for y, x in coords)
        (tmp_path / f"{name}.truth.csv").write_text(table)
    (tmp_path / "b.csv").write_text("y,x\n10,10\n")
    pairs = {p.name: p for p in load_pairs(tmp_path)}
    assert sorted(pairs) == ["a", "b"]
    assert len(pairs["a"].coords) == 6 and len(pairs["b"].coords) == 1
    assert "b.csv used, b.truth.csv left out" in caplog.text


class _ToTheBrightest(torch.nn.Module):
    """A stand-in network whose maps are exact in every orientation: the logit is the
    image, the displacement points from each pixel to the brightest one."""

    def forward(self, x):
        b, _, h, w = x.shape
        at = x.reshape(b, -1).argmax(1)
        y0, x0 = (at // w).view(b, 1, 1).float(), (at % w).view(b, 1, 1).float()
        yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
        return torch.stack([x[:, 0], y0 - yy, x0 - xx], 1)


def test_teacher_views_map_back_to_the_crop():
    """The teacher's 8 rotations and flips of a crop, mapped back, are the crop's own
    maps when the network is exact (a wrong sign or swap of dy, dx shows here)."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(3, 1, 24, 24)).astype(np.float32))
    net = _ToTheBrightest()
    teacher = Teacher(LoadedModel(net, {}), views=8)
    for k in range(8):
        np.testing.assert_allclose(_unview(net(_views(x, k)), k), net(x), atol=1e-6)
    np.testing.assert_allclose(teacher.maps(x), net(x), atol=1e-6)
    assert not torch.allclose(net(_views(x, 5)), net(x))  # the views do differ


def test_distillation_trains_and_is_recorded(tmp_path):
    """Training with a teacher model (the 8-view average) runs, and the model's config
    says which teacher it learnt from."""
    pairs = _pairs()
    parent = train(pairs[:2], tmp_path / "parent", _tiny(), val_pairs=pairs[2:])
    spec = {"model": str(parent), "views": 8, "weight": 1.0}
    child = train(
        pairs[:2], tmp_path / "child", _tiny(extra={"teacher": spec}), val_pairs=pairs[2:],
        init=parent,
    )  # fmt: skip
    cfg = json.loads((child / "config.json").read_text())
    assert cfg["training"]["config"]["extra"]["teacher"] == spec
    assert np.isfinite(cfg["training"]["history"][0]["loss"])
    assert cfg["views"] == 1  # one view unless the parent averages two


def _folder(tmp_path, n=2):
    data = tmp_path / "data"
    data.mkdir()
    for p in _pairs(n):
        tifffile.imwrite(data / f"{p.name}.tif", p.image)
        np.savetxt(data / f"{p.name}.csv", p.coords, delimiter=",", header="y,x", comments="")
    return data


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--crop", "60", "crop 60 must be a multiple of 8 (the network halves it 3 times): "
         "try 56 or 64"),
        ("--epochs", "0", "epochs must be a whole number >= 1, got 0"),
        ("--batch", "0", "batch_size must be a whole number >= 1, got 0"),
        ("--lr", "nan", "the learning rate must be a number > 0, got nan"),
    ],
)  # fmt: skip
def test_training_settings_that_cannot_train_are_one_line(tmp_path, capsys, option, value, said):
    """A crop the network cannot halve three times crashed in torch (sizes 14 and 15);
    0 epochs wrote untrained weights. Now one line, exit 2, and no folder left."""
    from piscis import cli

    data = _folder(tmp_path)
    argv = ["train", data, "-o", tmp_path / "m", "--epochs", "1", "--steps", "1", option, value]
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and said in err and "Traceback" not in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.ckpt").exists()


def test_a_diverging_training_stops_and_writes_no_model(tmp_path):
    """A loss that is NaN (learning rate 1e30) gave NaN weights, saved; the model then
    found 0 spots everywhere with exit 0."""
    pairs = _pairs()
    with pytest.raises(ValueError, match=r"training diverged at step \d+: the loss is nan"):
        train(pairs[:2], tmp_path / "m", _tiny(lr=1e30, steps_per_epoch=20), val_pairs=pairs[2:])
    assert not (tmp_path / "m").exists()


def test_a_model_with_nan_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from piscis.io import InputError

    pairs = _pairs()
    out = train(pairs[:2], tmp_path / "m", _tiny(), val_pairs=pairs[2:])
    state = load_file(str(out / "model.safetensors"))
    state["head.weight"][0, 0] = float("nan")
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(InputError, match="NaN or infinite weights in 1 of"):
        load_model(out)


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ({"views": 0}, "teacher views must be 1 to 8"),
        ({"views": 9}, "teacher views must be 1 to 8"),
        ({"weight": float("nan")}, "teacher weight must be a number >= 0"),
        ({"disp_weight": -1.0}, "teacher disp_weight must be a number >= 0"),
        ({"model": "no/such/model"}, "no such model folder"),
    ],
)
def test_teacher_settings_are_checked_before_anything_is_written(tmp_path, spec, said):
    from piscis.io import InputError

    pairs = _pairs()
    cfg = _tiny(extra={"teacher": {"model": "default", **spec}})
    with pytest.raises((ValueError, InputError), match=said):
        train(pairs[:2], tmp_path / "m", cfg, val_pairs=pairs[2:])
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.ckpt").exists()


def test_a_stop_between_epochs_records_no_empty_epoch(tmp_path):
    """Stopping at the start of an epoch recorded it with a NaN loss, and config.json then
    held a bare NaN, which JSON readers other than Python's refuse."""
    pairs = _pairs()
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3  # after the first epoch's 3 steps

    out = train(pairs[:2], tmp_path / "m", _tiny(epochs=3), val_pairs=pairs[2:], should_stop=stop)
    text = (out / "config.json").read_text()

    def refuse(name):
        raise AssertionError(f"{name} in config.json")

    cfg = json.loads(text, parse_constant=refuse)
    assert [r["epoch"] for r in cfg["training"]["history"]] == [0]
    assert cfg["training"]["stopped_early"] is True


def test_an_edited_model_config_is_read_again(tmp_path):
    """load_model kept the first reading of a folder for the whole process: a threshold
    or views edited while napari ran were ignored until a restart."""
    pairs = _pairs()
    out = train(pairs[:2], tmp_path / "m", _tiny(), val_pairs=pairs[2:])
    first = load_model(out)
    assert load_model(out) is first  # unchanged files: the same object
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(threshold=0.83, views=2)
    (out / "config.json").write_text(json.dumps(cfg) + " ")  # another size, whatever the clock
    again = load_model(out)
    assert again.threshold == 0.83 and again.net.views == 2
