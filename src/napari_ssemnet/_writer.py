"""npe2 writers: image layers to multipage TIFF, displacement layers to NPZ fields.

Also thin wrappers over :mod:`napari_ssemnet.core.io` (``save_fields``, ``load_fields``,
``apply_displacement``) used by the widgets. ``core.io`` imports torch only inside
``apply_displacement``, so importing this module stays light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ._layers import META_KEY, ROLE_ALIGNED, ROLE_DISPLACEMENT, placement_from_state
from .core.errors import SsemnetError


def save_fields(path: str | Path, displacement: np.ndarray, params: Any = None,
                flags: list[str] | None = None, section_params: str = "",
                environment: dict[str, Any] | None = None,
                placement: dict[str, Any] | None = None, **arrays: np.ndarray) -> str:
    """Write a displacement field (Z, 2, H, W) to an ``.npz`` (key ``displacement``).

    Parameters
    ----------
    path : str or Path
    displacement : ndarray, shape (Z, 2, H, W), float32, (dy, dx) backward map in pixels
    params : AlignParams or dict, optional
        Stored as JSON under key ``params``.
    flags : list of str, optional
    section_params : str
        JSON of the sections re-aligned with their own parameters
        (``AlignmentResult.section_params_json()``); stored under that key when not empty.
    environment : dict, optional
        The run's ``AlignmentResult.environment`` (versions, threads, device, date); stored
        as JSON under that key when not empty.
    placement : dict, optional
        The source layer's world transform and units (``_layers.placement``), stored as
        JSON under that key, so that the plugin's reader draws the arrows over that layer.
    **arrays : ndarray
        More arrays to store as they are (the widget: ``ncc_before``, ``ncc_after``,
        ``pair_ncc``).

    Returns
    -------
    str
        The path written.
    """
    from .core import io

    extra = {"section_params": np.array(section_params)} if section_params else {}
    extra.update(arrays)
    if environment:
        extra["environment"] = np.array(json.dumps(environment))
    if placement:
        extra["placement"] = np.array(json.dumps(placement))
    return str(io.save_fields(path, displacement, params=params, flags=flags, **extra))


def load_fields(path: str | Path) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Read a displacement field written by :func:`save_fields` or the CLI.

    Returns
    -------
    displacement : ndarray, shape (Z, 2, H, W)
    params : dict or None
    """
    from .core import io

    return io.load_fields(path)


def apply_displacement(stack: np.ndarray, displacement: np.ndarray, *, order: int = 1
                       ) -> np.ndarray:
    """Resample ``stack`` (Z, H, W) through a backward map; a new array, input untouched.

    ``order=0`` (nearest) keeps label values and dtype intact; ``order=1`` is bilinear.
    """
    from .core import io

    return io.apply_displacement(stack, displacement, order=order)


def write_tiff(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: an image layer to a (multipage) TIFF.

    An aligned stack made by this plugin is written in its source layer's data type
    (rounded and clipped, as the command line does by default) and, when that layer was
    opened from a TIFF, with that file's compression and MinIsWhite as they were when the
    run started (the file may be gone since), as the command line keeps them; other layers
    as they are.
    """
    from .core import io

    arr = np.asarray(data)
    entry = (meta.get("metadata") or {}).get(META_KEY) or {}
    res = layer_resolution(meta) if arr.ndim == 3 else None
    compression = None
    if entry.get("role") == ROLE_ALIGNED:
        if entry.get("source_dtype"):
            arr = io.as_dtype(arr, entry["source_dtype"])
        compression = entry.get("source_compression")
        if res is not None and entry.get("source_miniswhite"):
            res = {**res, "photometric": "miniswhite"}
    io.write_stack(path, arr, compression=compression, resolution=res)
    return [path]


# pint's names (napari layer units) as read_resolution gives them ("Å" is written as nm)
_IMAGEJ_UNITS = {"nanometer": "nm", "micrometer": "um", "millimeter": "mm",
                 "centimeter": "cm", "meter": "m", "angstrom": "Å", "picometer": "pm"}


def layer_resolution(meta: dict) -> dict[str, Any]:
    """The layer's (Z, Y, X) ``scale`` (and ``units``) as :func:`core.io.read_resolution`'s
    pixel size and section spacing (in the X axis' unit), so that a saved stack keeps them;
    empty for scale 1 without units."""
    from .core.io import _LENGTH_IN_UM

    scale = meta.get("scale")
    if scale is None or len(scale) != 3:
        return {}
    sz, sy, sx = (float(v) for v in scale)
    units = [_IMAGEJ_UNITS.get(str(u), str(u)) for u in (meta.get("units") or ())]
    unit = units[-1] if len(units) == 3 and units[-1] != "pixel" else ""
    if ((sz, sy, sx) == (1.0, 1.0, 1.0) and not unit) or min(sz, sy, sx) <= 0:
        return {}
    def in_x_unit(size: float, axis_unit: str) -> float:  # 0.05 um sections in nm: 50
        if unit and axis_unit != unit and {axis_unit, unit} <= set(_LENGTH_IN_UM):
            return size * _LENGTH_IN_UM[axis_unit] / _LENGTH_IN_UM[unit]
        return size

    if unit:
        sz, sy = in_x_unit(sz, units[0]), in_x_unit(sy, units[1])
    out: dict[str, Any] = {"resolution": (1.0 / sx, 1.0 / sy), "resolutionunit": 1,
                           "spacing": sz}
    if unit:
        out["unit"] = unit
    return out


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
    if entry.get("state") == "preview":
        # one section from the preview's parameters, the rest from a full run or none: no
        # set of parameters describes that. Not a ValueError: npe2 reads that as "no writer"
        # and drops the message
        raise SsemnetError(f"This layer shows a Preview of section {entry.get('section')}, not "
                         "an alignment; press Re-align section to keep it (after Align), or "
                         "Align, then save.")
    from .core import io

    sections = entry.get("section_params") or {}
    arrays = {k: np.array([np.nan if v is None else v for v in entry[k]], np.float64)
              for k in ("ncc_before", "ncc_after") if entry.get(k) is not None}
    if entry.get("pair_ncc") is not None:  # as Save fields writes them
        arrays["pair_ncc"] = io.pair_array(entry["pair_ncc"])
    try:
        path = save_fields(path, disp, params=entry.get("params") or None,
                           flags=entry.get("flags"),
                           section_params=json.dumps(sections) if sections else "",
                           environment=entry.get("environment"),
                           placement=placement_from_state(meta), **arrays)
    except SsemnetError as exc:  # e.g. an InputError (a ValueError) for a bad name
        raise SsemnetError(str(exc)) from None
    return [path]
