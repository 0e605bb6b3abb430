"""core.warp: sampling, coordinates, control grids and composition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from emtools import smooth_image

from napari_ssemnet.core import warp


def _bilinear(img: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Reference bilinear interpolation in numpy (points must be inside)."""
    y0 = np.clip(np.floor(y).astype(int), 0, img.shape[0] - 2)
    x0 = np.clip(np.floor(x).astype(int), 0, img.shape[1] - 2)
    fy, fx = y - y0, x - x0
    return ((1 - fy) * (1 - fx) * img[y0, x0] + (1 - fy) * fx * img[y0, x0 + 1]
            + fy * (1 - fx) * img[y0 + 1, x0] + fy * fx * img[y0 + 1, x0 + 1])


def test_identity_displacement_returns_image():
    img = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    out, ok = warp.warp_image(torch.from_numpy(img), torch.zeros(2, 40, 50))
    np.testing.assert_allclose(out.numpy(), img, atol=1e-5)
    assert ok.all()
    # bit for bit on large values too (the reference section of a 16-bit stack)
    big = (np.random.default_rng(1).integers(0, 65535, (40, 50)) * 100).astype(np.float32)
    src = torch.from_numpy(big)
    out, ok = warp.warp_image(src, torch.zeros(2, 40, 50))
    np.testing.assert_array_equal(out.numpy(), big)
    assert ok.all() and out.data_ptr() != src.data_ptr()  # a copy, never the input


def test_integer_shift_matches_indexing():
    img = np.random.default_rng(1).random((40, 50)).astype(np.float32)
    disp = torch.zeros(2, 40, 50)
    disp[0], disp[1] = 3.0, -2.0  # out(y, x) = img(y + 3, x - 2)
    out, ok = warp.warp_image(torch.from_numpy(img), disp)
    out, ok = out.numpy(), ok.numpy()
    np.testing.assert_allclose(out[:-3, 2:], img[3:, :-2], atol=1e-5)
    assert ok[:-3, 2:].all() and not ok[-3:].any() and not ok[:, :2].any()
    # 0 outside (up to float leakage of grid_sample's zero padding: ~1e-7)
    assert np.abs(out[~ok]).max() < 1e-5


def test_rotation_by_90_degrees_is_exact():
    n = 33
    img = np.random.default_rng(2).random((n, n)).astype(np.float32)
    pts = warp.level_points(n, n)
    c = (n - 1) / 2.0
    # backward map p -> R(90 deg)(p - c) + c: source y' = c - (x - c), x' = y
    src = torch.stack([2 * c - pts[..., 1], pts[..., 0]], dim=-1)
    out, ok = warp.warp_image(torch.from_numpy(img), (src - pts).permute(2, 0, 1))
    yy, xx = np.mgrid[0:n, 0:n]
    np.testing.assert_allclose(out.numpy(), img[n - 1 - xx, yy], atol=1e-4)
    assert ok.all()


def test_small_rotation_matches_numpy_bilinear():
    h, w = 48, 64
    img = np.random.default_rng(3).random((h, w)).astype(np.float32)
    th = math.radians(5.0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    sy = math.cos(th) * (yy - cy) - math.sin(th) * (xx - cx) + cy
    sx = math.sin(th) * (yy - cy) + math.cos(th) * (xx - cx) + cx
    disp = torch.from_numpy(np.stack([sy - yy, sx - xx]).astype(np.float32))
    out, ok = warp.warp_image(torch.from_numpy(img), disp)
    inside = (sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1)
    np.testing.assert_array_equal(ok.numpy()[5:-5, 5:-5], inside[5:-5, 5:-5])
    ref = _bilinear(img, sy[inside], sx[inside])
    np.testing.assert_allclose(out.numpy()[inside], ref, atol=1e-4)


def test_compose_equals_warping_twice():
    h, w = 64, 72
    img = torch.from_numpy(smooth_image(h, w))
    rng = np.random.default_rng(4)
    pts = warp.level_points(h, w)[None]

    def field(scale: float) -> torch.Tensor:
        grid = torch.from_numpy(rng.normal(0, scale, (1, 2, 4, 4)).astype(np.float32))
        return warp.grid_displacement(grid, pts, (h, w)).permute(0, 3, 1, 2)

    first, second = field(2.0), field(2.0) + torch.tensor([1.5, -2.0]).view(1, 2, 1, 1)
    once, ok1 = warp.warp_image(img, first[0])
    twice, ok2 = warp.warp_image(once, second[0])
    direct, ok3 = warp.warp_image(img, warp.compose(first, second)[0])
    good = (ok2 & ok3).numpy()
    good[:8], good[-8:], good[:, :8], good[:, -8:] = False, False, False, False
    assert good.sum() > 0.5 * h * w
    diff = np.abs(twice.numpy() - direct.numpy())[good]
    assert diff.max() < 0.03, diff.max()  # two bilinear passes vs one, on a smooth image


def test_to_grid_maps_pixel_centres_to_minus_one_and_one():
    h, w = 30, 50
    pts = torch.tensor([[0.0, 0.0], [h - 1.0, w - 1.0], [(h - 1) / 2, (w - 1) / 2]])
    g = warp.to_grid(pts, (h, w))
    np.testing.assert_allclose(g.numpy(), [[-1, -1], [1, 1], [0, 0]], atol=1e-6)  # (x, y)
    # a level of factor 2: its first pixel centre is at full-resolution 0.5
    g2 = warp.to_grid(torch.tensor([[0.5, 0.5], [2 * 14 + 0.5, 2 * 24 + 0.5]]), (15, 25), 2.0)
    np.testing.assert_allclose(g2.numpy(), [[-1, -1], [1, 1]], atol=1e-6)


def test_grid_displacement_equals_grid_to_dense():
    h, w = 40, 52
    grid = torch.from_numpy(np.random.default_rng(5).normal(0, 3, (2, 2, 5, 6))
                            .astype(np.float32))
    pts = warp.level_points(h, w)
    wy, wx = warp.grid_interpolators(pts[:, 0, 0], pts[0, :, 1], (5, 6), (h, w))
    dense = warp.grid_to_dense(grid, wy, wx)
    bicubic = warp.grid_displacement(grid, pts[None].expand(2, h, w, 2), (h, w))
    assert dense.shape == bicubic.shape == (2, h, w, 2)
    np.testing.assert_allclose(dense.numpy(), bicubic.numpy(), atol=1e-4)
    # the corner nodes sit on the corner pixels
    np.testing.assert_allclose(dense[:, 0, 0].numpy(), grid[:, :, 0, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(dense[:, -1, -1].numpy(), grid[:, :, -1, -1].numpy(), atol=1e-5)


@pytest.mark.parametrize("image_shape, disp_shape", [
    ((40, 50), (2, 41, 50)),   # size mismatch
    ((40, 50), (3, 40, 50)),   # three channels
    ((1, 40, 50), (2, 40, 50)),  # image not 2D
    ((40, 50), (40, 50)),      # displacement not (2, H, W)
])
def test_warp_image_shape_errors(image_shape, disp_shape):
    with pytest.raises(ValueError, match="shape"):
        warp.warp_image(torch.zeros(image_shape), torch.zeros(disp_shape))


def test_other_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        warp.compose(torch.zeros(2, 8, 8), torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="last axis 2"):
        warp.sample(torch.zeros(1, 1, 8, 8), torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="shape"):
        warp.displacement_to_points(torch.zeros(2, 8, 8))
