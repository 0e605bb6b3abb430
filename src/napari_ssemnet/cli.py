"""The ``napari-ssemnet`` command line.

::

    napari-ssemnet align INPUT.tif -o ALIGNED.tif [--fields FIELDS.npz] [--grid-spacing 64 ...]
    napari-ssemnet align --sample [-o sample_aligned.tif]
    napari-ssemnet apply-fields FIELDS.npz LABELS.tif -o LABELS_OUT.tif [--interpolation nearest]
    napari-ssemnet train-features STACK.tif [STACK2.tif ...] -o WEIGHTS.pt [--steps N]
    napari-ssemnet --version

The ``align`` options are generated from :class:`~napari_ssemnet.core.params.AlignParams`
(one ``--dash-name`` per field, same default, limits, choices and help), so the CLI, the
Python API and the napari widget share every parameter.

Exit codes: 0 done, 2 bad input or parameters (one ``error: ...`` line on stderr, usage
errors included), 3 out of memory or disk or a failed write, 75 the output is being written by
another run (retry later), 130 cancelled with Ctrl-C, 143 stopped by SIGTERM (a batch
scheduler's time limit; the run stops as cleanly as with Ctrl-C). torch is imported only
once a command runs.

Output files are checked before any work (not a folder; the folder exists, is made, and
takes files; folders made for a run that fails are removed again), never replace an input
(same name or a hard link of it), and are written under a hidden working name, renamed over
the target once complete. A lock file ``.NAME.lock`` (a kernel lock where the file system has
them) keeps two runs of any command from writing the same output. Messages go to stdout
only after the files are written; a closed stdout (``| head``) costs no file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TextIO

import numpy as np

from . import __version__
from .core.align import ProgressRate
from .core.errors import AlignmentCancelled, MemoryLimitError, SsemnetError
from .core.io import SectionReader, as_dtype, fields_file_name, file_digest, section_files
from .core.params import ADDED_LATER, TRAIN_STEPS, AlignParams, ParameterError, knobs

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_RESOURCE = 3  # out of memory or disk, or a write failed (see the message)
EXIT_BUSY = 75  # another run is writing the output (EX_TEMPFAIL): retry once it is done
EXIT_CANCELLED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a terminated job
SAMPLE_OUTPUT = "sample_aligned.tif"


# -- parameters ------------------------------------------------------------------------


def option_name(field_name: str) -> str:
    """``grid_spacing`` -> ``--grid-spacing``."""
    return "--" + field_name.replace("_", "-")


def _help_text(f: dataclasses.Field) -> str:
    meta = f.metadata
    parts = [meta.get("help", "")]
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        parts.append(f"Range {lo} to {hi}.")
    elif lo is not None:
        parts.append(f"At least {lo}.")
    default = f.default if f.default != "" else "''"
    parts.append(f"(default: {default})")
    # argparse %-formats help strings
    return " ".join(p for p in parts if p).replace("%", "%%")


def whole_number(text: str) -> int:
    """An integer option's value: ``32``, or a whole number written as a float (``32.0``),
    as :class:`AlignParams` and a ``--params`` file take it."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(value)


def add_param_options(parser: argparse.ArgumentParser) -> None:
    """Add one option per :class:`AlignParams` field.

    The argparse default is None (meaning "not given"), so values from ``--params`` are only
    overridden by options actually typed; the real defaults come from ``AlignParams``.
    """
    group = parser.add_argument_group(
        "alignment parameters (same names and defaults as AlignParams and the napari widget)")
    for f in knobs():
        kind = type(f.default)
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": _help_text(f)}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = whole_number if kind is int else kind
            if f.metadata.get("choices"):
                kwargs["choices"] = list(f.metadata["choices"])
            else:
                kwargs["metavar"] = ("PATH" if f.name == "weights" else
                                     {int: "N", float: "X", str: "TEXT"}.get(kind, "VALUE"))
        group.add_argument(option_name(f.name), **kwargs)


def load_params_file(path: str | Path, gaps: list[str] | None = None) -> AlignParams:
    """Read parameters from a JSON file (``AlignParams.to_json``) or a fields ``.npz``;
    ``gaps`` (if given) receives the names of :data:`ADDED_LATER` that a whole record of an
    older version leaves out."""
    p = Path(path)
    if p.is_dir():
        raise SsemnetError(f"Parameter file {str(p)!r} is a folder; give the .json file "
                           "(AlignParams.to_json) or a fields .npz.")
    if p.exists() and not p.is_file():  # a pipe or a device: reading it may never end
        raise SsemnetError(f"Parameter file {str(p)!r} is not a regular file.")
    if not p.is_file():
        raise SsemnetError(f"Parameter file {str(p)!r} does not exist.")
    if p.suffix.lower() == ".npz":
        from .core.io import load_fields_params

        data = load_fields_params(p)
        if not data:
            raise SsemnetError(f"{str(p)!r} holds no alignment parameters.")
    else:
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SsemnetError(f"Parameter file {str(p)!r} is not valid JSON ({exc}).") from None
        except RecursionError:  # json's own limit on nesting
            raise SsemnetError(f"Parameter file {str(p)!r} is nested too deeply to be a "
                               "parameters file.") from None
    if not isinstance(data, dict):
        raise SsemnetError(f"Parameter file {str(p)!r} must hold a JSON object of parameters.")
    if _is_summary(data):
        data = data["params"]  # a --summary-json file: its run's parameters
    weights = data.get("weights")
    if isinstance(weights, str) and weights and not os.path.isabs(weights) \
            and not os.path.exists(weights) and (p.parent / weights).is_file():
        # files written before weights were stored absolute, read from another folder
        data = {**data, "weights": str((p.parent / weights).resolve())}
    if gaps is not None and "magnitude_penalty" in data:  # a whole record, not a few overrides
        gaps.extend(name for name in ADDED_LATER if name not in data)
    return AlignParams.from_dict(data)


def params_from_args(args: argparse.Namespace) -> AlignParams:
    """``--params`` file (if any), overridden by the options given on the command line."""
    gaps: list[str] = []
    base = (load_params_file(args.params, gaps) if getattr(args, "params", None)
            else AlignParams())
    given = {f.name: getattr(args, f.name) for f in knobs()
             if getattr(args, f.name, None) is not None}
    gaps = [name for name in gaps if name not in given]
    if gaps:
        then = ", ".join(f"{n}={ADDED_LATER[n]}" for n in gaps)
        now = ", ".join(f"{n}={getattr(base, n)}" for n in gaps)
        opts = " ".join(f"{option_name(n)} {ADDED_LATER[n]}" for n in gaps)
        _say(sys.stderr, f"note: {args.params} was written before {', '.join(gaps)} "
                         f"existed; its run fitted as {then} does, and this one uses the "
                         f"defaults {now}; add {opts} to repeat that run.\n")
    if given.get("weights"):  # stored with the results: it must still say which file
        given["weights"] = os.path.abspath(given["weights"])
    params = base.replace(**given) if given else base
    if given.get("weights") and params.features != "custom":
        raise SsemnetError(f"--weights is used only with --features custom (features is "
                           f"'{params.features}' here); add --features custom, or leave "
                           "--weights out.")
    if params.weights and params.features != "custom":  # from --params
        _say(sys.stderr, f"note: the weights file in {args.params} ({params.weights}) is not "
                         f"used: features is '{params.features}'; add --features custom to "
                         "use it.\n")
        params = params.replace(weights="")
    return params


def _is_summary(data: Any) -> bool:
    """Whether parsed JSON is a ``--summary-json`` file (its run's figures, not parameters)."""
    return isinstance(data, dict) and isinstance(data.get("params"), dict) \
        and "sections" in data and "version" in data


def recorded_run(path: str | Path) -> dict[str, Any]:
    """What a results file says of the run that made it, besides its parameters: the
    ``device`` type (``cpu``, ``cuda``) from a fields ``.npz`` or a ``--summary-json`` file,
    and from a summary also its ``output_dtype`` and ``ignore`` mask. Empty for a plain
    parameters file; only the entries a file has. Reads no displacement."""
    p = Path(path)
    run: dict[str, Any] = {}
    try:
        if p.suffix.lower() == ".npz":
            with np.load(p, allow_pickle=False) as npz:  # members are read on demand
                if "device_used" in npz.files:
                    run["device"] = str(npz["device_used"])
        else:
            data = json.loads(p.read_text(encoding="utf-8"))
            if _is_summary(data):
                run = {k: data[k] for k in ("device", "output_dtype", "ignore")
                       if data.get(k) is not None}
    except (OSError, ValueError, zipfile.BadZipFile):
        return {}  # load_params_file has read it already; nothing to add here
    if "device" in run:
        run["device"] = str(run["device"]).split(":")[0]
    if run.get("output_dtype") not in ("input", "float32"):
        run.pop("output_dtype", None)
    return run


def _note_other_device(params_path: str, before: str | None) -> None:
    """With device "auto" from a results file, say so when this run lands on another kind
    of device (``before``) than the run that made the file: the same seed matches only on
    the same device."""
    from .core.device import pick_device

    now = pick_device("auto").type
    if before is not None and before != now:
        _say(sys.stderr, f"note: {params_path} was made with device {before} and this run "
                         f"uses {now} (device auto): the results will differ a little; add "
                         f"--device {before} to repeat that run.\n")


# -- progress --------------------------------------------------------------------------


class ProgressPrinter:
    """Text progress for :class:`~napari_ssemnet.core.align.Progress` events.

    On a terminal: one ``\\r``-redrawn bar per stage, redrawn at most ``rate`` times a second.
    Otherwise (logs, pipes, batch jobs): a line when a stage starts and then one every
    ``log_interval`` seconds, each stamped with the time since the start, so that a job's
    log says how far a long run got.
    """

    def __init__(self, stream: TextIO | None = None, *, rate: float = 10.0, width: int = 30,
                 tty: bool | None = None, log_interval: float = 30.0,
                 t0: float | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty = tty
        self._rate = ProgressRate(1.0 / rate)
        self.width = width
        self.log_interval = log_interval
        self.stage: str | None = None
        self._shown = 0  # length of the bar on screen, to blank leftovers
        self._gone = False
        self._t0 = time.monotonic() if t0 is None else t0  # the stamps count from here
        self._last_line = -float("inf")

    def __call__(self, event: Any) -> None:
        stage = getattr(event, "stage", None)
        if stage is None:  # a SectionResult
            return
        new_stage = stage != self.stage
        if new_stage:
            self._end_line()
            self.stage = stage
        if not self.tty:
            self._log_line(event, new_stage)
            return
        if not self._rate.due(event):
            return
        frac = min(max(event.step / event.total, 0.0), 1.0) if event.total else 1.0
        n = int(round(frac * self.width))
        text = (f"{stage:<14} [{'#' * n}{'.' * (self.width - n)}] "
                f"{event.step}/{event.total} {event.message}")[:110]
        self._emit("\r" + text + " " * max(0, self._shown - len(text)))
        self._shown = len(text)

    def _log_line(self, event: Any, new_stage: bool) -> None:
        now = time.monotonic()
        if not new_stage and now - self._last_line < self.log_interval:
            return
        self._last_line = now
        stamp = self._stamp()
        msg = f": {event.message}" if event.message else ""
        if new_stage:
            self._emit(f"{stamp} {event.stage}{msg}\n")
        else:
            pct = f" ({100 * event.step // event.total}%)" if event.total else ""
            self._emit(f"{stamp} {event.stage} {event.step}/{event.total}{pct}{msg}\n")

    def _stamp(self) -> str:
        seconds = int(time.monotonic() - self._t0)
        return f"[{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}]"

    def note(self, text: str) -> None:
        """A line of its own (e.g. "writing ..."), stamped like the progress in a log."""
        self._end_line()
        self._emit(f"{text}\n" if self.tty else f"{self._stamp()} {text}\n")

    def _end_line(self) -> None:
        if self.tty and self._shown:
            self._emit("\n")
        self._shown = 0

    def _emit(self, text: str) -> None:
        """Write and flush; a reader that went away (``2>&1 | head``) silences the progress
        instead of stopping the run."""
        if self._gone:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError, AttributeError):  # reader gone, or stderr closed
            self._gone = True

    def close(self) -> None:
        """Finish the current bar line."""
        self._end_line()


_STOP_SIGNALS = ("SIGINT", "SIGTERM")
_stopped_by: list[int] = []  # the signal that asked the current command to stop


@contextmanager
def _handling(names: Sequence[str], handler: Callable[[int, Any], Any]) -> Iterator[None]:
    """``handler`` for the named signals (those this platform has) while the block runs, the
    previous handlers after it; nothing changes outside the main thread, where Python cannot
    set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [getattr(signal, name) for name in names if hasattr(signal, name)]
    old = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


@contextmanager
def ctrl_c_stops() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C or SIGTERM into a polite stop request; a second one
    interrupts at once.

    SIGTERM is what batch schedulers (SLURM, PBS) send at a job's time limit, shortly before
    SIGKILL: the run stops at its next check (within about a second), removes its working
    files, and a block-wise run keeps its finished blocks for ``--resume``. Yields the
    ``should_stop`` callable to pass to the core. Outside the main thread (where signal
    handlers cannot be set) it yields a callable that never stops. A request that came after
    the core's last check still stops (:class:`AlignmentCancelled` on leaving the block):
    having said "stopping", the command must not go on to write its outputs and exit 0.
    """
    requested = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        _stopped_by[:] = [signum]
        again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
        _say(sys.stderr, f"\nstopping ({signal.Signals(signum).name})... "
                         f"({again} again to abort at once)\n")

    with _handling(_STOP_SIGNALS, handler):
        yield requested.is_set
    if requested.is_set():
        raise AlignmentCancelled("Stopped after the last check.")


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Outside the stages that poll for a stop (reading, writing), SIGTERM interrupts like
    Ctrl-C, so that working files are removed; by default it would end the process on the
    spot and leave them."""
    def handler(signum: int, frame: Any) -> None:
        _stopped_by[:] = [signum]
        raise KeyboardInterrupt

    with _handling(["SIGTERM"], handler):
        yield


def _printer() -> ProgressPrinter:
    """The commands' progress on stderr, stamped from the command's start."""
    return ProgressPrinter(sys.stderr, t0=_STARTED[0])


def _say(stream: TextIO | None, text: str) -> None:
    """Write a message where a closed or missing stream (``2>&-``, ``2>&1 | head``) costs
    nothing but the message: the exit code stays the command's own."""
    try:
        stream.write(text)  # type: ignore[union-attr]
        stream.flush()  # type: ignore[union-attr]
    except (OSError, ValueError, AttributeError):
        pass


class _PipeSafe:
    """stdout for the commands' messages that outlives its reader (``... | head -1``): after a
    BrokenPipeError the rest is dropped, and the descriptor is pointed at /dev/null so that
    the interpreter's last flush does not complain. The files are written all the same."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.broken = stream is None  # started with stdout closed (>&-)

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)  # type: ignore[union-attr]
            except (OSError, ValueError):  # a broken pipe, /dev/full
                self._gone()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()  # type: ignore[union-attr]
            except (OSError, ValueError):
                self._gone()

    def _gone(self) -> None:
        self.broken = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self.stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):  # not a real file (tests, StringIO)
            pass


# -- commands --------------------------------------------------------------------------


_NOT_FIELDS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".json", ".pt", ".npy", ".h5",
               ".zarr", ".csv", ".txt")


def _tiff_name(output: str) -> None:
    """The output is always a TIFF: a name like ``aligned.png`` got a TIFF under it (a folder
    is left to the target checks, which say so)."""
    if Path(output).suffix.lower() not in (".tif", ".tiff") and not Path(output).is_dir():
        raise SsemnetError(f"The output {output} is written as a TIFF stack; give it a .tif "
                           "or .tiff name (-o aligned.tif).")


def cmd_align(args: argparse.Namespace, out: TextIO) -> int:
    if args.sample and args.input:
        raise SsemnetError("Give either an INPUT file or --sample, not both.")
    if not args.sample and not args.input:
        raise SsemnetError("No input: give a TIFF stack (napari-ssemnet align INPUT.tif -o "
                           "ALIGNED.tif) or --sample.")
    output = args.output or (SAMPLE_OUTPUT if args.sample else None)
    if output is None:
        raise SsemnetError("No output file: add -o ALIGNED.tif.")
    output = str(_follow(Path(output)))
    params = params_from_args(args)  # before reading a big stack: fail fast on bad options
    if params.features == "custom":  # and on a weights file that cannot be used
        from .core.features import load_weights

        load_weights(params.weights)
    if params.device != "auto":  # and on a device that is not there
        from .core.device import pick_device

        pick_device(params.device)
    run = recorded_run(args.params) if args.params else {}
    if params.device == "auto" and args.params and args.device is None:
        _note_other_device(args.params, run.get("device"))
    if args.output_dtype is None:  # a rerun from a summary writes what that run wrote
        args.output_dtype = run.get("output_dtype", "input")
    if run.get("ignore") and not args.ignore:  # the mask is not a parameter
        _say(sys.stderr, f"note: the run of {args.params} left out the pixels of --ignore "
                         f"{run['ignore']}; this one has no mask (add --ignore to repeat "
                         "it).\n")
    if args.fields and Path(args.fields).suffix.lower() in _NOT_FIELDS:
        # b.tif became b.tif.npz, while -o a.png is refused (run.v2 still gets .npz added)
        raise SsemnetError(f"--fields {args.fields}: the fields are a NumPy .npz archive; "
                           "give it a .npz name (other names get .npz added).")
    fields = _follow(fields_file_name(args.fields)) if args.fields else None
    # every file the run reads: the stack, and the weights and parameters files it was given
    inputs = [args.input, params.weights if params.features == "custom" else None,
              args.params if args.params and Path(args.params).is_file() else None,
              args.ignore]
    summary = _follow(Path(args.summary_json)) if args.summary_json else None
    for src in inputs:
        _refuse_overwriting_input(src, output)
        if fields is not None:
            _refuse_overwriting_input(src, fields, what="fields file")
        if summary is not None:
            _refuse_overwriting_input(src, summary, what="summary file")
    named = [(Path(output), "-o"), (fields, "--fields"), (summary, "--summary-json")]
    named = [(f, opt) for f, opt in named if f is not None]
    for i, (a, opt_a) in enumerate(named):
        for b, opt_b in named[i + 1:]:
            if a.resolve() == b.resolve():
                raise SsemnetError(f"{opt_a} and {opt_b} name the same file ({a}); give "
                                   "different files.")
    _tiff_name(output)
    targets = [(Path(output), "output file")]
    if fields is not None:
        targets.append((fields, "fields file"))
    if summary is not None:
        targets.append((summary, "summary file"))
    # before reading or aligning anything: the outputs can be written (folders are made now)
    with contextlib.ExitStack() as held:
        held.enter_context(_prepared_targets(targets))
        for target, _what in targets:  # a second run must not write either file at once
            held.enter_context(_output_lock(target))
        return _align(args, params, output, fields, out)


def _align(args: argparse.Namespace, params: AlignParams, output: str, fields: Path | None,
           out: TextIO) -> int:
    from .core.align import align_stack, check_reference
    from .core.io import open_stack, read_stack, section_count, write_stack

    blockwise = params.block_size > 0
    if args.resume and not blockwise:  # before reading a stack that may not even fit
        _refuse_orphaned_blocks(Path(output))
    if args.sample:
        from .core.sample import load_sample

        stack = load_sample(misaligned=True)
        source = "the shipped sample (ISBI 2012 crop with a known misalignment)"
    else:
        count = section_count(args.input)
        if count is not None:  # not after reading what may be many GB
            check_reference(params.reference, count)
        # block-wise runs read the sections as they go (memory-mapped when uncompressed)
        stack = open_stack(args.input) if blockwise else read_stack(args.input)
        source = str(args.input)
    out.write(f"aligning {source}: {stack.shape[0]} sections of {stack.shape[1]}x"
              f"{stack.shape[2]} px, {stack.dtype}\n")
    out.flush()
    streamed = blockwise and params.block_size < stack.shape[0]
    try:
        ignore = _open_ignore(args, tuple(stack.shape), lazy=streamed)
    except SsemnetError:
        if isinstance(stack, SectionReader):
            stack.close()
        raise
    if args.resume and not streamed:  # e.g. a job array over stacks of several lengths
        try:
            _refuse_orphaned_blocks(Path(output))
        except SsemnetError:
            if isinstance(stack, SectionReader):
                stack.close()
            raise
        _say(sys.stderr, "nothing to resume: the stack is aligned in one piece (no "
                         "--block-size smaller than its number of sections)\n")
    if streamed:
        try:
            return _align_blocks_to_disk(stack, params, args, output, fields, out, ignore)
        except OSError as exc:
            raise ResourceError(f"Could not write next to {output}: {exc}") from None
        finally:
            for held in (stack, ignore):
                if isinstance(held, SectionReader):
                    held.close()
    if isinstance(stack, SectionReader):  # one block holds it all: the joint run reads it whole
        stack.close()
        stack = read_stack(args.input)
    z, h, w = stack.shape
    out_dtype = _output_dtype(stack.dtype, args.output_dtype)
    # before the work, not after it: a full disk would cost the whole alignment
    _check_space([(Path(output), z * h * w * out_dtype.itemsize)]
                 + ([(fields, z * 2 * h * w * 4)] if fields is not None else []))
    printer = _printer()
    callback = None if args.quiet else printer
    try:
        with ctrl_c_stops() as should_stop:
            result = align_stack(stack, params, progress=callback, should_stop=should_stop,
                                 ignore=ignore)
    finally:
        printer.close()
    aligned = as_dtype(result.aligned, out_dtype)
    out_path = Path(output)
    if not args.quiet:  # a big stack's TIFF and fields take a while: the log says so
        printer.note(f"writing {out_path}" + (f" and {fields}" if fields is not None else ""))
    # under a working name, renamed over -o once complete: an existing -o survives a failure
    # and a hard link at -o is replaced, never written through
    tmp = _partial(out_path, "joint-partial.tif")
    try:
        try:
            write_stack(tmp, aligned, compression=_compression(args),
                        resolution=_input_resolution(args))
        except (OSError, ValueError) as exc:
            raise _write_failure(f"the aligned stack {out_path}", tmp, exc) from None
        _finish_outputs(tmp, out_path, fields,
                        _fields_writer(result.displacement, result.params, result))
    finally:
        _unlink_quietly(tmp, _fields_partial(fields))
    return _report(args, out, (z, h, w), stack.dtype, result, result.params, out_path, fields)


_STARTED = [time.monotonic()]  # when the command started (main sets it)
_ARGV: list[str] = []  # the command's arguments (main sets them), for the records


def _report(args: argparse.Namespace, out: TextIO, shape: tuple[int, int, int], dtype: Any,
            res: Any, params: AlignParams, out_path: Path, fields: Path | None,
            blocks: int | None = None, resumed: bool = False) -> int:
    """The end of an alignment, once every file is written (a closed stdout cannot cost a
    file): what went where, the summary, and ``--summary-json``."""
    from .core.align import format_summary

    out.write(f"aligned stack -> {out_path}\n")
    if fields is not None:
        out.write(f"displacement fields -> {fields}\n")
    if blocks is not None:
        out.write(f"aligned in {blocks} blocks of at most {params.block_size} sections\n")
        if resumed:  # else "7.9 s on cpu" beside "wall time 4.8 s" reads as a mistake
            out.write("(resumed: the times below include the blocks of the stopped run)\n")
    out.write(format_summary(shape, res.device, res.timings, res.ncc_before, res.ncc_after,
                             res.flags, reference=params.reference) + "\n")
    out.write(_wall_line())
    for note in getattr(res, "notes", None) or []:  # a block-wise summary has none
        _say(sys.stderr, f"note: {note}\n")
    _write_summary(args, shape, dtype, params, res, out_path, fields, blocks=blocks,
                   resumed=resumed)
    return EXIT_OK


def _blocks_done(state_path: Path) -> int:
    """How many blocks a stopped block-wise run finished (0: none, or no readable state)."""
    from .core.blocks import BlockState

    try:
        return BlockState.load(state_path)[0].next_block
    except SsemnetError:
        return 0


def _refuse_orphaned_blocks(out_path: Path) -> None:
    """``--resume`` without ``--block-size`` (or with one that covers the stack) next to
    the finished blocks of a stopped block-wise run: refused, so that the blocks are not
    left behind by a one-piece run."""
    state_path = _partial(out_path, "blocks.npz")
    if not state_path.is_file():
        return
    done = _blocks_done(state_path)
    if done:
        raise SsemnetError(
            f"A stopped block-wise run has {done} block(s) done for {out_path}; give its "
            "--block-size (and its other options) with --resume to go on, or delete its "
            "working files (" + ", ".join(_partial(out_path, x).name for x in _BLOCK_WORK)
            + f" in {out_path.parent}) to start over.")


def _provenance(res: Any) -> dict[str, np.ndarray]:
    """Stored with the fields: the version and the device that made them (the parameters
    say only what was asked for, e.g. device "auto"), and the environment of the run."""
    return {"version": np.array(__version__), "device_used": np.array(str(res.device)),
            "environment": np.array(json.dumps(_environment(res)))}


def _environment(res: Any) -> dict[str, Any]:
    """The run's ``environment`` (an AlignmentResult's or a block-wise summary's) with the
    command line."""
    return {**res.environment, "command": ["napari-ssemnet", *_ARGV]}


def _write_summary(args: argparse.Namespace, shape: tuple[int, int, int], dtype: Any,
                   params: AlignParams, res: Any, output: Path, fields: Path | None,
                   blocks: int | None = None, resumed: bool = False) -> None:
    """``--summary-json``: the figures of the run ``res`` (an AlignmentResult or a
    block-wise summary) for a pipeline (JSON; NaN written as null)."""
    from .core.align import link_yardstick
    from .core.io import pair_rows

    if not getattr(args, "summary_json", None):
        return
    path = _follow(Path(args.summary_json))

    def numbers(a: Any) -> list[float | None]:
        return [float(v) if np.isfinite(v) else None for v in np.asarray(a, float)]

    data = {
        "version": __version__, "input": "sample" if args.sample else str(args.input),
        "output": str(output), "fields": None if fields is None else str(fields),
        "sections": shape[0], "height": shape[1], "width": shape[2],
        "input_dtype": str(dtype),
        "device": str(res.device), "blocks": blocks, "params": params.to_dict(),
        "timings": {k: float(v) for k, v in res.timings.items()},
        "wall_seconds": time.monotonic() - _STARTED[0],
        "ncc_before": numbers(res.ncc_before), "ncc_after": numbers(res.ncc_after),
        "flags": list(res.flags),
        # [a, b, NCC] of consecutive usable sections after alignment (the poor_match check)
        "pair_ncc": pair_rows(res.pair_ncc),
        # what poor_match compares each pair with (core.align.link_yardstick; null: no check)
        "link_yardstick": link_yardstick(dict(res.pair_ncc)),
        "output_dtype": args.output_dtype, "compression": _compression(args),
        "ignore": getattr(args, "ignore", None),
        "resumed": resumed,
        "notes": list(getattr(res, "notes", None) or []),
        "environment": _environment(res),
    }
    tmp = _partial(path, "partial.json")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        _install(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise _write_failure(f"the summary {path}", tmp, exc) from None


def _wall_line() -> str:
    return (f"wall time {time.monotonic() - _STARTED[0]:.1f} s, reading and writing "
            "included\n")


def _follow(path: Path) -> Path:
    """An output given as a symlink is written where the link points (the link stays), as
    a shell redirection would; otherwise the path as given."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _size(n: int) -> str:
    """Bytes for a message: GB, or MB under 1 GB (0.0 GB said nothing)."""
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def _check_space(needs: Sequence[tuple[Path, int]]) -> None:
    """Refuse before the work when a disk cannot take what will be written there: ``needs``
    pairs an output file with the bytes it (and its working copies) will take; files on the
    same file system add up. Raises SsemnetError naming the folder."""
    by_dev: dict[int, list[Any]] = {}
    for path, n in needs:
        folder = Path(os.path.abspath(path)).parent
        try:
            dev = os.stat(folder).st_dev
        except OSError:
            continue  # made by _check_target; a folder that vanished fails at the write
        entry = by_dev.setdefault(dev, [folder, 0])
        entry[1] += n
    for folder, n in by_dev.values():
        free = shutil.disk_usage(folder).free
        if n > free:
            raise ResourceError(f"Writing the result needs about {_size(n)} of disk in "
                               f"{folder}, but only {_size(free)} is free.")


class ResourceError(SsemnetError):
    """The disk is full or a file could not be written (exit code 3, as for memory)."""


class OutputBusyError(SsemnetError):
    """Another run holds the output's lock (exit code 75)."""


def _write_failure(what: str, path: Path, exc: BaseException) -> SsemnetError:
    """One error line for a failed write; a full disk is said in words (tifffile reports
    it as 'N requested and M written')."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    try:
        free = shutil.disk_usage(Path(os.path.abspath(path)).parent).free
    except OSError:
        free = None
    full = getattr(exc, "errno", None) == errno.ENOSPC or "requested and" in text or (
        free is not None and free < 2**20)
    if full:
        text = f"the disk is full ({_size(free or 0)} free in {Path(path).parent}; {text})"
    return ResourceError(f"Could not write {what}: {text}")


def _unlink_quietly(*paths: Path | None) -> None:
    """Remove working files, never hiding the error that got us here."""
    for f in paths:
        if f is not None:
            try:
                f.unlink(missing_ok=True)
            except OSError:
                pass


def _samefile(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _refuse_overwriting_input(input_path: str | Path | None, output: str | Path,
                              what: str = "output file") -> None:
    """The result must not replace the user's input (or a section file of an input folder):
    neither by name (links resolved) nor as another name (hard link) of the same file."""
    if not input_path:
        return
    src, out = Path(input_path).resolve(), Path(output).resolve()
    same = out == src or (src.is_dir() and out.parent == src)
    if not same and out.is_file():
        if src.is_dir():
            files = [f for f in src.iterdir() if f.is_file()]
        else:
            files = [src] if src.is_file() else []
        same = any(_samefile(out, f) for f in files)
    if same and src.is_dir() and out.parent == src and not out.exists():
        raise SsemnetError(f"The {what} {output} is inside the input folder {input_path}, "
                           f"whose files are read as sections; choose another place.")
    if same:
        raise SsemnetError(f"The {what} {output} would replace the input "
                           f"{input_path}; choose another {what}.")


def _check_target(path: Path, what: str) -> list[Path]:
    """Pre-flight check of an output file: not a folder, and its folder exists (made here,
    returned as the folders made) and takes new files. Raises SsemnetError."""
    if path.is_dir():
        raise SsemnetError(f"The {what} {path} is a folder; give a file name.")
    parent = Path(os.path.abspath(path)).parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SsemnetError(f"Cannot write the {what} {path}: {existing} is a file, not a "
                           "folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SsemnetError(f"Cannot write the {what} {path}: the folder {existing} is not "
                           "writable.")
    made: list[Path] = []
    try:
        missing = []
        d = parent
        while d != existing:
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
        # os.access says yes to root everywhere: try it (a read-only mount, /proc, ...)
        # as long a name as the longest working file (.NAME.displacement.partial.npy), so
        # a name too long for the file system fails here, not after the alignment
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".displacement.probe",
                                     dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        _remove_empty(made)
        where = getattr(exc, "filename", None) or parent
        if str(where).endswith(".probe"):  # a name of ours: it said "displacement" for weights
            where = f"in {parent}"
        raise SsemnetError(f"Cannot write the {what} {path}: {exc.strerror or exc} "
                           f"({where}).") from None
    return made


def _remove_empty(folders: list[Path]) -> None:
    for d in reversed(folders):
        try:
            d.rmdir()
        except OSError:
            pass  # not empty (a stopped run's working files) or already gone


@contextmanager
def _prepared_targets(targets: Sequence[tuple[Path, str]]) -> Iterator[None]:
    """Check the output files before any work (see :func:`_check_target`); the folders made
    for them are removed again if the command fails and leaves them empty."""
    made: list[Path] = []
    ok = False
    try:
        for path, what in targets:
            made += _check_target(path, what)
        yield
        ok = True
    finally:
        if not ok:
            _remove_empty(made)


def _partial(path: Path, suffix: str) -> Path:
    """A working file next to ``path`` that replaces nothing of the user's."""
    return path.with_name(f".{path.name}.{suffix}")


def _fields_partial(fields: Path | None) -> Path | None:
    """The working name of the fields' ``.npz`` (None without ``--fields``)."""
    return _partial(fields, "partial.npz") if fields is not None else None


def _fields_writer(displacement: Any, params: AlignParams, res: Any) -> Callable[[Path], None]:
    """Writes ``displacement`` with the run's parameters, flags, NCC and provenance
    (``res``: an :class:`AlignmentResult` or a block-wise summary) to a path."""
    from .core.io import pair_array, save_fields

    def write(path: Path) -> None:
        save_fields(path, displacement, params=params, flags=res.flags,
                    ncc_before=res.ncc_before, ncc_after=res.ncc_after,
                    pair_ncc=pair_array(res.pair_ncc), **_provenance(res))
    return write


_COMPRESSION_HELP = ("Compression of the written TIFF: input (that of the input file: the "
                     "same lossless codec, zlib for a lossy one or one that cannot be "
                     "written here; none for the sample), none, or zlib. (default: input)")


def _open_ignore(args: argparse.Namespace, shape: tuple[int, ...], *, lazy: bool) -> Any:
    """``--ignore``'s mask stack (None without it), checked against the stack's shape; read
    section by section for a block-wise run."""
    if not getattr(args, "ignore", None):
        return None
    from .core.align import check_ignore
    from .core.io import open_stack, read_stack

    mask = (open_stack(args.ignore, masks=True) if lazy
            else read_stack(args.ignore, masks=True))
    try:
        return check_ignore(mask, shape, name=f"--ignore mask {args.ignore}")
    except SsemnetError:
        if isinstance(mask, SectionReader):
            mask.close()
        raise


def _input_resolution(args: argparse.Namespace) -> dict[str, Any] | None:
    """The pixel size and section spacing to write the aligned stack with: the input's, or
    the sample's."""
    from .core.io import read_resolution
    from .core.sample import sample_resolution

    return sample_resolution() if getattr(args, "sample", False) else read_resolution(
        args.input)


def _compression(args: argparse.Namespace) -> str | None:
    """The codec for tifffile (None: uncompressed) that ``--compression`` asks for."""
    from .core.io import read_compression

    if args.compression == "input":
        return read_compression(None if getattr(args, "sample", False) else args.input)
    return None if args.compression == "none" else args.compression


def _output_dtype(input_dtype: Any, choice: str) -> np.dtype:
    """The type written for ``--output-dtype`` (``input`` or ``float32``); a boolean mask
    becomes uint8 0/1, which every TIFF reader takes."""
    dtype = np.dtype(np.float32) if choice == "float32" else np.dtype(input_dtype)
    return np.dtype(np.uint8) if dtype.kind == "b" else dtype


def _install(tmp: Path, target: Path) -> None:
    """Rename a finished working file over ``target``; a file it replaces passes on its
    permissions where it can (a group-writable result in a shared folder stays so)."""
    try:
        os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
    except OSError:
        pass  # a new file (the umask decides), or a file system without chmod: no reason
        # to fail between the renames of the TIFF and its fields
    tmp.replace(target)


def _finish_outputs(tif_tmp: Path, out_path: Path, fields_path: Path | None,
                    write_fields: Callable[[Path], Any]) -> None:
    """Write the fields under their working name (``write_fields(path)``), then rename the
    fields and the finished TIFF over their targets, one right after the other: neither
    replaces an existing file before both are complete."""
    fields_tmp = _fields_partial(fields_path)
    if fields_path is not None:
        try:
            write_fields(fields_tmp)
        except (OSError, ValueError) as exc:
            _unlink_quietly(fields_tmp)
            raise _write_failure(f"the fields {fields_path}", fields_tmp, exc) from None
        except BaseException:  # Ctrl-C while the fields are written: no half file left
            _unlink_quietly(fields_tmp)
            raise
    # Ctrl-C or SIGTERM between the two renames would part the fields from the TIFF: their
    # handlers only take note until both are done (a signal mask would not do: the kernel
    # hands a process-wide signal to another thread, and Python still runs the handler)
    noted: list[int] = []
    try:
        with _handling(_STOP_SIGNALS, lambda signum, frame: noted.append(signum)):
            if fields_path is not None:
                _install(fields_tmp, fields_path)
            _install(tif_tmp, out_path)
    except OSError as exc:
        raise ResourceError(f"Could not write the output: {exc}") from None
    if noted:  # the outputs are complete: the stop came too late to matter
        _say(sys.stderr, f"({signal.Signals(noted[0]).name} while the outputs were put in "
                         "place: they are complete)\n")


def _reserve(path: Path) -> None:
    """Allocate a sparse file's blocks now, so that a full disk fails here."""
    if not hasattr(os, "posix_fallocate"):  # pragma: no cover - not Linux
        return
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return  # the file system cannot; the disk check above has to do
            raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or cannot tell: assume it runs)
    return True


def _link_or_create(src: Path, dst: Path) -> None:
    """``dst`` appears complete (a hard link of ``src``), or, where the file system has no
    hard links (FAT, some network shares), is created exclusively and then filled."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        fd = os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, src.read_bytes())
        finally:
            os.close(fd)


def _lock_refusal(out_path: Path, lock: Path, owner: tuple[int, str]) -> SsemnetError:
    pid, host = owner
    who = (f" (process {pid}{f' on {host}' if host and host != _HOST else ''})" if pid
           else "")
    return OutputBusyError(f"Another napari-ssemnet run{who} is writing {out_path}; wait for it "
                        f"to end or stop it (or, if it is not napari-ssemnet, delete {lock}).")


_HOST = socket.gethostname()


def _owner() -> bytes:
    """What a lock file holds: this process's id and host (runs on several nodes of a
    cluster share a file system, and a process id means nothing on another node)."""
    return f"{os.getpid()} {_HOST}".encode()


def _lock_pid(text: str) -> int:
    try:
        return int((text.split() or ["0"])[0])
    except ValueError:  # garbage
        return 0


def _lock_owner(text: str) -> tuple[int, str]:
    """(process id, host) of a lock file's text; the host is "" in a lock of an older
    version (the id alone)."""
    parts = text.split()
    return _lock_pid(text), (parts[1] if len(parts) > 1 else "")


_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
"""What ``flock`` answers on a file system without kernel locks."""


def _still_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path``."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _flock(out_path: Path, lock: Path) -> int | None:
    """Take ``lock`` with a kernel lock (``flock``), which ends with its process however that
    ends, so that no stale lock can be taken over by two runs at once. Returns the open
    descriptor, or None where the file system (or the platform) has no such locks."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    for _ in range(5):
        created = False
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:
                continue  # removed meanwhile
            except PermissionError:
                # another user's lock file: a kernel lock needs only read access to test it
                if not _take_foreign_lock(out_path, lock, fcntl):
                    return None
                continue
            except OSError as exc:
                raise SsemnetError(f"Could not open the lock file {lock}: "
                                   f"{exc.strerror or exc}") from None
        except OSError as exc:
            raise SsemnetError(f"Could not create the lock file {lock}: "
                               f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                owner = _lock_owner(lock.read_text())
            except OSError:
                owner = (0, "")
            raise _lock_refusal(out_path, lock, owner) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_LOCKS:
                if created:  # the link scheme must not find an empty lock file
                    _unlink_quietly(lock)
                return None
            raise SsemnetError(f"Could not lock {lock}: {exc.strerror or exc}") from None
        if not _still_at(fd, lock):  # a run that just ended removed it
            os.close(fd)
            continue
        # the kernel lock decides: an id left in the file by a crashed run may belong to
        # another process by now (ids are reused), so it is only read for messages
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _owner(), 0)
        except OSError as exc:  # e.g. a full disk
            _unlink_quietly(lock)  # while still locked: nobody else can be using it
            os.close(fd)
            raise SsemnetError(f"Could not write the lock file {lock}: "
                               f"{exc.strerror or exc}") from None
        try:
            os.fchmod(fd, 0o644)
        except OSError:
            pass  # not ours to change; readable enough for its owner
        return fd
    raise SsemnetError(f"Could not lock {lock}: it keeps being replaced.")


def _take_foreign_lock(out_path: Path, lock: Path, fcntl: Any) -> bool:
    """A lock file we may not write (another user's): refuse if its run still holds it,
    else remove it, so that the caller can make its own. False where the file system has
    no kernel locks."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return True  # removed meanwhile: try again
    except OSError as exc:
        raise SsemnetError(f"Could not read the lock file {lock}: "
                           f"{exc.strerror or exc}") from None

    def refuse() -> SsemnetError:
        return _lock_refusal(out_path, lock, _lock_owner(
            os.pread(fd, 320, 0).decode(errors="replace")))

    try:
        # NFS refuses an exclusive lock without write access (EBADF); a shared one still
        # conflicts with the holder's exclusive lock
        for mode in (fcntl.LOCK_EX, fcntl.LOCK_SH):
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                raise refuse() from None
            except OSError as exc:
                if exc.errno in _NO_LOCKS:
                    return False
                if exc.errno != errno.EBADF or mode == fcntl.LOCK_SH:
                    raise SsemnetError(f"Could not lock {lock}: "
                                       f"{exc.strerror or exc}") from None
        # ours now; remove it only if it is still the file at the lock's path (its run may
        # have removed it, and a new run made and locked another one since)
        if _still_at(fd, lock):
            try:  # needs write access to the folder only
                lock.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise SsemnetError(f"{lock} is left by a run that has ended, but cannot be "
                                   f"removed ({exc.strerror or exc}); delete it.") from None
        return True
    finally:
        os.close(fd)


@contextmanager
def _output_lock(out_path: Path) -> Iterator[None]:
    """Keep a second run from writing the same output (and working files) at once: a lock
    file ``.NAME.lock`` holding the process id, mode 0o644, held with a kernel lock where the
    file system has them (a lock file left by a crash is then simply taken). Elsewhere the
    file alone is the lock (:func:`_link_lock`)."""
    lock = _partial(out_path, "lock")
    if lock.is_dir():
        raise SsemnetError(f"{lock} is a folder where napari-ssemnet keeps its lock file; "
                           "remove it.")
    fd = _flock(out_path, lock)
    if fd is None:
        with _link_lock(out_path, lock):
            _remove_stale_work(out_path)
            yield
        return
    try:
        _remove_stale_work(out_path)
        yield
    finally:
        _unlink_quietly(lock)  # before the kernel lock ends: see the check in _flock
        os.close(fd)


# working files that only a run which was killed (SIGKILL, power loss) leaves behind; the
# block-wise ones (.NAME.partial.tif, .NAME.displacement.partial.npy, .NAME.blocks.npz) are
# kept for --resume. "-partial" (not ".partial"): .a.tif.joint.partial.tif was also the
# block-wise TIFF of a run on -o a.tif.joint
_BLOCK_WORK = ("partial.tif", "displacement.partial.npy", "blocks.npz")
_STALE_SUFFIXES = ("joint-partial.tif", "apply-partial.tif", "partial.npz", "partial.pt",
                   "blocks.npz.tmp.npz", "partial.json", "blocks-compressed.tif")


def _remove_stale_work(out_path: Path) -> None:
    """With the output's lock held, no other run is writing its working files: one that
    exists was left by a killed run. It is removed before the disk space is checked (a
    killed run on a big stack can leave gigabytes), and said so."""
    for suffix in _STALE_SUFFIXES:
        f = _partial(out_path, suffix)
        try:
            size = f.stat().st_size if f.is_file() and not f.is_symlink() else None
            if size is None:
                continue
            f.unlink()
        except OSError:
            continue  # it stays; the run then writes over it
        _say(sys.stderr, f"removed {f.name} ({_size(size)}), left in {f.parent} by an "
                         "interrupted run\n")


@contextmanager
def _link_lock(out_path: Path, lock: Path) -> Iterator[None]:
    """The lock file alone as the lock, for file systems without kernel locks: the id is
    written before the lock appears (a hard link of a complete file), so no other run can
    read an empty lock and take it as stale; one left by a process that no longer runs is
    taken over (two runs that do so at the same instant can both win)."""
    try:
        fd, mine = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".lock-new",
                                    dir=lock.parent)
    except OSError as exc:
        raise SsemnetError(f"Could not create the lock file {lock}: "
                           f"{exc.strerror or exc}") from None
    try:
        try:
            os.write(fd, _owner())
        except OSError as exc:  # a full disk
            raise SsemnetError(f"Could not write the lock file {lock}: "
                               f"{exc.strerror or exc}") from None
        finally:
            os.close(fd)
        os.chmod(mine, 0o644)
        for _ in range(2):
            try:
                _link_or_create(Path(mine), lock)
                break
            except FileExistsError:
                try:
                    pid, host = _lock_owner(lock.read_text())
                except OSError:  # not a file
                    pid, host = 0, ""
                # a run on another node cannot be checked: it counts as running
                if pid and ((host and host != _HOST)
                            or (pid != os.getpid() and _pid_alive(pid))):
                    raise _lock_refusal(out_path, lock, (pid, host)) from None
                lock.unlink(missing_ok=True)
            except OSError as exc:
                raise SsemnetError(f"Could not create the lock file {lock}: "
                                   f"{exc.strerror or exc}") from None
        else:  # pragma: no cover - lost a race twice
            raise SsemnetError(f"Could not lock {lock}.")
    finally:
        _unlink_quietly(Path(mine))
    try:
        yield
    finally:
        _unlink_quietly(lock)


def _run_identity(args: argparse.Namespace, params: AlignParams, shape: tuple[int, ...],
                  dtype: np.dtype) -> str:
    """What a resumed run must share with the one that stopped (JSON). The input counts by
    its content (sizes and a digest of every byte), not its path or time: a job that
    copies its input to scratch again before it is requeued can still resume. So do custom
    weights: the same file name with other weights in it is another run."""
    src: Any = "sample" if args.sample else _content_record(Path(args.input))
    ident = {"params": params.to_dict(), "input": src, "shape": list(shape),
             "dtype": str(dtype), "identity": IDENTITY_VERSION}
    if params.features == "custom" and Path(params.weights).is_file():
        ident["weights"] = file_digest(Path(params.weights))
    if getattr(args, "ignore", None):  # another mask is another run
        ident["ignore"] = _content_record(Path(args.ignore))
    return json.dumps(ident, sort_keys=True)


def _content_record(path: Path) -> list[list[Any]]:
    """[name, size, digest] of a TIFF, or of each section of a folder (its sections only: a
    notes file or .DS_Store beside them does not count)."""
    files = section_files(path) if path.is_dir() else [path]
    return [[f.name if path.is_dir() else "", f.stat().st_size, file_digest(f)]
            for f in files if f.is_file()]


IDENTITY_VERSION = 2
"""Of :func:`_run_identity`'s record; 2: whole-file digests and the weights' content."""


def _what_changed(old: str | None, new: str) -> str:
    """Which part of :func:`_run_identity` differs, in words."""
    try:
        a, b = json.loads(old or "{}"), json.loads(new)
    except ValueError:
        return "another input or other options"
    if a.get("identity") != b.get("identity"):
        return ("a record of its input from another napari-ssemnet version, which this one "
                "cannot compare (resume it with that version)")
    parts = []
    if a.get("params") != b.get("params"):
        changed = sorted(k for k in set(a.get("params", {})) | set(b["params"])
                         if a.get("params", {}).get(k) != b["params"].get(k))
        parts.append(f"other parameters ({', '.join(changed)})" if changed else
                     "other parameters")
    if a.get("input") != b.get("input"):
        parts.append("another input (or the input's content changed since)")
    if a.get("weights") != b.get("weights"):
        parts.append("other weights in the weights file")
    if a.get("ignore") != b.get("ignore"):
        parts.append("another --ignore mask (or none where there was one)")
    if a.get("dtype") != b.get("dtype") or a.get("shape") != b.get("shape"):
        parts.append("another output type or shape")
    if len(parts) > 1:
        parts[-1] = "and " + parts[-1]
    return (", " if len(parts) > 2 else " ").join(parts) or "another input or other options"


def _align_blocks_to_disk(stack: Any, params: AlignParams, args: argparse.Namespace,
                          output: str, fields_path: Path | None, out: TextIO,
                          ignore: Any = None) -> int:
    """Block-wise run whose sections go straight into memory-mapped files: the aligned TIFF
    (written under a working name, renamed once complete) and the displacement, which the
    later blocks read back and ``--fields`` packs into its ``.npz``. After each block the
    run's state is saved beside them, so that a run that stops can go on with ``--resume``."""
    import tifffile

    from .core.align import run_generator
    from .core.blocks import BlockState, block_plan, iter_align_blocks
    from .core.io import tiff_write_kwargs

    z, h, w = (int(n) for n in stack.shape)
    dtype = _output_dtype(stack.dtype, args.output_dtype)
    out_path = Path(output)
    work = [_partial(out_path, x) for x in _BLOCK_WORK]
    tmp_tif, tmp_disp, state_path = work
    run_id = _run_identity(args, params, (z, h, w), dtype)
    codec = _compression(args)  # the blocks go to an uncompressed map: compressed at the end
    n_blocks = 1 + len(block_plan(z, params.reference, params.block_size, params.window)[1])
    state = None
    left = [f for f in work if f.exists()]
    stopped, stopped_id = None, None
    if len(left) == len(work):
        try:
            stopped, extra = BlockState.load(state_path)
            stopped_id = extra.get("run")
        except SsemnetError:
            stopped = None
    names = ", ".join(f.name for f in left)
    if args.resume and stopped is None:
        # a job script that always says --resume (requeued after preemption) must also
        # work for the first run, and after a kill before the first block was finished
        _say(sys.stderr, f"nothing to resume for {out_path} (no stopped run finished a "
                         "block there): starting from the first block\n")
    if args.resume and stopped is not None:
        if stopped_id != run_id:
            raise SsemnetError(f"The stopped run for {out_path} had "
                               f"{_what_changed(stopped_id, run_id)}; give the same ones, or "
                               f"delete its working files ({names} in {out_path.parent}) to "
                               "start over.")
        state = stopped
        out.write("every block was done; writing the outputs\n" if state.next_block >= n_blocks
                  else f"resuming at block {state.next_block + 1} of {n_blocks}\n")
    elif stopped is not None and stopped.next_block > 0:
        # finished blocks can be hours of work: only the user throws them away
        same = stopped_id == run_id
        whose = "this command" if same else (
            f"a command with {_what_changed(stopped_id, run_id)}")
        how = "add --resume" if same else "give its options and --resume"
        raise SsemnetError(
            f"A stopped run of {whose} has {min(stopped.next_block, n_blocks)} of "
            f"{n_blocks} blocks done for {out_path}; {how} to go on from there, or "
            f"delete its working files ({names} in {out_path.parent}) to start over.")
    elif left:
        why = "it had not finished a block, or its state file could not be read"
        _say(sys.stderr, f"removing the working files of an earlier stopped run ({names}): "
                         f"{why}.\n")
    maps: dict[str, Any] = {}  # the memory maps, dropped (unmapped) before renaming or removing
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        if state is None:
            _unlink_quietly(*work)  # before the space check: they are being replaced
            # the TIFF and a working copy of the displacement (8 bytes a pixel) beside -o,
            # the fields' .npz (as much again, uncompressed) where --fields goes
            # (and the compressed copy the memory-mapped TIFF is written to at the end)
            _check_space([(out_path, z * h * w * (dtype.itemsize * (2 if codec else 1) + 8))]
                         + ([(fields_path, z * h * w * 8)] if fields_path is not None else []))
            maps["aligned"] = tifffile.memmap(
                tmp_tif, shape=(z, h, w), dtype=dtype,
                **tiff_write_kwargs(_input_resolution(args),
                                    dtype, z * h * w * dtype.itemsize))
            maps["disp"] = np.lib.format.open_memmap(tmp_disp, mode="w+", dtype=np.float32,
                                                     shape=(z, 2, h, w))
            for f in (tmp_tif, tmp_disp):  # a full disk under a memory map is a crash (SIGBUS)
                _reserve(f)
        else:
            maps["aligned"] = tifffile.memmap(tmp_tif, mode="r+")
            maps["disp"] = np.load(tmp_disp, mmap_mode="r+")
    except OSError as exc:
        if state is None:
            _unlink_quietly(*work)
        raise ResourceError(f"Could not create the output files: {exc}") from None

    def saved(st: BlockState) -> None:
        try:
            for m in maps.values():
                m.flush()
            st.save(state_path, run=run_id)
        except OSError as exc:  # said as what it is, not as the output
            raise _write_failure(f"the state of the run after block {st.next_block} "
                                 f"({state_path.name})", state_path, exc) from None

    printer = _printer()
    finished = False
    try:
        with ctrl_c_stops() as should_stop:
            gen = iter_align_blocks(stack, params, displacement=maps["disp"],
                                    aligned=maps["aligned"], should_stop=should_stop,
                                    state=state, on_block=saved, ignore=ignore)
            summary = run_generator(gen, None if args.quiet else printer)
        del gen
        if not args.quiet:
            printer.note(f"writing {out_path}"
                         + (f" and {fields_path}" if fields_path is not None else ""))
        maps.pop("aligned").flush()
        finished_tif = tmp_tif
        if codec is not None:
            finished_tif = _partial(out_path, "blocks-compressed.tif")
            _compressed_copy(tmp_tif, finished_tif, codec,
                             _input_resolution(args))
        _finish_outputs(finished_tif, out_path, fields_path,
                        _fields_writer(maps["disp"], params, summary))
        finished = True
    except OSError as exc:
        raise ResourceError(f"Could not write the output: {exc}") from None
    finally:
        printer.close()
        maps.clear()
        if codec is not None:
            _unlink_quietly(_partial(out_path, "blocks-compressed.tif"))
        done_blocks = (_blocks_done(state_path) if not finished
                       and all(f.is_file() for f in work) else 0)
        if not done_blocks:
            _unlink_quietly(*work)
        else:
            where = (f"working files {', '.join(f.name for f in work)} in {out_path.parent}; "
                     "delete them to start over")
            _say(sys.stderr,
                 f"every block is done but the outputs were not written (stopped, or a "
                 f"failed write); the same command with --resume writes them ({where}).\n"
                 if done_blocks == n_blocks
                 else f"stopped after block {done_blocks} of {n_blocks}; the same command "
                      f"with --resume goes on from there ({where}).\n")
    return _report(args, out, (z, h, w), stack.dtype, summary, params, out_path, fields_path,
                   blocks=len(summary.blocks), resumed=state is not None)


def _compressed_copy(src: Path, dst: Path, codec: str,
                     resolution: dict[str, Any] | None) -> None:
    """Write the (Z, H, W) TIFF ``src`` again as ``dst``, compressed with ``codec``, a
    section at a time (a block-wise run's memory-mapped result stays resumable, and is
    only read here)."""
    import tifffile

    from .core.io import tiff_write_kwargs

    data = tifffile.memmap(src, mode="r")
    try:
        tifffile.imwrite(dst, (np.asarray(sec) for sec in data), shape=data.shape,
                         dtype=data.dtype, compression=codec,
                         **tiff_write_kwargs(resolution, data.dtype, data.nbytes))
    except (OSError, ValueError) as exc:
        raise _write_failure(f"the compressed copy {dst.name}", dst, exc) from None
    finally:
        del data


def cmd_apply(args: argparse.Namespace, out: TextIO) -> int:
    """Resample a stack through saved fields, one section at a time."""
    from .core.io import FieldSections, open_stack

    if args.labels and args.interpolation == "linear":
        raise SsemnetError("--labels means --interpolation nearest; give one of them.")
    _refuse_overwriting_input(args.input, args.output)
    _refuse_overwriting_input(args.fields, args.output)
    _tiff_name(args.output)
    out_path = _follow(Path(args.output))
    with contextlib.ExitStack() as held:
        held.enter_context(_prepared_targets([(out_path, "output file")]))
        held.enter_context(_output_lock(out_path))
        stack = open_stack(args.input, masks=True)  # a boolean mask is read as uint8 0/1
        if isinstance(stack, SectionReader):
            held.callback(stack.close)
        fields = held.enter_context(FieldSections(args.fields))
        _apply(args, stack, fields, out_path, out)
    out.write(f"resampled stack -> {out_path}\n")
    return EXIT_OK


def _apply(args: argparse.Namespace, stack: Any, fields: Any, out_path: Path,
           out: TextIO) -> None:
    """Resample ``stack`` through ``fields`` (a :class:`FieldSections`) into ``out_path``."""
    import tifffile

    from .core.align import Progress
    from .core.io import apply_displacement_section, read_resolution, tiff_write_kwargs

    order = 0 if args.labels or args.interpolation == "nearest" else 1
    z, h, w = (int(n) for n in stack.shape)
    if fields.shape != (z, 2, h, w):
        raise SsemnetError(
            f"The fields in {args.fields} are for a stack of {fields.shape[0]} sections of "
            f"{fields.shape[2]}x{fields.shape[3]} px; {args.input} has {z} of {h}x{w} px.")
    dtype = np.dtype(stack.dtype)
    if order == 1 and dtype.kind in "iu" and dtype.itemsize >= 4:
        _say(sys.stderr, f"note: {args.input} is {dtype}, the type of label ids; with linear "
                         "interpolation they are blended into ids that do not exist (add "
                         "--interpolation nearest or --labels to keep them).\n")
    dtype = _output_dtype(dtype, args.output_dtype if order == 1 else "input")
    _check_space([(out_path, z * h * w * dtype.itemsize)])
    # not align's working name: a stopped block-wise run there stays resumable
    tmp = _partial(out_path, "apply-partial.tif")
    # one series written as the sections come, so that ImageJ's section spacing is kept as
    # well as the pixel size
    write_kw = tiff_write_kwargs(read_resolution(args.input), dtype, z * h * w * dtype.itemsize)
    out.write(f"applying {args.fields} to {args.input} ("
              f"{'nearest neighbour, labels' if order == 0 else 'bilinear'}): {z} sections "
              f"of {h}x{w} px\n")
    out.flush()
    printer = _printer()

    def sections(should_stop: Callable[[], bool]) -> Iterator[np.ndarray]:
        for zz, disp in enumerate(fields):
            if should_stop():
                raise AlignmentCancelled("Cancelled.")
            sec = apply_displacement_section(np.asarray(stack[zz]), disp, order=order)
            if sec.dtype != dtype:  # labels keep theirs (no float round trip)
                sec = as_dtype(sec, dtype)
            yield sec
            if not args.quiet:
                printer(Progress("apply", zz + 1, z, f"section {zz + 1}/{z}"))

    try:
        with ctrl_c_stops() as should_stop:
            tifffile.imwrite(tmp, sections(should_stop), shape=(z, h, w), dtype=dtype,
                             compression=_compression(args), **write_kw)
        _install(tmp, out_path)
    except SsemnetError:  # a bad section, a cancel: not a failed write
        raise
    except (OSError, ValueError) as exc:
        raise _write_failure(str(out_path), tmp, exc) from None
    finally:
        printer.close()
        _unlink_quietly(tmp)


def _sha256_prefix(path: Path, n: int = 16) -> str:
    """Digest of a file, or of a folder's TIFF sections in the order they are read."""
    h = hashlib.sha256()
    files = [path]
    if path.is_dir():
        files = section_files(path)
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:n]


def cmd_train(args: argparse.Namespace, out: TextIO) -> int:
    paths = [Path(p) for p in args.stacks]
    for p in paths:
        _refuse_overwriting_input(p, args.output, what="weights file")
    if args.steps is not None and args.steps < 1:  # before reading the stacks
        raise SsemnetError(f"--steps must be at least 1; got {args.steps}.")
    if not 0 <= args.seed <= 2**31 - 1:
        raise SsemnetError(f"--seed must be from 0 to {2**31 - 1}; got {args.seed}.")
    if args.init and not Path(args.init).is_file():
        raise SsemnetError(f"The --init weights file {args.init} does not exist.")
    if Path(args.output).suffix.lower() in (".safetensors", ".tif", ".tiff", ".npz", ".json"):
        # other tools (or a later command of ours) would take it for what its name says
        raise SsemnetError(f"Weights are written in PyTorch's format; name the file .pt, not "
                           f"{Path(args.output).name}.")
    target = _follow(Path(args.output))
    with _prepared_targets([(target, "weights file")]), _output_lock(target):
        return _train(args, paths, target, out)


def _train(args: argparse.Namespace, paths: list[Path], path: Path, out: TextIO) -> int:
    from .core.align import run_generator
    from .core.features import load_weights, save_weights, train_encoder
    from .core.io import read_stack

    stacks = [read_stack(p, min_sections=1) for p in paths]
    init = load_weights(args.init) if args.init else None
    kwargs: dict[str, Any] = {"seed": args.seed, "device": args.device, "init": init}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    total_px = sum(s.size for s in stacks)
    out.write(f"training the encoder on {len(stacks)} stack(s), {total_px / 1e6:.1f} Mpx\n")
    out.flush()
    printer = _printer()
    try:
        with ctrl_c_stops() as should_stop:
            model = run_generator(train_encoder(stacks, should_stop=should_stop, **kwargs),
                                  None if args.quiet else printer)
    finally:
        printer.close()
    info = dict(getattr(model, "info", {}) or {})
    info["inputs"] = "; ".join(f"{p.name} sha256:{_sha256_prefix(p)}" for p in paths)
    if args.init:
        info["init"] = f"{Path(args.init).name} sha256:{_sha256_prefix(Path(args.init))}"
    info["napari_ssemnet_version"] = __version__
    # under a working name, renamed when complete: an existing file (even the --init one)
    # survives a failure
    tmp = _partial(path, "partial.pt")
    try:
        save_weights(model, tmp, info=info)
        _install(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as a RuntimeError
        raise _write_failure(f"the weights {path}", tmp, exc) from None
    finally:
        _unlink_quietly(tmp)
    out.write(f"encoder weights -> {path} (final loss {info.get('train_loss', '?')})\n"
              f"use them with: napari-ssemnet align ... --features custom --weights {path}\n")
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, as every other error of the CLI, and an
    option must be spelled out: the options are generated from the parameters, so an
    abbreviation that works today (``--iter``) could mean another option tomorrow."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        self.exit(EXIT_ERROR, f"error: {text} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="napari-ssemnet",
        description="Align serial-section EM stacks with learned CAE features and a "
                    "spatial-transformer deformation (ssEMnet).")
    parser.add_argument("--version", action="version", version=f"napari-ssemnet {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="Show full tracebacks instead of one-line error messages.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    al = sub.add_parser(
        "align", help="Align a (Z, H, W) TIFF stack onto its reference section.",
        description="Align a multi-page grayscale TIFF stack. Writes the aligned stack and, "
                    "with --fields, the displacement fields (.npz, key 'displacement', shape "
                    "(Z, 2, H, W), (dy, dx) backward map in pixels).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    al.add_argument("input", nargs="?", metavar="INPUT.tif",
                    help="Multi-page grayscale TIFF, shape (Z, H, W), or a folder of "
                         "single-section TIFFs (natural name order: s2 before s10).")
    al.add_argument("-o", "--output", metavar="ALIGNED.tif",
                    help=f"Aligned stack (TIFF). With --sample defaults to {SAMPLE_OUTPUT}.")
    al.add_argument("--fields", metavar="FIELDS.npz",
                    help="Also write the displacement fields, parameters, flags and NCC.")
    al.add_argument("--sample", action="store_true",
                    help="Align the shipped sample (8 sections of real EM with a known "
                         "misalignment) instead of INPUT.")
    al.add_argument("--params", metavar="PARAMS.json",
                    help="Load parameters from a JSON file: a params file, a --summary-json "
                         "file, or the params of a fields .npz; options given on the command "
                         "line override them.")
    al.add_argument("--output-dtype", choices=["input", "float32"], default=None,
                    help="Data type of the aligned TIFF: that of the input (rounded) or "
                         "float32. (default: input, or that of the run whose --summary-json "
                         "file is the --params)")
    al.add_argument("--compression", choices=["input", "none", "zlib"], default="input",
                    help=_COMPRESSION_HELP)
    al.add_argument("--ignore", metavar="MASK.tif",
                    help="A mask stack of the input's shape (TIFF or folder of sections, like "
                         "the input): nonzero pixels (dust, a fold, a stain, a film edge) are "
                         "left out of the alignment, as padding is; the sections are still "
                         "warped whole. The same as the widget's Ignore mask and "
                         "align_stack(ignore=...).")
    al.add_argument("-q", "--quiet", action="store_true", help="No progress output.")
    al.add_argument("--summary-json", metavar="SUMMARY.json",
                    help="Also write the run's figures as JSON (version, device, parameters, "
                         "timings, wall time, NCC and flags per section), after the outputs.")
    al.add_argument("--resume", action="store_true",
                    help="Go on with a block-wise run (--block-size) that stopped (Ctrl-C, an "
                         "error, a crash): the finished blocks are kept. Needs the same "
                         "input, options and output as the run that stopped; with nothing to "
                         "resume the run starts from the beginning (for requeued batch jobs).")
    add_param_options(al)
    al.set_defaults(func=cmd_align)

    ap = sub.add_parser(
        "apply-fields", help="Resample a stack (e.g. labels) through saved fields.",
        description="Apply displacement fields written by 'align --fields' (or the napari "
                    "widget) to another stack of the same shape, e.g. a segmentation or "
                    "another channel, one section at a time.")
    ap.add_argument("fields", metavar="FIELDS.npz", help="Fields file from 'align --fields'.")
    ap.add_argument("input", metavar="INPUT.tif", help="Stack to resample, shape (Z, H, W).")
    ap.add_argument("-o", "--output", required=True, metavar="OUT.tif",
                    help="Resampled stack (TIFF).")
    ap.add_argument("--interpolation", choices=["linear", "nearest"], default=None,
                    help="linear (bilinear; the default) or nearest (nearest neighbour, which "
                         "keeps label ids and the data type: for segmentations), as the "
                         "widget's Interpolation.")
    ap.add_argument("--labels", action="store_true",
                    help="The same as --interpolation nearest. A boolean mask TIFF is read as "
                         "0/1 and written as uint8 0/1.")
    ap.add_argument("--output-dtype", choices=["input", "float32"], default="input",
                    help="Data type of a bilinear result: that of the input (rounded) or "
                         "float32. (default: input)")
    ap.add_argument("--compression", choices=["input", "none", "zlib"], default="input",
                    help=_COMPRESSION_HELP)
    ap.add_argument("-q", "--quiet", action="store_true", help="No progress output.")
    ap.set_defaults(func=cmd_apply)

    tr = sub.add_parser(
        "train-features", help="Train (or fine-tune) the CAE feature encoder on stacks.",
        description="Self-supervised training of the convolutional autoencoder whose features "
                    "the alignment matches. Use the result with --features custom --weights.")
    tr.add_argument("stacks", nargs="+", metavar="STACK.tif", help="Training stacks (TIFF).")
    tr.add_argument("-o", "--output", required=True, metavar="WEIGHTS.pt",
                    help="Weights file to write.")
    tr.add_argument("--steps", type=int, default=None, metavar="N",
                    help=f"Adam steps (default {TRAIN_STEPS}).")
    tr.add_argument("--seed", type=int, default=0, metavar="N",
                    help="Random seed of the training patches and noise. (default: 0)")
    tr.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="Where to train. (default: auto)")
    tr.add_argument("--init", metavar="WEIGHTS.pt",
                    help="Start from these weights (fine-tuning) instead of random ones.")
    tr.add_argument("-q", "--quiet", action="store_true", help="No progress output.")
    tr.set_defaults(func=cmd_train)
    return parser


def _did_you_mean(parser: argparse.ArgumentParser, extra: Sequence[str]) -> str:
    """``"; did you mean --grid-spacing?"`` for a misspelt option, or ''."""
    import difflib

    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for word in extra:
        if word.startswith("--"):
            close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.75)
            if close and close[0] not in hints:
                hints.append(close[0])
    return f"; did you mean {' or '.join(hints)}?" if hints else ""


def _show_warning(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: TextIO | None = None, line: str | None = None) -> None:
    """What the core says through ``warnings`` (e.g. padded sections) as a ``note:`` line,
    not as a source location."""
    from .core.io import SectionsPadded

    if issubclass(category, SectionsPadded):
        _say(sys.stderr, f"note: {message}\n")
        return
    _say(sys.stderr, warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-ssemnet`` console script; returns the exit code."""
    parser = build_parser()
    _ARGV[:] = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the subcommand's parser, so that the hint points at its --help
        choices = parser._subparsers._group_actions[0].choices if parser._subparsers else {}
        sub = choices.get(args.command) or parser
        sub.error(f"unrecognized arguments: {' '.join(extra)}" + _did_you_mean(sub, extra))
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    out = _PipeSafe(sys.stdout)
    _stopped_by.clear()
    _STARTED[0] = time.monotonic()
    try:
        with _sigterm_interrupts(), warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args, out)
    except (AlignmentCancelled, KeyboardInterrupt):
        if _stopped_by and _stopped_by[0] == signal.SIGTERM:
            _say(sys.stderr, "stopped by SIGTERM\n")
            return EXIT_TERMINATED
        _say(sys.stderr, "cancelled\n")
        return EXIT_CANCELLED
    except (SsemnetError, ParameterError, ValueError) as exc:
        if args.debug:
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        _say(sys.stderr, f"error: {text}\n")
        if isinstance(exc, MemoryLimitError | ResourceError):
            return EXIT_RESOURCE
        return EXIT_BUSY if isinstance(exc, OutputBusyError) else EXIT_ERROR
    finally:
        out.flush()


def console_main() -> None:
    """The console script: :func:`main`, then its exit code, which a signal during the
    interpreter's shutdown (the outputs complete and reported) no longer turns into 143."""
    code = main()
    if threading.current_thread() is threading.main_thread():
        for name in _STOP_SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    console_main()
