"""One progress fraction for a whole run, from the core's per-stage :class:`Progress` events.

The core reports each stage on its own scale (pre-alignment by section, each pyramid level
by iteration, rendering by section); a bar that restarts at every stage says nothing about
how much of the run is left. Qt-free so that it can be tested without a display.
"""

from __future__ import annotations

import re

from ..core.align import Progress

# Share of a run's time per stage, from the CPU timings of benchmarks/bench_speed.py
# (5-30 x 256^2-1024^2: pre-alignment 13-30 %, fit 67-90 %, rendering about 2 %) and of
# the widget (10 x 320^2: pre-alignment and feature extraction about 40 %; 30 x 512^2:
# rendering and the error map about 15 %). Shares vary that much, so the bar is a
# fraction of the stages, not of the time.
SPANS = {"prepare": (0.0, 0.01), "prealign": (0.01, 0.30), "fit": (0.30, 0.93),
         "render": (0.93, 0.96), "metrics": (0.96, 1.0)}

_LEVEL = re.compile(r"^fit level (\d+)/(\d+)$")
_BLOCK = re.compile(r"^block (\d+)/(\d+):")


def _level_span(level: int, levels: int) -> tuple[float, float]:
    """Part of the fit span for pyramid level ``level`` (1 = coarsest) of ``levels``.

    Each finer level has 4x the pixels and half the iterations, so about twice the work.
    """
    weights = [2.0 ** i for i in range(levels)]
    total = sum(weights)
    start = sum(weights[:level - 1]) / total
    return start, start + weights[level - 1] / total


def overall_fraction(event: Progress) -> float | None:
    """How much of the run is done when ``event`` arrives, 0..1; None for stages this does
    not know (their own step / total is then the best there is).

    Block-wise runs ("block k/n: ..." messages) count each block as an equal share; the
    widget's own error-map stage ("metrics") comes after the last block.
    """
    stage = event.stage
    frac_in_stage = min(max(event.step / max(event.total, 1), 0.0), 1.0)
    if stage == "train":
        return frac_in_stage
    m = _LEVEL.match(stage)
    if m:
        lo, hi = SPANS["fit"]
        a, b = _level_span(int(m.group(1)), int(m.group(2)))
        lo, hi = lo + (hi - lo) * a, lo + (hi - lo) * b
    elif stage in SPANS:
        lo, hi = SPANS[stage]
    else:
        return None
    frac = lo + (hi - lo) * frac_in_stage
    blk = _BLOCK.match(event.message or "")
    if blk and stage != "metrics":
        end = SPANS["render"][1]  # a block's own stages; the error map follows the last
        k, n = int(blk.group(1)), int(blk.group(2))
        frac = end * (k - 1 + frac / end) / n
    return frac
