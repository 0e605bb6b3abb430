"""gui._jobs: the Qt-free generator jobs (here: how progress reaches the GUI thread)."""

from __future__ import annotations

import numpy as np

from napari_ssemnet.core.align import Progress, SectionResult, run_generator
from napari_ssemnet.gui._jobs import throttled


def _events():
    for i in range(1, 101):
        yield Progress("fit level 1/2", i, 100)
    section = SectionResult(0, np.zeros((2, 2), np.float32), np.zeros((2, 2, 2), np.float32),
                            np.ones((2, 2), bool))
    yield section
    for i in range(1, 51):
        yield Progress("fit level 2/2", i, 50)
    return "done"


def _drain(gen):
    out = []
    return out, run_generator(gen, out.append)


def test_throttled_keeps_stage_changes_last_steps_and_every_other_event():
    events, value = _drain(throttled(_events(), interval=3600.0))
    assert value == "done"
    shown = [(e.stage, e.step) if isinstance(e, Progress) else "section" for e in events]
    assert shown == [("fit level 1/2", 1), ("fit level 1/2", 100), "section",
                     ("fit level 2/2", 1), ("fit level 2/2", 50)]


def test_throttled_with_no_interval_passes_everything():
    events, value = _drain(throttled(_events(), interval=0.0))
    assert value == "done" and len(events) == 151


def test_closing_the_throttled_job_closes_the_run_inside():
    closed = []

    def run():
        try:
            for i in range(10):
                yield Progress("fit", i, 10)
        finally:
            closed.append(True)

    inner = run()  # held here too, so garbage collection cannot close it for the wrapper
    gen = throttled(inner)
    next(gen)
    gen.close()
    assert closed == [True]
