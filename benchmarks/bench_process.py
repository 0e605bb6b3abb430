"""Widget-style runs (a worker thread) in that thread or in a child process.

The dock widget runs ``iter_align_stack`` in a napari worker thread; with
``NAPARI_SSEMNET_PROCESS`` set (or ``auto`` on large stacks) it runs the same generator in a
child process instead (``core.process.iter_align_stack_in_process``), fed from that worker
thread. Each point here runs in a fresh Python process: a worker thread consumes one of the
two generators to the end, as the widget does (every event is taken, nothing drawn). It
records the wall time from the call to the result (the child's start and the transfers of
the stack and the result included), the peak resident set of this process and of its
children, and a digest of the displacement, so that both paths can be seen to agree. The
stacks are the shared ones as they are, default parameters, seed 0.

    OMP_NUM_THREADS=2 python benchmarks/bench_process.py
    OMP_NUM_THREADS=2 python benchmarks/bench_process.py --points isbi:8 vnc:20
    OMP_NUM_THREADS=2 python benchmarks/bench_process.py --points vnc:20 --block-size 8 \
        --output process_cpu_blocks.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

DEFAULT_POINTS = ["isbi:8", "isbi:30", "vnc:8", "vnc:20"]


def one_point(data: Path, dataset: str, n: int, path: str, block_size: int = 0) -> dict:
    from napari_ssemnet import AlignParams
    from napari_ssemnet.core.align import iter_align_stack, run_generator
    from napari_ssemnet.core.process import iter_align_stack_in_process

    stack = C.load_stack(data, C.ISBI if dataset == "isbi" else C.VNC)[:n]
    run = iter_align_stack_in_process if path == "process" else iter_align_stack
    out: dict = {"events": 0}

    def count(_event: object) -> None:
        out["events"] += 1

    t0 = time.perf_counter()
    worker = threading.Thread(target=lambda: out.update(
        r=run_generator(run(stack, AlignParams(seed=0, block_size=block_size)), count)))
    worker.start()
    worker.join()
    total = time.perf_counter() - t0
    r = out["r"]
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"dataset": dataset, "sections": n, "size": stack.shape[1], "path": path,
            "block_size": block_size,
            "total_s": round(total, 2), "fit_s": round(r.timings["fit"], 2),
            "run_total_s": round(r.timings["total"], 2), "events": out["events"],
            "peak_rss_mb": own.ru_maxrss // 1024,
            "child_peak_rss_mb": kids.ru_maxrss // 1024 if path == "process" else None,
            "displacement_digest": C.digest(r.displacement)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_data_arg(parser)
    parser.add_argument("--points", nargs="+", default=DEFAULT_POINTS,
                        help="dataset:sections (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=0,
                        help="block_size of every run (default: 0, one joint fit)")
    parser.add_argument("--output", default="process_cpu.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        dataset, n, path = args.one.split(":")
        print("RESULT " + json.dumps(one_point(args.data, dataset, int(n), path,
                                               args.block_size)))
        return
    rows = []
    for point in args.points:
        for path in ("thread", "process"):
            row, err = C.run_child([sys.executable, __file__, "--data", str(args.data),
                                    "--block-size", str(args.block_size),
                                    "--one", f"{point}:{path}"])
            if row is None:
                print(f"{point} {path}: {err}")
                continue
            rows.append(row)
            print(json.dumps(row))
    path = C.finish(args.output, {"machine": C.machine_info(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
