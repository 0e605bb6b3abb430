"""Shared helpers for the core tests (plain functions; imported as ``from emtools import``)."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from napari_ssemnet.core import warp

# Small and quick settings where the point is not accuracy.
FAST = {"levels": 1, "iterations": 20, "grid_spacing": 32, "features": "pixels",
        "prealign": "translation", "device": "cpu"}


@lru_cache(maxsize=1)
def _em() -> np.ndarray:
    from napari_ssemnet.core.sample import load_sample

    return load_sample(misaligned=False)


def em(z: slice | list[int] = slice(0, 4), size: int = 320) -> np.ndarray:
    """Real EM (the shipped ISBI 2012 crop), a centre crop of ``size`` px; a new array."""
    arr = _em()
    o = (arr.shape[1] - size) // 2
    return np.array(arr[z, o:o + size, o:o + size])


def rigid_fields(shape: tuple[int, int, int], moves: dict[int, tuple[float, float, float]]
                 ) -> np.ndarray:
    """Backward fields (Z, 2, H, W) of rigid maps ``p -> R(deg)(p - c) + c + (ty, tx)``.

    ``moves`` maps section index -> (ty, tx, degrees); other sections get zero.
    """
    z, h, w = shape
    pts = warp.level_points(h, w)
    c = torch.tensor([(h - 1) / 2.0, (w - 1) / 2.0])
    out = np.zeros((z, 2, h, w), np.float32)
    for k, (ty, tx, deg) in moves.items():
        th = math.radians(deg)
        rot = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        p = (pts - c) @ rot.T + c + torch.tensor([ty, tx])
        out[k] = (p - pts).permute(2, 0, 1).numpy()
    return out


def interior(valid: np.ndarray, margin: int) -> np.ndarray:
    """``valid`` with a ``margin`` px frame removed."""
    m = valid.copy()
    m[..., :margin, :] = False
    m[..., -margin:, :] = False
    m[..., :, :margin] = False
    m[..., :, -margin:] = False
    return m


def smooth_image(h: int, w: int) -> np.ndarray:
    """A smooth float32 test image (bilinear interpolation error is tiny on it)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return (np.sin(xx / 6.0) + np.cos(yy / 7.0) + 0.01 * xx).astype(np.float32)
