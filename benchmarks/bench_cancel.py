"""How soon can a worker thread stop an alignment? The longest gap between two calls of
``should_stop`` in each stage (a Cancel press waits at most that long, plus the unwinding).

    python benchmarks/bench_cancel.py [--data DIR]

Runs ``align_stack`` with the defaults on two real stacks with the benchmark misalignment of
``common.MISALIGNMENT`` (ISBI 6 x 384^2 and VNC 4 x 1024^2, seed 0), timing every call of
the ``should_stop`` callback (which never stops the run) and attributing each gap to the stage
of the last progress event. Then it really cancels: ``should_stop`` turns True 0.3 s into
each stage once, and the time from that moment to ``AlignmentCancelled`` is recorded.
Prints a table and writes ``benchmarks/results/cancel_cpu.json``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import (
    ISBI,
    MISALIGNMENT,
    VNC,
    add_data_arg,
    finish,
    load_stack,
    machine_info,
)
from napari_ssemnet.core import AlignmentCancelled, align_stack
from napari_ssemnet.core.synth import apply_misalignment, random_misalignment

CASES = {"isbi 6x384^2": (ISBI, 6, 384), "vnc 4x1024^2": (VNC, 4, 1024)}


def stage_of(name: str) -> str:
    return "fit" if name.startswith("fit") else name


def make_stack(data, name: str, z: int, size: int) -> np.ndarray:
    src = load_stack(data, name)[:z]
    fields = random_misalignment(src.shape, seed=0, **MISALIGNMENT)
    mis = apply_misalignment(src, fields)
    o = (src.shape[1] - size) // 2
    return np.ascontiguousarray(mis[:, o:o + size, o:o + size])


def poll_gaps(stack: np.ndarray) -> dict[str, float]:
    """Longest gap between polls per stage, over one whole run."""
    state = {"stage": "start", "last": time.perf_counter()}
    gaps: dict[str, float] = {}

    def should_stop() -> bool:
        now = time.perf_counter()
        st = state["stage"]
        gaps[st] = max(gaps.get(st, 0.0), now - state["last"])
        state["last"] = now
        return False

    def progress(ev) -> None:
        stage = getattr(ev, "stage", None)
        if stage is not None:
            state["stage"] = stage_of(stage)

    align_stack(stack, device="cpu", progress=progress, should_stop=should_stop)
    return gaps


def cancel_delay(stack: np.ndarray, stage: str, after: float = 0.3) -> float | None:
    """Seconds from ``should_stop`` turning True (``after`` s into ``stage``) to the raise."""
    state: dict[str, float | None] = {"entered": None, "flag": None}

    def progress(ev) -> None:
        name = getattr(ev, "stage", None)
        if name is not None and stage_of(name) == stage and state["entered"] is None:
            state["entered"] = time.perf_counter()

    def should_stop() -> bool:
        t0 = state["entered"]
        if t0 is None or time.perf_counter() - t0 < after:
            return False
        if state["flag"] is None:
            state["flag"] = t0 + after  # the moment a Cancel press would have come
        return True

    try:
        align_stack(stack, device="cpu", progress=progress, should_stop=should_stop)
    except AlignmentCancelled:
        return time.perf_counter() - state["flag"]
    return None  # the stage ended before the flag was due


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arg(ap)
    args = ap.parse_args()
    machine = machine_info()  # before the runs: their load average is the machine's
    rows = []
    for label, (name, z, size) in CASES.items():
        stack = make_stack(args.data, name, z, size)
        gaps = poll_gaps(stack)
        delays = {st: cancel_delay(stack, st, after) for st, after in
                  (("prealign", 0.3), ("fit", 0.3), ("render", 0.0))}
        rows.append({"case": label, "max_gap_s": gaps, "cancel_delay_s": delays})
        print(f"| {label} | " + ", ".join(f"{k} {v:.2f}" for k, v in gaps.items()) + " | "
              + ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in delays.items())
              + " |", flush=True)
    finish("cancel_cpu.json", {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
