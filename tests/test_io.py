"""Tests of piscis.io: reading images and spot tables, atomic writes.

Every input is generated in the test from a seeded generator; expected values come
from how the input was built.
"""

from __future__ import annotations

import logging
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage import io as skio

from piscis import io as pio
from piscis.io import (
    InputError,
    atomic_write_text,
    read_image,
    read_image_2d,
    read_spots,
    table_text,
    to_plane,
    write_table,
)

SHAPE = (24, 36)  # Y != X so a transposed result cannot pass
ZYX = {"axes": "ZYX"}


def _base(seed: int = 0, high: int = 100) -> np.ndarray:
    """Values that fit every integer dtype tested (int8 included)."""
    return np.random.default_rng(seed).integers(0, high, SHAPE).astype(np.uint8)


def _png(path: Path, arr: np.ndarray) -> Path:
    skio.imsave(path, arr, check_contrast=False)
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- dtypes, byte orders


@pytest.mark.parametrize("order", [">", "<"])
@pytest.mark.parametrize("dtype", ["u1", "u2", "i1", "i2", "i4", "f4", "f8"])
def test_tiff_dtypes_and_byte_orders_read_the_same_values(tmp_path, dtype, order):
    base = _base(1)
    arr = base.astype(order + dtype)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, arr)
    data = read_image(path)
    assert data.image.shape == SHAPE
    assert data.image.dtype == np.dtype(dtype).newbyteorder("=")
    assert data.image.dtype.byteorder in "=|"  # native order for torch and numba-free code
    np.testing.assert_array_equal(data.image, base)
    assert data.axes == "YX"
    assert data.notes == []


INT_FLOAT_DTYPES = ["u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8"]


@pytest.mark.parametrize("order", [">", "<"])
@pytest.mark.parametrize("dtype", INT_FLOAT_DTYPES)
@pytest.mark.parametrize("ndim", [2, 3])
def test_every_int_and_float_dtype_both_byte_orders_2d_and_3d(dtype, order, ndim):
    """The array path (napari layers, the API) as well as files: same values, native order."""
    base = _stack(3, 40).astype(np.uint8) // 3 if ndim == 3 else _base(40)
    arr = base.astype(order + dtype)
    stack = pio.resolve_axes(arr, "ZYX" if ndim == 3 else "YX", "arr")
    assert stack.data.dtype == np.dtype(dtype).newbyteorder("=")
    assert stack.data.dtype.byteorder in "=|"
    np.testing.assert_array_equal(stack.data, base)


@pytest.mark.parametrize("order", [">", "<"])
@pytest.mark.parametrize("dtype", ["u4", "i8", "u8", "f2"])
def test_wide_and_half_dtypes_read_from_tiff_in_3d(tmp_path, dtype, order):
    base = _stack(3, 41) // 10
    path = tmp_path / "v.tif"
    tifffile.imwrite(path, base.astype(order + dtype), photometric="minisblack", metadata=ZYX)
    data = read_image(path)
    assert data.axes == "ZYX" and data.image.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(data.image, base)


@pytest.mark.parametrize("dtype", [bool, np.complex64, np.complex128])
@pytest.mark.parametrize("ndim", [2, 3])
def test_bool_and_complex_refused_before_processing_2d_and_3d(tmp_path, dtype, ndim):
    path = tmp_path / "bad.tif"
    shape = (3, *SHAPE) if ndim == 3 else SHAPE
    tifffile.imwrite(
        path, np.zeros(shape, dtype), photometric="minisblack", metadata={"axes": "ZYX"[-ndim:]}
    )
    for call in (read_image, pio.read_planes, lambda p: pio.read_channels(p, [None])):
        with pytest.raises(InputError) as e:
            call(path)
        assert np.dtype(dtype).name in str(e.value) and "bad.tif" in str(e.value)
    with pytest.raises(InputError, match=np.dtype(dtype).name):
        to_plane(np.zeros(shape, dtype), "ZYX"[-ndim:], name="layer")


# --------------------------------------------------------------------------- voxel size


def test_imagej_spacing_unit_and_resolution_give_the_voxel_size(tmp_path):
    path = tmp_path / "ij.tif"
    meta = {"axes": "ZYX", "spacing": 300, "unit": "nm"}
    tifffile.imwrite(path, _stack(3, 42), imagej=True, metadata=meta, resolution=(1 / 65, 1 / 80))
    data = read_image(path)
    assert data.spacing == pytest.approx((0.3, 0.08, 0.065))  # (z, y, x) in micrometres
    assert read_image(path, project=True).spacing == pytest.approx((0.08, 0.065))
    micron = tmp_path / "um.tif"
    meta = {"axes": "YX", "unit": "\\u00B5m"}  # how ImageJ writes a micrometre
    tifffile.imwrite(micron, _base(43), imagej=True, metadata=meta, resolution=(10, 10))
    assert read_image(micron).spacing == pytest.approx((0.1, 0.1))


def test_ome_physical_sizes_give_the_voxel_size(tmp_path):
    path = tmp_path / "o.ome.tif"
    meta = {"axes": "ZYX", "PhysicalSizeX": 65, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 65,
            "PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 0.25}  # fmt: skip
    tifffile.imwrite(path, _stack(3, 44), metadata=meta)
    assert read_image(path).spacing == pytest.approx((0.25, 0.065, 0.065))


def test_voxel_size_unknown_given_and_wrong(tmp_path):
    path = tmp_path / "p.tif"
    tifffile.imwrite(path, _stack(3, 45), photometric="minisblack", metadata=ZYX)
    assert read_image(path).spacing is None
    assert read_image(path, voxel_size=(0.5, 0.1, 0.2)).spacing == (0.5, 0.1, 0.2)
    assert read_image(path, voxel_size=(0.5, 0.1, 0.2), project=True).spacing == (0.1, 0.2)
    with pytest.raises(InputError, match=r"p.tif: --voxel-size 0.1,0.2 does not fit a ZYX"):
        read_image(path, voxel_size=(0.1, 0.2))


# --------------------------------------------------------------------------- read_planes


def test_read_planes_index_and_channel(tmp_path):
    arr = np.random.default_rng(46).integers(0, 999, (2, 3, 2, *SHAPE)).astype(np.uint16)
    path = tmp_path / "h.tif"
    tifffile.imwrite(path, arr, imagej=True, metadata={"axes": "TZCYX"})
    planes = pio.read_planes(path)
    assert [i for i, _ in planes] == [{"t": t, "c": c} for t in (0, 1) for c in (0, 1)]
    for i, d in planes:
        np.testing.assert_array_equal(d.image, arr[i["t"], :, i["c"]])
    one = pio.read_planes(path, channel=1, project=True)
    assert [i for i, _ in one] == [{"t": 0, "c": 1}, {"t": 1, "c": 1}]
    np.testing.assert_array_equal(one[1][1].image, arr[1, :, 1].max(axis=0))
    with pytest.raises(InputError, match=r"h.tif: 2 time points.*read_planes"):
        read_image(path, channel=0)
    assert pio.read_planes(_png(tmp_path / "g.png", _base(1)))[0][0] == {}


@pytest.mark.parametrize("axes", ["zyx", "ZYX", "YXZ", "CYX", "YXC", "TYX", "XYZ"])
def test_explicit_axes_give_canonical_order(axes):
    rng = np.random.default_rng(47)
    canon = "".join(a for a in "TCZYX" if a in axes.upper())
    shape = {"T": 2, "C": 3, "Z": 4, "Y": SHAPE[0], "X": SHAPE[1]}
    ref = rng.integers(0, 99, [shape[a] for a in canon]).astype(np.uint16)
    arr = np.transpose(ref, [canon.index(a) for a in axes.upper()])
    stack = pio.resolve_axes(arr, "", "arr", axes=axes)
    assert stack.axes == canon
    np.testing.assert_array_equal(stack.data, ref)


def test_explicit_axes_may_leave_out_singletons(tmp_path):
    arr = np.random.default_rng(48).integers(0, 99, (3, 1, *SHAPE)).astype(np.uint16)
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, arr)
    np.testing.assert_array_equal(read_image(path, axes="ZYX").image, arr[:, 0])


@pytest.mark.parametrize("order", [">", "<"])
def test_tiff_file_byte_order_does_not_change_values(tmp_path, order):
    base = _base(2).astype(np.uint16) * 500
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, base, byteorder=order)
    with tifffile.TiffFile(path) as tif:
        assert tif.byteorder == order
    np.testing.assert_array_equal(read_image_2d(path), base)


@pytest.mark.parametrize("order", [">", "<"])
def test_to_plane_makes_big_endian_arrays_native(order):
    base = _base(3).astype(np.int16) - 50
    out = to_plane(base.astype(order + "i2"), "YX").image
    assert out.dtype.byteorder in "=|"
    np.testing.assert_array_equal(out, base)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_grey_8_and_16_bit(tmp_path, dtype):
    base = _base(4).astype(dtype) * (300 if dtype == np.uint16 else 1)
    out = read_image_2d(_png(tmp_path / "g.png", base))
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, base)


# --------------------------------------------------------------------------- grey, RGB, RGBA


def _rgb(base, distinct: bool, alpha: bool):
    planes = [base, base + 1, base + 2] if distinct else [base, base, base]
    if alpha:
        planes.append(np.full_like(base, 255))
    return np.stack(planes, axis=-1)


def _write(path: Path, arr: np.ndarray) -> Path:
    if path.suffix == ".png":
        return _png(path, arr)
    extra = {"extrasamples": ["unassalpha"]} if arr.shape[-1] == 4 else {}
    tifffile.imwrite(path, arr, photometric="rgb", **extra)
    return path


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("alpha", [False, True], ids=["rgb", "rgba"])
def test_equal_colour_channels_are_read_as_grey(tmp_path, suffix, alpha):
    base = _base(5)
    path = _write(tmp_path / f"c{suffix}", _rgb(base, distinct=False, alpha=alpha))
    out = read_image_2d(path)
    assert out.shape == SHAPE
    np.testing.assert_array_equal(out, base)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("alpha", [False, True], ids=["rgb", "rgba"])
def test_different_colour_channels_need_a_channel(tmp_path, suffix, alpha):
    base = _base(6)
    path = _write(tmp_path / f"c{suffix}", _rgb(base, distinct=True, alpha=alpha))
    with pytest.raises(InputError) as e:
        read_image(path)
    assert path.name in str(e.value)
    assert "--channel" in str(e.value)
    np.testing.assert_array_equal(read_image_2d(path, channel=1), base + 1)
    np.testing.assert_array_equal(read_image_2d(path, channel=-1 if not alpha else 2), base + 2)


def test_grey_plus_opaque_alpha_png_is_grey(tmp_path):
    base = _base(7)
    path = _png(tmp_path / "la.png", np.stack([base, np.full_like(base, 255)], axis=-1))
    np.testing.assert_array_equal(read_image_2d(path), base)


def test_channel_out_of_range_is_refused(tmp_path):
    path = _write(tmp_path / "c.png", _rgb(_base(8), distinct=True, alpha=False))
    with pytest.raises(InputError, match=r"--channel 5 out of range.*3 channels"):
        read_image(path, channel=5)


def test_channel_on_a_grey_image_is_refused(tmp_path):
    path = _png(tmp_path / "g.png", _base(9))
    with pytest.raises(InputError, match="no channel axis") as e:
        read_image(path, channel=5)
    assert "g.png" in str(e.value)
    np.testing.assert_array_equal(read_image_2d(path, channel=0), _base(9))


# --------------------------------------------------------------------------- axes from metadata


def _stack(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1000, (n, *SHAPE)).astype(np.uint16)


def test_imagej_hyperstack_zyx_stays_3d_unless_projected(tmp_path, caplog):
    z = _stack(4, 10)
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, z, imagej=True, metadata={"axes": "ZYX"})
    with caplog.at_level(logging.INFO, logger="piscis.io"):
        data = read_image(path)
    np.testing.assert_array_equal(data.image, z)
    assert data.axes == "ZYX" and data.notes == []
    assert "ij.tif: axes ZYX, shape (4, 24, 36) (ImageJ metadata)" in caplog.text
    flat = read_image(path, project=True)
    np.testing.assert_array_equal(flat.image, z.max(axis=0))
    assert flat.axes == "YX"
    assert len(flat.notes) == 1 and "4 z-planes max-projected (--project)" in flat.notes[0]


def test_imagej_hyperstack_zcyx_with_channel(tmp_path):
    arr = np.random.default_rng(11).integers(0, 1000, (3, 2, *SHAPE)).astype(np.uint16)
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, arr, imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(InputError, match="--channel"):
        read_image(path)
    data = read_image(path, channel=1)
    np.testing.assert_array_equal(data.image, arr[:, 1])
    assert data.axes == "ZYX"
    np.testing.assert_array_equal(read_image(path, channel=1, project=True).image, arr[:, 1].max(0))


@pytest.mark.parametrize("suffix", [".ome.tif", ".ome.tiff"])
def test_ome_tiff_zyx_axes_from_metadata(tmp_path, suffix):
    z = _stack(3, 12)
    path = tmp_path / f"o{suffix}"
    tifffile.imwrite(path, z, photometric="minisblack", metadata=ZYX)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
    data = read_image(path)
    np.testing.assert_array_equal(data.image, z)
    assert data.axes == "ZYX"


def test_ome_tiff_cyx_axes_from_metadata(tmp_path):
    c = _stack(2, 13)
    path = tmp_path / "o.ome.tif"
    tifffile.imwrite(path, c, metadata={"axes": "CYX"})
    with pytest.raises(InputError, match="2 different channels"):
        read_image(path)
    data = read_image(path, channel=1)
    np.testing.assert_array_equal(data.image, c[1])
    assert data.notes == []  # a channel pick is not a projection


def test_plain_multipage_tiff_is_a_z_stack_and_says_so(tmp_path, caplog):
    z = _stack(3, 14)
    path = tmp_path / "mp.tif"
    tifffile.imwrite(path, z, metadata=None, photometric="minisblack")
    with caplog.at_level(logging.INFO, logger="piscis.io"):
        data = read_image(path)
    np.testing.assert_array_equal(data.image, z)
    assert data.axes == "ZYX"
    assert "mp.tif: axes ZYX" in caplog.text and "z-planes" in caplog.text


# --------------------------------------------------------------------------- axes override


@pytest.mark.parametrize("axes", ["YXZ", "ZYX", "XYZ", "ZXY", "YZX", "XZY"])
def test_axes_override_moves_z_wherever_it_is(tmp_path, axes):
    rng = np.random.default_rng(15)
    yxz = rng.integers(0, 1000, (*SHAPE, 5)).astype(np.uint16)  # Y, X, Z
    arr = np.transpose(yxz, ["YXZ".index(a) for a in axes])
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, arr, metadata=None, photometric="minisblack")
    data = read_image(path, axes=axes)
    np.testing.assert_array_equal(data.image, np.moveaxis(yxz, 2, 0))
    assert data.axes == "ZYX"
    np.testing.assert_array_equal(read_image(path, axes=axes, project=True).image, yxz.max(2))


def test_axes_override_beats_metadata(tmp_path):
    rng = np.random.default_rng(16)
    yxc = rng.integers(0, 1000, (*SHAPE, 3)).astype(np.uint16)
    path = tmp_path / "s.tif"
    # Pages of (X, C): the file says 24 planes of 36 x 3, which is wrong.
    tifffile.imwrite(path, yxc, metadata=None, photometric="minisblack")
    out = read_image_2d(path, axes="yxz")  # lower case is accepted; read_image_2d projects
    np.testing.assert_array_equal(out, yxc.max(axis=2))
    np.testing.assert_array_equal(read_image_2d(path, axes="YXC", channel=2), yxc[..., 2])


def test_axes_override_of_the_wrong_length_is_refused(tmp_path):
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, _stack(2, 17), metadata=None, photometric="minisblack")
    with pytest.raises(InputError, match=r"--axes 'YX' has 2 letters.*3 dimensions") as e:
        read_image(path, axes="YX")
    assert "s.tif" in str(e.value)


@pytest.mark.parametrize("axes", ["YYX", "ZCX", "EYX"])
def test_axes_without_yx_or_unsupported_are_refused(axes):
    arr = np.zeros((3, *SHAPE), np.uint8)
    with pytest.raises(InputError, match="--axes"):
        to_plane(arr, axes, name="f.tif", explicit=True)


def test_guessed_4d_axes_drop_singletons_by_position():
    rng = np.random.default_rng(18)
    arr = rng.integers(0, 1000, (3, 1, *SHAPE)).astype(np.uint16)  # guessed 'QQYX'
    data = to_plane(arr, "")
    np.testing.assert_array_equal(data.image, arr[:, 0].max(axis=0))
    arr2 = rng.integers(0, 1000, (1, 3, *SHAPE)).astype(np.uint16)
    np.testing.assert_array_equal(to_plane(arr2, "").image, arr2[0].max(axis=0))
    with pytest.raises(InputError, match="--axes"):  # two real unknown axes: say which
        to_plane(rng.integers(0, 9, (2, 3, *SHAPE)), "")


def test_xy_axes_are_transposed():
    base = _base(19)
    np.testing.assert_array_equal(to_plane(base.T, "XY", explicit=True).image, base)


# --------------------------------------------------------------------------- refused pixels


def test_zero_size_axis_is_refused(tmp_path):
    with pytest.raises(InputError, match="zero-size axis"):
        to_plane(np.zeros((0, 10), np.uint8), "YX")
    path = tmp_path / "empty.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile: "writing zero-size array"
        tifffile.imwrite(path, np.zeros((0, 10), np.uint8))
    with pytest.raises(InputError) as e:
        read_image(path)
    assert "empty.tif" in str(e.value)


# --------------------------------------------------------------------------- bad files


def test_truncated_tiff_names_the_file(tmp_path):
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, _base(20).astype(np.uint16))
    raw = good.read_bytes()
    for n in (len(raw) // 2, 100, 8, 4):
        bad = tmp_path / f"cut{n}.tif"
        bad.write_bytes(raw[:n])
        with pytest.raises(InputError) as e:
            read_image(bad)
        assert bad.name in str(e.value)


def test_truncated_compressed_tiff_names_the_file(tmp_path):
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, _base(21).astype(np.uint16), compression="zlib")
    bad = tmp_path / "cut.tif"
    bad.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(InputError, match="not a readable TIFF") as e:
        read_image(bad)
    assert "cut.tif" in str(e.value)


@pytest.mark.parametrize("keep", [1000, 0.6, -10])
def test_truncated_tiff_says_it_is_cut_short(tmp_path, keep):
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, _base(22).astype(np.uint16))
    data = good.read_bytes()
    bad = tmp_path / "cut.tif"
    bad.write_bytes(data[: keep if isinstance(keep, int) else int(keep * len(data))])
    with pytest.raises(InputError) as e:
        read_image(bad)
    text = str(e.value)
    assert "cut.tif" in text and "truncated" in text and "\n" not in text, text


def test_zero_byte_file(tmp_path):
    path = tmp_path / "zero.tif"
    path.write_bytes(b"")
    with pytest.raises(InputError, match="0 bytes") as e:
        read_image(path)
    assert "zero.tif" in str(e.value)


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="no such file") as e:
        read_image(tmp_path / "nothere.tif")
    assert "nothere.tif" in str(e.value)


def test_folder_is_not_an_image(tmp_path):
    (tmp_path / "d.tif").mkdir()
    with pytest.raises(InputError, match="folder") as e:
        read_image(tmp_path / "d.tif")
    assert "d.tif" in str(e.value)


@pytest.mark.parametrize("name", ["x.jpg", "notes.txt", "noext"])
def test_unsupported_extension(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"abc")
    with pytest.raises(InputError, match="unsupported file type") as e:
        read_image(path)
    assert name in str(e.value)


def test_corrupt_png_names_the_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    with pytest.raises(InputError, match="not a readable PNG") as e:
        read_image(path)
    assert "broken.png" in str(e.value)


def test_png_named_tif_is_refused_clearly(tmp_path):
    path = tmp_path / "fake.tif"
    path.write_bytes(_png(tmp_path / "real.png", _base(22)).read_bytes())
    with pytest.raises(InputError, match="not a readable TIFF") as e:
        read_image(path)
    assert "fake.tif" in str(e.value)


# --------------------------------------------------------------------------- compression, suffixes


@pytest.mark.parametrize("compression", ["lzw", "zlib", "deflate", "zstd", "packbits"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_compressed_tiffs_read_identically(tmp_path, compression, dtype):
    base = (_base(23).astype(dtype) * 3).astype(dtype)
    plain, packed = tmp_path / "plain.tif", tmp_path / "packed.tif"
    tifffile.imwrite(plain, base)
    tifffile.imwrite(packed, base, compression=compression)
    with tifffile.TiffFile(packed) as tif:
        assert tif.pages[0].compression != 1  # really compressed
    a, b = read_image_2d(plain), read_image_2d(packed)
    assert a.dtype == b.dtype == dtype
    np.testing.assert_array_equal(a, base)
    np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("name", ["a.tif", "a.tiff", "a.TIF", "a.TIFF", "a.ome.tif", "a.ome.tiff"])
def test_tiff_suffixes(tmp_path, name):
    base = _base(24).astype(np.uint16)
    tifffile.imwrite(tmp_path / name, base)
    np.testing.assert_array_equal(read_image_2d(tmp_path / name), base)


def test_bigtiff_btf(tmp_path):
    base = _base(25).astype(np.uint16)
    path = tmp_path / "big.btf"
    tifffile.imwrite(path, base, bigtiff=True)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
    np.testing.assert_array_equal(read_image_2d(path), base)


def test_png_upper_case_suffix(tmp_path):
    base = _base(26)
    np.testing.assert_array_equal(read_image_2d(_png(tmp_path / "G.PNG", base)), base)


def test_all_nan_float_image_gets_a_note():
    data = to_plane(np.full(SHAPE, np.nan, np.float32), "YX")
    assert data.image.shape == SHAPE
    assert any("NaN" in n for n in data.notes)


# --------------------------------------------------------------------------- spot tables


def _csv(tmp_path: Path, text: str, name: str = "s.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


YX = np.array([[1.5, 2.25], [3.0, 40.0], [7.0, 0.0]])


def _rows(cols):
    return "".join(",".join(str(v) for v in r) + "\n" for r in zip(*cols))


def test_read_spots_yx(tmp_path):
    out = read_spots(_csv(tmp_path, "y,x\n" + _rows([YX[:, 0], YX[:, 1]])))
    assert out.shape == (3, 2) and out.dtype == np.float64
    np.testing.assert_array_equal(out, YX)


def test_read_spots_xy_order_gives_yx(tmp_path):
    out = read_spots(_csv(tmp_path, "x,y\n" + _rows([YX[:, 1], YX[:, 0]])))
    np.testing.assert_array_equal(out, YX)


def test_read_spots_ignores_extra_columns(tmp_path):
    text = "class,x,score,y\n" + _rows([["a", "b", "c"], YX[:, 1], [0.9, 0.1, 0.5], YX[:, 0]])
    np.testing.assert_array_equal(read_spots(_csv(tmp_path, text)), YX)


def test_read_spots_header_case_and_spaces(tmp_path):
    text = " Y , X \n" + "".join(f" {y} , {x} \n" for y, x in YX)
    np.testing.assert_array_equal(read_spots(_csv(tmp_path, text)), YX)


def test_read_spots_napari_export(tmp_path):
    text = "index,axis-0,axis-1\n" + _rows([[0, 1, 2], YX[:, 0], YX[:, 1]])
    np.testing.assert_array_equal(read_spots(_csv(tmp_path, text)), YX)


def test_read_spots_napari_3d_export_uses_last_two_axes(tmp_path):
    text = "index,axis-0,axis-1,axis-2\n" + _rows([[0, 1, 2], [9, 8, 7], YX[:, 0], YX[:, 1]])
    np.testing.assert_array_equal(read_spots(_csv(tmp_path, text)), YX)


def test_read_spots_without_header_is_refused(tmp_path):
    path = _csv(tmp_path, _rows([YX[:, 0], YX[:, 1]]), name="nohead.csv")
    with pytest.raises(InputError, match="header") as e:
        read_spots(path)
    assert "nohead.csv" in str(e.value)


def test_read_spots_without_coordinate_columns_is_refused(tmp_path):
    with pytest.raises(InputError, match="no coordinates"):
        read_spots(_csv(tmp_path, "a,b\n1,2\n"))


@pytest.mark.parametrize(
    "text,line",
    [
        ("y,x\n1,2\n3,abc\n", 3),
        ("y,x\n1,2\n\n3,abc\n", 4),  # a blank line still counts
        ("y,x\n1,2\n5\n", 3),  # a missing cell
    ],
)
def test_read_spots_non_numeric_line_is_named(tmp_path, text, line):
    path = _csv(tmp_path, text, name="bad.csv")
    with pytest.raises(InputError, match=rf"line {line} is not numeric") as e:
        read_spots(path)
    assert "bad.csv" in str(e.value)


def test_read_spots_header_only_is_empty(tmp_path):
    out = read_spots(_csv(tmp_path, "y,x,score,intensity,background\n"))
    assert out.shape == (0, 2)


def test_read_spots_zero_byte_file(tmp_path):
    with pytest.raises(InputError, match="empty file"):
        read_spots(_csv(tmp_path, ""))


def test_read_spots_missing_file(tmp_path):
    with pytest.raises(InputError, match="cannot read") as e:
        read_spots(tmp_path / "gone.csv")
    assert "gone.csv" in str(e.value)


def test_read_spots_non_finite_is_refused(tmp_path):
    with pytest.raises(InputError, match="non-finite"):
        read_spots(_csv(tmp_path, "y,x\n1,nan\n"))


def test_read_spots_excel_byte_order_mark(tmp_path):
    path = _csv(tmp_path, "\ufeffy,x\r\n" + "".join(f"{y},{x}\r\n" for y, x in YX))
    np.testing.assert_array_equal(read_spots(path), YX)


def test_read_spots_latin1_text_column(tmp_path):
    path = _csv(tmp_path, "y,x,name\n1,2,\xe9t\xe9\n", encoding="latin-1")
    np.testing.assert_array_equal(read_spots(path), [[1.0, 2.0]])


def test_read_spots_binary_file_is_an_input_error(tmp_path):
    path = tmp_path / "img.csv"
    tifffile.imwrite(path, _base(27), photometric="minisblack")
    with pytest.raises(InputError) as e:
        read_spots(path)
    assert "img.csv" in str(e.value)


def test_table_text_round_trip(tmp_path):
    cols = {"y": YX[:, 0], "x": YX[:, 1], "score": np.array([0.5, np.nan, 1.0])}
    text = table_text(cols)
    assert text.splitlines()[0] == "y,x,score"
    assert text.splitlines()[2] == "3.0000,40.0000,"  # NaN is an empty cell
    write_table(tmp_path / "t.csv", cols)
    np.testing.assert_allclose(read_spots(tmp_path / "t.csv"), YX)
    assert table_text({"y": [], "x": []}) == "y,x\n"
    assert table_text({"name": ['a,"b"']}).splitlines()[1] == '"a,""b"""'


# --------------------------------------------------------------------------- atomic writes


def _leftovers(folder: Path, name: str):
    return [p.name for p in folder.iterdir() if p.name != name]


def test_atomic_write_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "out.csv"
    atomic_write_text(target, "y,x\n1,2\n")
    assert target.read_text() == "y,x\n1,2\n"
    assert _leftovers(target.parent, "out.csv") == []
    atomic_write_text(target, "y,x\n")  # overwrite=True is the default
    assert target.read_text() == "y,x\n"
    assert _leftovers(target.parent, "out.csv") == []


def test_atomic_write_refuses_to_overwrite(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    with pytest.raises(FileExistsError, match="out.csv"):
        atomic_write_text(target, "new\n", overwrite=False)
    assert target.read_text() == "old\n"
    assert _leftovers(tmp_path, "out.csv") == []
    with pytest.raises(FileExistsError):
        write_table(target, {"y": [1.0], "x": [2.0]}, overwrite=False)
    assert target.read_text() == "old\n"


@pytest.mark.parametrize("where", ["os.replace", "os.fsync"])
def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch, where):
    target = tmp_path / "out.csv"
    target.write_text("old\n")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # the user pressing Ctrl-C at the worst moment

    monkeypatch.setattr(pio.os, where.split(".")[1], boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new\n" * 1000)
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert _leftovers(tmp_path, "out.csv") == []


def test_interrupted_first_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pio.os, "replace", boom)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(tmp_path / "new.csv", "y,x\n")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_written_files_follow_the_umask_not_private(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.csv", "y,x\n")
        assert stat.S_IMODE((tmp_path / "a.csv").stat().st_mode) == 0o644
        b = tmp_path / "b.csv"
        b.write_text("old\n")
        b.chmod(0o640)
        atomic_write_text(b, "new\n")  # a replaced file keeps its mode
        assert stat.S_IMODE(b.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_saved_model_folder_is_not_private(tiny_model):
    mode = stat.S_IMODE(Path(tiny_model).stat().st_mode)
    assert mode == 0o777 & ~_umask()
    assert sorted(p.name for p in Path(tiny_model).iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    assert not [p for p in Path(tiny_model).parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("order", ["<", ">"])
def test_large_uncompressed_stacks_are_memory_mapped(tmp_path, monkeypatch, order):
    z = _stack(4, 49)
    path = tmp_path / "big.tif"
    tifffile.imwrite(
        path, z.astype(order + "u2"), photometric="minisblack", metadata=ZYX, byteorder=order
    )
    monkeypatch.setattr(pio, "MEMMAP_BYTES", 0)  # every file counts as large
    data = read_image(path)
    np.testing.assert_array_equal(data.image, z)
    assert data.image.dtype.byteorder in "=|"

    def mapped(a):
        while a is not None and not isinstance(a, np.memmap):
            a = a.base
        return a is not None

    # a file in the machine's byte order is read through a map (plane by plane later);
    # the other byte order is read and converted
    assert mapped(data.image) == (np.dtype(order + "u2").isnative)
    compressed = tmp_path / "zip.tif"
    tifffile.imwrite(compressed, z, photometric="minisblack", metadata=ZYX, compression="zlib")
    data = read_image(compressed)
    np.testing.assert_array_equal(data.image, z)
    assert not mapped(data.image)


def test_few_unnamed_pages_are_z_with_a_warning_and_extra_series_are_named(tmp_path, caplog):
    z = _stack(5, 50)
    path = tmp_path / "five.tif"
    tifffile.imwrite(path, z, metadata=None)
    with caplog.at_level(logging.WARNING, logger="piscis.io"):
        data = read_image(path)
    assert data.axes == "ZYX"
    assert "five.tif: 5 unnamed planes" in caplog.text and "--axes CYX" in caplog.text
    caplog.clear()
    two = tmp_path / "two_series.tif"
    with tifffile.TiffWriter(two) as tw:
        tw.write(z[0], metadata={"axes": "YX"})
        tw.write(z[:2, :10, :10], metadata={"axes": "ZYX"})
    with caplog.at_level(logging.WARNING, logger="piscis.io"):
        data = read_image(two)
    np.testing.assert_array_equal(data.image, z[0])
    assert "two_series.tif: 2 image series in the file; only the first" in caplog.text


@pytest.mark.parametrize(
    "how",
    ["semicolon", "semicolon_decimal_comma", "tab", "utf-16", "utf-16-no-bom", "utf-8-bom;"],
)
def test_spot_csvs_in_other_delimiters_and_encodings_are_read(tmp_path, how):
    from piscis.annotate import read_spot_table

    rng = np.random.default_rng(31)
    coords = np.round(rng.uniform(0, 100, (5, 2)), 3)
    delimiter = {"semicolon": ";", "semicolon_decimal_comma": ";", "tab": "\t", "utf-8-bom;": ";"}
    delimiter = delimiter.get(how, ",")
    lines = [delimiter.join(["y", "x", "score"])]
    for y, x in coords:
        cells = [f"{y}", f"{x}", "0.9"]
        if how == "semicolon_decimal_comma":  # a German spreadsheet's export
            cells = [c.replace(".", ",") for c in cells]
        lines.append(delimiter.join(cells))
    text = "\r\n".join(lines) + "\r\n"
    encoding = {"utf-16": "utf-16", "utf-16-no-bom": "utf-16-le", "utf-8-bom;": "utf-8-sig"}
    path = tmp_path / "spots.csv"
    path.write_bytes(text.encode(encoding.get(how, "utf-8")))
    np.testing.assert_allclose(read_spots(path), coords)
    table = read_spot_table(path)  # the napari plugin's reader
    np.testing.assert_allclose(table.coords, coords)
    np.testing.assert_allclose(table.features["score"], 0.9)


def test_a_csv_without_coordinates_says_how_it_was_read(tmp_path):
    path = tmp_path / "spots.csv"
    path.write_text("row|col\n1|2\n")
    with pytest.raises(InputError) as e:
        read_spots(path)
    text = str(e.value)
    assert "columns ['row|col'] hold no coordinates (read as UTF-8, ',' delimiter)" in text
    assert "comma-separated" in text


def test_a_1x1x1_tiff_is_a_1x1_image_not_axes_xyx(tmp_path, caplog):
    tifffile.imwrite(tmp_path / "one.tif", np.ones((1, 1, 1), np.uint16))
    with caplog.at_level(logging.INFO, logger="piscis"):
        data = read_image(tmp_path / "one.tif")
    assert data.image.shape == (1, 1) and data.axes == "YX"
    assert "XYX" not in caplog.text and "axes YX, shape (1, 1)" in caplog.text
