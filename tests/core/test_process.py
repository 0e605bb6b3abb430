"""core.process: a whole-stack run in a child process gives what the thread gives."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest
from emtools import FAST, em

from napari_ssemnet.core import memory, process
from napari_ssemnet.core.align import Progress, SectionResult, iter_align_stack, run_generator
from napari_ssemnet.core.errors import (
    AlignmentCancelled,
    InputError,
    MemoryLimitError,
    SsemnetError,
)

GUI_MODULES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui")

# the child as usual, plus a line at its exit (os._exit) naming any GUI module it imported
_REPORTING_CHILD = [
    sys.executable, "-c",
    "import os, runpy, sys\n"
    f"gui = {GUI_MODULES!r}\n"
    "real_exit = os._exit\n"
    "def report(code):\n"
    "    sys.__stderr__.write('GUI-MODULES:' + ','.join(m for m in gui if m in sys.modules)"
    " + '\\n')\n"
    "    sys.__stderr__.flush()\n"
    "    real_exit(code)\n"
    "os._exit = report\n"
    "runpy.run_module('napari_ssemnet.core.process', run_name='__main__', alter_sys=True)\n",
]


@pytest.fixture(scope="module")
def small() -> np.ndarray:
    return em(slice(0, 4), 96)


class _Recorded(subprocess.Popen):
    started: list[subprocess.Popen] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _Recorded.started.append(self)


def test_the_child_gives_the_threads_events_and_result_and_no_gui(small, monkeypatch, capfd):
    monkeypatch.setattr(process, "child_command", lambda: list(_REPORTING_CHILD))
    stack = small.copy()
    events: list = []
    got = run_generator(process.iter_align_stack_in_process(stack, **FAST), events.append)
    want = run_generator(iter_align_stack(small, **FAST), None)
    np.testing.assert_array_equal(stack, small)
    np.testing.assert_array_equal(got.displacement, want.displacement)
    np.testing.assert_array_equal(got.aligned, want.aligned)
    np.testing.assert_array_equal(got.valid, want.valid)
    np.testing.assert_array_equal(got.ncc_after, want.ncc_after)
    assert got.flags == want.flags and got.params == want.params
    sections = [e for e in events if isinstance(e, SectionResult)]
    assert sorted(e.z for e in sections) == [0, 1, 2, 3]
    for e in sections:
        np.testing.assert_array_equal(e.displacement, want.displacement[e.z])
    assert isinstance(events[0], Progress) and "starting" in events[0].message
    assert any(isinstance(e, Progress) and e.stage.startswith("fit") for e in events)
    err = capfd.readouterr().err
    assert "GUI-MODULES:\n" in err, err[-2000:]  # the line is there and names none


def test_the_child_uses_the_parents_torch_threads(small):
    import torch

    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2  # a number the child would not pick by itself
    torch.set_num_threads(wanted)
    try:
        got = run_generator(process.iter_align_stack_in_process(small, **FAST), None)
    finally:
        torch.set_num_threads(before)
    assert got.environment["torch_threads"] == wanted


def test_errors_raised_in_the_child_come_back_as_they_were(small):
    with pytest.raises(InputError) as here:
        run_generator(iter_align_stack(small, reference=7, **FAST), None)
    with pytest.raises(InputError) as there:
        run_generator(process.iter_align_stack_in_process(small, reference=7, **FAST), None)
    assert str(there.value) == str(here.value)


def test_a_stop_request_kills_the_child(small, monkeypatch):
    _Recorded.started.clear()
    monkeypatch.setattr(process.subprocess, "Popen", _Recorded)
    seen: list = []
    gen = process.iter_align_stack_in_process(
        small, should_stop=lambda: any(isinstance(e, Progress) and e.stage != "prepare"
                                       for e in seen), **{**FAST, "iterations": 2000})
    with pytest.raises(AlignmentCancelled):
        run_generator(gen, seen.append)
    (child,) = _Recorded.started
    assert child.returncode is not None  # gone, not left running
    assert not any(isinstance(e, SectionResult) for e in seen)


def test_closing_the_generator_kills_the_child(small, monkeypatch):
    _Recorded.started.clear()
    monkeypatch.setattr(process.subprocess, "Popen", _Recorded)
    gen = process.iter_align_stack_in_process(small, **{**FAST, "iterations": 2000})
    while not isinstance(ev := next(gen), Progress) or ev.stage == "prepare":
        pass
    gen.close()
    (child,) = _Recorded.started
    assert child.returncode is not None


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_child_killed_by_sigkill_reads_as_out_of_memory(small, monkeypatch):
    monkeypatch.setattr(process, "child_command", lambda: [
        sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(signal.SIGKILL)})"])
    with pytest.raises(MemoryLimitError, match="out-of-memory killer.*napari and its layers"):
        run_generator(process.iter_align_stack_in_process(small, **FAST), None)


def test_a_child_that_dies_mid_run_says_how_and_what_it_last_wrote(small, monkeypatch):
    monkeypatch.setattr(process, "child_command", lambda: [
        sys.executable, "-c",
        "import os, pickle, sys\n"
        "from napari_ssemnet.core.align import Progress\n"
        "pickle.dump(('event', Progress('prepare', 0, 1)), sys.stdout.buffer)\n"
        "sys.stdout.flush()\n"
        "sys.stderr.write('libfoo: no space left on device\\n')\n"
        "sys.stderr.flush()\n"
        "os._exit(3)\n"])
    with pytest.raises(SsemnetError, match="exit status 3") as info:
        run_generator(process.iter_align_stack_in_process(small, **FAST), None)
    assert "no space left on device" in str(info.value)
    assert "napari and its layers are not affected" in str(info.value)
    assert not isinstance(info.value, MemoryLimitError | process.ChildStartError)


@pytest.mark.parametrize("command", [
    ["/nonexistent/python"],
    [sys.executable, "-c", "import sys; sys.exit('No module named napari_ssemnet')"],
], ids=["missing-interpreter", "exits-before-its-first-report"])
def test_a_child_that_does_not_start_is_told_apart(small, monkeypatch, command):
    monkeypatch.setattr(process, "child_command", lambda: list(command))
    with pytest.raises(process.ChildStartError):
        run_generator(process.iter_align_stack_in_process(small, **FAST), None)


def test_bad_input_is_refused_before_a_child_starts(monkeypatch):
    _Recorded.started.clear()
    monkeypatch.setattr(process.subprocess, "Popen", _Recorded)
    with pytest.raises(InputError, match="NaN"):
        next(process.iter_align_stack_in_process(
            np.full((3, 64, 64), np.nan, np.float32), **FAST))
    assert _Recorded.started == []


def test_use_process_follows_the_setting(monkeypatch):
    big = (20, 1024, 1024)
    monkeypatch.setenv(process.PROCESS_ENV, "1")
    assert process.use_process((2, 8, 8))
    monkeypatch.setenv(process.PROCESS_ENV, "0")
    assert not process.use_process(big)
    monkeypatch.setenv(process.PROCESS_ENV, "auto")
    assert not process.use_process((4, 256, 256))
    assert not process.use_process((4096, 4096))  # not a stack: the usual checks say so
    glibc = sys.platform.startswith("linux") and memory._libc("mallopt") is not None
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 << 30)
    assert process.use_process(big) == glibc
    # without room for the kept heap (where the gain comes from) the thread stays
    need = memory.KEEP_HEAP_HEADROOM * memory.estimate_peak_bytes(big, 1)
    monkeypatch.setattr(memory, "available_bytes", lambda: int(need) - 1)
    assert not process.use_process(big)
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    assert not process.use_process(big)
    # a block run is judged by one block and a section, as its memory guard is
    monkeypatch.setattr(memory, "available_bytes", lambda: int(need) - 1)
    assert process.use_process((64, 1024, 1024), block_size=8) == glibc
    assert not process.use_process((64, 1024, 1024), block_size=4)  # 5 x 1024^2 < 8 Mpx


def test_the_child_finds_a_source_tree_but_site_packages_stays_in_its_place(monkeypatch):
    import os
    import site

    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setattr(process, "__file__", "/some/tree/src/napari_ssemnet/core/process.py")
    assert process._child_env()["PYTHONPATH"] == os.path.realpath("/some/tree/src")
    installed = os.path.join(site.getsitepackages()[0], "napari_ssemnet", "core", "process.py")
    monkeypatch.setattr(process, "__file__", installed)
    assert "PYTHONPATH" not in process._child_env()


_PARENT_SCRIPT = """
import subprocess, sys
sys.path.insert(0, sys.argv[1])
from emtools import FAST, em
from napari_ssemnet.core import process
from napari_ssemnet.core.align import Progress

class Told(subprocess.Popen):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        print("CHILD", self.pid, flush=True)

process.subprocess.Popen = Told
for ev in process.iter_align_stack_in_process(em(slice(0, 4), 96),
                                              **{**FAST, "iterations": 10000, "tolerance": 0.0}):
    if isinstance(ev, Progress) and ev.stage.startswith("fit"):
        print("FITTING", flush=True)
        input()  # wait to be killed
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(ln for ln in f if ln.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return " Z " not in state and "zombie" not in state


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_child_ends_when_its_parent_is_killed(tmp_path):
    import os
    import time
    from pathlib import Path

    # napari killed or crashed mid-run: the child must not run on alone
    here = str(Path(__file__).resolve().parent)
    parent = subprocess.Popen([sys.executable, "-c", _PARENT_SCRIPT, here],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline().split()[1])
        assert parent.stdout.readline().strip() == "FITTING"
        assert _running(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(child)
    finally:
        parent.kill()
