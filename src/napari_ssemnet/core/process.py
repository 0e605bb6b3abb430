"""Run a whole-stack alignment in a child Python process (the widget's large runs).

Why a process and not only a thread: glibc gives every thread but the main one an arena of
64 MB heaps, and a block larger than that is mapped and unmapped at each use whatever
``mallopt`` says, so the kernel zeroes its pages again on every iteration of the fit (see
:func:`memory.kept_heap`). In napari's worker thread that made a 20 x 1024^2 run 1.6x slower
than the same run from the command line. In the main thread of a child process the run
keeps its freed memory, and a child that is killed (the out-of-memory killer) or crashes
leaves napari and the user's layers alone.

The child is ``python -m napari_ssemnet.core.process``. It reads one pickled job from its
stdin, then any byte or the end of stdin stops it; it writes pickled frames to its stdout:
``("event", Progress | SectionResult)``, then ``("result", AlignmentResult)``,
``("cancelled", message)`` or ``("error", exception, traceback text)``. Only this module
talks to it, so the pickles never come from anyone else.
"""

from __future__ import annotations

import collections
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np

from .align import (
    AlignmentResult,
    Progress,
    ProgressRate,
    SectionResult,
    StopCallback,
    _check_callable,
    check_ignore,
    check_stack,
    iter_align_stack,
    resolve_params,
)
from .errors import AlignmentCancelled, MemoryLimitError, SsemnetError
from .params import AlignParams

PROCESS_ENV = "NAPARI_SSEMNET_PROCESS"
"""``1``: full runs of the widget always go to a child process, ``0``: never (a worker
thread), unset or ``auto``: see :func:`use_process`."""

PROCESS_MIN_PIXELS = 8 * 1024 * 1024
"""Stacks of at least this many pixels go to a child process in ``auto`` mode. Starting the
child (importing torch) takes 2.5-4 s on the 2-core dev box; smaller runs gain less than that
(docs/benchmarks.md, "A child process for the widget's runs")."""

CHILD_PROGRESS_INTERVAL = 0.05
"""Seconds between progress frames from the child (the parent throttles them again)."""

_POLL = 0.05  # seconds between the parent's looks at should_stop while it waits
_EXIT_WAIT = 5.0  # seconds a child that has sent its result gets to exit by itself
_TAIL = 40  # lines of the child's stderr kept for the message when it dies


class ChildStartError(SsemnetError):
    """The child process could not be started, or ended before its first report (e.g. its
    Python cannot import this package); the caller may run the alignment in-process."""


def use_process(shape: tuple[int, int, int], binning: int = 1, block_size: int = 0) -> bool:
    """Whether a run on a stack of ``shape``, fitted at ``binning`` (in blocks of
    ``block_size`` sections if above 0), should go to a child process.

    ``NAPARI_SSEMNET_PROCESS=1`` or ``0`` decide. Otherwise only on Linux with glibc (where
    the worker thread's arena is what costs time), not in a frozen application (its
    ``sys.executable`` is not a Python), for fits of at least :data:`PROCESS_MIN_PIXELS`
    pixels (a block run's: one block and a section), and when the child would keep its freed
    memory (:func:`memory.heap_can_be_kept`: twice the fit's estimate free), which is where
    its gain comes from; the child also holds a second copy of the stack and of the result.
    """
    setting = os.environ.get(PROCESS_ENV, "auto").strip().lower()
    if setting in ("1", "yes", "true", "on"):
        return True
    if setting in ("0", "no", "false", "off"):
        return False
    from .blocks import guarded_shape
    from .memory import heap_can_be_kept

    if len(shape) != 3:  # not a stack: the usual checks say so
        return False
    held = guarded_shape(block_size, shape)
    return (sys.platform.startswith("linux") and not getattr(sys, "frozen", False)
            and int(np.prod(held)) >= PROCESS_MIN_PIXELS and heap_can_be_kept(held, binning))


def child_command() -> list[str]:
    """The command line of the child process."""
    return [sys.executable, "-m", "napari_ssemnet.core.process"]


def _child_env() -> dict[str, str]:
    import site

    env = dict(os.environ)
    # the same package as this process, even from a source tree; never site-packages
    # itself (ahead of the standard library it could shadow it)
    root = os.path.realpath(Path(__file__).resolve().parents[2])
    known = {os.path.realpath(p) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if root not in known:
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.pop(PROCESS_ENV, None)
    return env


def iter_align_stack_in_process(
    stack: np.ndarray,
    params: AlignParams | None = None,
    *,
    should_stop: StopCallback | None = None,
    ignore: Any = None,
    **overrides: Any,
) -> Generator[Progress | SectionResult, None, AlignmentResult]:
    """:func:`align.iter_align_stack` in a child process: the same events and result.

    Parameters
    ----------
    stack : array-like, shape (Z, H, W)
        Not modified; the child gets a copy.
    params, ignore, overrides
        As for :func:`align.iter_align_stack` (no ``encoder`` object: the child loads the
        weights named by ``params``).
    should_stop : callable, optional
        Polled every 50 ms while waiting for the child; when it returns True the child is
        killed (it holds nothing worth keeping) and :class:`AlignmentCancelled` is raised.

    Raises
    ------
    SsemnetError
        The child's own errors come back as they were raised there (``InputError``,
        ``MemoryLimitError``, ...). A child that dies without a result gives a
        :class:`MemoryLimitError` when it was killed with SIGKILL (on Linux most often the
        out-of-memory killer), a :class:`ChildStartError` when it could not be started or
        ended otherwise before its first report, and else an :class:`SsemnetError` with its
        exit status and the last lines it wrote.
    """
    arr = check_stack(stack)
    mask = check_ignore(ignore, arr.shape)
    params = resolve_params(params, overrides)
    _check_callable(should_stop=should_stop)
    import torch  # not at the top: the widget module imports this one and not torch

    job = {"stack": np.ascontiguousarray(arr),
           "ignore": None if mask is None else np.ascontiguousarray(mask), "params": params,
           # a torch.set_num_threads made in napari's console is not in the environment
           "threads": torch.get_num_threads()}
    yield Progress("prepare", 0, 1, "starting the alignment process")
    try:
        proc = subprocess.Popen(child_command(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=_child_env())
    except OSError as exc:
        raise ChildStartError(f"Could not start the alignment process ({exc}).") from None
    frames: queue.Queue = queue.Queue()
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL)
    threads = [threading.Thread(target=_send_job, args=(proc, job), daemon=True),
               threading.Thread(target=_read_frames, args=(proc.stdout, frames), daemon=True),
               threading.Thread(target=_relay_stderr, args=(proc.stderr, tail), daemon=True)]
    del job  # only the writer thread holds it now, until the child has read it
    for t in threads:
        t.start()
    finished = False  # the child said its last word: let it end on its own
    heard = False  # any frame yet: a child that dies before one did not start
    try:
        while True:
            if should_stop is not None and should_stop():
                raise AlignmentCancelled("Alignment cancelled.")
            try:
                frame = frames.get(timeout=_POLL)
            except queue.Empty:
                continue
            kind = frame[0]
            finished = kind != "event"
            heard = heard or kind != "ended"
            if kind == "event":
                yield frame[1]
            elif kind == "result":
                return frame[1]
            elif kind == "cancelled":
                raise AlignmentCancelled(frame[1])
            elif kind == "error":
                exc, text = frame[1], frame[2]
                if not isinstance(exc, SsemnetError):
                    exc.add_note(f"Raised in the alignment process:\n{text}")
                raise exc
            else:  # the child's stdout ended without a last frame
                code = proc.wait()
                threads[2].join(timeout=1.0)
                raise _died(code, list(tail), started=heard)
    finally:
        if finished:
            try:
                proc.wait(timeout=_EXIT_WAIT)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:  # stopped, closed, or hanging after its result
            proc.kill()
        proc.wait()
        threads[2].join(timeout=1.0)  # its last lines reach stderr before we return
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:  # pragma: no cover - the child is gone already
                pass


def _send_job(proc: subprocess.Popen, job: dict[str, Any]) -> None:
    try:
        pickle.dump(job, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        proc.stdin.flush()
    except (BrokenPipeError, OSError, ValueError):  # the child died or was killed: the
        pass  # reader reports that


def _read_frames(stream: Any, frames: queue.Queue) -> None:
    while True:
        try:
            frame = pickle.load(stream)
        except Exception:  # end of the stream, or a frame cut short by the child's death
            frames.put(("ended",))
            return
        frames.put(frame)
        if frame[0] != "event":
            return


def _relay_stderr(stream: Any, tail: collections.deque[str]) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        tail.append(line.rstrip("\n"))
        try:
            sys.stderr.write(line)
        except Exception:  # pragma: no cover - no stderr (pythonw): the tail still has it
            pass


def _died(code: int, tail: list[str], *, started: bool = True) -> SsemnetError:
    if code < 0:
        try:
            how = f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"ended with exit status {code}"
    if code == -signal.SIGKILL:
        return MemoryLimitError(
            f"The alignment process {how} before it finished. On Linux that is most often the "
            "system's out-of-memory killer: the run needed more memory than was free. napari "
            "and its layers are not affected. Try a fit binning of 2, a block size, or fewer "
            "sections at a time, or close other programs.")
    last = "\n".join(line for line in tail if line.strip())[-2000:]
    if not started:
        return ChildStartError(f"The alignment process {how} before its first report."
                               + (f" Its last output:\n{last}" if last else ""))
    return SsemnetError(f"The alignment process {how} before it finished; napari and its "
                        "layers are not affected."
                        + (f" Its last output:\n{last}" if last else ""))


def _child_main() -> None:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed (Python or C) goes to stderr, not into the frames
    sys.stdout = sys.stderr
    stdin = sys.stdin.buffer
    job = pickle.load(stdin)
    stop = threading.Event()

    def watch() -> None:  # any byte, or the parent going away, stops the run
        try:
            stdin.read(1)
        finally:
            stop.set()

    threading.Thread(target=watch, daemon=True).start()

    def send(*frame: Any) -> None:
        pickle.dump(frame, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()

    rate = ProgressRate(CHILD_PROGRESS_INTERVAL)
    stack, mask = job.pop("stack"), job.pop("ignore")
    import torch

    torch.set_num_threads(job["threads"])
    try:
        gen = iter_align_stack(stack, job["params"], should_stop=stop.is_set, ignore=mask)
        del stack, mask
        try:
            while True:
                event = next(gen)
                if not isinstance(event, Progress) or rate.due(event):
                    send("event", event)
        except StopIteration as done:
            result = done.value
        send("result", result)
    except AlignmentCancelled as exc:
        send("cancelled", str(exc))
    except BaseException as exc:  # every error goes back to the parent
        text = traceback.format_exc()
        try:  # some exception classes pickle but cannot be rebuilt from their args
            pickle.loads(pickle.dumps(exc))
        except Exception:
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        send("error", exc, text)
    out.close()
    sys.stderr.flush()
    # nothing is left to save: skip the interpreter's teardown (freeing the run's arrays,
    # torch's exit hooks), which kept the parent waiting for 1-2 s on large stacks
    os._exit(0)


if __name__ == "__main__":
    _child_main()
