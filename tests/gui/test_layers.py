"""Result -> layer data builders (pure functions, no Qt needed)."""

from __future__ import annotations

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_ssemnet import _layers as L


def _field(z=3, h=64, w=80):
    disp = np.zeros((z, 2, h, w), np.float32)
    for k in range(z):
        disp[k, 0] = k  # dy grows with z
        disp[k, 1] = -2.0 * k
    return disp


def test_names():
    assert L.layer_name("em", L.ROLE_ALIGNED) == "em aligned"
    assert L.layer_name("em", L.ROLE_DISPLACEMENT) == "em displacement"
    assert L.layer_name("em", L.ROLE_NCC_ERROR) == "em NCC error"


def test_section_vectors_positions_and_directions():
    disp = _field()
    vec, mag = L.section_vectors(disp[2], 2, arrows_across=10)
    ys, xs, spacing = L.arrow_grid((64, 80), 10)
    assert spacing == 8 and vec.shape == (ys.size * xs.size, 2, 3)
    assert np.all(vec[:, 0, 0] == 2)  # drawn on their own slice
    assert np.all(vec[:, 1, 0] == 0)  # no z component
    np.testing.assert_allclose(vec[:, 1, 1], 2.0)
    np.testing.assert_allclose(vec[:, 1, 2], -4.0)
    np.testing.assert_allclose(mag, np.hypot(2, 4), rtol=1e-6)
    assert vec[:, 0, 1].max() < 64 and vec[:, 0, 2].max() < 80


def test_vectors_skip_invalid_pixels():
    disp = _field()
    valid = np.zeros((64, 80), bool)
    valid[:32] = True
    vec, _ = L.section_vectors(disp[1], 1, valid=valid, arrows_across=10)
    assert vec.shape[0] > 0 and vec[:, 0, 1].max() < 32


def test_stack_vectors_and_layer_kwargs():
    disp = _field()
    vec, mag = L.stack_vectors(disp, arrows_across=20)
    assert sorted(np.unique(vec[:, 0, 0])) == [0, 1, 2]
    data, kwargs, kind = L.displacement_layer_data(vec, mag, "em", section_shape=(64, 80))
    assert kind == "vectors" and kwargs["name"] == "em displacement"
    assert kwargs["edge_color"] == "magnitude"
    np.testing.assert_array_equal(kwargs["features"]["magnitude"], mag)
    meta = kwargs["metadata"][L.META_KEY]
    assert meta["arrow_scale"] == kwargs["length"]
    assert f"{kwargs['length']:g}x" in meta["arrow_note"]


@pytest.mark.parametrize("p95,spacing,expected", [(4.0, 20, 2.0), (0.5, 20, 20.0),
                                                  (100.0, 20, 0.1), (0.0, 20, 1.0)])
def test_arrow_scale_is_a_round_number(p95, spacing, expected):
    assert L.arrow_scale(np.full(10, p95), spacing) == pytest.approx(expected)


def test_arrow_scale_shows_typical_arrows_without_long_ones_overlapping():
    # most sections move a few px, the far ones much more (as on a real stack)
    mags = np.concatenate([np.full(80, 4.0), np.linspace(10.0, 14.0, 20)])
    scale = L.arrow_scale(mags, 19)
    assert 4.0 * scale >= 0.4 * 19  # the median arrow is well longer than it is wide
    assert np.percentile(mags, 95) * scale <= 1.5 * 19


def test_one_section_that_moved_far_does_not_shrink_the_others_arrows_to_dots():
    # 7 sections a few px, one turned by 30 deg (141 px at its corners): scaled by the pooled
    # 95th percentile, the 7 sections' arrows were drawn under 1 px long
    rng = np.random.default_rng(0)
    zs = np.repeat(np.arange(8), 100)
    mags = np.where(zs == 5, rng.uniform(40, 141, zs.size), rng.uniform(2, 6, zs.size))
    pooled = L.arrow_scale(mags, 16)
    scale = L.arrow_scale(mags, 16, zs)
    typical = np.median(mags[zs != 5])
    assert typical * pooled < 2  # what the fix is for
    assert typical * scale >= 0.2 * 16  # half a cell, less the rounding down (up to 2.5x)
    assert np.percentile(mags[zs != 5], 95) * scale <= 1.5 * 16
    # a stack whose sections move alike is drawn as before
    alike = rng.uniform(2, 6, zs.size)
    assert L.arrow_scale(alike, 16, zs) == L.arrow_scale(alike, 16)
    # and the layer data passes the sections on
    vec = np.zeros((zs.size, 2, 3), np.float32)
    vec[:, 0, 0] = zs
    _, kwargs, _ = L.displacement_layer_data(vec, mags, "em", section_shape=(320, 320))
    assert kwargs["length"] == scale


def test_aligned_and_error_layers():
    aligned = np.random.default_rng(0).random((3, 40, 40)).astype(np.float32)
    data, kw, kind = L.aligned_layer_data(aligned, "em", contrast_limits=(0, 255),
                                          placement={"scale": [2, 1, 1]})
    assert kind == "image" and kw["contrast_limits"] == [0.0, 255.0] and kw["scale"] == [2, 1, 1]
    # degenerate source limits -> computed from the data
    _, kw, _ = L.aligned_layer_data(aligned, "em", contrast_limits=(5, 5))
    assert 0 <= kw["contrast_limits"][0] < kw["contrast_limits"][1] <= 1
    _, kw, kind = L.ncc_error_layer_data(np.zeros((3, 40, 40)), "em")
    assert kind == "image" and kw["colormap"] == "magma" and kw["blending"] == "additive"


def test_metadata_is_json_friendly():
    import json

    meta = L.result_metadata(L.ROLE_ALIGNED, "em", ncc_before=[0.1, np.nan],
                             ncc_after=np.array([0.3, 0.4]), flags=["", "blank"])
    json.dumps(meta)
    assert meta[L.META_KEY]["ncc_before"] == [0.1, None]


def test_local_ncc_error_low_for_identical_neighbours():
    rng = np.random.default_rng(1)
    img = rng.random((64, 64)).astype(np.float32)
    stack = np.stack([img, img, rng.random((64, 64)).astype(np.float32)])
    err = L.local_ncc_error(stack, None)
    assert err.shape == stack.shape and err.dtype == np.float32
    assert err[1].mean() < 0.05 < err[2].mean()


def test_upsert_updates_only_plugin_layers():
    viewer = ViewerModel()
    user = viewer.add_image(np.zeros((2, 8, 8)), name="em aligned")
    data = L.aligned_layer_data(np.ones((2, 8, 8), np.float32), "em")
    ours = L.upsert_layer(viewer, data, role=L.ROLE_ALIGNED, source_name="em")
    assert ours is not user and np.all(user.data == 0)
    data = L.aligned_layer_data(np.full((2, 8, 8), 2, np.float32), "em")
    again = L.upsert_layer(viewer, data, role=L.ROLE_ALIGNED, source_name="em")
    assert again is ours and np.all(ours.data == 2) and len(viewer.layers) == 2
    vec, mag = L.stack_vectors(_field(2, 16, 16))
    v1 = L.upsert_layer(viewer, L.displacement_layer_data(vec, mag, "em", section_shape=(16, 16)),
                        role=L.ROLE_DISPLACEMENT, source_name="em")
    vec2, mag2 = vec[:5], mag[:5] * 0 + 7
    v2 = L.upsert_layer(viewer, L.displacement_layer_data(vec2, mag2, "em",
                                                          section_shape=(16, 16)),
                        role=L.ROLE_DISPLACEMENT, source_name="em")
    assert v2 is v1 and v2.data.shape[0] == 5
    np.testing.assert_array_equal(v2.features["magnitude"], 7)
