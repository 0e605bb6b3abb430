"""Peak memory of ``align_stack`` by stage, against the estimate of ``core.memory``.

Every point runs in a fresh child process that samples its own resident set size
(``/proc/self/statm``) every 5 ms while it aligns, and files each sample under the stage the
run last reported (``prepare``, ``prealign``, ``fit level i/n``, ``render``). A stage's peak
includes the set-up of the next one that runs before the next progress report (e.g. the
encoding of level i+1 counts for "fit level i"). ``added`` is the peak minus the reading just
before ``align_stack`` (imports and input loaded), which is what ``estimate_peak_bytes``
predicts. Sizes larger than the data tile each section (``tiled`` in the JSON): repeated
content, so such points are for time and memory only. Linux only (``/proc``).

    OMP_NUM_THREADS=2 python benchmarks/bench_memory.py
    OMP_NUM_THREADS=2 python benchmarks/bench_memory.py --points isbi:8:512 vnc:16:1024
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

DEFAULT_POINTS = ["isbi:8:256", "isbi:8:512", "isbi:30:512", "vnc:4:1024", "vnc:16:1024"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one_point(data: Path, dataset: str, n: int, size: int, binning: int = 1) -> dict:
    from napari_ssemnet import align_stack
    from napari_ssemnet.core.memory import estimate_peak_bytes

    full = C.load_stack(data, C.ISBI if dataset == "isbi" else C.VNC)[:n]
    h, w = full.shape[1:]
    if n > full.shape[0]:
        raise SystemExit(f"error: {dataset} has {full.shape[0]} sections")
    reps = -(-size // min(h, w))
    if reps > 1:  # larger than the data: tile each section (for time and memory only)
        full = np.tile(full, (1, reps, reps))
        h, w = full.shape[1:]
    oy, ox = (h - size) // 2, (w - size) // 2
    stack = full[:, oy:oy + size, ox:ox + size].copy()
    del full
    stage, peaks, running = ["start"], {}, [True]

    def sample() -> None:
        while running[0]:
            peaks[stage[0]] = max(peaks.get(stage[0], 0.0), _rss_mb())
            time.sleep(0.005)

    def progress(event) -> None:
        name = getattr(event, "stage", None)
        if name:
            stage[0] = name

    base = _rss_mb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    align_stack(stack, progress=progress, fit_binning=binning)
    seconds = time.perf_counter() - t0
    running[0] = False
    sampler.join()
    return {"dataset": dataset, "sections": n, "size": size, "fit_binning": binning,
            "tiled": reps,
            "dtype": str(stack.dtype),
            "seconds": seconds, "baseline_mb": base,
            "stages_added_mb": {k: v - base for k, v in peaks.items()},
            "added_mb": max(peaks.values()) - base,
            "estimate_mb": estimate_peak_bytes(stack.shape, binning) / 2**20}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_data_arg(p)
    p.add_argument("--points", nargs="+", default=DEFAULT_POINTS,
                   help="DATASET:SECTIONS:SIZE[:FIT_BINNING], e.g. isbi:8:512 vnc:16:1024:2")
    p.add_argument("--output", default="memory_cpu.json", help="JSON under benchmarks/results/")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        dataset, n, size, *binning = args.one.split(":")
        print("RESULT " + json.dumps(one_point(args.data, dataset, int(n), int(size),
                                               int(binning[0]) if binning else 1)))
        return
    out = {"machine": C.machine_info(), "points": []}
    print(f"load average before: {os.getloadavg()}", flush=True)
    print("| data | sections x size | fit binning | wall (s) | added at peak (MB) | "
          "estimate (MB) | estimate / measured | peak stage |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for point in args.points:
        row, err = C.run_child([sys.executable, __file__, "--data", str(args.data),
                                "--one", point])
        if row is None:
            print(f"| {point} | failed: {err} |")
            out["points"].append({"point": point, "error": err})
            continue
        worst = max(row["stages_added_mb"], key=row["stages_added_mb"].get)
        print(f"| {row['dataset']} | {row['sections']} x {row['size']}^2 | "
              f"{row['fit_binning']} | {row['seconds']:.1f} | {row['added_mb']:.0f} | "
              f"{row['estimate_mb']:.0f} | "
              f"{row['estimate_mb'] / row['added_mb']:.2f} | {worst} |", flush=True)
        out["points"].append(row)
        C.save_json(args.output, out)
    C.finish(args.output, out)


if __name__ == "__main__":
    main()
