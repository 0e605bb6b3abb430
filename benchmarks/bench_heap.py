"""Time and memory of ``align_stack`` on the CPU with and without ``core.memory.kept_heap``.

Every point runs in a fresh child process, once with ``NAPARI_SSEMNET_KEEP_HEAP=0`` (glibc's
own settings: large freed blocks go back to the system at once) and once without (freed
memory kept for reuse during the run), in the main thread (the CLI) and in a worker thread
(the napari widget). It records the run's wall time and fit time, the process's user and
system CPU time, its minor page faults and its peak resident set size, and a digest of the
displacement so that the two settings can be seen to give the same result. The stacks are
the shared ones as they are (no misalignment), default parameters, seed 0.

    OMP_NUM_THREADS=2 python benchmarks/bench_heap.py
    OMP_NUM_THREADS=2 python benchmarks/bench_heap.py --points isbi:30 vnc:20 --threads main
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

DEFAULT_POINTS = ["isbi:30", "vnc:8", "vnc:20"]


def one_point(data: Path, dataset: str, n: int, in_thread: bool) -> dict:
    from napari_ssemnet import AlignParams, align_stack

    stack = C.load_stack(data, C.ISBI if dataset == "isbi" else C.VNC)[:n]
    before = resource.getrusage(resource.RUSAGE_SELF)
    out: dict = {}
    t0 = time.perf_counter()
    if in_thread:
        worker = threading.Thread(
            target=lambda: out.update(r=align_stack(stack, params=AlignParams(seed=0))))
        worker.start()
        worker.join()
    else:
        out["r"] = align_stack(stack, params=AlignParams(seed=0))
    total = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    r = out["r"]
    return {"dataset": dataset, "sections": n, "size": stack.shape[1],
            "thread": "worker" if in_thread else "main",
            "keep_heap": os.environ.get("NAPARI_SSEMNET_KEEP_HEAP", "1") != "0",
            "total_s": round(total, 2), "fit_s": round(r.timings["fit"], 2),
            "user_s": round(after.ru_utime - before.ru_utime, 1),
            "sys_s": round(after.ru_stime - before.ru_stime, 1),
            "minor_faults": after.ru_minflt - before.ru_minflt,
            "peak_rss_mb": after.ru_maxrss // 1024,
            "displacement_digest": C.digest(r.displacement)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_data_arg(parser)
    parser.add_argument("--points", nargs="+", default=DEFAULT_POINTS,
                        help="dataset:sections (default: %(default)s)")
    parser.add_argument("--threads", nargs="+", default=["main", "worker"],
                        choices=["main", "worker"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        dataset, n, thread = args.one.split(":")
        print("RESULT " + json.dumps(one_point(args.data, dataset, int(n), thread == "worker")))
        return
    rows = []
    for point in args.points:
        for thread in args.threads:
            for keep in ("0", "1"):
                os.environ["NAPARI_SSEMNET_KEEP_HEAP"] = keep
                row, err = C.run_child([sys.executable, __file__, "--data", str(args.data),
                                        "--one", f"{point}:{thread}"])
                if row is None:
                    print(f"{point} {thread} keep={keep}: {err}")
                    continue
                rows.append(row)
                print(json.dumps(row))
    os.environ.pop("NAPARI_SSEMNET_KEEP_HEAP", None)
    path = C.finish("heap_cpu.json", {"machine": C.machine_info(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
