"""Block-wise alignment: stacks too large for one joint fit (``AlignParams.block_size``).

The stack is aligned a block of sections at a time. The first block holds the reference and
is aligned as a whole stack would be. Every later block holds the next new sections plus the
``window`` non-blank sections next to them that are already aligned (and any blank sections
among those): these are *fixed*. They enter raw, with the global map and control grid their
own block fitted held constant, so the new sections are pre-aligned and fitted onto them as
in a joint run, and nothing already written is re-estimated. (Resampling them into the
reference frame first and holding that image instead cost several pixels across a blank
section: the fill outside the resampled section misled the coarse matches.) Blocks run
outwards from the reference block, first towards the end of the stack, then towards its
start.

Memory then grows with ``block_size``, not with the stack; the caller decides where the
finished sections go (arrays in memory, or memory-mapped files for the command line).
"""

from __future__ import annotations

import json
import time
import zipfile
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .align import (
    FLAG_BLANK,
    FLAG_DUPLICATE,
    FLAG_OK,
    USABLE_FLAGS,
    Progress,
    SectionResult,
    check_binning,
    check_ignore,
    check_reference,
    flag_poor_links,
    map_events,
    on_tissue,
    placed_doubtfully,
    render_section,
    resolve_params,
    result_environment,
    section_flag,
    stopper,
)
from .errors import InputError
from .io import SectionReader, as_dtype
from .params import AlignParams


@dataclass
class BlockRunSummary:
    """What a block-wise run returns besides the sections it wrote.

    Attributes
    ----------
    ncc_before, ncc_after : ndarray, shape (Z,), float64
        As :class:`~napari_ssemnet.core.align.AlignmentResult`: pairs of consecutive usable
        sections, also across sections flagged ``no_overlap``.
    flags : list of str, length Z
    blocks : list of list of int
        The sections of each block, in the order the blocks ran (fixed ones included).
    timings : dict of str to float
    device : str
    environment : dict
        As :attr:`~napari_ssemnet.core.align.AlignmentResult.environment`.
    pair_ncc, placed_flags
        As in :class:`~napari_ssemnet.core.align.AlignmentResult`.
    """

    ncc_before: np.ndarray
    ncc_after: np.ndarray
    flags: list[str]
    blocks: list[list[int]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    environment: dict[str, Any] = field(default_factory=dict)
    pair_ncc: dict[tuple[int, int], float] = field(default_factory=dict)
    placed_flags: list[str] = field(default_factory=list)


@dataclass
class BlockState:
    """Where a block-wise run stands after its last finished block; enough to resume it.

    Attributes
    ----------
    next_block : int
        Index of the next block to run (in the order of :func:`block_plan`).
    flags : list of str, length Z
    done : ndarray, shape (Z,), bool
    held_mats : dict of int to ndarray (3, 3)
        Each finished section's global map (reference frame -> section).
    held_grids : dict of int to ndarray (2, gh, gw)
        Each finished section's control grid (pixels).
    pairs_before, pairs_after : dict of (int, int) to float
        Adjacent-section NCCs found so far.
    blocks : list of list of int
    timings : dict of str to float
        Seconds per stage so far.
    doubtful : ndarray, shape (Z,), bool
        Sections placed through a doubtful pre-alignment match, whatever their flag says (a
        ``duplicate`` one too): the sections placed from them inherit the doubt.
    """

    next_block: int
    flags: list[str]
    done: np.ndarray
    held_mats: dict[int, np.ndarray] = field(default_factory=dict)
    held_grids: dict[int, np.ndarray] = field(default_factory=dict)
    pairs_before: dict[tuple[int, int], float] = field(default_factory=dict)
    pairs_after: dict[tuple[int, int], float] = field(default_factory=dict)
    blocks: list[list[int]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    doubtful: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.doubtful is None:
            self.doubtful = np.zeros(len(self.flags), bool)

    @classmethod
    def start(cls, z_count: int) -> BlockState:
        return cls(0, [FLAG_OK] * z_count, np.zeros(z_count, bool),
                   timings={"check": 0.0, "prepare": 0.0, "prealign": 0.0, "fit": 0.0,
                            "render": 0.0})

    def save(self, path: str | Path, **extra: str) -> None:
        """Write to a ``.npz`` (plain arrays, no pickles), replacing ``path`` only once
        complete; ``extra`` strings (e.g. what the run was) are stored alongside."""
        zs = sorted(self.held_mats)
        gshape = next(iter(self.held_grids.values())).shape if self.held_grids else (2, 0, 0)

        def pairs(d: dict[tuple[int, int], float]) -> np.ndarray:
            return np.array([(a, b, v) for (a, b), v in sorted(d.items())],
                            np.float64).reshape(-1, 3)

        arrays = {
            "next_block": np.array(self.next_block), "flags": np.array(self.flags, dtype=str),
            "done": self.done, "held_z": np.array(zs, np.int64).reshape(-1),
            "held_mats": np.array([self.held_mats[z] for z in zs], np.float64).reshape(-1, 3, 3),
            "held_grids": np.array([self.held_grids[z] for z in zs],
                                   np.float32).reshape(-1, *gshape),
            "pairs_before": pairs(self.pairs_before), "pairs_after": pairs(self.pairs_after),
            "block_members": np.array([z for b in self.blocks for z in b], np.int64),
            "block_lengths": np.array([len(b) for b in self.blocks], np.int64),
            "timings": np.array(json.dumps(self.timings)),
            "doubtful": np.asarray(self.doubtful, bool),
            **{f"extra_{k}": np.array(v) for k, v in extra.items()},
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        try:
            np.savez(tmp, **arrays)
            tmp.replace(path)
        except BaseException:  # a full disk: no half-written file left beside the run
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> tuple[BlockState, dict[str, str]]:
        """Read :meth:`save`'s file; returns the state and the ``extra`` strings.

        Raises
        ------
        InputError
            If the file is missing or not such a state.
        """
        try:
            with np.load(Path(path), allow_pickle=False) as f:
                a = {k: f[k] for k in f.files}
            zs = [int(z) for z in a["held_z"]]
            blocks, pos = [], 0
            for n in a["block_lengths"]:
                blocks.append([int(z) for z in a["block_members"][pos:pos + int(n)]])
                pos += int(n)
            state = cls(
                next_block=int(a["next_block"]), flags=[str(f) for f in a["flags"]],
                done=a["done"].astype(bool),
                held_mats={z: a["held_mats"][i] for i, z in enumerate(zs)},
                held_grids={z: a["held_grids"][i] for i, z in enumerate(zs)},
                pairs_before={(int(x), int(y)): float(v) for x, y, v in a["pairs_before"]},
                pairs_after={(int(x), int(y)): float(v) for x, y, v in a["pairs_after"]},
                blocks=blocks, timings=json.loads(str(a["timings"])),
                doubtful=a["doubtful"].astype(bool) if "doubtful" in a else None)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise InputError(f"{str(path)!r} is not a readable block-wise run state "
                             f"({type(exc).__name__}).") from None
        extra = {k[len("extra_"):]: str(v) for k, v in a.items() if k.startswith("extra_")}
        return state, extra


def block_plan(z_count: int, reference: int, block_size: int, window: int
               ) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """Which sections each block adds.

    Returns
    -------
    first : (lo, hi)
        The reference block, sections ``lo`` to ``hi - 1`` (``block_size`` of them, or all).
    later : list of (start, stop)
        New sections of each later block in the order they run: upwards from ``hi``, then
        downwards from ``lo``. Each adds ``block_size - window`` sections.
    """
    lo = max(0, reference - (block_size - 1) // 2)
    hi = min(z_count, lo + block_size)
    lo = max(0, hi - block_size)
    step = block_size - window
    later = []
    s = hi
    while s < z_count:
        later.append((s, min(z_count, s + step)))
        s += step
    e = lo
    while e > 0:
        later.append((max(0, e - step), e))
        e -= step
    return (lo, hi), later


def held_shape(block_size: int, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The stack shape whose joint-run estimate (:func:`memory.estimate_peak_bytes`) bounds a
    block-wise run's own peak: one section more than a block. Measured on the CLI, 1024^2
    in blocks of 8: 1.00-1.10 GB for 16-64 sections, where 8 sections give 1.04 GB and 9
    give 1.13 GB (fixed sections read again, and heap that is only trimmed between blocks).
    """
    z, h, w = (int(s) for s in shape)
    return (min(block_size + 1, z), h, w)


def guarded_shape(block_size: int, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The shape a run's memory guard is given: :func:`held_shape` for a block-wise run
    (``0 < block_size <`` the number of sections), else the whole stack's."""
    z, h, w = (int(s) for s in shape)
    return held_shape(block_size, (z, h, w)) if 0 < block_size < z else (z, h, w)


def _carried(order: Sequence[int], flags: list[str], done: np.ndarray, window: int,
             limit: int) -> list[int]:
    """Finished sections walked in ``order`` (away from the new ones) until ``window``
    non-blank ones are collected; blank sections met on the way are kept (they hold the
    distances in z that the pre-alignment uses). At most ``limit`` sections.

    Sections flagged ``no_overlap`` or ``low_confidence`` count: a joint run fits its
    sections against them too (the flags come after the fit)."""
    out, found = [], 0
    for z in order:
        if not done[z] or len(out) == limit:
            break
        out.append(z)
        if flags[z] != FLAG_BLANK:
            found += 1
            if found == window:
                break
    while out and flags[out[-1]] == FLAG_BLANK:  # nothing to hold onto beyond that
        out.pop()
    return sorted(out)


def _nearest_usable(order: Sequence[int], flags: list[str], done: np.ndarray) -> int | None:
    """The first finished section in ``order`` with a usable flag, walking no further than
    the finished ones."""
    for z in order:
        if not done[z]:
            return None
        if flags[z] in USABLE_FLAGS:
            return z
    return None


def _rewarp(section: Any, disp: Any, device: Any) -> tuple[np.ndarray, np.ndarray]:
    """A finished section resampled again through its field, for the NCC pairs only."""
    from . import warp

    im, ok = warp.warp_image(warp.float_tensor(section, device), warp.float_tensor(disp, device))
    return im.cpu().numpy(), ok.cpu().numpy()


def _skip_ncc(stack: Any, displacement: Any, a: int, c: int, device: Any,
              ignore: Any = None) -> float:
    """NCC of finished sections ``a`` and ``c`` as aligned, on the tissue of both."""
    from . import metrics

    img, ok = {}, {}
    for z in (a, c):
        raw = np.asarray(stack[z])
        img[z], ok[z] = _rewarp(raw, displacement[z], device)
        ok[z] = on_tissue(ok[z], metrics.tissue_fill(raw, None if ignore is None
                                                     else ignore[z]),
                          displacement[z], device)
    return metrics.ncc(img[a], img[c], ok[a] & ok[c], robust=True)


def _read_sections(stack: Any, zs: Sequence[int]) -> np.ndarray:
    """Sections ``zs`` of an array-like stack as one array, checked for NaN and inf."""
    raw = np.stack([np.asarray(stack[z]) for z in zs])
    if np.issubdtype(raw.dtype, np.floating):
        bad = [z for z, sec in zip(zs, raw, strict=True) if not np.isfinite(sec).all()]
        if bad:
            shown = ", ".join(str(z) for z in bad[:10]) + (" ..." if len(bad) > 10 else "")
            raise InputError(f"The stack contains NaN or infinite values in section(s) "
                             f"{shown}; replace them (e.g. with 0) first.")
    return raw


def _relabelled(gen: Generator[Any, None, Any], tag: str, members: list[int]
                ) -> Generator[Any, None, Any]:
    """Pass on a block's events with stack section numbers and the block named."""

    def relabel(ev: Any) -> Any:
        if isinstance(ev, Progress):
            if ev.section is not None:
                ev.section = members[ev.section]
            if ev.stage == "prealign" and ev.section is not None:
                ev.message = f"pre-aligning section {ev.section}"  # not the block's index
            ev.message = f"{tag}: {ev.message}"
        return ev

    return map_events(gen, relabel)


def _store(out: Any, z: int, value: np.ndarray) -> None:
    """Write one section into an output array, rounding into integer dtypes."""
    out[z] = as_dtype(value, out.dtype)


def iter_align_blocks(
    stack: Any,
    params: AlignParams,
    *,
    displacement: Any,
    aligned: Any,
    valid: Any = None,
    should_stop: Callable[[], bool] | None = None,
    encoder: Any = None,
    extra_bytes: int = 0,
    state: BlockState | None = None,
    on_block: Callable[[BlockState], None] | None = None,
    ignore: Any = None,
) -> Generator[Progress | SectionResult, None, BlockRunSummary]:
    """Align ``stack`` in blocks of ``params.block_size`` sections, writing each finished
    section into the output arrays.

    Parameters
    ----------
    stack : array_like, shape (Z, H, W)
        Anything with ``shape``, ``dtype`` and ``stack[z]`` (e.g. a memory-mapped TIFF). Never
        modified; each section is read when a block needs it.
    params : AlignParams
        With ``block_size`` >= ``window + 2``.
    displacement : array_like, shape (Z, 2, H, W), float32, writable
        Receives the fields; read back for the fixed sections of later blocks.
    aligned : array_like, shape (Z, H, W), writable
        Receives the aligned sections (rounded and clipped for an integer dtype).
    valid : array_like, shape (Z, H, W), bool, writable, optional
    extra_bytes : int
        Memory the caller holds besides one block (for the memory check).
    state : BlockState, optional
        Resume a run that stopped: the blocks before ``state.next_block`` are taken as done
        (their sections must be in ``displacement`` and ``aligned``). Same parameters and
        stack as the first run give the same result as an uninterrupted one.
    on_block : callable, optional
        Called with the :class:`BlockState` after each block's sections are written (e.g.
        to flush the outputs and save the state).
    ignore : array_like, shape (Z, H, W), optional
        What to leave out, as for :func:`core.align.align_stack`; read a block at a time.

    Yields
    ------
    Progress, and one SectionResult per finished section (blocks in the order they run).

    Returns
    -------
    BlockRunSummary
    """
    import torch

    from . import fit, memory, metrics, prealign, warp
    from .device import pick_device
    from .features import check_encoder, load_feature_extractor

    params = resolve_params(params, {})  # a dict, too (it raised an AttributeError)
    z_count, h, w = (int(s) for s in stack.shape)
    ignore = check_ignore(ignore, (z_count, h, w))
    b = params.block_size
    if not b or b < params.window + 2:
        raise InputError(f"block_size must be at least window + 2 = {params.window + 2} for a "
                         f"block-wise run; got {b}.")
    check_reference(params.reference, z_count)
    check_binning(params, h, w)
    check_encoder(encoder)
    # before any work: a wrong output array failed only when the first block was written
    for name, arr, want in (("displacement", displacement, (z_count, 2, h, w)),
                            ("aligned", aligned, (z_count, h, w)),
                            ("valid", valid, (z_count, h, w))):
        if arr is not None and tuple(int(n) for n in arr.shape) != want:
            raise InputError(f"The {name} output has shape {tuple(arr.shape)}; a stack of "
                             f"shape {(z_count, h, w)} needs {want}.")
        flags = getattr(arr, "flags", None)
        if flags is not None and not flags.writeable:  # failed at the first block's write
            raise InputError(f"The {name} output is read-only (a memory map opened with "
                             "mode 'r'?); give a writable array.")
    stop_check = stopper(should_stop)
    t_start = time.perf_counter()
    device = pick_device(params.device)
    memory.check_memory(held_shape(b, (z_count, h, w)), device, binning=params.fit_binning,
                        extra_bytes=extra_bytes, total_sections=z_count)
    fit.warm_up_optimiser()
    extractor = encoder if encoder is not None else load_feature_extractor(params)
    st = state if state is not None else BlockState.start(z_count)
    if len(st.flags) != z_count:
        raise InputError(f"The run to resume had {len(st.flags)} sections; this stack has "
                         f"{z_count}.")
    flags, done, timings = st.flags, st.done, st.timings
    pairs_before, pairs_after, blocks = st.pairs_before, st.pairs_after, st.blocks
    held_mats, held_grids = st.held_mats, st.held_grids
    t_before = sum(timings.get(k, 0.0)
                   for k in ("check", "prepare", "prealign", "fit", "render"))
    (lo, hi), later = block_plan(z_count, params.reference, b, params.window)
    n_blocks = 1 + len(later)
    if isinstance(stack, SectionReader) and st.next_block < n_blocks:
        # a compressed page that does not decode, or a NaN in the last section, ended a
        # run after hours of blocks, whose --resume then met it again
        t0 = time.perf_counter()
        for z in range(z_count):
            if z % 8 == 0:
                stop_check()
                yield Progress("check", z, z_count, "checking that every section reads")
            _read_sections(stack, [z])
        yield Progress("check", z_count, z_count, "checking that every section reads")
        timings["check"] = timings.get("check", 0.0) + time.perf_counter() - t0

    for k in range(st.next_block, n_blocks):
        if k == 0:
            fixed_zs, new = [params.reference], [z for z in range(lo, hi) if z != params.reference]
        else:
            s, e = later[k - 1]
            new = list(range(s, e))
            away = range(s - 1, -1, -1) if s >= hi else range(e, z_count)
            fixed_zs = _carried(away, flags, done, params.window, b)
            if not fixed_zs:
                raise InputError(f"Sections {s}-{e - 1} have no aligned section with image "
                                 f"structure within {b} sections to continue from (a run of "
                                 "blank sections?); raise block_size.")
        members = sorted(fixed_zs + new)
        blocks.append(members)
        local = {z: i for i, z in enumerate(members)}
        fixed = np.array([z in fixed_zs for z in members])
        usable_fixed = [z for z in fixed_zs if z == params.reference or flags[z] != FLAG_BLANK]
        if not usable_fixed:  # pragma: no cover - the reference block always has one
            raise InputError("No aligned section to continue from.")
        anchor_z = min(usable_fixed, key=lambda z: min(abs(z - n) for n in new))
        anchor = local[anchor_z]
        tag = f"block {k + 1}/{n_blocks}"

        stop_check()
        memory.release_freed_memory()
        t0 = time.perf_counter()
        yield Progress("prepare", 0, 1, f"{tag}: sections {members[0]}-{members[-1]} "
                                        f"({len(new)} new)")
        raw = _read_sections(stack, members)
        norm, blank, fill = metrics.normalise_stack(
            raw, fill=True, should_stop=stop_check,
            ignore=None if ignore is None else np.stack([np.asarray(ignore[z]) for z in members]))
        if k == 0 and blank[anchor]:
            if blank.all():  # the rest of the stack is not read yet: say what is known
                raise InputError(f"Sections {members[0]}-{members[-1]}, the reference's "
                                 "block, are all blank or have no structure; if the whole "
                                 "stack is, there is nothing to align, else choose a "
                                 "reference section with tissue.")
            raise InputError(f"Reference section {params.reference} is blank or has no "
                             "structure; choose another reference section.")
        twin = metrics.duplicate_sections(norm, blank, anchor, should_stop=stop_check)
        # raw-stack NCC of the pairs this block is the first to see
        use_b = np.array([not blank[i] for i in range(len(members))])
        ub = np.nonzero(use_b)[0]
        for i, j in zip(ub[:-1], ub[1:], strict=False):
            if not (fixed[i] and fixed[j]):  # on tissue only, as a joint run has it
                both = None if fill is None else ~fill[i] & ~fill[j]
                pairs_before[(members[i], members[j])] = metrics.ncc(norm[i], norm[j], both)
        # fixed sections enter as in a joint run: raw, with the global map and control grid
        # their own block fitted, both held
        held_now = {int(i): held_mats[members[i]] for i in np.nonzero(fixed)[0]
                    if members[i] in held_mats}
        init_grid = None
        if held_now:
            gshape = warp.control_grid_shape((h, w), params.grid_spacing)
            init_grid = torch.zeros(len(members), 2, *gshape)
            for i in held_now:
                init_grid[i] = torch.from_numpy(held_grids[members[i]])
        timings["prepare"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        matrices, confidence = yield from _relabelled(prealign.prealign_stack(
            norm, blank, reference=anchor, kind=params.prealign,
            max_rotation=params.max_rotation, device=device, should_stop=stop_check,
            fixed=held_now or {anchor: np.eye(3)},
            # a doubtful link earlier in the chain stays one for the sections beyond it
            fixed_confidence={i: 0.0 for i in held_now if st.doubtful[members[i]]}),
            tag, members)
        if params.prealign == "none" and held_now:
            # the fit's translations chain outwards from the anchor, whose own is in its map
            matrices[~fixed] = held_mats[anchor_z]
        timings["prealign"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        residual = yield from _relabelled(fit.fit_stack(
            norm, matrices, blank=blank, free=~fixed, params=params.replace(reference=anchor),
            extractor=extractor, device=device, should_stop=stop_check, init_grid=init_grid,
            fill=fill), tag, members)
        del norm  # the fill masks (1 byte a pixel) stay for the NCC on tissue
        res_mats, res_grid = residual.mats.cpu().numpy(), residual.grid.cpu().numpy()
        for i in np.nonzero(~fixed)[0]:
            # M (A q + v) = (M A)(q + v) for the translations A that the fit may add
            held_mats[members[i]] = matrices[i] @ res_mats[i].astype(np.float64)
            held_grids[members[i]] = res_grid[i]
        if k == 0:
            held_mats[params.reference] = np.eye(3)
            held_grids[params.reference] = res_grid[anchor]
        timings["fit"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        out_img: dict[int, np.ndarray] = {}
        out_ok: dict[int, np.ndarray] = {}
        n_new = len(members) - int(fixed.sum()) + (1 if k == 0 else 0)
        rendered = 0
        for i, z in enumerate(members):
            stop_check()
            if fixed[i] and k > 0:
                if flags[z] in USABLE_FLAGS:
                    out_img[z], out_ok[z] = _rewarp(raw[i], displacement[z], device)
                    out_ok[z] = on_tissue(out_ok[z], None if fill is None else fill[i],
                                           displacement[z], device)
                continue
            d_np, im_np, ok_np = render_section(raw[i], residual, matrices, i, device)
            flags[z] = section_flag(blank[i], ok_np, confidence[i], params.prealign)
            st.doubtful[z] = placed_doubtfully(blank[i], confidence[i], params.prealign)
            if twin[i] >= 0 and flags[z] in USABLE_FLAGS:
                flags[z] = FLAG_DUPLICATE
            displacement[z] = d_np
            _store(aligned, z, im_np)
            if valid is not None:
                valid[z] = ok_np
            done[z] = True
            if flags[z] in USABLE_FLAGS:
                out_img[z] = im_np
                out_ok[z] = on_tissue(ok_np, None if fill is None else fill[i], d_np, device)
            yield SectionResult(z, im_np, d_np, ok_np, flags[z])
            rendered += 1
            yield Progress("render", rendered, n_new,
                           f"{tag}: section {z} ({int(done.sum())} of {z_count} done)",
                           section=z)
        if k > 0 and not any(z in out_img for z in fixed_zs):
            # every fixed section is flagged no_overlap: the new sections' usable neighbour
            # on the finished side lies beyond them, and its pairs join them as in a joint run
            near = _nearest_usable(away, flags, done)
            if near is not None:
                out_img[near], out_ok[near] = _rewarp(stack[near], displacement[near], device)
                out_ok[near] = on_tissue(out_ok[near],
                                          metrics.tissue_fill(np.asarray(stack[near]),
                                                              None if ignore is None
                                                              else ignore[near]),
                                          displacement[near], device)
        use = sorted(out_img)
        for a, c in zip(use[:-1], use[1:], strict=False):
            if a in local and c in local and fixed[local[a]] and fixed[local[c]]:
                continue
            pairs_after[(a, c)] = metrics.ncc(out_img[a], out_img[c], out_ok[a] & out_ok[c],
                                              robust=True)
            if (a, c) not in pairs_before:  # the pair skips a section flagged no_overlap
                pairs_before[(a, c)] = metrics.raw_pair_ncc(
                    *(raw[local[x]] if x in local else np.asarray(stack[x]) for x in (a, c)))
        timings["render"] += time.perf_counter() - t0
        st.next_block = k + 1
        if on_block is not None:
            on_block(st)

    placed_flags = list(flags)

    def skip_ncc(a: int, c: int) -> float:
        stop_check()  # each call resamples two whole sections
        return _skip_ncc(stack, displacement, a, c, device, ignore)

    flags[:] = flag_poor_links(flags, pairs_after, params.reference, skip_ncc)
    usable = np.array([f in USABLE_FLAGS for f in flags])
    ncc_before = metrics.mean_of_pairs(_restrict(pairs_before, usable), usable)
    ncc_after = metrics.mean_of_pairs(pairs_after, usable)
    timings = {**timings, "total": t_before + time.perf_counter() - t_start}
    return BlockRunSummary(ncc_before=ncc_before, ncc_after=ncc_after, flags=flags,
                           blocks=blocks, timings=timings, device=str(device),
                           environment=result_environment(params, device),
                           pair_ncc=_restrict(pairs_after, usable), placed_flags=placed_flags)


def _restrict(pairs: dict[tuple[int, int], float], usable: np.ndarray
              ) -> dict[tuple[int, int], float]:
    """Pairs between sections that are both usable (the raw-stack pairs were taken over
    non-blank sections, before rendering could flag one ``no_overlap``)."""
    return {k: v for k, v in pairs.items() if usable[k[0]] and usable[k[1]]}
