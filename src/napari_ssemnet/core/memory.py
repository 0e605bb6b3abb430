"""How much memory an alignment needs, and a clear error instead of an out-of-memory crash.

On Linux an allocation rarely fails outright: the kernel lets the process grow and then kills
it (and with it napari and whatever the user had open). So the CPU path checks its estimate
against the memory that is free *before* it starts, and every out-of-memory exception that
does surface (NumPy, torch on the CPU, CUDA) becomes a :class:`MemoryLimitError` that says
what to do.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Generator, Iterator
from typing import Any

from .errors import MemoryLimitError

# Peak resident memory an alignment adds to its process, measured with the default
# parameters on the 2-core dev box (benchmarks/bench_memory.py, docs/benchmarks.md): about
# 90 bytes per input pixel of the stack plus about 320 MB that does not depend on the size
# (8 x 256^2 to 16 x 1024^2). Rounded so that the estimate is at or above those measurements
# (all but 4 x 1024^2 at binning 2, which it misses by 2 %). A few sections of 512^2 need
# more than it says: 4 x 512^2 took 432-505 MB against 410 (benchmarks/results/
# memory_cpu_small.json), about 100 MB that no machine this runs on would miss.
PEAK_BYTES_PER_PIXEL = 90
PEAK_BYTES_FIXED = 320 * 2**20
# With fit_binning b the fit holds about 8 + 82 / b**2 bytes per input pixel, and the render
# step (the result's aligned stack, displacement and validity) about 20, whichever is more
# (measured with b = 1, 2 and 4).
FIT_FULL_RESOLUTION_BYTES = 8
RESULT_BYTES = 13
"""Bytes per pixel of a finished result held in memory: aligned (4), displacement (8), valid (1)."""
RENDER_BYTES = 20
SKIP_ENV = "NAPARI_SSEMNET_SKIP_MEMORY_CHECK"
"""Set to 1 to skip the check (e.g. with swap the estimate does not know about)."""
KEEP_HEAP_ENV = "NAPARI_SSEMNET_KEEP_HEAP"
"""Set to 0 to leave the C allocator's settings alone during a run (see :func:`kept_heap`)."""
KEEP_HEAP_HEADROOM = 2.0
"""Free memory, in multiples of the estimate, above which a run keeps freed memory: kept, the
memory a run added at its peak was up to 1.6 times the estimate (30 x 512^2 in a worker
thread, 1.8 times the same run without; benchmarks/bench_heap.py)."""


def estimate_peak_bytes(shape: tuple[int, int, int], binning: int = 1) -> int:
    """Bytes an alignment of a ``(Z, H, W)`` stack adds at its peak (CPU, default parameters
    apart from ``fit_binning``).

    The input stack itself is not included: it is already in memory.
    """
    z, h, w = (int(s) for s in shape)
    fit = (FIT_FULL_RESOLUTION_BYTES
           + (PEAK_BYTES_PER_PIXEL - FIT_FULL_RESOLUTION_BYTES) / binning**2)
    per_px = max(RENDER_BYTES, fit)
    return int(per_px * z * h * w) + PEAK_BYTES_FIXED


def available_bytes() -> int | None:
    """Memory the system can give this process without swapping, or None if unknown: the
    machine's available memory, or what is left under the process's cgroup limit (a batch
    job's ``--mem``, a container's limit) when that is less."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:  # other Unix systems: free pages only (an underestimate)
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            pass
    limited = cgroup_free_bytes()
    if limited is not None and (free is None or limited < free):
        return limited
    return free


def cgroup_free_bytes(root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup"
                      ) -> int | None:
    """Bytes left under the tightest cgroup memory limit of this process and its parent
    cgroups (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``; SLURM sets the job's on a
    parent of the task's), or None without a limit. Page cache that the kernel can drop
    (``inactive_file``) does not count as used. Past the limit the kernel kills the job
    without a word, however much memory the machine has."""
    paths = {"": "", "memory": ""}
    try:
        with open(self_cgroup) as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":
                    paths[""] = path
                elif "memory" in controllers.split(","):
                    paths["memory"] = path
    except (OSError, ValueError):
        pass

    def ancestors(path: str) -> list[str]:
        parts = [x for x in path.split("/") if x]
        return ["/" + "/".join(parts[:i]) if i else "" for i in range(len(parts), -1, -1)]

    places = [(f"{root}{sub}", "memory.max", "memory.current", "inactive_file")
              for sub in ancestors(paths[""])]
    places += [(f"{root}/memory{sub}", "memory.limit_in_bytes", "memory.usage_in_bytes",
                "total_inactive_file") for sub in ancestors(paths["memory"])]
    best = None
    for folder, limit_name, usage_name, cache_key in places:
        try:
            with open(f"{folder}/{limit_name}") as f:
                text = f.read().strip()
            if text == "max" or int(text) >= 2**60:  # no limit here
                continue
            with open(f"{folder}/{usage_name}") as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        try:
            with open(f"{folder}/memory.stat") as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == cache_key:
                        used -= int(value)
                        break
        except (OSError, ValueError):
            pass
        left = max(0, int(text) - used)
        best = left if best is None else min(best, left)
    return best


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def _advice(shape: tuple[int, int, int]) -> str:
    z, h, w = shape
    return ("Raise fit_binning (e.g. 2 or 4: the fit runs on binned sections), crop the stack "
            f"to the region you need, align fewer than {z} sections at a time (block_size; "
            "the command line then streams the result to disk), or use a machine with more "
            "memory.")


def check_memory(shape: tuple[int, int, int], device: Any, binning: int = 1, *,
                 extra_bytes: int = 0, total_sections: int | None = None) -> None:
    """Raise :class:`MemoryLimitError` if aligning ``shape`` on the CPU would not fit.

    ``extra_bytes`` is held on top of the estimate for ``shape`` (e.g. the whole result of a
    block-wise run, whose fit only sees one block of ``shape``; ``total_sections`` is then the
    stack's length, for the message).

    On a GPU only what stays in the computer's memory is checked (the normalised stack and
    the result, ``RENDER_BYTES`` per pixel): the GPU itself fails with a catchable
    out-of-memory error (turned into the same error by :func:`guard`), and its figure has
    not been measured.
    """
    if os.environ.get(SKIP_ENV) == "1":
        return
    on_cpu = getattr(device, "type", str(device)) == "cpu"
    free = available_bytes()
    z, h, w = (int(v) for v in shape)
    need = (estimate_peak_bytes(shape, binning) if on_cpu
            else RENDER_BYTES * z * h * w) + int(extra_bytes)
    if free is None or need <= free:
        return
    z_all = total_sections or z
    how = "" if z_all == z else f" a block at a time (about {z} sections held)"
    raise MemoryLimitError(
        f"Aligning {z_all} sections of {h}x{w} px{how} needs about {_gb(need)} of memory, but "
        f"only {_gb(free)} is free. {_advice((z_all, h, w))} (Set {SKIP_ENV}=1 to try "
        "anyway.)")


def release_freed_memory() -> None:
    """Hand memory that was freed back to the system (glibc only; elsewhere a no-op).

    glibc keeps freed heap pages for reuse; across the blocks of a block-wise run that
    retained heap grew with the number of blocks (44 x 1024^2 in blocks of 8: 581 -> 794 MB
    at the block starts), where trimming before each block kept it at 363 MB.
    """
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)


# glibc's mallopt() parameters, and the values put back after a run: the thresholds
# glibc's own dynamic setting reaches after one large free (32 MB, twice that for the
# trim), its default top pad and mmap count
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_KEPT = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 128 << 20))
_AFTER = ((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, 32 << 20),
          (_M_TRIM_THRESHOLD, 64 << 20), (_M_TOP_PAD, 128 << 10))
_heap_lock = threading.Lock()
_heap_users = 0


def heap_can_be_kept(shape: tuple[int, int, int], binning: int = 1) -> bool:
    """Whether :func:`kept_heap` would keep freed memory during a run of ``shape`` fitted at
    ``binning``: glibc, not turned off by ``NAPARI_SSEMNET_KEEP_HEAP=0``, and the free memory
    known and at least :data:`KEEP_HEAP_HEADROOM` times the estimate."""
    if os.environ.get(KEEP_HEAP_ENV, "1") == "0" or _libc("mallopt") is None:
        return False
    free = available_bytes()
    return free is not None and free >= KEEP_HEAP_HEADROOM * estimate_peak_bytes(shape, binning)


@contextlib.contextmanager
def kept_heap(shape: tuple[int, int, int], binning: int = 1) -> Iterator[bool]:
    """During a run, keep the memory torch frees for its next tensors (glibc only).

    Each iteration of the fit frees and allocates tensors of tens to hundreds of MB. glibc
    hands such blocks back to the system at once (``mmap``/``munmap``, heap trimming), and
    the kernel zeroes every page again when the next tensor touches it: on the 2-core dev box
    a CPU run spent as long in the kernel as in torch (30 x 512^2: 8.4 million page faults,
    24 s of system time in a 35 s run). Here no block is handed back while the run lasts
    (no ``mmap``, no trimming), and everything freed is given back to the system at its end
    (``malloc_trim``).

    Yields whether the settings were changed: not when ``NAPARI_SSEMNET_KEEP_HEAP=0``, off
    glibc, or when the free memory is unknown or under :data:`KEEP_HEAP_HEADROOM` times
    the estimate for ``shape`` at ``binning`` (kept memory raises the peak). Nested and
    concurrent runs share one setting; the last one to end restores it.
    """
    global _heap_users
    use = heap_can_be_kept(shape, binning)
    mallopt = _libc("mallopt")
    if use:
        with _heap_lock:
            if _heap_users == 0:
                # musl's mallopt does nothing and returns 0; glibc's returns 1
                use = all([mallopt(param, value) == 1 for param, value in _KEPT])
            if use:
                _heap_users += 1
    try:
        yield use
    finally:
        if use:
            with _heap_lock:
                _heap_users -= 1
                if _heap_users == 0:
                    for param, value in _AFTER:
                        mallopt(param, value)
                    release_freed_memory()


@functools.cache
def _libc(name: str) -> Any:
    """The C library's function ``name``, or None (not glibc, or not found)."""
    try:
        import ctypes
        import ctypes.util

        lib = ctypes.util.find_library("c")
        return getattr(ctypes.CDLL(lib), name, None) if lib else None
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover - torch is a dependency
        pass
    text = str(exc).lower()
    # cuFFT, cuBLAS and cuDNN say it their own way (CUFFT_ALLOC_FAILED, ...)
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text
                                              or "not enough memory" in text
                                              or "alloc_failed" in text)


def guard(gen: Generator[Any, None, Any], shape: tuple[int, int, int], binning: int = 1
          ) -> Generator[Any, None, Any]:
    """Run the generator ``gen``; an out-of-memory error inside becomes a
    :class:`MemoryLimitError` about a stack of ``shape`` fitted at ``binning``."""
    try:
        with kept_heap(shape, binning):
            return (yield from gen)
    except (MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        z, h, w = shape
        text = str(exc).lower()
        on_gpu = any(w_ in text for w_ in ("cuda", "cufft", "cublas", "cudnn"))
        where = "the GPU" if on_gpu else "this machine"
        estimate = ("" if on_gpu else
                    f" (an estimated {_gb(estimate_peak_bytes(shape, binning))})")
        error = MemoryLimitError(
            f"Ran out of memory on {where} while aligning {z} sections of {h}x{w} px"
            f"{estimate}. {_advice(shape)} On a GPU, device='cpu' may fit where the GPU "
            "does not.")
        # the original error's traceback holds the run's tensors: GPU memory would stay
        # taken in a long-lived process (napari) for as long as the error is kept
        exc.__traceback__ = None
        del exc
        release_gpu_cache()
        raise error from None


def release_gpu_cache() -> None:
    """Hand memory cached by torch's CUDA allocator back to the GPU (a no-op without one)."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - a courtesy, never a reason to fail
        pass
