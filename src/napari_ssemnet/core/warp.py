"""Coordinates, sampling and displacement fields (torch).

Conventions
-----------
* A *point* tensor has last axis ``(y, x)`` in full-resolution input pixels; pixel ``i`` has
  its centre at coordinate ``i``.
* A pyramid level with factor ``k`` holds ``k x k`` average-pooled pixels; level pixel ``i``
  is centred at full-resolution coordinate ``k * i + (k - 1) / 2``.
* ``torch.nn.functional.grid_sample`` is always called with ``align_corners=True``: normalised
  ``-1`` and ``+1`` are the centres of the first and last pixel. :func:`to_grid` is the only
  place where pixel coordinates become normalised ones.
* A displacement field has shape ``(2, H, W)`` (per section) with channels ``(dy, dx)`` and is
  a backward map: ``out(q) = image(q + d(q))``.
* Deformation control grids, shape ``(B, 2, gh, gw)``, span ``[0, H-1] x [0, W-1]`` with their
  corner nodes on the corner pixels, and are interpolated bicubically.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_EPS = 1e-3


def float_tensor(a: np.ndarray, device=None) -> torch.Tensor:
    """A float32 tensor holding a copy of ``a``: never a view of the caller's array, so a
    read-only or memory-mapped input is left alone (and torch does not warn about it)."""
    return torch.from_numpy(np.array(a, dtype=np.float32, order="C", copy=True)).to(device)


def _check(t: torch.Tensor, ndim: int, name: str, last: int | None = None) -> None:
    if t.ndim != ndim or (last is not None and t.shape[-1] != last):
        want = f"{ndim}D" + (f" with last axis {last}" if last is not None else "")
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")


def level_points(h: int, w: int, k: float = 1.0, *, device=None) -> torch.Tensor:
    """Full-resolution coordinates of the pixel centres of an ``h x w`` level of factor ``k``.

    Returns
    -------
    Tensor, shape (h, w, 2), (y, x)
    """
    off = (k - 1.0) / 2.0
    ys = torch.arange(h, dtype=torch.float32, device=device) * k + off
    xs = torch.arange(w, dtype=torch.float32, device=device) * k + off
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([yy, xx], dim=-1)


def to_grid(points: torch.Tensor, size: tuple[int, int], k: float = 1.0) -> torch.Tensor:
    """Convert full-resolution ``(y, x)`` points to ``grid_sample`` coordinates ``(x, y)`` of an
    image of ``size = (h, w)`` level pixels at level factor ``k`` (``align_corners=True``)."""
    h, w = size
    off = (k - 1.0) / 2.0
    y = (points[..., 0] - off) / k
    x = (points[..., 1] - off) / k
    yn = y * (2.0 / max(h - 1, 1)) - 1.0
    xn = x * (2.0 / max(w - 1, 1)) - 1.0
    return torch.stack([xn, yn], dim=-1)


def sample(images: torch.Tensor, points: torch.Tensor, k: float = 1.0, *,
           mode: str = "bilinear", padding_mode: str = "zeros"
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``images`` at full-resolution points.

    Parameters
    ----------
    images : Tensor, shape (B, C, h, w)
        A pyramid level of factor ``k``.
    points : Tensor, shape (B, Hq, Wq, 2)
        ``(y, x)`` in full-resolution pixels.

    Returns
    -------
    values : Tensor, shape (B, C, Hq, Wq)
    valid : Tensor, shape (B, Hq, Wq), bool
        True where the point lies inside the image.
    """
    _check(images, 4, "images")
    _check(points, 4, "points", 2)
    size = (images.shape[-2], images.shape[-1])
    grid = to_grid(points, size, k)
    out = F.grid_sample(images, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    tol = 2.0 * _EPS / max(min(size) - 1, 1)
    return out, grid.detach().abs().amax(dim=-1) <= 1.0 + tol


def control_grid_shape(size: tuple[int, int], spacing: float) -> tuple[int, int]:
    """Number of control nodes ``(gh, gw)`` so that nodes are at most ``spacing`` px apart."""
    h, w = size
    gh = max(2, int(np.ceil((h - 1) / spacing)) + 1)
    gw = max(2, int(np.ceil((w - 1) / spacing)) + 1)
    return gh, gw


def cubic_weights(pos: torch.Tensor, n: int) -> torch.Tensor:
    """Cubic-convolution (Keys, a = -0.75, as torch's bicubic) interpolation matrix.

    Parameters
    ----------
    pos : Tensor, shape (m,)
        Positions in node units (0 .. n-1); outside positions are clamped to the border.
    n : int
        Number of nodes.

    Returns
    -------
    Tensor, shape (m, n): ``values_at_pos = W @ node_values``.
    """
    a = -0.75
    pos = pos.clamp(0, n - 1)
    base = torch.floor(pos)
    t = pos - base
    out = torch.zeros(pos.shape[0], n, dtype=pos.dtype, device=pos.device)
    rows = torch.arange(pos.shape[0], device=pos.device)
    for off in (-1, 0, 1, 2):
        x = (t - off).abs()
        wgt = torch.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                          torch.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a,
                                      torch.zeros_like(x)))
        idx = (base.long() + off).clamp(0, n - 1)
        out.index_put_((rows, idx), wgt, accumulate=True)
    return out


def grid_interpolators(ys: torch.Tensor, xs: torch.Tensor, grid_shape: tuple[int, int],
                       full_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable interpolation matrices from control nodes to a rectilinear set of points.

    Parameters
    ----------
    ys, xs : Tensor, shape (m,), (n,)
        Full-resolution row and column coordinates.

    Returns
    -------
    wy : Tensor, shape (m, gh)
    wx : Tensor, shape (n, gw)
    """
    gh, gw = grid_shape
    h, w = full_size
    wy = cubic_weights(ys * ((gh - 1) / max(h - 1, 1)), gh)
    wx = cubic_weights(xs * ((gw - 1) / max(w - 1, 1)), gw)
    return wy, wx


def grid_to_dense(grid: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """Control grid (B, 2, gh, gw) -> displacement on the points of :func:`grid_interpolators`,
    shape (B, m, n, 2) (dy, dx)."""
    _check(grid, 4, "grid")
    dense = torch.einsum("mi,bcij,nj->bmnc", wy, grid, wx)
    return dense


def grid_displacement(grid: torch.Tensor, points: torch.Tensor,
                      full_size: tuple[int, int]) -> torch.Tensor:
    """Interpolate control-grid displacements (bicubic) at arbitrary full-resolution points.

    Parameters
    ----------
    grid : Tensor, shape (B, 2, gh, gw)
        (dy, dx) in pixels at nodes spanning the full image.
    points : Tensor, shape (B, Hq, Wq, 2)
    full_size : (H, W)

    Returns
    -------
    Tensor, shape (B, Hq, Wq, 2), (dy, dx)
    """
    _check(grid, 4, "grid")
    h, w = full_size
    g = torch.stack([points[..., 1] * (2.0 / max(w - 1, 1)) - 1.0,
                     points[..., 0] * (2.0 / max(h - 1, 1)) - 1.0], dim=-1)
    out = F.grid_sample(grid, g, mode="bicubic", padding_mode="border", align_corners=True)
    return out.permute(0, 2, 3, 1)


def resize_grid(grid: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Resample a control grid to a new node count: bicubically over the nodes, so the field it
    represents is kept closely, not exactly (a review measured 0.14 px on a field of about
    3 px); the next level's fit starts from it."""
    if tuple(grid.shape[-2:]) == tuple(shape):
        return grid
    return F.interpolate(grid, size=shape, mode="bicubic", align_corners=True)


def apply_matrix(mats: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply homogeneous ``(y, x, 1)`` matrices to points.

    Parameters
    ----------
    mats : Tensor, shape (B, 3, 3)
    points : Tensor, shape (B, ..., 2) or (..., 2) (broadcast over B)

    Returns
    -------
    Tensor, shape (B, ..., 2)
    """
    _check(mats, 3, "mats")
    b = mats.shape[0]
    lin = mats[:, :2, :2]
    t = mats[:, :2, 2]
    if points.ndim == 3:
        points = points.unsqueeze(0).expand(b, *points.shape)
    flat = points.reshape(b, -1, 2)
    out = torch.einsum("bij,bnj->bni", lin, flat) + t[:, None, :]
    return out.reshape(points.shape)


def displacement_to_points(disp: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) backward displacement -> (B, H, W, 2) absolute sampling points."""
    _check(disp, 4, "displacement")
    b, _, h, w = disp.shape
    base = level_points(h, w, 1.0, device=disp.device)
    return base.unsqueeze(0) + disp.permute(0, 2, 3, 1)


def warp_image(image: torch.Tensor, disp: torch.Tensor, *, mode: str = "bilinear"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample one section through a backward displacement.

    Parameters
    ----------
    image : Tensor, shape (H, W)
    disp : Tensor, shape (2, H, W)
        (dy, dx) in pixels.
    mode : {"bilinear", "nearest"}

    Returns
    -------
    warped : Tensor, shape (H, W), 0 outside the section
    valid : Tensor, shape (H, W), bool
    """
    if not (isinstance(image, torch.Tensor) and isinstance(disp, torch.Tensor)):
        raise TypeError("warp_image works on torch tensors; for numpy arrays use "
                        "napari_ssemnet.core.io.apply_displacement_section.")
    _check(image, 2, "image")
    _check(disp, 3, "displacement")
    if disp.shape[0] != 2 or disp.shape[1:] != image.shape:
        raise ValueError(f"displacement of shape {tuple(disp.shape)} does not fit an image of "
                         f"shape {tuple(image.shape)}; expected (2, H, W)")
    if not bool(disp.any()):
        # the identity (e.g. the reference section) gives the input back bit for bit;
        # grid_sample's coordinate round trip moves values by up to about 1e-3 of their size
        return image.to(torch.float32).clone(), torch.ones(image.shape, dtype=torch.bool,
                                                           device=image.device)
    pts = displacement_to_points(disp[None].to(torch.float32))
    src = image[None, None].to(torch.float32)
    out, ok = sample(src, pts, 1.0, mode=mode)
    # exactly 0 outside (grid_sample's zero padding leaves rounding residue at the border)
    return out[0, 0] * ok[0], ok[0]


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Compose backward displacements: warping by ``first`` then by ``second``.

    ``warp(warp(I, first), second) == warp(I, compose(first, second))``, i.e.
    ``d(q) = second(q) + first(q + second(q))``.

    Parameters
    ----------
    first, second : Tensor, shape (B, 2, H, W)

    Returns
    -------
    Tensor, shape (B, 2, H, W)
    """
    _check(first, 4, "first")
    _check(second, 4, "second")
    pts = displacement_to_points(second)
    f_at, _ = sample(first, pts, 1.0, padding_mode="border")
    return second + f_at
