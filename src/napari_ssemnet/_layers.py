"""Alignment results -> napari layer data, plus the few viewer helpers that place them.

The builders (``*_layer_data``) are pure functions from NumPy arrays to napari
``LayerDataTuple`` values ``(data, kwargs, layer_type)``, so they can be tested without Qt.
:func:`upsert_layer` and :func:`remove_layer` are the only functions here that touch a
viewer; they only ever change layers that this plugin created (recognised by
``metadata["ssemnet"]``), never the source layer or a user layer that happens to share a
name.

Result layer names are derived from the source layer name::

    "<name> aligned"        Image, the aligned stack
    "<name> displacement"   Vectors, the displacement field on a subsampled grid
    "<name> NCC error"      Image, 1 - local NCC with the previous section
    "<name> fields applied" Image or Labels, saved fields applied ("Apply saved fields")
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

META_KEY = "ssemnet"
"""Key in ``layer.metadata`` that marks a layer as created by this plugin."""

ROLE_ALIGNED = "aligned"
ROLE_DISPLACEMENT = "displacement"
ROLE_NCC_ERROR = "ncc_error"

ROLE_APPLIED = "applied"
ROLES = (ROLE_ALIGNED, ROLE_DISPLACEMENT, ROLE_NCC_ERROR, ROLE_APPLIED)

_SUFFIX = {ROLE_ALIGNED: "aligned", ROLE_DISPLACEMENT: "displacement",
           ROLE_NCC_ERROR: "NCC error", ROLE_APPLIED: "fields applied"}

DEFAULT_ARROWS_ACROSS = 20
"""Arrows along the longer side of a section in the displacement layer."""

LayerDataTuple = tuple[Any, dict[str, Any], str]


def layer_name(source_name: str, role: str) -> str:
    """Name of the result layer with ``role`` for the source layer ``source_name``."""
    return f"{source_name} {_SUFFIX[role]}"


def _as_list(values: Any) -> list[float | None]:
    """NCC arrays -> JSON-friendly lists (NaN becomes None)."""
    if values is None:
        return []
    out = []
    for v in np.asarray(values, dtype=float).ravel():
        out.append(float(v) if np.isfinite(v) else None)
    return out


def result_metadata(
    role: str,
    source_name: str,
    *,
    ncc_before: Any = None,
    ncc_after: Any = None,
    flags: Sequence[str] | None = None,
    params: dict[str, Any] | None = None,
    complete: bool = True,
    state: str = "aligned",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``metadata`` dict of a result layer.

    Parameters
    ----------
    role : str
        One of ``"aligned"``, ``"displacement"``, ``"ncc_error"``.
    source_name : str
        Name of the layer that was aligned.
    ncc_before, ncc_after : array_like, shape (Z,), optional
        Per-section adjacent NCC; NaN is stored as None.
    flags : list of str, optional
        Per-section flags ('' for a normal section).
    params : dict, optional
        ``AlignParams.to_dict()`` of the run.
    complete : bool
        False while sections are still streaming in.
    state : str
        ``"aligned"`` (full run), ``"preview"`` or ``"running"``.
    extra : dict, optional
        More entries merged into the plugin's metadata entry.
    """
    entry: dict[str, Any] = {
        "role": role,
        "source": source_name,
        "complete": complete,
        "state": state,
        "ncc_before": _as_list(ncc_before),
        "ncc_after": _as_list(ncc_after),
        "flags": list(flags) if flags is not None else [],
        "params": dict(params) if params else {},
    }
    if extra:
        entry.update(extra)
    return {META_KEY: entry}


def aligned_layer_data(
    aligned: np.ndarray,
    source_name: str,
    *,
    contrast_limits: Sequence[float] | None = None,
    colormap: str = "gray",
    placement: Mapping[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> LayerDataTuple:
    """Image layer data for the aligned stack.

    Parameters
    ----------
    aligned : ndarray, shape (Z, H, W)
        The aligned stack (0 outside each section).
    source_name : str
        Name of the source layer; the layer is called ``"<source_name> aligned"``.
    contrast_limits : (float, float), optional
        Usually the source layer's, so both look the same; else computed from the data.
    colormap : str
        Usually the source layer's colormap name.
    placement : mapping, optional
        The source layer's world transform and units (:func:`placement`), so that results
        overlay it.
    metadata : dict, optional
        From :func:`result_metadata`.

    Returns
    -------
    (data, kwargs, "image")
    """
    if aligned.ndim != 3:
        raise ValueError(f"aligned must have shape (Z, H, W), got {aligned.shape}")
    kwargs: dict[str, Any] = {
        "name": layer_name(source_name, ROLE_ALIGNED),
        "colormap": colormap,
        "blending": "translucent",
        "metadata": metadata or result_metadata(ROLE_ALIGNED, source_name),
    }
    limits = _sensible_limits(aligned, contrast_limits)
    if limits is not None:
        kwargs["contrast_limits"] = limits
    kwargs.update(placement or {})
    return aligned, kwargs, "image"


def _sensible_limits(data: np.ndarray, preferred: Sequence[float] | None) -> list[float] | None:
    """Use ``preferred`` unless it is degenerate; else 0.5/99.5 percentiles of the data."""
    if preferred is not None:
        lo, hi = float(preferred[0]), float(preferred[1])
        if np.isfinite(lo) and np.isfinite(hi) and hi > lo:
            return [lo, hi]
    sample = np.asarray(data[:: max(1, data.shape[0] // 8), ::4, ::4], dtype=np.float32)
    nonzero = sample[sample != 0]
    if nonzero.size == 0:
        return None
    lo, hi = np.percentile(nonzero, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return [float(lo), float(hi)]


PLACEMENT_KEYS = ("scale", "translate", "rotate", "shear", "affine", "units")


def placement(layer: Any) -> dict[str, Any]:
    """A layer's world transform (scale, translate, rotation, shear, affine) and units as
    layer keyword arguments: result layers made with them lie exactly on the layer."""
    return {"scale": [float(v) for v in layer.scale],
            "translate": [float(v) for v in layer.translate],
            "rotate": np.asarray(layer.rotate, float).tolist(),
            "shear": np.asarray(layer.shear, float).tolist(),
            "affine": np.asarray(layer.affine.affine_matrix, float).tolist(),
            "units": [str(u) for u in layer.units]}


def placement_from_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`placement` from a layer's state as napari hands it to a writer (``scale``,
    ``translate``, ... and ``units`` entries); the identity for what is missing."""
    out: dict[str, Any] = {}
    for key in ("scale", "translate", "rotate", "shear", "affine"):
        if state.get(key) is not None:
            out[key] = np.asarray(state[key], float).tolist()
    if state.get("units") is not None:
        out["units"] = [str(u) for u in state["units"]]
    return out


def stored_placement(value: Any, ndim: int = 3) -> dict[str, Any]:
    """The layer keyword arguments of a placement read back from a file (as
    :func:`placement` wrote it); entries of the wrong form are left out, so a damaged or
    foreign entry costs the placement, never the layer."""
    if not isinstance(value, Mapping):
        return {}
    shapes = {"scale": (ndim,), "translate": (ndim,), "affine": (ndim + 1, ndim + 1)}
    out: dict[str, Any] = {}
    for key, shape in shapes.items():
        try:
            a = np.asarray(value.get(key), float)
        except (TypeError, ValueError):
            continue
        if a.shape == shape and np.isfinite(a).all() and (key != "scale" or (a != 0).all()):
            out[key] = a.tolist()
    for key in ("rotate", "shear"):  # napari takes several forms: let it check them
        if isinstance(value.get(key), list | float | int):
            try:
                a = np.asarray(value[key], float)
            except (TypeError, ValueError):
                continue
            if np.isfinite(a).all():
                out[key] = a.tolist()
    units = value.get("units")
    if isinstance(units, list) and len(units) == ndim and all(isinstance(u, str) for u in units):
        out["units"] = units
    return out


def arrow_grid(shape: tuple[int, int], arrows_across: int = DEFAULT_ARROWS_ACROSS
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """Grid points for the arrows of one section.

    Parameters
    ----------
    shape : (int, int)
        Section size (H, W).
    arrows_across : int
        Arrows along the longer side.

    Returns
    -------
    ys, xs : ndarray of int
        Row and column coordinates of the grid points (cell centres).
    spacing : int
        Distance between grid points in pixels.
    """
    h, w = shape
    spacing = max(1, int(round(max(h, w) / max(1, arrows_across))))
    ys = np.arange(spacing // 2, h, spacing)
    xs = np.arange(spacing // 2, w, spacing)
    return ys, xs, spacing


def section_vectors(
    displacement: np.ndarray,
    z: int,
    *,
    valid: np.ndarray | None = None,
    arrows_across: int = DEFAULT_ARROWS_ACROSS,
) -> tuple[np.ndarray, np.ndarray]:
    """Arrows of one section's displacement on a subsampled grid.

    Parameters
    ----------
    displacement : ndarray, shape (2, H, W)
        Backward map (dy, dx) in pixels.
    z : int
        Section index, used as the arrows' z coordinate so each section's arrows show on
        its own slice.
    valid : ndarray, shape (H, W), bool, optional
        Arrows are only drawn where this is True.
    arrows_across : int
        Arrows along the longer side.

    Returns
    -------
    vectors : ndarray, shape (N, 2, 3)
        napari Vectors data: ``[:, 0]`` the (z, y, x) position, ``[:, 1]`` the projection
        ``(0, dy, dx)`` in pixels (true length; the layer's ``length`` scales the drawing).
    magnitude : ndarray, shape (N,)
        ``hypot(dy, dx)`` in pixels.
    """
    if displacement.ndim != 3 or displacement.shape[0] != 2:
        raise ValueError(f"displacement must have shape (2, H, W), got {displacement.shape}")
    ys, xs, _ = arrow_grid(displacement.shape[1:], arrows_across)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    if valid is not None:
        keep = np.asarray(valid)[yy, xx]
        yy, xx = yy[keep], xx[keep]
    dy = displacement[0][yy, xx].astype(np.float32)
    dx = displacement[1][yy, xx].astype(np.float32)
    vectors = np.zeros((yy.size, 2, 3), np.float32)
    vectors[:, 0, 0] = z
    vectors[:, 0, 1] = yy
    vectors[:, 0, 2] = xx
    vectors[:, 1, 1] = dy
    vectors[:, 1, 2] = dx
    return vectors, np.hypot(dy, dx)


def stack_vectors(
    displacement: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    sections: Sequence[int] | None = None,
    arrows_across: int = DEFAULT_ARROWS_ACROSS,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`section_vectors` for several sections, concatenated.

    Parameters
    ----------
    displacement : ndarray, shape (Z, 2, H, W)
    valid : ndarray, shape (Z, H, W), bool, optional
    sections : sequence of int, optional
        Which sections to include (default all).

    Returns
    -------
    vectors : ndarray, shape (N, 2, 3)
    magnitude : ndarray, shape (N,)
    """
    if displacement.ndim != 4 or displacement.shape[1] != 2:
        raise ValueError(f"displacement must have shape (Z, 2, H, W), got {displacement.shape}")
    zs = range(displacement.shape[0]) if sections is None else sections
    parts = [section_vectors(displacement[z], z, valid=None if valid is None else valid[z],
                             arrows_across=arrows_across) for z in zs]
    if not parts:
        return np.zeros((0, 2, 3), np.float32), np.zeros(0, np.float32)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def arrow_scale(magnitude: np.ndarray, spacing: int,
                sections: np.ndarray | None = None) -> float:
    """Drawing scale for arrows: the median arrow spans half a grid cell, unless that would
    make the 95th-percentile one longer than 1.5 cells.

    (Scaling by the 95th percentile alone drew the typical arrow as a stub shorter than its
    own width on real stacks, where the sections far from the reference move most.)
    With ``sections`` (the section of each arrow), the median is the median of the sections'
    medians and the 95th percentile the upper quartile of the sections' 95th percentiles,
    so that one section that moved much more than the rest (a turned or misplaced one)
    does not shrink every other section's arrows to dots; that section's arrows are then
    drawn longer than the grid. Rounded down to 1, 2 or 5 times a power of ten so the
    legend reads well. Returns 1.0 when there is no displacement.

    Parameters
    ----------
    magnitude : ndarray, shape (N,)
        Arrow lengths in pixels.
    spacing : int
        Grid spacing in pixels.
    sections : ndarray, shape (N,), optional
        Section index of each arrow.
    """
    mags = np.asarray(magnitude, dtype=float)
    keep = np.isfinite(mags) & (mags > 1e-6)
    if not keep.any():
        return 1.0
    if sections is None:
        p50, p95 = np.percentile(mags[keep], [50, 95])
    else:
        zs = np.asarray(sections)[keep]
        mags = mags[keep]
        per = np.array([np.percentile(mags[zs == z], [50, 95]) for z in np.unique(zs)])
        p50 = float(np.median(per[:, 0]))
        p95 = float(np.percentile(per[:, 1], 75))
    raw = min(0.5 * spacing / float(p50), 1.5 * spacing / float(p95))
    exponent = math.floor(math.log10(raw))
    base = raw / 10 ** exponent
    nice = 5.0 if base >= 5 else 2.0 if base >= 2 else 1.0
    return float(nice * 10 ** exponent)


def displacement_layer_data(
    vectors: np.ndarray,
    magnitude: np.ndarray,
    source_name: str,
    *,
    section_shape: tuple[int, int],
    arrows_across: int = DEFAULT_ARROWS_ACROSS,
    length: float | None = None,
    placement: Mapping[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> LayerDataTuple:
    """Vectors layer data for the displacement field.

    Arrows start at a grid point q of the aligned section and point along the backward
    map d(q) = (dy, dx), i.e. towards where that content was in the input section. The
    layer's ``length`` scales the drawing; ``metadata["ssemnet"]["arrow_scale"]`` records it.

    Parameters
    ----------
    vectors, magnitude : from :func:`stack_vectors`.
    source_name : str
    section_shape : (int, int)
        (H, W) of a section, to size arrows and line widths.
    length : float, optional
        Drawing scale; default :func:`arrow_scale`.

    Returns
    -------
    (data, kwargs, "vectors")
    """
    _, _, spacing = arrow_grid(section_shape, arrows_across)
    if length is None:
        zs = np.asarray(vectors)[:, 0, 0] if len(vectors) == len(magnitude) else None
        length = arrow_scale(magnitude, spacing, zs)
    meta = metadata or result_metadata(ROLE_DISPLACEMENT, source_name)
    meta[META_KEY].update(arrow_metadata(length, spacing))
    mag = np.asarray(magnitude, dtype=np.float32)
    hi = float(np.percentile(mag, 99)) if mag.size else 1.0
    kwargs: dict[str, Any] = {
        "name": layer_name(source_name, ROLE_DISPLACEMENT),
        "features": {"magnitude": mag},
        "edge_color": "magnitude",
        "edge_colormap": "plasma",
        "edge_contrast_limits": (0.0, max(hi, 1e-3)),
        "edge_width": max(1.0, spacing / 10),  # thin enough for the heads to show
        "length": length,
        "vector_style": "arrow",
        "opacity": 0.9,
        "metadata": meta,
    }
    kwargs.update(placement or {})
    return vectors, kwargs, "vectors"


def arrow_metadata(length: float, spacing: int) -> dict[str, Any]:
    """Human-readable description of how the arrows are drawn."""
    return {
        "arrow_scale": float(length),
        "arrow_spacing_px": int(spacing),
        "arrow_note": (f"Arrows every {spacing} px, drawn {length:g}x their true length. Each "
                       "starts at a pixel of the aligned section and points to where that "
                       "content was in the input (backward map, dy/dx in input pixels); "
                       "colour = magnitude in px."),
    }


def ncc_error_layer_data(
    error: np.ndarray,
    source_name: str,
    *,
    placement: Mapping[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    visible: bool = True,
) -> LayerDataTuple:
    """Image layer data for the local 1 - NCC map, made to overlay the aligned stack.

    Parameters
    ----------
    error : ndarray, shape (Z, H, W)
        From :func:`local_ncc_error` (0 where invalid, about 0..2 elsewhere).

    Returns
    -------
    (data, kwargs, "image")
    """
    kwargs: dict[str, Any] = {
        "name": layer_name(source_name, ROLE_NCC_ERROR),
        "colormap": "magma",
        "contrast_limits": error_contrast_limits(error),
        "blending": "additive",
        # subtle by default: the aligned tissue must stay readable underneath
        "opacity": 0.35,
        "visible": visible,
        "metadata": metadata or result_metadata(ROLE_NCC_ERROR, source_name),
    }
    kwargs.update(placement or {})
    return error.astype(np.float32, copy=False), kwargs, "image"


def error_contrast_limits(error: np.ndarray) -> list[float]:
    """Median to 99th percentile of the nonzero error: real neighbours differ everywhere
    (1 - NCC of about 0.5-0.8 is normal), so only the worst regions should light up."""
    sample = np.asarray(error[:, ::2, ::2], dtype=np.float32)
    values = sample[sample > 0]
    if values.size == 0:
        return [0.0, 1.0]
    lo, hi = np.percentile(values, [75, 99.5])
    return [float(lo), float(max(hi, lo + 0.1))]


def local_ncc_error(aligned: np.ndarray, valid: np.ndarray | None = None, *,
                    flags: Sequence[str] | None = None, sigma: float = 8.0,
                    sections: Sequence[int] | None = None) -> np.ndarray:
    """1 - local NCC of each section with its previous usable neighbour (core metric).

    Parameters
    ----------
    aligned : ndarray, shape (Z, H, W)
    valid : ndarray, shape (Z, H, W), bool, optional
    flags : sequence of str, optional
        Per-section flags; ``"blank"`` sections are skipped (their map is 0).
    sigma : float
        Gaussian window of the local statistics, in pixels.
    sections : sequence of int, optional
        Only these sections' maps (the others are 0).

    Returns
    -------
    ndarray, shape (Z, H, W), float32
        0 where invalid or where a section has no usable neighbour.
    """
    from .core.metrics import local_ncc_error as core_local_ncc_error

    blank = None if flags is None else np.array([f == "blank" for f in flags])
    return core_local_ncc_error(aligned, valid, sigma=sigma, blank=blank, sections=sections)


# --- viewer helpers (model only, no Qt) --------------------------------------------------


def find_result_layer(viewer: Any, source_name: str, role: str) -> Any | None:
    """The layer this plugin made for ``source_name`` and ``role``, or None."""
    for layer in viewer.layers:
        entry = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
        if entry and entry.get("role") == role and entry.get("source") == source_name:
            return layer
    return None


def layer_kind(layer: Any) -> str:
    """``"image"``, ``"labels"``, ``"vectors"``... (napari's layer type string)."""
    # __class__, not type(): plugin widgets see layers through napari's PublicOnlyProxy
    return layer.__class__.__name__.lower()


def is_result_layer(layer: Any) -> bool:
    """True for layers made by this plugin."""
    return isinstance(layer.metadata, dict) and META_KEY in layer.metadata


def remove_layer(viewer: Any, layer: Any) -> None:
    """Remove ``layer`` from ``viewer`` in a way napari 0.9.2 survives on software OpenGL.

    There (vispy 0.17, Mesa), removing two layers between two canvas draws, or removing a
    layer that was drawn and then hidden, made the next draw segfault; removing each layer
    visible and right after a draw did not (docs/widget.md, "Known problems").
    """
    if layer not in viewer.layers:
        return
    from qtpy.QtCore import QEventLoop
    from qtpy.QtWidgets import QApplication

    layer.visible = True
    if QApplication.instance() is not None:
        QApplication.processEvents(QEventLoop.ProcessEventsFlag.ExcludeUserInputEvents)
    viewer.layers.remove(layer)


def upsert_layer(viewer: Any, layer_data: LayerDataTuple, *, role: str, source_name: str
                 ) -> Any:
    """Add the result layer, or update in place the one this plugin made earlier.

    Only layers whose metadata marks them as this plugin's result for ``source_name`` and
    ``role`` are updated; a user layer with the same name is left alone (napari then adds
    ours under a de-duplicated name).

    Returns
    -------
    napari.layers.Layer
    """
    data, kwargs, layer_type = layer_data
    existing = find_result_layer(viewer, source_name, role)
    if existing is None or layer_kind(existing) != layer_type:
        if existing is not None:
            remove_layer(viewer, existing)
        adder = getattr(viewer, f"add_{layer_type}")
        return adder(data, **kwargs)
    update = {k: v for k, v in kwargs.items() if k not in ("name", "visible", "opacity",
                                                           "blending")}
    if layer_type == "vectors":
        features = update.pop("features", None)
        existing.data = data
        if features is not None:
            existing.features = features
        for key in ("edge_colormap", "edge_contrast_limits", "edge_width", "length",
                    "vector_style"):
            if key in update:
                setattr(existing, key, update.pop(key))
        existing.edge_color = update.pop("edge_color", "magnitude")
    else:
        existing.data = data
        for key in ("contrast_limits", "colormap"):
            if key in update:
                setattr(existing, key, update.pop(key))
    for key in PLACEMENT_KEYS:
        if key in update:
            setattr(existing, key, update.pop(key))
    if "metadata" in update:
        existing.metadata = update.pop("metadata")
    return existing
