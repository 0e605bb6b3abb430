"""npe2 writers: image layers to multipage TIFF, displacement layers to NPZ fields.

Also thin wrappers over :mod:`napari_ssemnet.core.io` (``save_fields``, ``load_fields``,
``apply_displacement``) used by the widgets; they fall back to small local versions with
the same contract while the core module is not available.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ._layers import META_KEY, ROLE_DISPLACEMENT


def _core_io():
    try:
        from .core import io
    except ImportError:
        return None
    return io


def save_fields(path: str | Path, displacement: np.ndarray, params: Any = None,
                flags: list[str] | None = None) -> str:
    """Write a displacement field (Z, 2, H, W) to an ``.npz`` (key ``displacement``).

    Parameters
    ----------
    path : str or Path
    displacement : ndarray, shape (Z, 2, H, W), float32, (dy, dx) backward map in pixels
    params : AlignParams or dict, optional
        Stored as JSON under key ``params``.
    flags : list of str, optional

    Returns
    -------
    str
        The path written.
    """
    io = _core_io()
    if io is not None and hasattr(io, "save_fields"):
        io.save_fields(path, displacement, params=params, flags=flags)
        return str(path)
    if params is not None and hasattr(params, "to_dict"):
        params = params.to_dict()
    np.savez_compressed(path, displacement=np.asarray(displacement, np.float32),
                        params=np.array(json.dumps(params or {})),
                        flags=np.array(list(flags or []), dtype=str))
    return str(path)


def load_fields(path: str | Path) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Read a displacement field written by :func:`save_fields` or the CLI.

    Returns
    -------
    displacement : ndarray, shape (Z, 2, H, W)
    params : dict or None
    """
    io = _core_io()
    if io is not None and hasattr(io, "load_fields"):
        return io.load_fields(path)
    from .core.errors import InputError

    try:
        with np.load(path, allow_pickle=False) as npz:
            if "displacement" not in npz:
                raise InputError(f"{path} has no 'displacement' array; is it a fields file "
                                 "written by napari-ssemnet?")
            disp = np.asarray(npz["displacement"], np.float32)
            params = json.loads(str(npz["params"])) if "params" in npz else None
    except (OSError, ValueError) as exc:
        raise InputError(f"Could not read fields file {path}: {exc}") from None
    if disp.ndim != 4 or disp.shape[1] != 2:
        raise InputError(f"{path}: displacement has shape {disp.shape}; expected (Z, 2, H, W).")
    return disp, params


def apply_displacement(stack: np.ndarray, displacement: np.ndarray, *, order: int = 1
                       ) -> np.ndarray:
    """Resample ``stack`` (Z, H, W) through a backward map; a new array, input untouched.

    ``order=0`` (nearest) keeps label values intact; ``order=1`` is bilinear.
    """
    io = _core_io()
    if io is not None and hasattr(io, "apply_displacement"):
        return io.apply_displacement(stack, displacement, order=order)
    from scipy.ndimage import map_coordinates

    from .core.errors import InputError

    stack = np.asarray(stack)
    if stack.ndim != 3 or displacement.shape != (stack.shape[0], 2, *stack.shape[1:]):
        raise InputError(f"Fields of shape {displacement.shape} do not fit a stack of shape "
                         f"{stack.shape}; they must be (Z, 2, H, W) for a (Z, H, W) stack.")
    z_count, h, w = stack.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros_like(stack)
    for z in range(z_count):
        coords = np.stack([yy + displacement[z, 0], xx + displacement[z, 1]])
        out[z] = map_coordinates(stack[z], coords, order=order, mode="constant", cval=0)
    return out


def write_tiff(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: an image layer to a (multipage) TIFF."""
    arr = np.asarray(data)
    io = _core_io()
    if io is not None and hasattr(io, "write_stack"):
        io.write_stack(path, arr)
    else:
        import tifffile

        tifffile.imwrite(path, arr, photometric="minisblack")
    return [path]


def write_fields(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: a ``<name> displacement`` layer to an NPZ fields file.

    The Vectors layer shows a subsampled grid; the full (Z, 2, H, W) field it came from is
    kept in the layer metadata and that is what is written. Returns an empty list (napari's
    "writer could not write") for vectors layers this plugin did not make.
    """
    entry = (meta.get("metadata") or {}).get(META_KEY) or {}
    disp = entry.get("displacement")
    if entry.get("role") != ROLE_DISPLACEMENT or disp is None:
        return []
    if not str(path).endswith(".npz"):
        path = f"{path}.npz"
    save_fields(path, disp, params=entry.get("params") or None, flags=entry.get("flags"))
    return [path]
