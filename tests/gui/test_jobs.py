"""gui._jobs: the Qt-free generator jobs (here: how progress reaches the GUI thread)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

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


def test_the_ncc_curve_after_a_realign_equals_a_full_recompute_on_tissue():
    # only the values that section z moving changes are computed again (a padded stack's
    # full recompute took 2.8 s for 20 x 1024^2), and they are those of a full recompute
    from napari_ssemnet.core.align import USABLE_FLAGS, align_stack, tissue_after
    from napari_ssemnet.core.metrics import adjacent_ncc, fill_mask, mean_of_pairs
    from napari_ssemnet.core.sample import load_sample
    from napari_ssemnet.gui._jobs import _adjacent_ncc

    stack = load_sample(misaligned=True)[:6].copy()
    stack[:, :, :60] = 0  # padding on every section
    r = align_stack(stack, iterations=20, levels=1, features="pixels", device="cpu")
    z = 3
    disp = r.displacement.copy()
    disp[z] += 1.5  # as if re-aligned
    aligned, valid = r.aligned.copy(), r.valid.copy()
    import torch

    from napari_ssemnet.core import warp

    im, ok = warp.warp_image(warp.float_tensor(stack[z]), torch.from_numpy(disp[z]))
    aligned[z], valid[z] = im.numpy(), ok.numpy()
    got, pairs = _adjacent_ncc(aligned, valid, r.flags, stack, disp, z, r.ncc_after,
                               r.pair_ncc)
    tissue = np.stack([valid[i] & tissue_after(~fill_mask(stack[i]), disp[i], "cpu")
                       for i in range(6)])
    usable = np.array([f in USABLE_FLAGS for f in r.flags])
    full = adjacent_ncc(aligned, tissue, usable, robust=True)
    np.testing.assert_allclose(got, full)
    # the pairs behind the curve are redone too, the others kept as the run had them
    np.testing.assert_allclose(mean_of_pairs(pairs, usable), full)
    assert pairs.keys() == r.pair_ncc.keys() and pairs[(0, 1)] == r.pair_ncc[(0, 1)]
    assert pairs[(z - 1, z)] != r.pair_ncc[(z - 1, z)]
    assert not np.allclose(got[2:5], r.ncc_after[2:5])  # z and its neighbours did change


def test_re_aligning_runs_the_check_of_the_links_again_from_the_run_s_placement():
    # Re-align once cleared poor_match, dropped the low_confidence the check had given, and
    # judged the section after a lone stranger against it
    import threading

    from napari_ssemnet.core.align import align_stack, run_generator
    from napari_ssemnet.core.params import AlignParams
    from napari_ssemnet.core.sample import load_sample
    from napari_ssemnet.gui._jobs import SectionOutcome, section_job

    params = AlignParams(device="cpu")
    lone = load_sample()
    lone[4] = np.rot90(lone[4])
    r = align_stack(lone, device="cpu")
    assert r.flags == [""] * 4 + ["poor_match"] + [""] * 3 and r.placed_flags == [""] * 8
    out = run_generator(section_job(lone, 5, params, r, threading.Event()), None)
    assert isinstance(out, SectionOutcome)
    assert out.flags == r.flags and out.result.flags == out.flags
    assert out.result.placed_flags == [""] * 8
    # sections 4-7 all turned: the stack breaks at 4 and 5-7 follow it
    broken = load_sample()
    broken[4:] = np.rot90(broken[4:], axes=(1, 2))
    r = align_stack(broken, device="cpu")
    assert r.flags == [""] * 4 + ["poor_match"] + ["low_confidence"] * 3
    out = run_generator(section_job(broken, 5, params, r, threading.Event()), None)
    assert out.flags == r.flags


def test_re_aligning_keeps_the_sections_own_doubtful_placement():
    # started from the run's field, Re-align does not place the section again: it dropped
    # its low_confidence and kept that of the sections placed through it
    import dataclasses
    import threading

    from napari_ssemnet.core.align import align_stack, run_generator
    from napari_ssemnet.core.params import AlignParams
    from napari_ssemnet.core.sample import load_sample
    from napari_ssemnet.gui._jobs import section_job

    stack = load_sample()
    r = align_stack(stack, device="cpu")
    assert r.flags == [""] * 8
    doubtful = [""] * 5 + ["low_confidence"] * 3  # as a doubtful match of section 5 gives
    r = dataclasses.replace(r, flags=list(doubtful), placed_flags=list(doubtful))
    out = run_generator(section_job(stack, 5, AlignParams(device="cpu"), r,
                                    threading.Event()), None)
    assert out.flags == doubtful and out.result.placed_flags == doubtful
    assert list(out.result.pair_ncc) == sorted(out.result.pair_ncc)
    # given the run's error map, only the maps section 5 takes part in (5 and 6) are
    # computed again, and the result is the map computed whole
    from napari_ssemnet._layers import local_ncc_error

    before = local_ncc_error(r.aligned, r.valid, flags=r.flags)
    part = run_generator(section_job(stack, 5, AlignParams(device="cpu"), r,
                                     threading.Event(), base_error=before), None)
    np.testing.assert_allclose(part.ncc_error, out.ncc_error, atol=1e-6)
    assert not np.array_equal(part.ncc_error[5], before[5])  # it did change there
    np.testing.assert_array_equal(part.ncc_error[:5], before[:5])


def test_a_section_placed_again_is_judged_by_its_new_placement():
    # the run doubted section 4 (low_confidence) and placed it wrongly; with the right image
    # back, Re-align places it again, and the run's doubt about the old placement goes
    import dataclasses
    import threading

    from napari_ssemnet.core.align import align_stack, run_generator
    from napari_ssemnet.core.params import AlignParams
    from napari_ssemnet.core.sample import load_sample
    from napari_ssemnet.gui._jobs import section_job

    good = load_sample()
    turned = good.copy()
    turned[4] = np.rot90(good[4])
    r = align_stack(turned, device="cpu")
    doubtful = [""] * 4 + ["low_confidence"] + [""] * 3
    r = dataclasses.replace(r, flags=[""] * 4 + ["poor_match"] + [""] * 3,
                            placed_flags=list(doubtful))
    out = run_generator(section_job(good, 4, AlignParams(device="cpu"), r,
                                    threading.Event()), None)
    assert out.section.placed_again
    assert out.flags == [""] * 8 and out.result.placed_flags == [""] * 8
    # the run's environment stays, and the Re-align's own is beside it
    env = out.result.environment
    assert {k: v for k, v in env.items() if k != "re_aligned"} == r.environment
    assert env["re_aligned"]["4"]["device"] == "cpu" and "date" in env["re_aligned"]["4"]


def test_align_job_falls_back_to_the_thread_when_the_child_cannot_start(monkeypatch, caplog):
    import threading

    from conftest import FAST, make_stack

    from napari_ssemnet.core import process
    from napari_ssemnet.core.align import align_stack
    from napari_ssemnet.core.params import AlignParams
    from napari_ssemnet.gui import _jobs as jobs

    stack = make_stack(z=4)
    monkeypatch.setenv(process.PROCESS_ENV, "1")
    monkeypatch.setattr(process, "child_command", lambda: ["/nonexistent/python"])
    outcome = run_generator(jobs.align_job(stack, AlignParams(**FAST), threading.Event()), None)
    assert isinstance(outcome, jobs.AlignOutcome), outcome
    np.testing.assert_array_equal(outcome.result.displacement,
                                  align_stack(stack, **FAST).displacement)
    assert "worker thread instead" in caplog.text


@pytest.mark.parametrize("job", [
    "_jobs.align_job(stack, AlignParams(), threading.Event())",
    "_jobs.section_job(stack, 1, AlignParams(), None, threading.Event())",
])
def test_jobs_import_napari_s_vectors_dependencies_before_the_run_starts(job):
    # a fresh interpreter: this test session imported pandas long ago
    code = ("import sys, threading, numpy as np\n"
            "from napari_ssemnet.gui import _jobs\n"
            "from napari_ssemnet.core.params import AlignParams\n"
            "assert 'pandas' not in sys.modules, 'imported by the package already'\n"
            "stack = np.zeros((3, 64, 64), np.float32)\n"
            f"job = {job}\n"
            "next(job)\n"
            "print('pandas' in sys.modules)\n"
            "job.close()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True"]
