"""core.metrics: NCC, normalisation and blank detection, local error maps."""

from __future__ import annotations

import numpy as np
import pytest
from emtools import em

from napari_ssemnet.core import metrics


def test_ncc_identical_negated_masked_and_flat():
    a = em(slice(0, 1), 128)[0].astype(np.float32)
    assert abs(metrics.ncc(a, a) - 1) < 1e-9
    assert abs(metrics.ncc(a, -a) + 1) < 1e-9
    assert abs(metrics.ncc(a, 3 * a + 7) - 1) < 1e-9  # gain and offset do not matter
    b = a.copy()
    b[:, 64:] = np.random.default_rng(0).random((128, 64))
    mask = np.zeros(a.shape, bool)
    mask[:, :64] = True
    assert abs(metrics.ncc(a, b, mask) - 1) < 1e-9 and metrics.ncc(a, b) < 0.9
    assert np.isnan(metrics.ncc(a, np.ones_like(a)))
    assert np.isnan(metrics.ncc(a, a, np.zeros(a.shape, bool)))


def test_real_neighbours_correlate_weakly():
    s = em(slice(0, 2), 256).astype(np.float32)
    assert 0.1 < metrics.ncc(s[0], s[1]) < 0.6  # real sections differ (about 50 nm apart)


def test_normalise_stack_flags_constant_and_noise_sections():
    real = em(slice(0, 2), 128)
    noise = np.random.default_rng(1).integers(0, 256, (128, 128)).astype(np.uint8)
    stack = np.stack([real[0], np.full((128, 128), 90, np.uint8), noise, real[1]])
    before = stack.copy()
    norm, blank = metrics.normalise_stack(stack)
    np.testing.assert_array_equal(stack, before)  # input untouched
    assert blank.tolist() == [False, True, True, False]
    assert norm.dtype == np.float32 and norm.shape == stack.shape
    assert (norm[1] == 0).all() and (norm[2] == 0).all()
    for z in (0, 3):
        assert abs(norm[z].mean()) < 1e-3 and abs(norm[z].std() - 1) < 1e-2
        assert np.abs(norm[z]).max() <= 4.0


def test_dark_section_is_not_blank():
    real = em(slice(0, 2), 128)
    dark = (real[1] // 8).astype(np.uint8)  # 8x darker, still structured
    _norm, blank = metrics.normalise_stack(np.stack([real[0], dark]))
    assert not blank.any()


def test_hot_pixels_do_not_make_a_section_blank():
    # 12-bit data in uint16 with a few saturated pixels, and one huge float value
    real = em(slice(0, 2), 128).astype(np.uint16) * 16
    hot = real.copy()
    rng = np.random.default_rng(0)
    hot[1][rng.integers(0, 128, 20), rng.integers(0, 128, 20)] = 65535
    spike = real.astype(np.float32)
    spike[0, 5, 5] = 1e30
    for stack in (hot, spike):
        _norm, blank = metrics.normalise_stack(stack)
        assert not blank.any()
    # a flat noisy section with the same hot pixels is still blank
    flat = np.full((128, 128), 2000, np.float32) + rng.normal(0, 20, (128, 128))
    flat[rng.integers(0, 128, 20), rng.integers(0, 128, 20)] = 65535
    assert metrics.normalise_stack(np.stack([real[0], flat]))[1].tolist() == [False, True]


def test_local_ncc_error_shape_and_range():
    s = em(slice(0, 3), 96).astype(np.float32)
    stack = np.stack([s[0], s[0], s[1]])
    err = metrics.local_ncc_error(stack, sigma=4.0)
    assert err.shape == stack.shape and err.dtype == np.float32
    assert err.min() >= 0.0 and err.max() <= 2.0
    assert err[1].mean() < 1e-3  # section 1 equals section 0
    assert err[2].mean() > 0.3
    valid = np.ones(stack.shape, bool)
    valid[2, :10] = False
    err_v = metrics.local_ncc_error(stack, valid, sigma=4.0)
    assert (err_v[2, :10] == 0).all()
    blank_skip = metrics.local_ncc_error(stack, sigma=4.0, blank=np.array([False, True, False]))
    assert (blank_skip[1] == 0).all()


def test_adjacent_ncc_skips_blank_sections():
    a = em(slice(0, 1), 96)[0].astype(np.float32)
    noise = np.random.default_rng(2).random(a.shape).astype(np.float32)
    stack = np.stack([a, noise, a, a])
    out = metrics.adjacent_ncc(stack, None, np.array([True, False, True, True]))
    assert out.shape == (4,) and np.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2, 3]], 1.0, atol=1e-9)  # 0 pairs with 2 across 1
    plain = metrics.adjacent_ncc(stack, None)
    assert plain[0] < 0.5


def test_field_stats_of_constant_field():
    disp = np.zeros((2, 2, 8, 8), np.float32)
    disp[:, 0], disp[:, 1] = 3.0, 4.0
    stats = metrics.field_stats(disp)
    assert stats["median"] == 5.0 and stats["max"] == 5.0


def test_padding_and_a_missing_piece_are_fill_a_saturated_spot_is_not():
    sec = em(0, 128).copy()  # uint8 EM
    assert metrics.fill_mask(sec) is None
    padded = sec.copy()
    padded[:, :40] = 0  # padding on the left
    padded[100:, 100:] = 255  # a missing corner, bright
    padded[50:70, 70:90] = 255  # a saturated spot inside the tissue (2.4 %): kept
    fill = metrics.fill_mask(padded)
    assert fill[:, :40].all() and fill[100:, 100:].all()
    assert not fill[:, 40 + metrics.FILL_MARGIN + 1:100 - metrics.FILL_MARGIN - 1].any()
    # zero padding of signed or zero-centred data, which is not the lowest value there
    signed = sec.astype(np.int16) - 128
    signed[:, :40] = 0
    assert metrics.fill_mask(signed)[:, :40].all()
    # normalised on the tissue only: fill is the tissue's mean (0), the tissue as before
    norm, blank, masks = metrics.normalise_stack(np.stack([padded, sec]), fill=True)
    assert not blank.any() and (masks[0] == fill).all() and not masks[1].any()
    assert (norm[0][fill] == 0).all()
    t = norm[0][~fill]
    assert abs(t.mean()) < 1e-4 and abs(t.std() - 1) < 1e-3
    # a stack without fill: no masks, and the same normalisation with or without fill=True
    plain, _, none = metrics.normalise_stack(np.stack([sec, sec]), fill=True)
    assert none is None
    np.testing.assert_array_equal(plain, metrics.normalise_stack(np.stack([sec, sec]))[0])
    # a section that is nearly all padding is blank
    mostly = np.zeros_like(sec)
    mostly[60:64, 60:64] = sec[60:64, 60:64]
    assert metrics.normalise_stack(np.stack([mostly, sec]))[1].tolist() == [True, False]


def test_a_large_offset_in_float64_keeps_its_grey_levels():
    # cast to float32 first, 1e9 + (0..255) kept 5 grey levels and the stack aligned on them
    stack = em(slice(0, 3), 96).astype(np.float64)
    plain, _ = metrics.normalise_stack(stack)
    offset, _ = metrics.normalise_stack(stack + 1e9)
    np.testing.assert_allclose(offset, plain, atol=1e-5)


def test_ncc_takes_a_0_1_mask_as_a_mask():
    from napari_ssemnet.core.errors import InputError

    rng = np.random.default_rng(0)
    a, b = rng.random((32, 32)), rng.random((32, 32))
    mask = np.zeros((32, 32), bool)
    mask[4:20, 4:20] = True
    # uint8 0/1 was used as row indices: 0.526 on data that share nothing
    assert metrics.ncc(a, b, mask.astype(np.uint8)) == metrics.ncc(a, b, mask)
    with pytest.raises(InputError, match="of one shape"):
        metrics.ncc(a, b[:16])


def test_local_ncc_and_field_stats_refuse_what_they_cannot_measure():
    from napari_ssemnet.core.errors import InputError

    a = np.random.default_rng(0).random((32, 32))
    with pytest.raises(InputError, match="sigma above 0"):  # an all-NaN map
        metrics.local_ncc(a, a, sigma=0)
    with pytest.raises(InputError, match="one shape"):
        metrics.local_ncc(a, a[:16])
    disp = np.zeros((3, 2, 32, 32), np.float32)
    with pytest.raises(InputError, match=r"\(Z, 2, H, W\)"):  # one section's field: nonsense
        metrics.field_stats(disp[0])
    with pytest.raises(InputError, match="valid has shape"):
        metrics.field_stats(disp, np.ones((32, 32), bool))
    assert metrics.field_stats(disp, np.ones((3, 32, 32), np.uint8))["max"] == 0.0


def _local_ncc_by_definition(a: np.ndarray, b: np.ndarray, sigma: float) -> np.ndarray:
    """The local NCC in float64 with the separable numpy blur (the former implementation)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    blur = metrics._gauss_blur
    ma, mb = blur(a, sigma), blur(b, sigma)
    va, vb, cov = blur(a * a, sigma) - ma * ma, blur(b * b, sigma) - mb * mb, \
        blur(a * b, sigma) - ma * mb
    floor = 1e-4 * max(float(np.mean(np.maximum(va, 0))), float(np.mean(np.maximum(vb, 0))))
    return np.clip(cov / np.sqrt(np.maximum(va, floor) * np.maximum(vb, floor)), -1, 1)


def test_local_ncc_matches_its_definition_on_real_em_whatever_the_intensity_scale():
    a, b = em(slice(0, 2), 200)
    want = _local_ncc_by_definition(a, b, 8.0)
    got = metrics.local_ncc(a, b, 8.0)  # the FFT path (the image is wider than 3 sigma)
    assert got.dtype == np.float32 and got.shape == a.shape
    np.testing.assert_allclose(got, want, atol=1e-4)
    # uint16-like values with an offset: float32 moments of raw values would cancel badly
    np.testing.assert_allclose(metrics.local_ncc(a * 900.0 + 30000.0, b, 8.0), want, atol=1e-4)
    # an image narrower than the window's reach takes the numpy path
    small_a, small_b = a[:20, :20], b[:20, :20]
    np.testing.assert_allclose(metrics.local_ncc(small_a, small_b, 8.0),
                               _local_ncc_by_definition(small_a, small_b, 8.0), atol=1e-6)
