"""npe2 reader: a fields ``.npz`` (CLI ``--fields``, Save fields, the napari writer) opens as
the ``<name> displacement`` arrows layer, with what the file holds in its metadata.

So a stack aligned headless can be inspected in napari: open the aligned TIFF, then drop
the fields file on the viewer. The layer is the one the Align widget makes, so the napari
writer saves it back to the same arrays. Only files that hold a ``displacement`` array are
claimed; other ``.npz`` files are left to other readers.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from . import _layers as L


def _holds_fields(path: Path) -> bool:
    """Whether ``path`` is a zip with a ``displacement.npy`` member (without reading it)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return "displacement.npy" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def get_reader(path: str | list[str]) -> Any:
    """npe2 ``get_reader``: :func:`read_fields` for a fields ``.npz``, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(str(path))
    if p.suffix.lower() != ".npz" or not p.is_file() or not _holds_fields(p):
        return None
    return read_fields


def _json(arrays: dict[str, np.ndarray], key: str) -> Any:
    """A JSON string stored by ``save_fields`` (None when absent or unreadable)."""
    if key not in arrays:
        return None
    try:
        return json.loads(str(arrays[key]))
    except json.JSONDecodeError:
        return None


def fields_layer_data(path: str | Path) -> L.LayerDataTuple:
    """The ``<stem> displacement`` Vectors layer of a fields file.

    Parameters
    ----------
    path : str or Path
        An ``.npz`` written by napari-ssemnet.

    Returns
    -------
    (data, kwargs, "vectors")
        Arrows on a subsampled grid of every section, as the Align widget draws them (but
        over the whole section: the file has no valid-pixel mask). The metadata holds the
        full (Z, 2, H, W) field, the parameters, flags, NCC values and pairs, the
        environment and the re-aligned sections' parameters where the file has them, and
        the file's path (``fields_file``). Fields saved from napari (Save fields, the
        writer) carry their layer's scale, translate, rotation, shear and units, and the
        arrows get them, so that they lie over a stack placed as the one aligned; fields
        from the command line have none (pixel units, as napari opens a TIFF).

    Raises
    ------
    InputError
        The file is not a readable fields file (from :func:`core.io.load_fields`).
    """
    from .core import io

    p = Path(path)
    disp, params, extra = io.load_fields(p, with_extra=True)
    z_count = disp.shape[0]

    def per_section(key: str) -> Any:
        a = extra.get(key)
        return a if a is not None and a.shape == (z_count,) else None

    flags = [str(f) for f in extra["flags"]] if "flags" in extra else []
    more: dict[str, Any] = {"displacement": disp, "fields_file": str(p.resolve())}
    pairs = extra.get("pair_ncc")
    if pairs is not None and pairs.ndim == 2 and pairs.shape[1] == 3:
        more["pair_ncc"] = io.pair_rows({(int(a), int(b)): float(v) for a, b, v in pairs})
    for key in ("version", "device_used"):  # the command line's provenance
        if key in extra and extra[key].ndim == 0:
            more[key] = str(extra[key])
    for key in ("environment", "section_params"):
        value = _json(extra, key)
        if isinstance(value, dict) and value:
            more[key] = value
    name = p.stem
    meta = L.result_metadata(L.ROLE_DISPLACEMENT, name, ncc_before=per_section("ncc_before"),
                             ncc_after=per_section("ncc_after"),
                             flags=flags if len(flags) == z_count else None,
                             params=params, extra=more)
    vectors, magnitude = L.stack_vectors(disp)
    return L.displacement_layer_data(vectors, magnitude, name, section_shape=disp.shape[-2:],
                                     placement=L.stored_placement(_json(extra, "placement")),
                                     metadata=meta)


def read_fields(path: str | list[str]) -> list[L.LayerDataTuple]:
    """npe2 reader function: one Vectors layer per fields file."""
    paths = path if isinstance(path, list) else [path]
    return [fields_layer_data(p) for p in paths]
