"""Public alignment API: :func:`align_stack`, :func:`iter_align_stack`, :class:`AlignmentResult`.

Axis convention (used throughout the package):

* stack: ``ndarray, shape (Z, H, W)``
* displacement: ``ndarray, shape (Z, 2, H, W)``, float32, channel order (dy, dx), in input
  pixels, a BACKWARD map: ``aligned[z](y, x) = stack[z](y + dy, x + dx)`` (bilinear).
  It holds the whole transform, pre-alignment included.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .device import run_environment
from .errors import AlignmentCancelled, InputError
from .params import AlignParams, ParameterError

# Section flags (strings so they serialise to JSON/NPZ and read well in the UI).
FLAG_OK = ""
FLAG_BLANK = "blank"
FLAG_NO_OVERLAP = "no_overlap"
FLAG_LOW_CONFIDENCE = "low_confidence"
FLAG_DUPLICATE = "duplicate"
FLAG_POOR_MATCH = "poor_match"
USABLE_FLAGS = (FLAG_OK, FLAG_LOW_CONFIDENCE, FLAG_POOR_MATCH)

POOR_MATCH_RATIO = 0.5
"""A pair of adjacent aligned sections whose NCC is under this share of the stack's usual
NCC (:func:`link_yardstick`) is a bad link (:func:`flag_poor_links`). Pairs of intact ISBI
and VNC sections measured 0.61 or more of it (43 runs), the pair that links a foreign or
turned section to its stack 0.45 or less (8 runs; docs/benchmarks.md, "Checking the links
after the fit")."""

GAP_MATCH_RATIO = 0.25
"""The same for a pair that skips a blank section or one with no overlap: it spans more
tissue, and such pairs of intact sections measured 0.39 or more (a pair across a repeated
section is held to :data:`POOR_MATCH_RATIO`: the repeat adds no tissue)."""

MIN_SIZE = 32
"""Smallest section side the pyramid and the encoder can work with (pixels)."""


@dataclass
class Progress:
    """A progress report: ``step`` of ``total`` in ``stage``."""

    stage: str
    step: int
    total: int
    message: str = ""
    section: int | None = None


class ProgressRate:
    """Which :class:`Progress` events are worth showing: the first of each stage, each
    stage's last step, and otherwise at most one every ``interval`` seconds.

    The core reports every fit iteration (about 150 a second on the sample); front ends that
    draw each report (a terminal bar, a Qt window) pass them through this first.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stage: str | None = None
        self._last = -float("inf")

    def due(self, event: Progress) -> bool:
        """True if ``event`` should be shown (and remembered as the last one shown)."""
        now = time.monotonic()
        if (event.stage == self._stage and event.step < event.total
                and now - self._last < self.interval):
            return False
        self._stage, self._last = event.stage, now
        return True


@dataclass
class SectionResult:
    """One finished section, reported while the full result is assembled.

    Attributes
    ----------
    z : int
    aligned : ndarray, shape (H, W), float32
    displacement : ndarray, shape (2, H, W), float32 (dy, dx)
    valid : ndarray, shape (H, W), bool
    flag : str
        As known when the section is rendered; in full runs the check of the links once
        all are rendered (:func:`flag_poor_links`) can still make ``""`` or
        ``"low_confidence"`` into ``"poor_match"`` or ``"low_confidence"`` in the result.
    ncc_before, ncc_after : float
        Mean NCC with the adjacent sections before and after (set by
        :func:`iter_align_section`; NaN in full runs, whose result holds them).
    placed_again : bool
        Set by :func:`iter_align_section` after a run: the run's placement of the section
        was dropped for a new one (``flag`` then judges the new placement).
    """

    z: int
    aligned: np.ndarray
    displacement: np.ndarray
    valid: np.ndarray
    flag: str = FLAG_OK
    ncc_before: float = float("nan")
    ncc_after: float = float("nan")
    placed_again: bool = False


@dataclass
class AlignmentResult:
    """Everything an alignment run produced.

    Attributes
    ----------
    aligned : ndarray, shape (Z, H, W), float32
        Input intensities resampled through ``displacement``; 0 outside the section.
    displacement : ndarray, shape (Z, 2, H, W), float32
        Backward map (dy, dx) in input pixels, pre-alignment included.
    valid : ndarray, shape (Z, H, W), bool
        True where the aligned pixel comes from inside its section.
    ncc_before, ncc_after : ndarray, shape (Z,), float64
        Mean NCC of each section with its adjacent (z-1, z+1) non-blank sections, on pixels
        valid in both; NaN where a section has no usable neighbour or is blank.
    flags : list of str, length Z
        ``""`` for a normal section, else ``"blank"``, ``"no_overlap"``,
        ``"low_confidence"`` (no confident chain of pre-alignment matches links it to the
        reference: a doubtful match flags every section placed through it, as does a
        ``poor_match`` section that the ones beyond it follow),
        ``"poor_match"`` (after alignment it matches its neighbour on the side of the
        reference far worse than the stack's other pairs match; see
        :func:`flag_poor_links`) or ``"duplicate"`` (the same image as its neighbour on the
        side of the reference, saved twice; left out of the NCC).
    params : AlignParams
        Those of the run.
    timings : dict of str to float
        Seconds per stage and ``"total"``.
    device : str
    section_params : dict of int to AlignParams
        Sections aligned again on their own afterwards (the widget's Re-align section),
        with the parameters used there.
    environment : dict
        Versions, CPU thread count, device and date of the run
        (:func:`core.device.run_environment`); stored with saved fields.
    pair_ncc : dict of (int, int) to float
        NCC after alignment of each pair of consecutive usable sections (a, b), a < b: the
        values behind ``ncc_after`` and the ``poor_match`` check.
    placed_flags : list of str, length Z
        The flags before that check (:func:`flag_poor_links`), for running it again after
        a section moved (Re-align section).
    notes : list of str
        Advice about the run for the user (e.g. :func:`scale_note`); empty for most runs.
    """

    aligned: np.ndarray
    displacement: np.ndarray
    valid: np.ndarray
    ncc_before: np.ndarray
    ncc_after: np.ndarray
    flags: list[str]
    params: AlignParams
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    section_params: dict[int, AlignParams] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    pair_ncc: dict[tuple[int, int], float] = field(default_factory=dict)
    placed_flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def section_params_json(self) -> str:
        """``section_params`` as a JSON object keyed by section ("" when there are none)."""
        if not self.section_params:
            return ""
        return json.dumps({str(z): p.to_dict() for z, p in sorted(self.section_params.items())})

    @property
    def flagged(self) -> list[int]:
        """Indices of sections with a non-empty flag."""
        return [z for z, f in enumerate(self.flags) if f]

    def summary(self) -> str:
        """A few human-readable lines about the run."""
        return format_summary(self.aligned.shape, self.device, self.timings, self.ncc_before,
                              self.ncc_after, self.flags, reference=self.params.reference)


SCALE_NOTE_AT = 0.05
"""Median scale deviation between neighbours (affine fits of the pre-alignment's patches)
from which a run without an affine pre-alignment advises one. Measured medians on the
2-core dev box (docs/benchmarks.md): untouched ssTEM 0.004-0.020 (ISBI, VNC, the sample);
sections scaled by up to 2 % per axis 0.015-0.042, by 5 % 0.029-0.049, by 10 % 0.044-0.089
(ISBI 8 seeds with and without a blank section, VNC 4 seeds). Only with at least
``SCALE_NOTE_MATCHES`` matches on sections of at least ``SCALE_NOTE_SIDE`` px: on 96 px crops
of the sample the fits of 2 matches said 11 % for sections of one scale."""
SCALE_NOTE_MATCHES = 4
SCALE_NOTE_SIDE = 256


def scale_note(scales: dict[int, float], prealign: str, size: tuple[int, int]) -> str:
    """The advice to use ``prealign='affine'`` when neighbouring sections of ``size``
    (H, W) differ in scale (``scales``: :func:`prealign.prealign_stack`'s), or ""."""
    if (prealign == "affine" or len(scales) < SCALE_NOTE_MATCHES
            or min(size) < SCALE_NOTE_SIDE):
        return ""
    median = float(np.median(list(scales.values())))
    if median < SCALE_NOTE_AT:
        return ""
    return (f"Neighbouring sections seem to differ in scale by {100 * median:.0f} % (median "
            f"of {len(scales)} matches; sections of one scale measured 0.4-2 %). A "
            f"'{prealign}' pre-alignment cannot follow that: if the sections were compressed "
            "unevenly by the knife or imaged at other magnifications, align again with "
            "prealign='affine' (on sections scaled by up to 10 % it was about twice as "
            "consistent).")


def format_summary(shape: tuple[int, ...], device: str, timings: dict[str, float],
                   ncc_before: np.ndarray, ncc_after: np.ndarray, flags: list[str], *,
                   reference: int | None = None) -> str:
    """The lines of :meth:`AlignmentResult.summary` for a run of a (Z, H, W) stack."""
    finite_b = np.nanmean(ncc_before) if np.isfinite(ncc_before).any() else np.nan
    finite_a = np.nanmean(ncc_after) if np.isfinite(ncc_after).any() else np.nan
    z = shape[0]
    total = timings.get("total", float("nan"))
    lines = [
        f"{z} sections of {shape[1]}x{shape[2]} px on {device} in {total:.1f} s "
        f"({total / max(z, 1):.2f} s/section)",
        f"mean adjacent NCC: {finite_b:.3f} before, {finite_a:.3f} after",
    ]
    stages = [f"{k} {v:.1f} s" for k, v in timings.items() if k != "total"]
    if stages:
        lines.insert(1, "stages: " + ", ".join(stages))
    for zz, f in enumerate(flags):
        if f:
            lines.append(f"section {zz}: {f}")
    doubtful = [zz for zz, f in enumerate(flags) if f == FLAG_LOW_CONFIDENCE]
    if doubtful:
        lines.append(
            f"{_ranges(doubtful)}: {FLAG_LOW_CONFIDENCE} means that no confident chain of "
            "matches links the section to the reference (a doubtful pre-alignment match, "
            "parts of the section that match at different places, as at a fold, or "
            f"a {FLAG_POOR_MATCH} section on the way); a wrong match moves every section "
            "placed after it together, so look at these (a section out of order or from "
            "elsewhere, or lost sections just before them, are the usual causes)")
    poor = [zz for zz, f in enumerate(flags) if f == FLAG_POOR_MATCH]
    if poor:
        lines.append(
            f"{_ranges(poor)}: {FLAG_POOR_MATCH} means that after alignment the section "
            "matches its neighbour towards the reference at less than half the stack's usual "
            "NCC (a quarter across a blank section): it may be off, damaged or from "
            "elsewhere; if the section after it does not match the one before it either, the "
            f"sections beyond were placed through it and are flagged {FLAG_LOW_CONFIDENCE}")
        if reference is not None:
            lines.extend(placed_through_text(flags, reference))
        others = [zz for zz, f in enumerate(flags) if f in USABLE_FLAGS and zz != reference]
        if reference is not None and others and all(flags[zz] != FLAG_OK for zz in others):
            lines.append(
                f"every section but the reference ({reference}) is flagged: the reference "
                "section itself may be damaged or from elsewhere; look at it, and align "
                "again with another reference if it is")
    return "\n".join(lines)


def placed_through(flags: list[str], reference: int) -> dict[int, list[int] | None]:
    """For each ``poor_match`` section, the ``low_confidence`` sections right after it on
    the side away from the reference (blank ones passed over): those placed through it,
    which may be off together with it. An empty list: the next usable section is not
    flagged, i.e. it matched the section before the poor one, so that one is off alone.
    None: no usable section follows it."""
    out: dict[int, list[int] | None] = {}
    for p, f in enumerate(flags):
        if f != FLAG_POOR_MATCH or p == reference:
            continue
        step = 1 if p > reference else -1
        usable = [q for q in range(p + step, len(flags) if step > 0 else -1, step)
                  if flags[q] != FLAG_BLANK]
        if not usable:
            out[p] = None
            continue
        after = []
        for q in usable:
            if flags[q] != FLAG_LOW_CONFIDENCE:
                break
            after.append(q)
        out[p] = sorted(after)
    return out


def placed_through_text(flags: list[str], reference: int) -> list[str]:
    """One sentence per ``poor_match`` section: off alone, or with the sections after it."""
    lines = []
    for p, after in placed_through(flags, reference).items():
        if after:
            lines.append(f"section {p} matches poorly and {_ranges(after)} "
                         f"{'were' if len(after) > 1 else 'was'} placed through it: they may "
                         "be off together with it")
        elif after is not None:
            lines.append(f"section {p} matches poorly on its own: the next section matches "
                         "the one before it, so the sections beyond are not affected")
    return lines


def _nearest_usable(blank: np.ndarray, params: AlignParams) -> str:
    """``"section 2"``: the section nearest the blank reference that is not blank."""
    ok = np.nonzero(~np.asarray(blank, bool))[0]
    return f"section {int(ok[np.argmin(np.abs(ok - params.reference))])}"


def _ranges(sections: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"sections 3-5, 9"``."""
    parts, start = [], sections[0]
    for a, b in zip(sections, sections[1:] + [None], strict=True):
        if b != a + 1:
            parts.append(f"{start}-{a}" if a > start else f"{a}")
            start = b
    return ("sections " if len(sections) > 1 else "section ") + ", ".join(parts)


ProgressCallback = Callable[[Progress | SectionResult], None]
StopCallback = Callable[[], bool]


def run_generator(gen: Generator[Any, None, Any], progress: ProgressCallback | None) -> Any:
    """Drive one of the ``iter_*`` generators to its return value, passing events on."""
    _check_callable(progress=progress)
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(event)


def map_events(gen: Generator[Any, None, Any], fn: Callable[[Any], Any]
               ) -> Generator[Any, None, Any]:
    """Pass on ``gen``'s events through ``fn`` (returning the event to pass on, or None to
    drop it); returns ``gen``'s return value. Closing this generator closes ``gen``."""
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            event = fn(event)
            if event is not None:
                yield event
    finally:
        gen.close()


def check_layout(shape: tuple[int, ...], dtype: Any, *, name: str = "stack",
                 min_sections: int = 2) -> None:
    """The checks of :func:`check_stack` that need only the shape and data type (for a lazy
    array, before its data is read).

    Raises
    ------
    InputError
    """
    shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    if dtype.kind == "b":
        raise InputError(f"The {name} is a boolean mask, not an image; pass the grayscale EM "
                         "stack.")
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise InputError(f"The {name} has dtype {dtype}; a real-valued (integer or float) "
                         "grayscale stack is needed.")
    if len(shape) == 2:
        raise InputError(f"The {name} is a single 2D image of shape {shape}; a stack of "
                         "sections with shape (Z, H, W) is needed.")
    if len(shape) == 4 and shape[-1] in (3, 4):
        raise InputError(f"The {name} looks like an RGB(A) stack with shape {shape}; convert "
                         "it to grayscale (Z, H, W) first.")
    if len(shape) != 3:
        raise InputError(f"The {name} has shape {shape}; a grayscale stack of shape "
                         "(Z, H, W) is needed. Split channels or time points first.")
    if shape[-1] in (3, 4) and shape[-2] > 16:
        raise InputError(f"The {name} of shape {shape} looks like a single RGB(A) image; "
                         "a grayscale stack (Z, H, W) is needed.")
    z, h, w = shape
    if z < min_sections:
        raise InputError(f"The {name} has {z} section(s); at least {min_sections} are needed.")
    if h < MIN_SIZE or w < MIN_SIZE:
        raise InputError(f"Sections of {h}x{w} px are too small; at least {MIN_SIZE}x{MIN_SIZE} "
                         "px are needed.")


def check_stack(stack: Any, *, name: str = "stack", min_sections: int = 2,
                masks: bool = False) -> np.ndarray:
    """Validate a (Z, H, W) real-valued stack and return it as an array (never a copy-on-write
    view that could alias user data into an in-place operation).

    ``masks=True`` also accepts a boolean stack (e.g. a mask to resample through saved
    fields) and returns it as uint8 0/1.

    Raises
    ------
    InputError
        With a message that says what is wrong and what to do.
    """
    if isinstance(stack, str | bytes | os.PathLike):  # it read as a 0-D string "dtype <U19"
        raise InputError(f"The {name} is a file name ({os.fsdecode(stack)!r}), not an array; "
                         "read it first with napari_ssemnet.core.io.read_stack.")
    try:
        arr = np.asarray(stack)
    except Exception as exc:  # pragma: no cover - exotic array-likes
        raise InputError(f"The {name} could not be read as an array: {exc}") from None
    if arr.dtype == bool and masks:
        arr = arr.astype(np.uint8)
    check_layout(arr.shape, arr.dtype, name=name, min_sections=min_sections)
    z = arr.shape[0]
    if np.issubdtype(arr.dtype, np.floating):
        # one section at a time: a whole-stack mask would be 1 byte per pixel of a big stack
        zs = [i for i in range(z) if not np.isfinite(arr[i]).all()]
        if zs:
            shown = ", ".join(str(int(s)) for s in zs[:10]) + (" ..." if len(zs) > 10 else "")
            raise InputError(f"The {name} contains NaN or infinite values in section(s) {shown}; "
                             "replace them (e.g. with 0) first.")
        if arr.dtype.itemsize > 4:  # the aligned stack is float32
            big = max(float(np.abs(arr[i]).max()) for i in range(z))
            if big > float(np.finfo(np.float32).max):
                raise InputError(f"The {name} has values up to {big:.3g}, beyond the float32 "
                                 "range of the aligned stack (3.4e38); rescale it first.")
    return arr


def check_ignore(ignore: Any, shape: tuple[int, ...], *, name: str = "ignore mask") -> Any:
    """Validate a mask of what to leave out (:func:`align_stack`'s ``ignore``): None, or an
    array-like of the stack's (Z, H, W) shape, boolean or integer (nonzero: leave out), such
    as a napari Labels layer or a memory-mapped TIFF. Returned as given (not copied: its
    sections are read as they are needed).

    Raises
    ------
    InputError
    """
    if ignore is None:
        return None
    if not hasattr(ignore, "shape") or not hasattr(ignore, "dtype"):
        try:
            ignore = np.asarray(ignore)
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise InputError(f"The {name} could not be read as an array: {exc}") from None
    got = tuple(int(n) for n in ignore.shape)
    if got != tuple(shape):
        raise InputError(f"The {name} has shape {got}, but the stack is {tuple(shape)}; it "
                         "needs one mask section of the same size per stack section.")
    kind = np.dtype(ignore.dtype).kind
    if kind not in "biu":
        raise InputError(f"The {name} has dtype {ignore.dtype}; it must be a boolean or "
                         "integer mask (nonzero where a section is left out), e.g. a Labels "
                         "layer.")
    return ignore


def resolve_params(params: AlignParams | dict[str, Any] | None, overrides: dict[str, Any]
                   ) -> AlignParams:
    """``params`` (default ``AlignParams()``; a dict is read by :meth:`AlignParams.from_dict`)
    with ``overrides`` applied, validated again (its fields may have been set since).

    Raises
    ------
    ParameterError
    """
    if params is None:
        params = AlignParams()
    elif isinstance(params, dict):
        params = AlignParams.from_dict(params)
    elif not isinstance(params, AlignParams):
        raise ParameterError(f"params must be an AlignParams (or a dict of parameters); got "
                             f"{type(params).__name__}.")
    # a new object, validated as it is made: fields set after construction are checked too,
    # and the caller's object is left as it was
    out = params.replace(**overrides)
    if overrides.get("weights") and out.features != "custom":  # it ran the shipped model
        raise ParameterError(f"weights is used only with features='custom' (features is "
                             f"'{out.features}' here); add features='custom', or leave "
                             "weights out.")
    if out.weights and out.features != "custom":
        # stored with the results, which must not name a file that was not used
        out = out.replace(weights="")
    elif out.weights and not os.path.isabs(out.weights):
        # stored with the results: relative, it named another file from another folder
        # (the command line already stored it absolute)
        out = out.replace(weights=os.path.abspath(out.weights))
    return out


def result_environment(params: AlignParams, device: Any) -> dict[str, Any]:
    """:func:`core.device.run_environment`, and for custom weights a digest of the weights
    file (its path alone says nothing once the file is overwritten): what a result records
    as ``environment``."""
    env = run_environment(device)
    if params.features == "custom" and params.weights and os.path.isfile(params.weights):
        from .io import file_digest

        env["weights_digest"] = file_digest(params.weights)
    return env


def check_reference(reference: int, z_count: int) -> None:
    """Raise :class:`InputError` if ``reference`` is not a section of a ``z_count`` stack."""
    if not 0 <= reference < z_count:
        raise InputError(f"Reference section {reference} is out of range; the stack has "
                         f"sections 0 to {z_count - 1}.")


def _check_callable(**hooks: Any) -> None:
    """A hook that is not callable failed with a bare TypeError at its first call."""
    for name, hook in hooks.items():
        if hook is not None and not callable(hook):
            raise InputError(f"{name} must be a function (or None); got "
                             f"{type(hook).__name__}.")


def _check_encoder(encoder: Any) -> None:
    if encoder is not None:  # torch is imported only when one is given
        from .features import check_encoder

        check_encoder(encoder)


def stopper(should_stop: StopCallback | None) -> Callable[[], None]:
    """A check to call between steps: raises :class:`AlignmentCancelled` once
    ``should_stop()`` returns True."""

    def stop_check() -> None:
        if should_stop is not None and should_stop():
            raise AlignmentCancelled("Alignment cancelled.")

    return stop_check


def render_section(source: np.ndarray, residual: Any, matrices: np.ndarray, i: int,
                   device: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Section ``i`` of a fitted stack at full resolution.

    Parameters
    ----------
    source : ndarray, shape (H, W)
        The raw section (any real dtype).
    residual : fit.Residual
    matrices : ndarray, shape (Z, 3, 3)
        Pre-alignment of the fitted stack.

    Returns
    -------
    displacement : ndarray, shape (2, H, W), float32
    aligned : ndarray, shape (H, W), float32
    valid : ndarray, shape (H, W), bool
    """
    from . import fit, warp

    disp = fit.full_displacement(residual, matrices, i, source.shape, device=device)
    # one section at a time: a float copy of a whole integer stack is 4 bytes per pixel
    img, ok = warp.warp_image(warp.float_tensor(source, device), disp)
    return disp.cpu().numpy(), img.cpu().numpy(), ok.cpu().numpy()


def tissue_after(tissue: np.ndarray, displacement: np.ndarray, device: Any) -> np.ndarray:
    """(H, W) bool: which aligned pixels come from tissue, for a section's (H, W) tissue
    mask and its (2, H, W) displacement."""
    from . import warp

    out, _ = warp.warp_image(warp.float_tensor(tissue, device),
                             warp.float_tensor(displacement, device))
    return out.cpu().numpy() > 0.999


def on_tissue(ok: np.ndarray, fill: np.ndarray | None, displacement: np.ndarray | None,
              device: Any) -> np.ndarray:
    """A section's valid pixels ``ok`` less those that come from its (H, W) ``fill``
    (None: no fill), resampled through ``displacement`` (None: not moved), for the NCC."""
    if fill is None or not fill.any():
        return ok
    return ok & (~fill if displacement is None else tissue_after(~fill, displacement, device))


def placed_doubtfully(blank: bool, confidence: float, prealign: str) -> bool:
    """Whether a section's chain of pre-alignment matches to the reference has a doubtful
    link (:func:`section_flag` then says ``low_confidence``, unless a stronger flag wins)."""
    from .prealign import MIN_CONFIDENCE

    return not blank and prealign != "none" and confidence < MIN_CONFIDENCE


def section_flag(blank: bool, valid: np.ndarray, confidence: float, prealign: str) -> str:
    """A finished section's flag: blank, then no overlap (under a quarter of the aligned
    section comes from inside it), then a doubtful pre-alignment match."""
    if blank:
        return FLAG_BLANK
    if float(np.mean(valid)) < 0.25:
        return FLAG_NO_OVERLAP
    if placed_doubtfully(blank, confidence, prealign):
        return FLAG_LOW_CONFIDENCE
    return FLAG_OK


def link_yardstick(pairs: dict[tuple[int, int], float]) -> float | None:
    """The stack's usual NCC between adjacent aligned sections: the median over sections of
    each one's better adjacent pair, so that a few bad sections (each spoils two pairs)
    lower it less than they lower the median of the pairs. None with fewer than 3 adjacent
    pairs, or when it is not positive."""
    best: dict[int, float] = {}
    n = 0
    for (a, b), v in pairs.items():
        if b - a == 1 and np.isfinite(v):
            n += 1
            for z in (a, b):
                best[z] = max(best.get(z, -np.inf), float(v))
    if n < 3:
        return None
    y = float(np.median(list(best.values())))
    return y if y > 0 else None


def poor_link(pairs: dict[tuple[int, int], float], a: int, b: int, yardstick: float,
              flags: list[str]) -> bool:
    """Whether the pair of usable sections ``a`` and ``b`` matches under
    :data:`POOR_MATCH_RATIO` of ``yardstick`` (:data:`GAP_MATCH_RATIO` when a section
    between them is blank or has no overlap; a repeated one adds no tissue); a pair with no
    NCC (no tissue in common) is poor, one not in ``pairs`` is not judged."""
    lo, hi = min(a, b), max(a, b)
    if (lo, hi) not in pairs:
        return False
    gap = any(flags[z] != FLAG_DUPLICATE for z in range(lo + 1, hi))
    ratio = GAP_MATCH_RATIO if gap else POOR_MATCH_RATIO
    return not pairs[(lo, hi)] >= ratio * yardstick


def flag_poor_links(flags: list[str], pairs: dict[tuple[int, int], float], reference: int,
                    skip_ncc: Callable[[int, int], float]) -> list[str]:
    """Flags after a check of the aligned stack's links, walking out from the reference.

    On each side of the reference, the first poor link (:func:`poor_link`) between a usable
    section a and the next usable one b, farther out, gives b ``poor_match``; unless a was
    placed doubtfully (``low_confidence``) and the section before a matches b as well as a
    does and at :data:`GAP_MATCH_RATIO` of the yardstick: then a gets ``poor_match`` and the
    walk goes on from b. If the usable
    section c after b matches a (``skip_ncc(a, c)``) at least as well as a matches b, and at
    :data:`GAP_MATCH_RATIO` of the yardstick, b alone is off (a section from elsewhere or
    turned) and the walk goes on from c; otherwise c and every section beyond it were placed
    through the bad link and get ``low_confidence``.

    Parameters
    ----------
    flags : list of str, length Z
        The sections' flags so far; only usable ones (:data:`USABLE_FLAGS`) change, and
        ``low_confidence`` only to ``poor_match``.
    pairs : dict of (int, int) to float
        NCC after alignment of consecutive usable sections a < b.
    reference : int
    skip_ncc : callable
        NCC after alignment of two usable sections (a, c); called only after a poor link.

    Returns
    -------
    list of str, length Z
    """
    out = list(flags)
    yardstick = link_yardstick(pairs)
    if yardstick is None:
        return out
    usable = [z for z, f in enumerate(flags) if f in USABLE_FLAGS]
    for side in (1, -1):
        path = [reference] + sorted((z for z in usable if (z - reference) * side > 0),
                                    key=lambda z: abs(z - reference))
        i = 1
        while i < len(path):
            a, b = path[i - 1], path[i]
            i += 1
            if not poor_link(pairs, a, b, yardstick, flags):
                continue
            v = pairs[(min(a, b), max(a, b))]
            floor = max(GAP_MATCH_RATIO * yardstick, v if np.isfinite(v) else -np.inf)
            if (flags[a] == FLAG_LOW_CONFIDENCE and i >= 3
                    and skip_ncc(path[i - 3], b) >= floor):
                # a doubtfully placed section (e.g. a fold: no one map fits it) between two
                # that match each other: it is the odd one, not the section after it
                out[a] = FLAG_POOR_MATCH
                continue
            out[b] = FLAG_POOR_MATCH
            if i == len(path):
                break
            if not skip_ncc(a, path[i]) >= floor:  # the sections beyond follow b
                for z in path[i:]:
                    if out[z] == FLAG_OK:
                        out[z] = FLAG_LOW_CONFIDENCE
                break
            i += 1  # b alone is off: its link onwards says nothing about the next section
    return out


def check_binning(params: AlignParams, h: int, w: int) -> None:
    """Raise :class:`InputError` if ``params.fit_binning`` leaves sections too small to fit."""
    b = params.fit_binning
    if min(h, w) // b < MIN_SIZE:
        raise InputError(f"Fit binning {b} leaves {h // b}x{w // b} px of these {h}x{w} px "
                         f"sections; the fit needs at least {MIN_SIZE}x{MIN_SIZE} px. Use a "
                         f"fit binning of at most {max(1, min(h, w) // MIN_SIZE)}.")


def align_stack(
    stack: np.ndarray,
    params: AlignParams | None = None,
    *,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
    encoder: Any = None,
    ignore: Any = None,
    **overrides: Any,
) -> AlignmentResult:
    """Align a serial-section stack onto its reference section.

    Parameters
    ----------
    stack : array_like, shape (Z, H, W)
        Any integer or float dtype. Never modified.
    params : AlignParams or dict, optional
        Tuning knobs; defaults to ``AlignParams()``. Validated again here, so fields changed
        after the object was made are checked too; it is not modified.
    progress : callable, optional
        Called with every :class:`Progress` and :class:`SectionResult` event.
    should_stop : callable, optional
        Polled several times a second (the longest gaps measured on 2 CPU cores: 0.5 s on
        4 x 1024^2, and 0.9 s once per process while torch first builds its optimiser, which
        is started in the background);
        returning True raises :class:`AlignmentCancelled`.
    encoder : torch.nn.Module, optional
        A feature encoder to use instead of the one named by ``params.features``: a module
        with an ``encode(x)`` method mapping sections (B, 1, H, W) float32 to finite
        features (B, C, h, w), as :class:`~napari_ssemnet.core.features.CAE` does. The
        result's ``params`` cannot name it (``features`` stays as given): to make a run
        reproducible from its fields, save a CAE with ``save_weights`` and run with
        ``features='custom', weights=...`` instead.
    ignore : array_like, shape (Z, H, W), optional
        What to leave out of the alignment: nonzero (or True) where a section has dust, a
        fold, a film edge or a stain (:func:`check_ignore`). Those pixels count as no
        tissue, as padding does: they add no evidence to the pre-alignment, the fit or the
        NCC, and the sections are still warped whole. Never modified.
    **overrides
        Field values of :class:`AlignParams`, e.g. ``reference=3, grid_spacing=32``.

    Returns
    -------
    AlignmentResult

    Raises
    ------
    InputError
        The stack cannot be aligned (shape, values, too small, a reference past its end).
    ParameterError
        A parameter is unknown, of the wrong type or out of range.
    WeightsError
        The encoder weights cannot be loaded.
    MemoryLimitError
        The stack does not fit in the free memory.
    AlignmentCancelled
        ``should_stop`` returned True.

    All of them are :class:`SsemnetError` (importable from ``napari_ssemnet.core``), whose
    message is written for the user.
    """
    gen = iter_align_stack(stack, params, should_stop=should_stop, encoder=encoder,
                           ignore=ignore, **overrides)
    return run_generator(gen, progress)


def iter_align_stack(
    stack: np.ndarray,
    params: AlignParams | None = None,
    *,
    should_stop: StopCallback | None = None,
    encoder: Any = None,
    ignore: Any = None,
    **overrides: Any,
) -> Generator[Progress | SectionResult, None, AlignmentResult]:
    """Generator form of :func:`align_stack` for worker threads.

    Yields :class:`Progress` several times a second and one :class:`SectionResult` per
    finished section; returns the :class:`AlignmentResult` (``StopIteration.value``).
    Closing the generator (or ``should_stop`` returning True) stops the run.

    Raises
    ------
    MemoryLimitError
        Before any work if the stack would not fit in the free memory (CPU), or when an
        out-of-memory error surfaces during the run.
    """
    from . import memory

    arr = check_stack(stack)
    ignore = check_ignore(ignore, arr.shape)
    params = resolve_params(params, overrides)
    _check_encoder(encoder)
    _check_callable(should_stop=should_stop)
    from .blocks import guarded_shape

    if 0 < params.block_size < arr.shape[0]:
        gen = _iter_align_stack_blocks(arr, params, should_stop=should_stop, encoder=encoder,
                                       ignore=ignore)
    else:
        gen = _iter_align_stack(arr, params, should_stop=should_stop, encoder=encoder,
                                ignore=ignore)
    return (yield from memory.guard(gen, guarded_shape(params.block_size, arr.shape),
                                    params.fit_binning))


def _iter_align_stack_blocks(arr: np.ndarray, params: AlignParams, *,
                             should_stop: StopCallback | None, encoder: Any, ignore: Any = None
                             ) -> Generator[Progress | SectionResult, None, AlignmentResult]:
    """Block-wise run (``params.block_size``) into a result held in memory."""
    from .blocks import iter_align_blocks
    from .memory import RESULT_BYTES

    z_count, h, w = arr.shape
    aligned = np.zeros((z_count, h, w), np.float32)
    displacement = np.zeros((z_count, 2, h, w), np.float32)
    valid = np.zeros((z_count, h, w), bool)
    summary = yield from iter_align_blocks(
        arr, params, displacement=displacement, aligned=aligned, valid=valid,
        should_stop=should_stop, encoder=encoder, extra_bytes=RESULT_BYTES * arr.size,
        ignore=ignore)
    return AlignmentResult(aligned=aligned, displacement=displacement, valid=valid,
                           ncc_before=summary.ncc_before, ncc_after=summary.ncc_after,
                           flags=summary.flags, params=params, timings=summary.timings,
                           device=summary.device, environment=summary.environment,
                           pair_ncc=dict(summary.pair_ncc),
                           placed_flags=list(summary.placed_flags))


def _iter_align_stack(arr: np.ndarray, params: AlignParams, *,
                      should_stop: StopCallback | None, encoder: Any, ignore: Any = None
                      ) -> Generator[Progress | SectionResult, None, AlignmentResult]:
    from . import fit, memory, metrics, prealign  # torch is imported lazily
    from .device import pick_device
    from .features import load_feature_extractor

    z_count, h, w = arr.shape
    check_reference(params.reference, z_count)
    check_binning(params, h, w)
    stop_check = stopper(should_stop)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    device = pick_device(params.device)
    memory.check_memory(arr.shape, device, binning=params.fit_binning)
    fit.warm_up_optimiser()

    yield Progress("prepare", 0, 1, f"normalising {z_count} sections")
    t0 = time.perf_counter()
    norm, blank, fill = metrics.normalise_stack(arr, fill=True, should_stop=stop_check,
                                                ignore=ignore)
    masked = "" if ignore is None else " once the ignore mask is left out"
    if blank.all():  # no other reference would help
        raise InputError(f"Every section of the stack is blank or has no structure{masked}; "
                         "there is nothing to align.")
    if blank[params.reference]:
        raise InputError(f"Reference section {params.reference} is blank or has no structure"
                         f"{masked}; choose another reference section "
                         f"({_nearest_usable(blank, params)} is the nearest with structure).")
    if (~blank).sum() < 2:
        raise InputError("Fewer than two sections contain image structure; nothing to align.")
    # flagged, and left out of the NCC (a perfect match says nothing); they stay in the fit:
    # left out like blank sections they were no better (6 seeds of bench_defects' case:
    # 3.27 against 3.16 px mean median)
    twin = metrics.duplicate_sections(norm, blank, params.reference, should_stop=stop_check)
    extractor = encoder if encoder is not None else load_feature_extractor(params)
    timings["prepare"] = time.perf_counter() - t0
    stop_check()
    dups = f", {int((twin >= 0).sum())} repeating a neighbour" if (twin >= 0).any() else ""
    yield Progress("prepare", 1, 1, f"{int((~blank).sum())} of {z_count} sections with "
                                    f"structure{dups}")

    t0 = time.perf_counter()
    scales: dict[int, float] = {}
    matrices, confidence = yield from prealign.prealign_stack(
        norm, blank, reference=params.reference, kind=params.prealign,
        max_rotation=params.max_rotation, device=device, should_stop=stop_check,
        scales=scales)
    timings["prealign"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    free = np.ones(z_count, dtype=bool)
    free[params.reference] = False
    residual = yield from fit.fit_stack(
        norm, matrices, blank=blank, free=free, params=params, extractor=extractor,
        device=device, should_stop=stop_check, fill=fill)
    timings["fit"] = time.perf_counter() - t0

    # the normalised stack (4 bytes per pixel) is not held through the render step
    usable_before = ~blank & (twin < 0)  # as the flags will say, so that nothing is redone
    pairs_before = metrics.adjacent_pairs(norm, None if fill is None else ~fill,
                                          usable_before, should_stop=stop_check)
    del norm

    t0 = time.perf_counter()
    aligned = np.zeros((z_count, h, w), np.float32)
    displacement = np.zeros((z_count, 2, h, w), np.float32)
    valid = np.zeros((z_count, h, w), bool)
    flags = [FLAG_OK] * z_count
    for zz in range(z_count):
        stop_check()
        displacement[zz], aligned[zz], valid[zz] = render_section(
            arr[zz], residual, matrices, zz, device)
        if fill is not None:  # NCC on tissue only: matched padding is not a good result
            # (fill is reused to mark what the NCC leaves out: 1 byte a pixel, not 2)
            fill[zz] = ~on_tissue(valid[zz], fill[zz], displacement[zz], device)
        flags[zz] = section_flag(blank[zz], valid[zz], confidence[zz], params.prealign)
        if twin[zz] >= 0 and flags[zz] in USABLE_FLAGS:
            flags[zz] = FLAG_DUPLICATE
        yield SectionResult(zz, aligned[zz], displacement[zz], valid[zz], flags[zz])
        yield Progress("render", zz + 1, z_count, f"section {zz + 1}/{z_count}", section=zz)
    timings["render"] = time.perf_counter() - t0

    usable = np.array([f in USABLE_FLAGS for f in flags])
    idx = np.nonzero(usable)[0]
    for a, c in zip(idx[:-1], idx[1:], strict=False):  # pairs across a section that lost
        if (a, c) not in pairs_before:                 # its overlap when rendered
            stop_check()
            pairs_before[(int(a), int(c))] = metrics.raw_pair_ncc(arr[a], arr[c])
    ncc_before = metrics.mean_of_pairs(pairs_before, usable)
    tissue = valid if fill is None else ~fill
    pairs_after = metrics.adjacent_pairs(aligned, tissue, usable, robust=True,
                                         should_stop=stop_check)
    placed_flags = flags

    def skip_ncc(a: int, c: int) -> float:
        stop_check()
        return metrics.ncc(aligned[a], aligned[c], tissue[a] & tissue[c], robust=True)

    flags = flag_poor_links(flags, pairs_after, params.reference, skip_ncc)
    ncc_after = metrics.mean_of_pairs(pairs_after, usable)
    timings["total"] = time.perf_counter() - t_start
    return AlignmentResult(aligned=aligned, displacement=displacement, valid=valid,
                           ncc_before=ncc_before, ncc_after=ncc_after, flags=flags,
                           params=params, timings=timings, device=str(device),
                           environment=result_environment(params, device),
                           pair_ncc=pairs_after, placed_flags=placed_flags,
                           notes=[n for n in [scale_note(scales, params.prealign, (h, w))] if n])


def align_section(stack: np.ndarray, z: int, params: AlignParams | None = None, *,
                  previous_displacement: np.ndarray | None = None,
                  progress: ProgressCallback | None = None,
                  should_stop: StopCallback | None = None, encoder: Any = None,
                  ignore: Any = None, **overrides: Any) -> SectionResult:
    """Align one section against its neighbours; see :func:`iter_align_section`."""
    gen = iter_align_section(stack, z, params, previous_displacement=previous_displacement,
                             should_stop=should_stop, encoder=encoder, ignore=ignore,
                             **overrides)
    return run_generator(gen, progress)


def iter_align_section(
    stack: np.ndarray,
    z: int,
    params: AlignParams | None = None,
    *,
    previous_displacement: np.ndarray | None = None,
    should_stop: StopCallback | None = None,
    encoder: Any = None,
    ignore: Any = None,
    **overrides: Any,
) -> Generator[Progress, None, SectionResult]:
    """Align section ``z`` alone against its neighbours within ``params.window``.

    Used for a quick preview before a full run, and to re-align one section with changed
    parameters after it.

    Parameters
    ----------
    stack : array_like, shape (Z, H, W)
        Never modified.
    z : int
        Section to align.
    previous_displacement : ndarray, shape (Z, 2, H, W), optional
        A full run's result: the neighbours are held where it put them and section ``z`` is
        aligned onto them. Without it the neighbours stay as they are in ``stack``. With
        it, ``z`` must not be the run's reference (``params.reference`` with an all-zero
        field there), which stays put. The section starts from the run's field, unless
        that placement was poor: then it is placed again from scratch with ``params`` (see
        ``SectionResult.placed_again``), so that a higher ``max_rotation``, another
        ``prealign`` or the right image put back can take effect.
    ignore : array_like, shape (Z, H, W), optional
        As for :func:`align_stack`.

    Returns
    -------
    SectionResult
        With ``ncc_before`` (as the section was: raw, or per ``previous_displacement``) and
        ``ncc_after``.
    """
    from . import memory

    arr = check_stack(stack)
    ignore = check_ignore(ignore, arr.shape)
    params = resolve_params(params, overrides)
    _check_encoder(encoder)
    _check_callable(should_stop=should_stop)
    if isinstance(z, bool) or not isinstance(z, int | np.integer):  # np.int64 crashed late
        raise InputError(f"The section index must be an integer; got {z!r}.")
    z = int(z)
    held = (min(arr.shape[0], 2 * params.window + 1), *arr.shape[1:])
    return (yield from memory.guard(_iter_align_section(
        arr, z, params, previous_displacement=previous_displacement, should_stop=should_stop,
        encoder=encoder, ignore=ignore), held, params.fit_binning))


def _towards_reference(usable: list[int], z: int, reference: int) -> int:
    """The usable section nearest to ``z`` on the side of ``reference`` (the one a full run
    placed ``z`` through); the nearest of all when that side has none."""
    side = [i for i in usable if (i < z if reference < z else i > z)]
    return min(side or usable, key=lambda i: abs(i - z))


def _matrix_displacement(matrix: np.ndarray, size: tuple[int, int], device: Any) -> Any:
    """The backward displacement (2, H, W) of a (3, 3) map (reference frame -> section)."""
    import torch

    from . import warp

    q = warp.level_points(*size, device=device)
    m = torch.from_numpy(np.asarray(matrix, np.float32)[None]).to(device)
    return (warp.apply_matrix(m, q)[0] - q).permute(2, 0, 1).contiguous()


def _iter_align_section(arr: np.ndarray, z: int, params: AlignParams, *,
                        previous_displacement: np.ndarray | None,
                        should_stop: StopCallback | None, encoder: Any, ignore: Any = None
                        ) -> Generator[Progress, None, SectionResult]:
    import torch

    from . import fit, memory, metrics, prealign, warp
    from .device import pick_device
    from .features import load_feature_extractor

    z_count, h, w = arr.shape
    if not 0 <= z < z_count:
        raise InputError(f"Section {z} is out of range; the stack has sections 0 to "
                         f"{z_count - 1}.")
    if previous_displacement is not None:
        previous_displacement = np.asarray(previous_displacement, np.float32)
        if previous_displacement.shape != (z_count, 2, h, w):
            raise InputError(f"The previous displacement has shape "
                             f"{previous_displacement.shape}; this stack needs "
                             f"{(z_count, 2, h, w)}.")
        bad = np.nonzero(~np.isfinite(previous_displacement).all(axis=(1, 2, 3)))[0]
        if bad.size:
            raise InputError(f"The previous displacement has NaN or infinite values in "
                             f"{_ranges([int(b) for b in bad])}; use the fields of a finished "
                             "run.")
        # the array cannot say which section was the run's reference; its field is exactly
        # 0, whatever params.reference says
        if not previous_displacement[z].any():
            raise InputError(f"Section {z} did not move in that run: it is its reference, "
                             "which stays where it is. Pick another section, or align the "
                             "stack again with another reference.")
    device = pick_device(params.device)
    lo, hi = max(0, z - params.window), min(z_count, z + params.window + 1)
    check_binning(params, h, w)
    memory.check_memory((hi - lo, h, w), device, binning=params.fit_binning)

    stop_check = stopper(should_stop)
    fit.warm_up_optimiser()
    local = z - lo
    sub = arr[lo:hi]
    norm, blank, fill = metrics.normalise_stack(
        sub, fill=True, ignore=None if ignore is None else ignore[lo:hi])
    yield Progress("prepare", 0, 1, f"section {z}: {hi - lo - 1} neighbours", section=z)
    src = warp.float_tensor(arr[z], device)

    def tissue_ok(ok: np.ndarray, i: int, disp: np.ndarray | None) -> np.ndarray:
        return on_tissue(ok, None if fill is None else fill[i], disp, device)

    # the held neighbours (raw, or warped by the previous result) are resampled once
    held_raw = np.empty((hi - lo, h, w), np.float32)
    held_raw_ok = np.ones((hi - lo, h, w), bool)
    for i in range(hi - lo):
        if i == local or previous_displacement is None:
            held_raw[i] = arr[lo + i]
            held_raw_ok[i] = tissue_ok(held_raw_ok[i], i, None)
            continue
        im, v = warp.warp_image(warp.float_tensor(arr[lo + i], device),
                                warp.float_tensor(previous_displacement[lo + i], device))
        held_raw[i] = im.cpu().numpy()
        held_raw_ok[i] = tissue_ok(v.cpu().numpy(), i, previous_displacement[lo + i])

    def neighbours_state(disp_z: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        """The held neighbours with section z aligned by ``disp_z`` (raw if None)."""
        imgs, ok = held_raw.copy(), held_raw_ok.copy()
        if disp_z is not None:
            im, v = warp.warp_image(src, disp_z)
            imgs[local] = im.cpu().numpy()
            ok[local] = tissue_ok(v.cpu().numpy(), local, disp_z.cpu().numpy())
        return imgs, ok

    def mean_adjacent_ncc(imgs: np.ndarray, ok: np.ndarray) -> float:
        vals = [metrics.ncc(imgs[local], imgs[j], ok[local] & ok[j], robust=True)
                for j in (local - 1, local + 1) if 0 <= j < hi - lo and not blank[j]]
        vals = [v for v in vals if np.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")

    before_disp = (None if previous_displacement is None
                   else torch.from_numpy(np.array(previous_displacement[z])).to(device))
    run_state = neighbours_state(before_disp)
    ncc_before = mean_adjacent_ncc(*run_state)
    usable_nb = [i for i in range(hi - lo) if i != local and not blank[i]]
    if blank[local] or not usable_nb:
        disp = before_disp if before_disp is not None else torch.zeros(2, h, w, device=device)
        img, ok = warp.warp_image(src, disp)
        return SectionResult(z, img.cpu().numpy(), disp.cpu().numpy(), ok.cpu().numpy(),
                             FLAG_BLANK if blank[local] else FLAG_NO_OVERLAP,
                             ncc_before, float("nan"))

    # neighbours as held, in the common (reference) frame
    held = np.zeros((hi - lo, 1, h, w), np.float32)
    held_ok = np.ones((hi - lo, 1, h, w), np.float32)
    for i in usable_nb:
        held_ok[i, 0] = held_raw_ok[i]  # the same field and fill as the raw neighbour's
        if previous_displacement is None:
            held[i, 0] = norm[i]
        else:
            im, _ = warp.warp_image(torch.from_numpy(norm[i]).to(device),
                                    torch.from_numpy(np.array(previous_displacement[lo + i]))
                                    .to(device))
            held[i, 0] = im.cpu().numpy()
    anchor = min(usable_nb, key=lambda i: abs(i - local))
    matrices = np.tile(np.eye(3), (hi - lo, 1, 1))
    conf = float("inf")

    def estimate(towards: int) -> tuple[np.ndarray, float]:
        """Place section z onto neighbour ``towards`` (as held) from scratch."""
        band, pair_kind, hypotheses = prealign.pair_settings(params.prealign, local - towards)
        low, k = prealign.work_images(
            torch.from_numpy(np.stack([held[towards, 0], norm[local]])).to(device), band)
        with torch.no_grad():
            return prealign.estimate_pair(
                low[0], low[1], kind=pair_kind, k=k, max_rotation=params.max_rotation,
                full_size=(h, w), hypotheses=hypotheses)

    def better_placement() -> tuple[np.ndarray, float] | None:
        """A placement from scratch with these parameters, if the run's was poor.

        A run's placement can be wrong: a turned section, *Max rotation* too low, or the
        right image put back in the layer since. It is dropped when it matches the
        neighbour towards the reference at under half the NCC of the new one, and the new
        one matches there at least half as well as the run's does on the other side (a
        neighbour that is bad itself offers no more than a chance match). Where there is a
        usable section beyond that neighbour, the new placement must also match it at least
        half as well as the run's: this is the bar for the end of a stack, which has no
        other side.
        """
        towards = _towards_reference(usable_nb, local, params.reference - lo)
        fresh, fresh_conf = estimate(towards)
        states = {"run": run_state,
                  "new": neighbours_state(_matrix_displacement(fresh, (h, w), device))}

        def pair(state: str, j: int) -> float:
            imgs, ok = states[state]
            return metrics.ncc(imgs[local], imgs[j], ok[local] & ok[j], robust=True)

        run_ncc, new_ncc = pair("run", towards), pair("new", towards)
        other = [i for i in usable_nb if (i - local) * (towards - local) < 0]
        floor = 0.0
        if other:
            beyond = pair("run", min(other, key=lambda i: abs(i - local)))
            floor = POOR_MATCH_RATIO * beyond if np.isfinite(beyond) else 0.0
        far = [i for i in usable_nb if (i - towards) * (towards - local) > 0]
        if far:
            # a run that placed this section past a bad neighbour matched the one beyond
            witness = min(far, key=lambda i: abs(i - towards))
            run_far, new_far = pair("run", witness), pair("new", witness)
            if np.isfinite(run_far) and not new_far >= POOR_MATCH_RATIO * run_far:
                return None
        if np.isfinite(new_ncc) and new_ncc > max(floor, 0.0) \
                and not run_ncc >= POOR_MATCH_RATIO * new_ncc:  # NaN: no overlap at all
            return fresh, fresh_conf
        return None

    better = (better_placement() if params.prealign != "none"
              and previous_displacement is not None else None)
    placed_again = better is not None
    if better is not None:
        matrices[local], conf = better
    elif params.prealign != "none" and previous_displacement is not None:
        # start from the previous result (its global part here, its grid below); the fit
        # then refines it against the held neighbours, so a re-align with the same
        # parameters ends near, not at, the full run's answer (0.8-1.5 px median in a
        # review's test: the neighbours are held, not fitted with it)
        ys, xs = np.meshgrid(np.linspace(0, h - 1, 16), np.linspace(0, w - 1, 16),
                             indexing="ij")
        q = np.stack([ys.ravel(), xs.ravel()], 1)
        iy, ix = q[:, 0].round().astype(int), q[:, 1].round().astype(int)
        p = np.stack([iy, ix], 1) + previous_displacement[z][:, iy, ix].T
        matrices[local] = prealign.fit_points(np.stack([iy, ix], 1).astype(float), p,
                                              np.ones(len(q)), params.prealign)
    elif params.prealign != "none":
        matrices[local], conf = estimate(anchor)
    stop_check()
    images = torch.from_numpy(held).to(device)
    valid = torch.from_numpy(held_ok).to(device)
    pre, pre_ok = fit.prewarp(norm[local:local + 1], matrices[local:local + 1], device,
                              fill=None if fill is None else fill[local:local + 1])
    images[local], valid[local] = pre[0], pre_ok[0]
    extractor = encoder if encoder is not None else load_feature_extractor(params)
    free = np.zeros(hi - lo, bool)
    free[local] = True
    fit_params = params.replace(reference=anchor)
    init_grid = None
    if previous_displacement is not None and not placed_again:
        # keep the previous deformable part as the starting grid (v = L^-1 (q + d(q) - P q)
        # at the nodes) and refine at full resolution only: the section is already close
        gshape = warp.control_grid_shape((h, w), params.grid_spacing)
        ny = np.linspace(0, h - 1, gshape[0])
        nx = np.linspace(0, w - 1, gshape[1])
        yy, xx = np.meshgrid(ny, nx, indexing="ij")
        iy, ix = yy.round().astype(int), xx.round().astype(int)
        target = np.stack([yy, xx]) + previous_displacement[z][:, iy, ix]
        lin, t = matrices[local][:2, :2], matrices[local][:2, 2]
        mapped = np.einsum("ij,jhw->ihw", lin, np.stack([yy, xx])) + t[:, None, None]
        v = np.einsum("ij,jhw->ihw", np.linalg.inv(lin), target - mapped)
        init_grid = torch.zeros(hi - lo, 2, *gshape)
        init_grid[local] = torch.from_numpy(v.astype(np.float32))
        fit_params = fit_params.replace(levels=1)
    residual = yield from fit.fit_stack(
        norm, matrices, blank=blank, free=free, params=fit_params, extractor=extractor,
        device=device, should_stop=stop_check, prewarped=(images, valid), init_grid=init_grid)
    disp = fit.full_displacement(residual, matrices, local, (h, w), device=device)
    img, ok = warp.warp_image(src, disp)
    ncc_after = mean_adjacent_ncc(*neighbours_state(disp))
    ok_np = ok.cpu().numpy()
    return SectionResult(z, img.cpu().numpy(), disp.cpu().numpy(), ok_np,
                         section_flag(False, ok_np, conf, params.prealign), ncc_before,
                         ncc_after, placed_again)
