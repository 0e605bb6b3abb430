"""Known misalignments of aligned stacks, for tests, benchmarks and the sample data."""

from __future__ import annotations

import math

import numpy as np
import torch

from . import warp


def random_misalignment(
    shape: tuple[int, int, int],
    *,
    rotation_deg: float = 4.0,
    shift_frac: float = 0.06,
    scale: float = 0.02,
    shear: float = 0.02,
    elastic_px: float = 2.0,
    reference: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """Random per-section misalignment fields.

    Each section except ``reference`` gets an affine map (rotation, translation, scale and
    shear drawn uniformly within the given bounds, about the image centre) plus a smooth
    elastic field whose node values have std ``elastic_px``.

    Returns
    -------
    e : ndarray, shape (Z, 2, H, W), float32
        Backward fields: ``misaligned[z](p) = source[z](p + e[z](p))``.
    """
    z_count, h, w = shape
    rng = np.random.default_rng(seed)
    pts = warp.level_points(h, w)
    centre = torch.tensor([(h - 1) / 2.0, (w - 1) / 2.0])
    out = np.zeros((z_count, 2, h, w), np.float32)
    for z in range(z_count):
        if z == reference:
            continue
        th = math.radians(rng.uniform(-rotation_deg, rotation_deg))
        sy, sx = 1 + rng.uniform(-scale, scale, 2)
        sh = rng.uniform(-shear, shear)
        ty, tx = rng.uniform(-shift_frac, shift_frac, 2) * np.array([h, w])
        rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        lin = rot @ np.array([[sy, sh], [0.0, sx]])
        lin_t = torch.tensor(lin, dtype=torch.float32)
        p = (pts - centre) @ lin_t.T + centre + torch.tensor([ty, tx], dtype=torch.float32)
        disp = p - pts
        if elastic_px > 0:
            grid = torch.from_numpy(rng.normal(0, elastic_px, (1, 2, 5, 5)).astype(np.float32))
            disp = disp + warp.grid_displacement(grid, pts[None], (h, w))[0]
        out[z] = disp.permute(2, 0, 1).numpy()
    return out


def apply_misalignment(
    stack: np.ndarray,
    fields: np.ndarray,
    *,
    gain_jitter: float = 0.0,
    offset_jitter: float = 0.0,
    noise: float = 0.0,
    blank: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Warp each section through ``fields`` and optionally degrade intensities.

    Parameters
    ----------
    stack : ndarray, shape (Z, H, W) (not modified)
    fields : ndarray, shape (Z, 2, H, W)
    gain_jitter, offset_jitter : float
        Relative gain (e.g. 0.2 = +-20 %) and offset (fraction of the intensity range).
    noise : float
        Gaussian noise std as a fraction of the section's std.
    blank : int, optional
        Section replaced by a flat (noisy) image.

    Returns
    -------
    ndarray, shape (Z, H, W), float32
    """
    rng = np.random.default_rng(seed + 1)
    src = torch.from_numpy(np.asarray(stack, np.float32))
    out = np.empty(stack.shape, np.float32)
    rng_range = float(np.ptp(stack)) or 1.0
    for z in range(stack.shape[0]):
        img, ok = warp.warp_image(src[z], torch.from_numpy(fields[z]))
        img = img.numpy()
        fill = float(np.median(stack[z]))
        img[~ok.numpy()] = fill
        if gain_jitter or offset_jitter:
            g = 1 + rng.uniform(-gain_jitter, gain_jitter)
            o = rng.uniform(-offset_jitter, offset_jitter) * rng_range
            img = g * img + o
        if noise:
            img = img + rng.normal(0, noise * float(np.std(stack[z])), img.shape)
        if blank is not None and z == blank:
            img = np.full(img.shape, fill, np.float32)
            if noise:
                img += rng.normal(0, noise * float(np.std(stack[z])), img.shape)
        out[z] = img
    return out
