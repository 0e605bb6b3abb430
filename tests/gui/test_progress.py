"""gui._progress: one fraction for the whole run from the core's per-stage events."""

from __future__ import annotations

import pytest

from napari_ssemnet.core.align import Progress
from napari_ssemnet.gui._progress import SPANS, overall_fraction


def _run(levels: int, sections: int, tag: str = "") -> list[Progress]:
    pre = f"{tag}: " if tag else ""
    events = [Progress("prepare", 0, 1, pre + "normalising")]
    events += [Progress("prealign", k, sections - 1, pre + "pre-aligning") for k in
               range(1, sections)]
    for li in range(levels):
        total = 150 >> li
        events += [Progress(f"fit level {li + 1}/{levels}", it, total, pre + "level")
                   for it in range(1, total + 1, 7)]
    events += [Progress("render", k, sections, pre + "section") for k in range(1, sections + 1)]
    return events


def test_fraction_rises_through_a_joint_run():
    fracs = [overall_fraction(e) for e in _run(4, 6)]
    fracs.append(overall_fraction(Progress("metrics", 1, 1)))
    assert all(f is not None for f in fracs)
    assert all(b >= a for a, b in zip(fracs, fracs[1:], strict=False))
    assert fracs[0] == 0.0 and fracs[-1] == 1.0
    # the fit starts where the pre-alignment's share ends; its last level is its largest
    first_fit = overall_fraction(Progress("fit level 1/4", 0, 150))
    assert first_fit == pytest.approx(SPANS["fit"][0])
    last_level = overall_fraction(Progress("fit level 4/4", 0, 18))
    lo, hi = SPANS["fit"]
    assert last_level == pytest.approx(lo + (hi - lo) * 7 / 15)


def test_blocks_share_the_bar_in_order():
    fracs = []
    for k in range(1, 4):
        fracs += [overall_fraction(e) for e in _run(3, 5, tag=f"block {k}/3")]
    assert all(b >= a - 1e-9 for a, b in zip(fracs, fracs[1:], strict=False))
    end_of_first = overall_fraction(Progress("render", 5, 5, "block 1/3: section 4"))
    assert end_of_first == pytest.approx(SPANS["render"][1] / 3)
    assert fracs[-1] == pytest.approx(SPANS["render"][1])


def test_unknown_stage_and_training():
    assert overall_fraction(Progress("something else", 1, 2)) is None
    assert overall_fraction(Progress("train", 30, 120)) == pytest.approx(0.25)
