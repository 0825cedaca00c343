"""The synthetic generator: reproducible, exact positions, realistic ranges."""

import numpy as np

from piscis.synth import SynthConfig, generate, noise_image, render_spots, spot_image


def test_same_seed_same_image():
    a = generate(np.random.default_rng(7))
    b = generate(np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_images_cover_8_and_16_bit_and_empty_fields():
    rng = np.random.default_rng(0)
    dtypes, counts = set(), []
    for _ in range(40):
        img, coords = generate(rng, SynthConfig(shape=(64, 64)))
        dtypes.add(img.dtype)
        counts.append(len(coords))
        assert coords.shape[1] == 2
        assert np.all(coords >= -0.5) and np.all(coords < 63.5)
    assert dtypes == {np.dtype(np.uint8), np.dtype(np.uint16)}
    assert min(counts) == 0 and max(counts) > 5


def test_rendered_spot_peaks_at_its_subpixel_centre():
    img = render_spots((21, 21), np.array([[10.3, 9.8]]), np.array([1.2]), np.array([100.0]))
    yy, xx = np.mgrid[:21, :21]
    cy, cx = (img * yy).sum() / img.sum(), (img * xx).sum() / img.sum()
    assert abs(cy - 10.3) < 0.01 and abs(cx - 9.8) < 0.01
    assert img.max() < 100.0 and img.max() > 80.0


def test_spot_image_and_noise_image_follow_the_cases_conventions():
    rng = np.random.default_rng(1)
    img, coords = spot_image(rng, (128, 128), n_spots=10, min_sep=6, margin=4)
    assert img.dtype == np.uint16 and len(coords) == 10
    d = np.hypot(*(coords[:, None] - coords[None]).transpose(2, 0, 1))
    assert d[np.triu_indices(10, 1)].min() >= 6
    noise = noise_image(rng, (256, 256))
    assert abs(noise.mean() - 100) < 1 and abs(noise.std() - np.sqrt(125)) < 0.5


def test_close_pairs_and_crowded_patches_stay_resolvable():
    """The training options for crowded spots: pairs 2.2 sigma-5 px apart and packed
    patches, every neighbour at least 2.2 sigma away (a dip between them)."""
    from piscis.synth import _dense_patch, _pairs, generate_spots

    rng = np.random.default_rng(5)
    for base_sigma in (0.7, 1.0, 1.5, 2.0):
        coords, sigma = _pairs(rng, (96, 96), base_sigma)
        sep = np.hypot(*(coords[0::2] - coords[1::2]).T)
        assert len(sep) >= 2 and np.all(sep <= 5.0 + 1e-9)
        assert np.all(sep >= np.maximum(2.2 * sigma[0::2], 2.0) - 1e-9)
        coords, sigma = _dense_patch(rng, (96, 96), base_sigma)
        d = np.hypot(*(coords[:, None] - coords[None]).transpose(2, 0, 1))
        np.fill_diagonal(d, np.inf)
        assert len(coords) >= 5 and np.ptp(coords, axis=0).max() <= 32
        assert d.min() >= max(2.2 * min(base_sigma, 1.4), 2.2) - 1e-9
    # Off by default: the generator draws the same images as without the options.
    a = generate_spots(np.random.default_rng(9), SynthConfig(shape=(64, 64)))
    b = generate_spots(
        np.random.default_rng(9), SynthConfig(shape=(64, 64), pair_fraction=0, dense_fraction=0)
    )
    np.testing.assert_array_equal(a[0], b[0])
    c = generate_spots(np.random.default_rng(9), SynthConfig(shape=(64, 64), pair_fraction=1))
    assert len(c[1]["coords"]) > len(a[1]["coords"])
