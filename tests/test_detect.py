"""Detection: normalisation, tiling, decoding, intensities, and the shipped
model on simple synthetic images (the CASES.md conventions)."""

import json

import numpy as np
import pytest
import torch

from piscis.detect import decode, detect, estimate_normalization, predict_maps, spots_from_maps
from piscis.io import MODELS_DIR, LoadedModel, load_model
from piscis.metrics import match
from piscis.model import SpotNet, fuse_batchnorm
from piscis.synth import noise_image, spot_image

HAS_DEFAULT = (MODELS_DIR / "default" / "model.safetensors").exists()
needs_default = pytest.mark.skipif(not HAS_DEFAULT, reason="no shipped default model")


@pytest.fixture(scope="module")
def default():
    return load_model("default")


@pytest.fixture(scope="module")
def random_model():
    """An untrained network with a low threshold: plenty of spots, any weights."""
    torch.manual_seed(0)
    net = fuse_batchnorm(SpotNet((4, 8, 16)).eval())
    with torch.no_grad():
        net.head.bias[0] = 0.0
    return LoadedModel(net.to(memory_format=torch.channels_last), {"threshold": 0.6, "name": "r"})


def _recall(pred, true, cutoff=1.5):
    return len(match(pred, true, cutoff)[0]) / max(len(true), 1)


def test_noise_estimate_is_right_for_gaussian_noise():
    rng = np.random.default_rng(0)
    img = 1000 + rng.normal(0, 7.0, (512, 512))
    norm = estimate_normalization(img)
    assert norm.background == pytest.approx(1000, abs=1)
    assert norm.noise == pytest.approx(7.0, rel=0.05)


def test_flat_and_clipped_images_do_not_blow_up_the_noise():
    flat = np.full((64, 64), 100, np.uint16)
    assert estimate_normalization(flat).noise >= 0.5
    zeros = np.zeros((64, 64), np.uint16)
    assert np.all(estimate_normalization(zeros).apply(zeros) == 0)


def test_tiled_and_untiled_maps_and_spots_agree(random_model):
    rng = np.random.default_rng(3)
    img, _ = spot_image(rng, (520, 700), n_spots=150)
    whole, _ = predict_maps(img, random_model, tile_size=2048)
    tiled, _ = predict_maps(img, random_model, tile_size=128)
    assert np.abs(whole.logit - tiled.logit).max() < 1e-3
    thr = float(np.quantile(whole.prob, 0.999))
    a = detect(img, random_model, threshold=thr, tile_size=2048)
    b = detect(img, random_model, threshold=thr, tile_size=128)
    assert len(a) == len(b) > 50
    np.testing.assert_allclose(a.coords, b.coords, atol=1e-3)


def test_decoding_cached_maps_equals_detect(random_model):
    rng = np.random.default_rng(4)
    img, _ = spot_image(rng, (256, 256), n_spots=30)
    maps, _ = predict_maps(img, random_model)
    lo, hi = (float(np.quantile(maps.prob, q)) for q in (0.99, 0.999))
    direct = detect(img, random_model, threshold=lo)
    cached = spots_from_maps(maps, img, lo)
    assert len(cached) > 10
    np.testing.assert_allclose(direct.coords, cached.coords)
    higher = spots_from_maps(maps, img, hi)
    assert 0 < len(higher) < len(cached)
    # Every spot above the higher threshold is also a spot at the lower one.
    assert len(match(higher.coords, cached.coords, 1e-6)[0]) == len(higher)


def test_decode_breaks_ties_on_plateaus():
    logit = np.full((9, 9), -10.0, np.float32)
    logit[4, 4] = logit[4, 5] = 5.0  # two equal maxima side by side
    coords, scores, _ = decode(logit, np.zeros((2, 9, 9), np.float32), 0.5)
    assert len(coords) == 1


def test_rejects_non_2d_and_odd_dtypes(random_model):
    with pytest.raises(ValueError, match="2D"):
        detect(np.zeros((2, 3, 8, 8)), random_model)
    with pytest.raises(TypeError, match="bool"):
        detect(np.zeros((8, 8), bool), random_model)
    with pytest.raises(ValueError, match="threshold"):
        detect(np.zeros((8, 8)), random_model, threshold=1.5)


def test_intensity_is_background_subtracted_disk_sum():
    from piscis.detect import spot_intensities
    from piscis.synth import render_spots

    img = 100.0 + render_spots(
        (41, 41), np.array([[20.0, 20.0]]), np.array([1.0]), np.array([500.0])
    )
    inten, bg = spot_intensities(img, np.array([[20.0, 20.0]]), radius=2.0)
    assert bg[0] == pytest.approx(100.0, abs=0.5)
    disk = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if dy * dy + dx * dx <= 4]
    expected = sum(img[20 + dy, 20 + dx] - bg[0] for dy, dx in disk)
    assert inten[0] == pytest.approx(expected, rel=1e-6)


@needs_default
@pytest.mark.parametrize("kind", ["flat", "noise", "zeros"])
def test_blank_images_give_no_spots(default, kind):
    rng = np.random.default_rng(0)
    img = {
        "flat": np.full((512, 512), 100, np.uint16),
        "noise": noise_image(rng),
        "zeros": np.zeros((512, 512), np.uint16),
    }[kind]
    assert len(detect(img, default)) == 0


@needs_default
def test_finds_spots_and_edge_spots(default):
    rng = np.random.default_rng(1)
    edge = np.array([[1.0, 50], [254.5, 100], [128, 0.0], [128, 255.0], [0.0, 0.0], [255, 255]])
    _, inner = spot_image(rng, (256, 256), n_spots=14, margin=10)
    coords = np.concatenate([edge, inner])
    img, truth = spot_image(rng, (256, 256), coords=coords)
    spots = detect(img, default)
    assert abs(len(spots) - 20) <= 1
    assert _recall(spots.coords, truth) >= 0.95
    pi, ti = match(spots.coords, truth, 1.5)
    assert set(range(6)) <= set(ti.tolist()), "an edge spot was missed"
    assert np.all(spots.background > 80) and np.all(spots.intensity > 0)


@needs_default
def test_integer_dtypes_agree_and_floats_are_close(default):
    rng = np.random.default_rng(2)
    img, truth = spot_image(
        rng, (256, 256), n_spots=25, amp=150, background=20, noise_sd=3, dtype=np.uint8
    )
    ref = detect(img.astype(np.uint16), default).coords
    assert _recall(ref, truth) > 0.9
    for dt in (np.uint8, np.int16, np.int32, np.int64, ">u2", "<i4"):
        np.testing.assert_allclose(detect(img.astype(dt), default).coords, ref, atol=1e-4)
    for dt in (np.float16, np.float32, np.float64):
        got = detect(img.astype(dt), default).coords
        assert len(got) == len(ref)
        assert len(match(got, ref, 0.5)[0]) == len(ref)


@needs_default
def test_nan_pixels_are_ignored(default):
    rng = np.random.default_rng(5)
    img, truth = spot_image(rng, (256, 256), n_spots=20, amp=300, dtype=np.float32)
    img[0] = np.nan
    img[100:116, 100:116] = np.nan
    img[50, 200], img[200, 50] = np.inf, -np.inf
    spots = detect(img, default)
    assert np.all(np.isfinite(spots.coords))
    # Spots whose centre pixel is finite are found; nothing appears elsewhere
    # (no spurious spots at the edges of the NaN block).
    pix = np.round(truth).astype(int)
    visible = np.isfinite(img[pix[:, 0], pix[:, 1]])
    assert _recall(spots.coords, truth[visible]) >= 0.95
    pi, _ = match(spots.coords, truth, 1.5)
    assert len(spots) - len(pi) <= 1
    assert len(detect(np.full((64, 64), np.nan, np.float32), default)) == 0


@needs_default
def test_scale_returns_coordinates_in_the_input_frame(default):
    rng = np.random.default_rng(6)
    img, truth = spot_image(rng, (400, 400), n_spots=25, sigma=2.2, amp=400, min_sep=12)
    spots = detect(img, default, scale=0.5)
    assert _recall(spots.coords, truth, 1.5) >= 0.9
    pi, ti = match(spots.coords, truth, 1.5)
    assert np.abs(spots.coords[pi] - truth[ti]).mean() < 0.5


def test_numpy_vote_pool_matches_the_training_one():
    from piscis.detect import vote_pool_np
    from piscis.loss import vote_pool

    rng = np.random.default_rng(9)
    logit = rng.normal(0, 3, (40, 50)).astype(np.float32)
    disp = rng.normal(0, 1.2, (2, 40, 50)).astype(np.float32)
    ref = vote_pool(torch.from_numpy(logit)[None], torch.from_numpy(disp)[None], fill=-np.inf)[
        0
    ].numpy()
    np.testing.assert_array_equal(vote_pool_np(logit, disp), ref)


def test_fused_inference_network_equals_the_training_one():
    torch.manual_seed(1)
    net = SpotNet((4, 8, 16)).eval()
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 2)
            mod.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 1, 32, 48)
    with torch.no_grad():
        ref = net(x)
        fused = fuse_batchnorm(net)(x)
    assert torch.allclose(ref, fused, atol=1e-4)


class _Planes:
    """A lazy volume: shape, dtype and vol[z] only; records what was read."""

    def __init__(self, vol):
        self._vol, self.shape, self.dtype, self.reads = vol, vol.shape, vol.dtype, []

    def __getitem__(self, z):
        assert isinstance(z, (int, np.integer)), f"read {z!r}, not one plane"
        self.reads.append(int(z))
        return self._vol[z]


def _volume(seed=11, shape=(12, 96, 96), n=12):
    from piscis.synth import spot_volume

    return spot_volume(np.random.default_rng(seed), shape, n, sigma=(1.5, 1.0), amp=400)


def test_volume_streams_plane_by_plane_and_ignores_tiles_and_z_blocks(default):
    vol, true = _volume()
    ref = detect(vol, default)
    assert ref.coords.shape == (12, 3)
    lazy = _Planes(vol)
    np.testing.assert_array_equal(detect(lazy, default).coords, ref.coords)
    assert set(lazy.reads) == set(range(12))
    np.testing.assert_allclose(detect(vol, default, tile_size=32).coords, ref.coords, atol=1e-4)
    np.testing.assert_array_equal(detect(vol, default, z_block=4).coords, ref.coords)
    parts = [detect(vol, default, z_range=r).coords for r in ((0, 5), (5, 12))]
    np.testing.assert_array_equal(np.concatenate(parts), ref.coords)
    cols = ref.columns()
    assert list(cols)[:6] == ["z", "y", "x", "score", "intensity", "background"]


def test_volume_candidates_match_detect_at_every_threshold(default):
    from piscis.detect3d import VolumeCandidates

    vol, _ = _volume(12)
    cands = VolumeCandidates(vol, default)
    for t in (0.5, 0.9, 0.99):
        np.testing.assert_array_equal(cands.at(t).coords, detect(vol, default, threshold=t).coords)
    with pytest.raises(ValueError, match="below the cached minimum"):
        cands.at(0.01)


def test_an_asymmetric_axial_psf_is_one_spot_not_a_z_pair(default):
    """Aberrated PSFs are longer on one side in z: no z split for them."""
    from piscis.synth import random_positions, render_spots

    rng = np.random.default_rng(13)
    shape = (16, 96, 96)
    true = random_positions(rng, shape, 12, min_sep=10, margin=5)
    zz = np.arange(shape[0])[:, None, None]
    vol = np.full(shape, 100.0) + rng.normal(0, 5, shape)
    for c in true:
        dz = zz - c[0]
        profile = np.exp(-(dz**2) / (2 * np.where(dz < 0, 1.2, 2.0) ** 2))
        vol += 3000 * profile * render_spots(shape[1:], c[None, 1:], np.ones(1), np.ones(1))[None]
    spots = detect(vol.astype(np.float32), default)
    assert len(spots) == 12 and not spots.columns()["z_split"].any()


def _spot_contrast_by_definition(band, ok):
    """The 99.9th percentile over spot-sized objects, spelt out: every round grows each
    blob of more than BLOB_AREA pixels by 3 px (in-plane) and sorts all that is left."""
    from scipy import ndimage as ndi

    from piscis.detect import BLOB_AREA

    plane = np.zeros((3,) * band.ndim, bool)
    plane[(1,) * (band.ndim - 2)] = True
    structure = plane & ndi.generate_binary_structure(band.ndim, band.ndim)
    ok = ok.copy()
    level = float(np.quantile(band[ok], 0.999))
    for _ in range(8):
        lab, n = ndi.label(band >= 0.5 * level, structure=structure)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        big = [i for i in range(1, n + 1) if sizes[i] > BLOB_AREA]
        if not big:
            break
        for i in big:
            ok &= ~ndi.binary_dilation(lab == i, structure=structure, iterations=3)
        level = float(np.quantile(band[ok], 0.999))
    return level


@pytest.mark.parametrize("blocks", [False, True])
def test_spot_contrast_equals_its_definition(blocks):
    from scipy import ndimage as ndi

    from piscis.detect import _spot_contrast

    rng = np.random.default_rng(5)
    img = rng.normal(0, 1, (384, 384))
    yy, xx = np.mgrid[:384, :384]
    for y, x in rng.uniform(10, 374, (300, 2)):  # spots
        img += 8 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 2.0)
    for y, x, r in [(60, 60, 5), (200, 300, 7), (330, 90, 4), (150, 150, 6)]:  # bright blobs
        img += 300 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * r * r))
    if blocks:  # a stack of 64x64 blocks, as a large image's sample
        img = img.reshape(6, 64, 6, 64).transpose(0, 2, 1, 3).reshape(36, 64, 64)
        band = ndi.gaussian_filter(img, (0, 1, 1)) - ndi.gaussian_filter(img, (0, 3, 3))
    else:
        band = ndi.gaussian_filter(img, 1) - ndi.gaussian_filter(img, 3)
    ok = np.ones(band.shape, bool)
    ok[..., :2] = False
    fast, ref = _spot_contrast(band, ok), _spot_contrast_by_definition(band, ok)
    plain = float(np.quantile(band[ok], 0.999))
    assert fast == pytest.approx(ref, rel=1e-12)
    assert ref < 0.5 * plain  # the blobs were taken out: a case that tests something


def test_tiny_tile_sizes_are_raised_to_a_useful_core():
    """Tile size 8 must not run the network on hundreds of times the image."""
    from piscis.detect import tile_cores
    from piscis.model import receptive_margin

    net = SpotNet((8, 16, 32, 64))
    margin = receptive_margin(net.channels)
    for size in (1, 8, 100):
        ys, xs, cy, cx, m = tile_cores((1000, 1200), net, size)
        assert m == margin and cy >= 4 * margin and cx >= 4 * margin
        assert len(ys) * len(xs) <= 25
    assert tile_cores((1000, 1200), net, 512)[2:4] == (512, 512)  # larger ones as given
    assert tile_cores((100, 1200), net, 512)[2] == 104  # never beyond the image (rounded)


def _lopsided(views: int) -> LoadedModel:
    """A random network with random displacements: nothing makes it symmetric."""
    torch.manual_seed(1)
    net = SpotNet((4, 8, 16))
    with torch.no_grad():
        net.head.weight.normal_(0.0, 0.5)
        net.head.bias.zero_()
    net = fuse_batchnorm(net.eval()).to(memory_format=torch.channels_last)
    net.views = views
    return LoadedModel(net, {"threshold": 0.6, "views": views})


def test_two_views_average_the_pass_on_the_transposed_image():
    """views 2: the maps are the mean of the image's and of its transpose's, the latter
    transposed back with dy and dx swapped; tiles still agree with the whole image."""
    rng = np.random.default_rng(5)
    img, _ = spot_image(rng, (200, 264), n_spots=40)
    one, two = _lopsided(1), _lopsided(2)
    norm = estimate_normalization(img)
    a, _ = predict_maps(img, one, norm=norm)
    t, _ = predict_maps(np.ascontiguousarray(img.T), one, norm=norm)
    both, _ = predict_maps(img, two, norm=norm)
    np.testing.assert_allclose(both.logit, 0.5 * (a.logit + t.logit.T), atol=1e-5)
    np.testing.assert_allclose(both.disp[0], 0.5 * (a.disp[0] + t.disp[1].T), atol=1e-5)
    np.testing.assert_allclose(both.disp[1], 0.5 * (a.disp[1] + t.disp[0].T), atol=1e-5)
    # The second view does change the maps.
    assert np.abs(both.logit - a.logit).max() > 0.1 * np.abs(a.logit).max()
    assert np.abs(both.disp - a.disp).max() > 0.1 * np.abs(a.disp).max()
    tiled, _ = predict_maps(img, two, norm=norm, tile_size=64)
    assert np.abs(tiled.logit - both.logit).max() < 1e-3 * np.abs(a.logit).max()
    assert np.abs(tiled.disp - both.disp).max() < 1e-3 * np.abs(a.disp).max()


@pytest.mark.parametrize("views", [0, 3, "2", True, None])
def test_a_model_config_with_other_views_is_refused(tmp_path, views):
    from safetensors.torch import save_file

    from piscis.io import InputError

    net = SpotNet((4, 8))
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(net.state_dict(), str(folder / "model.safetensors"))
    config = {"architecture": {"channels": [4, 8]}, "views": views}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"config.json 'views' is .*expected 1 or 2"):
        load_model(folder)
    (folder / "config.json").write_text('{"architecture": {"channels": [4, 8]}}')
    assert load_model(folder).net.views == 1  # older model folders: one view
