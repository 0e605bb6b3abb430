"""Generator jobs the dock widget runs in napari ``thread_worker`` threads.

Qt-free on purpose: each job yields the core's :class:`Progress` / :class:`SectionResult`
events unchanged and *returns* an outcome object instead of raising, so the main thread
decides how an error is shown (napari's own worker relay would print a traceback-style
notification for every exception). Nothing here touches a layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._layers import local_ncc_error
from ..core.align import (
    AlignmentResult,
    Progress,
    ProgressRate,
    SectionResult,
    iter_align_stack,
    map_events,
)
from ..core.errors import AlignmentCancelled
from ..core.params import AlignParams
from ..core.process import ChildStartError, iter_align_stack_in_process, use_process

log = logging.getLogger(__name__)


@dataclass
class Failure:
    """A job ended with an exception (``user_facing``: message written for users)."""

    exc: BaseException
    traceback: str
    user_facing: bool


@dataclass
class Cancelled:
    """A job noticed the stop request and ended early."""


@dataclass
class AlignOutcome:
    """A finished full alignment with its local NCC error map."""

    result: AlignmentResult
    ncc_error: np.ndarray
    # of the sections as the run began; ``edited``: those that changed in place meanwhile
    # (napari sees no event for that), so the result may not hold for them
    digests: list[bytes] = field(default_factory=list)
    edited: list[int] = field(default_factory=list)


def section_digest(section: np.ndarray) -> bytes:
    """A fingerprint of one section's data (type, shape and bytes): which sections of a
    layer changed since a run, without keeping a copy of the stack."""
    a = np.ascontiguousarray(section)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
    return h.digest()


def section_digests(stack: np.ndarray) -> list[bytes]:
    """:func:`section_digest` of each section of a (Z, H, W) stack."""
    return [section_digest(stack[z]) for z in range(stack.shape[0])]


def changed_sections(stack: np.ndarray, digests: list[bytes]) -> list[int]:
    """The sections of ``stack`` whose data differ from the fingerprints ``digests`` (of a
    stack of the same length)."""
    return [z for z, d in enumerate(section_digests(stack)) if d != digests[z]]


@dataclass
class SectionOutcome:
    """One section (re-)aligned, merged into a full-stack picture.

    ``aligned``, ``valid``, ``displacement`` and ``ncc_error`` are fresh (Z, ...) arrays: the
    base run's (or the source stack and identity, before any run) with section ``z``
    replaced. ``result`` is the base :class:`AlignmentResult` updated with the section, or
    None when there was no base run.
    """

    z: int
    section: SectionResult
    aligned: np.ndarray
    valid: np.ndarray
    displacement: np.ndarray
    ncc_error: np.ndarray
    ncc_before: np.ndarray
    ncc_after: np.ndarray
    flags: list[str]
    params: AlignParams
    seconds: float
    result: AlignmentResult | None = None
    # of the sections as the job began; ``edited``: those changed in place meanwhile
    digests: list[bytes] = field(default_factory=list)
    edited: list[int] = field(default_factory=list)


@dataclass
class TrainOutcome:
    """Trained encoder weights written to ``path``."""

    path: str
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


PROGRESS_INTERVAL = 0.2
"""Seconds between progress reports passed to the GUI thread. The core reports every
iteration (about 150 a second on the sample); each report repaints the window, which under
software OpenGL took the CPU the fit needed."""


def throttled(gen: Generator[Any, None, Any], interval: float = PROGRESS_INTERVAL
              ) -> Generator[Any, None, Any]:
    """Pass on ``gen``'s events, a :class:`Progress` only when :class:`ProgressRate` finds
    it due; returns ``gen``'s return value. Every other event (e.g. :class:`SectionResult`)
    is passed on. Closing this job closes the run inside it at once."""
    rate = ProgressRate(interval)
    return map_events(gen, lambda ev: None if isinstance(ev, Progress) and not rate.due(ev)
                      else ev)


def _failure(exc: BaseException) -> Failure:
    from ..core.errors import SsemnetError

    user = isinstance(exc, SsemnetError | ValueError)
    return Failure(exc, traceback.format_exc(), user)


# napari imports these on the first Vectors layer, in the GUI thread (pandas: 0.4-0.8 s on
# the dev box); a job imports them first, while the window has little to draw
LAYER_IMPORTS = ("pandas",)


def warm_layer_imports() -> None:
    """Import :data:`LAYER_IMPORTS` that are not imported yet (in the calling thread)."""
    for name in LAYER_IMPORTS:
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except Exception as exc:  # napari will say so when it needs it; the run goes on
                log.debug("could not import %s early: %s", name, exc)


def align_job(stack: np.ndarray, params: AlignParams, stop: threading.Event, *,
              ignore: Any = None) -> Generator[Any, None, Any]:
    """Full-stack alignment (``ignore``: a mask of what to leave out, as for
    ``align_stack``); returns :class:`AlignOutcome`, :class:`Cancelled` or
    :class:`Failure`. Runs in a child process when :func:`core.process.use_process` says
    so (large stacks on Linux, or ``NAPARI_SSEMNET_PROCESS=1``)."""
    try:
        warm_layer_imports()
        digests = section_digests(stack)  # which sections a later change of the layer touches
        # large stacks run faster in a child process's main thread (core.process)
        result = None
        if use_process(stack.shape, params.fit_binning, params.block_size):
            try:
                result = yield from throttled(iter_align_stack_in_process(
                    stack, params, should_stop=stop.is_set, ignore=ignore))
            except ChildStartError as exc:  # e.g. a bundled app's Python: the thread works
                log.warning("%s Aligning in napari's worker thread instead.", exc)
        if result is None:
            result = yield from throttled(iter_align_stack(stack, params,
                                                           should_stop=stop.is_set,
                                                           ignore=ignore))
        yield Progress("metrics", 0, 1, "local NCC error map")
        tissue = _tissue_stack(result.valid, stack, result.displacement, ignore, stop)
        error = local_ncc_error(result.aligned, tissue, flags=result.flags)
        edited = changed_sections(stack, digests)
        yield Progress("metrics", 1, 1, "local NCC error map")
        return AlignOutcome(result, error, digests, edited)
    except AlignmentCancelled:
        return Cancelled()
    except Exception as exc:  # every error reaches the user as a notification
        return _failure(exc)


def _adjacent_ncc(aligned: np.ndarray, valid: np.ndarray, flags: list[str],
                  stack: np.ndarray, displacement: np.ndarray, z: int,
                  before: np.ndarray, pairs: dict[tuple[int, int], float] | None = None,
                  ignore: Any = None) -> tuple[np.ndarray, dict[tuple[int, int], float]]:
    """The run's NCC curve ``before`` with the values that section ``z`` moving changes
    (its own and its usable neighbours') computed again, on tissue only as the core does;
    and the run's ``pairs`` (:attr:`AlignmentResult.pair_ncc`) with those around z redone."""
    from ..core.align import USABLE_FLAGS
    from ..core.metrics import adjacent_pairs, mean_of_pairs

    usable = np.array([f in USABLE_FLAGS for f in flags])
    order = [int(i) for i in np.nonzero(usable | (np.arange(len(flags)) == z))[0]]
    k = order.index(z)
    window = order[max(0, k - 2):k + 3]  # z, its neighbours, and theirs beyond
    sub_valid = np.stack([_tissue(valid, stack, displacement, i, ignore) for i in window])
    local = adjacent_pairs(aligned[window], sub_valid, usable[window], robust=True)
    around = {(window[a], window[b]): v for (a, b), v in local.items()}
    sub = mean_of_pairs(local, usable[window])
    out = np.array(before, dtype=float)
    for n, i in enumerate(window):
        if abs(n - window.index(z)) <= 1:
            out[i] = sub[n]
    lo, hi = window[0], window[-1]  # pairs inside the window are replaced, not added to
    kept = {key: v for key, v in (pairs or {}).items() if not (lo <= key[0] and key[1] <= hi)}
    return out, dict(sorted({**kept, **around}.items()))


def _tissue(valid: np.ndarray, stack: np.ndarray, displacement: np.ndarray,
            i: int, ignore: Any = None) -> np.ndarray:
    """Aligned section ``i``'s valid pixels that come from tissue, as the core's NCC takes
    them."""
    from ..core.align import on_tissue
    from ..core.metrics import tissue_fill

    fill = tissue_fill(np.asarray(stack[i]), None if ignore is None else ignore[i])
    return on_tissue(valid[i], fill, displacement[i], "cpu")


def _tissue_stack(valid: np.ndarray, stack: np.ndarray, displacement: np.ndarray,
                  ignore: Any, stop: threading.Event) -> np.ndarray:
    """:func:`_tissue` of every section, (Z, H, W) bool: the NCC error map leaves out what
    the NCC leaves out (padding, a user's ignore mask), which showed as error. 0.36 s for
    the 20 VNC sections of 1024^2 here."""
    out = np.empty(valid.shape, bool)
    for i in range(valid.shape[0]):
        if stop.is_set():
            raise AlignmentCancelled("Cancelled.")
        out[i] = _tissue(valid, stack, displacement, i, ignore)
    return out


def _error_around(before: np.ndarray, aligned: np.ndarray, valid: np.ndarray,
                  stack: np.ndarray, displacement: np.ndarray, flags: list[str], z: int,
                  ignore: Any) -> np.ndarray:
    """The NCC error map ``before`` with the maps of the sections compared with section
    ``z`` (and its own) computed again."""
    from ..core.metrics import local_ncc_partners

    partners = local_ncc_partners(len(flags), np.array([f == "blank" for f in flags]))
    touched = sorted(i for i, other in partners.items() if z in (i, other))
    tissue = valid.copy()
    for i in set(touched) | {partners[i] for i in touched}:
        tissue[i] = _tissue(valid, stack, displacement, i, ignore)
    part = local_ncc_error(aligned, tissue, flags=flags, sections=touched)
    out = before.copy()
    out[touched] = part[touched]
    return out


def _skip_ncc(aligned: np.ndarray, valid: np.ndarray, stack: np.ndarray,
              displacement: np.ndarray, a: int, c: int, ignore: Any = None) -> float:
    """NCC of aligned sections ``a`` and ``c`` on the tissue of both, as the core's pairs."""
    from ..core.metrics import ncc

    ok = (_tissue(valid, stack, displacement, a, ignore)
          & _tissue(valid, stack, displacement, c, ignore))
    return ncc(aligned[a], aligned[c], ok, robust=True)


def section_job(stack: np.ndarray, z: int, params: AlignParams, base: AlignmentResult | None,
                stop: threading.Event, *, ignore: Any = None,
                base_error: np.ndarray | None = None, fingerprint: bool = True
                ) -> Generator[Any, None, Any]:
    """Align section ``z`` only (neighbours fixed at ``base`` or identity; ``ignore`` as
    for ``align_stack``). ``base_error`` is ``base``'s NCC error map (Z, H, W): then only the
    maps that section ``z`` takes part in are computed again (the whole map took 13 s for
    20 x 1024^2 here). ``fingerprint``: record the sections' fingerprints as the job starts,
    and which changed in place by its end (a Re-align, whose result is kept).

    Returns :class:`SectionOutcome`, :class:`Cancelled` or :class:`Failure`.
    """
    try:
        from ..core.align import USABLE_FLAGS, flag_poor_links, iter_align_section

        warm_layer_imports()  # a Preview before any Align makes the first Vectors layer
        t0 = time.perf_counter()
        # an in-place edit meanwhile sends no napari event; a Preview keeps nothing to check
        digests = section_digests(stack) if fingerprint else []
        previous = None if base is None else base.displacement
        section = yield from throttled(iter_align_section(
            stack, z, params, previous_displacement=previous, should_stop=stop.is_set,
            ignore=ignore))
        yield Progress("metrics", 0, 1, "local NCC error map")
        z_count, h, w = stack.shape
        if base is not None:
            aligned = base.aligned.copy()
            valid = base.valid.copy()
            displacement = base.displacement.copy()
            # the check of the links runs again below, from the flags it started from
            flags = list(base.placed_flags or base.flags)
            flags_of_run = list(flags)
            ncc_before = np.array(base.ncc_before, dtype=float)
            ncc_after = np.array(base.ncc_after, dtype=float)
        else:
            aligned = np.asarray(stack, dtype=np.float32).copy()
            valid = np.ones((z_count, h, w), bool)
            displacement = np.zeros((z_count, 2, h, w), np.float32)
            flags = [""] * z_count
            ncc_before = np.full(z_count, np.nan)
            ncc_after = np.full(z_count, np.nan)
        aligned[z] = section.aligned
        valid[z] = section.valid
        displacement[z] = section.displacement
        # the section alone cannot tell that it repeats its neighbour: the full run's flag
        keep = (base is not None and base.flags[z] == "duplicate"
                and section.flag in USABLE_FLAGS)
        flags[z] = "duplicate" if keep else section.flag
        if (base is not None and flags[z] == "" and flags_of_run[z] == "low_confidence"
                and not section.placed_again):
            # started from the run's field, the section's placement was not estimated again
            flags[z] = "low_confidence"
        if base is None:  # after a run, "before" stays the input's NCC (the plot's grey
            # curve); this section's previous value is in the status line
            ncc_before[z] = float(getattr(section, "ncc_before", np.nan))
        ncc_after[z] = float(getattr(section, "ncc_after", np.nan))
        result = None
        if base is not None:
            # neighbours' NCC changes too when z moves; recompute the whole curve
            ncc_after, pair_ncc = _adjacent_ncc(aligned, valid, flags, stack, displacement,
                                                z, base.ncc_after, base.pair_ncc, ignore)
            placed = list(flags)
            flags = flag_poor_links(placed, pair_ncc, base.params.reference,
                                    lambda a, c: _skip_ncc(aligned, valid, stack, displacement,
                                                           a, c, ignore))
            # the run's parameters and environment stay; this section's own are recorded
            # beside them (a Re-align on another device or days later says so)
            from ..core.device import pick_device, run_environment

            env = dict(base.environment)
            env["re_aligned"] = {**env.get("re_aligned", {}),
                                 str(z): run_environment(pick_device(params.device))}
            result = dataclasses.replace(base, aligned=aligned, valid=valid,
                                         displacement=displacement, flags=flags,
                                         ncc_after=ncc_after, pair_ncc=pair_ncc,
                                         placed_flags=placed, environment=env,
                                         section_params={**base.section_params, z: params})
        if base is not None and base_error is not None and base_error.shape == aligned.shape:
            error = _error_around(base_error, aligned, valid, stack, displacement, flags, z,
                                  ignore)
        else:
            error = local_ncc_error(aligned, _tissue_stack(valid, stack, displacement, ignore,
                                                           stop), flags=flags)
        edited = changed_sections(stack, digests) if fingerprint else []
        yield Progress("metrics", 1, 1, "local NCC error map")
        return SectionOutcome(z, section, aligned, valid, displacement, error, ncc_before,
                              ncc_after, flags, params, time.perf_counter() - t0, result,
                              digests, edited)
    except AlignmentCancelled:
        return Cancelled()
    except Exception as exc:
        return _failure(exc)


def weights_dir() -> Path:
    """Folder for encoder weights trained from the widget (user cache, else temp)."""
    try:
        from platformdirs import user_cache_dir

        path = Path(user_cache_dir("napari-ssemnet")) / "weights"
    except ImportError:  # pragma: no cover - platformdirs ships with napari
        path = Path(tempfile.gettempdir()) / "napari-ssemnet-weights"
    return path


def train_job(stack: np.ndarray, *, steps: int | None, seed: int, device: str, out_path: str,
              stop: threading.Event) -> Generator[Any, None, Any]:
    """Train an encoder on ``stack`` and save it to ``out_path``.

    Returns :class:`TrainOutcome`, :class:`Cancelled` or :class:`Failure`.
    """
    try:
        t0 = time.perf_counter()
        yield Progress("train", 0, steps or 1, "loading PyTorch")  # takes seconds at first
        from ..core.features import save_weights, train_encoder  # imports torch

        kwargs: dict[str, Any] = {"seed": seed, "device": device, "should_stop": stop.is_set}
        if steps:
            kwargs["steps"] = steps
        model = yield from throttled(train_encoder([stack], **kwargs))
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        save_weights(model, out_path)
        return TrainOutcome(out_path, dict(getattr(model, "info", {}) or {}),
                            time.perf_counter() - t0)
    except AlignmentCancelled:
        return Cancelled()
    except Exception as exc:
        return _failure(exc)


__all__ = ["AlignOutcome", "Cancelled", "Failure", "SectionOutcome", "TrainOutcome",
           "align_job", "section_job", "train_job", "weights_dir",
           "SectionResult"]
