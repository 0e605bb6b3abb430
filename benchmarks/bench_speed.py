"""End-to-end speed and peak memory of ``align_stack`` (defaults), with elastix for comparison.

Every point runs in a fresh child process, so that its peak memory is its own:

* ``peak RSS`` is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of that process (the whole
  process: Python, torch, the input and all numpy/torch CPU buffers); ``baseline RSS`` is the
  same reading just before ``align_stack`` is called (imports and input loaded), so
  ``peak - baseline`` is what the alignment itself added at its peak;
* with ``--device cuda``, ``torch.cuda.max_memory_allocated`` is reported as well.

Plans (``--plan``):

* ``full``: 30 x 512^2 ISBI (the headline), sections 5/10/20/30 at 512^2, 8 sections at
  256^2 (ISBI centre crop) / 512^2 (ISBI) / 1024^2 (VNC), elastix on 30 x 512^2;
* ``quick``: 4 and 8 sections at 512^2, 8 at 256^2, elastix on 8 x 512^2.

By default the stacks are timed as published (already aligned, so early stopping ends the fit
soon); ``--misaligned`` applies the accuracy benchmarks' known misalignment first.

    OMP_NUM_THREADS=2 python benchmarks/bench_speed.py --plan full
    OMP_NUM_THREADS=2 python benchmarks/bench_speed.py --plan quick --misaligned
    python benchmarks/bench_speed.py --plan full --device cuda     # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from napari_ssemnet.core.synth import apply_misalignment, random_misalignment  # noqa: E402

PLANS = {
    "full": [("ours", "isbi", 30, 512), ("ours", "isbi", 5, 512), ("ours", "isbi", 10, 512),
             ("ours", "isbi", 20, 512), ("ours", "isbi", 8, 256), ("ours", "isbi", 8, 512),
             ("ours", "vnc", 8, 1024), ("elastix", "isbi", 30, 512)],
    "quick": [("ours", "isbi", 4, 512), ("ours", "isbi", 8, 512), ("ours", "isbi", 8, 256),
              ("elastix", "isbi", 8, 512)],
    # ours only (a GPU machine may have no elastix): the 1024^2 target and scaling
    "gpu": [("ours", "isbi", 30, 512), ("ours", "vnc", 8, 1024), ("ours", "vnc", 20, 1024)],
}


def load(data: Path, dataset: str, n: int, size: int, misaligned: bool):
    full = C.load_stack(data, C.ISBI if dataset == "isbi" else C.VNC)[:n]
    h, w = full.shape[1:]
    if size > min(h, w):
        sys.exit(f"error: {dataset} sections are {h}x{w}; cannot crop {size}")
    oy, ox = (h - size) // 2, (w - size) // 2
    stack = full[:, oy:oy + size, ox:ox + size].copy()
    if misaligned:
        # the benchmarks' known misalignment, applied to the crop itself (its fill border does
        # not matter for timing)
        e = random_misalignment(stack.shape, seed=0, **C.MISALIGNMENT)
        stack = apply_misalignment(stack, e)
    return stack


def one_point(args) -> dict:
    """Run one point in this process and return its figures."""
    import torch

    stack = load(args.data, args.dataset, args.n, args.size, args.misaligned)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = {"method": args.method, "dataset": args.dataset, "sections": args.n,
           "size": args.size, "device": args.device, "misaligned": args.misaligned}
    if args.method == "ours":
        from napari_ssemnet import align_stack

        if args.device == "cuda":
            # a cold start (CUDA context, kernel loading, cuFFT/cuDNN plans, the weights) is
            # timed once on its own, then the same stack again warm: both are reported
            t0 = time.perf_counter()
            align_stack(stack, device=args.device)
            torch.cuda.synchronize()
            row["cold_seconds"] = time.perf_counter() - t0
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        r = align_stack(stack, device=args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
            row["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
            row["cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
        row["seconds"] = time.perf_counter() - t0
        row["timings"] = r.timings
        row["flags"] = r.flags
    else:
        r = C.run_elastix(stack, "rigid+affine+bspline64", isolate=False)
        row["seconds"] = r["seconds"]
        row["registration_seconds"] = r["registration_seconds"]
    row["seconds_per_section"] = row["seconds"] / args.n
    row["baseline_rss_mb"] = base_kb / 1024
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_data_arg(p)
    p.add_argument("--plan", choices=sorted(PLANS), default="quick")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--misaligned", action="store_true",
                   help="time on the stack with the benchmarks' known misalignment applied "
                        "(default: the already aligned stack as published)")
    p.add_argument("--output", default=None, help="JSON name under benchmarks/results/")
    p.add_argument("--one", nargs=4, metavar=("METHOD", "DATASET", "N", "SIZE"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        args.method, args.dataset, n, size = args.one
        args.n, args.size = int(n), int(size)
        print("RESULT " + json.dumps(one_point(args)))
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("error: --device cuda needs a CUDA GPU visible to PyTorch.")
    output = args.output or (f"speed_{args.device}_{args.plan}"
                              f"{'_misaligned' if args.misaligned else ''}.json")
    out = {"machine": C.machine_info(), "plan": args.plan, "device": args.device,
           "memory": "peak RSS = ru_maxrss of a fresh process per point (whole process); "
                     "baseline = the same just before aligning", "points": []}
    print(f"load average before: {os.getloadavg()}", flush=True)
    print("| method | data | sections | size | wall (s) | s/section | baseline RSS (MB) | "
          "peak RSS (MB) |\n|---|---|---|---|---|---|---|---|", flush=True)
    for method, dataset, n, size in PLANS[args.plan]:
        cmd = [sys.executable, __file__, "--data", str(args.data), "--device", args.device,
               *(["--misaligned"] if args.misaligned else []),
               "--one", method, dataset, str(n), str(size)]
        row, err = C.run_child(cmd)
        if row is None:
            row = {"method": method, "dataset": dataset, "sections": n, "size": size,
                   "error": err}
            print(f"| {method} | {dataset} | {n} | {size} | failed: {err} |")
        else:
            extra = (f" (+{row['cuda_peak_allocated_mb']:.0f} MB CUDA)"
                     if "cuda_peak_allocated_mb" in row else "")
            print(f"| {method} | {dataset} | {n} | {size} | {row['seconds']:.1f} | "
                  f"{row['seconds_per_section']:.2f} | {row['baseline_rss_mb']:.0f} | "
                  f"{row['peak_rss_mb']:.0f}{extra} |", flush=True)
        row["load_avg_after"] = list(os.getloadavg())
        out["points"].append(row)
        C.save_json(output, out)
    C.finish(output, out)


if __name__ == "__main__":
    main()
