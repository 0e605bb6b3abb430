"""Sections that are not all tissue: padding (as after montaging or a rotated acquisition)
and a missing wedge, on the benchmark's misaligned ISBI stack.

Each defect is put into the misaligned crop (so its edges lie in the image frame, as in
real data) and scored as the benchmark scores consistency, against our run on the
untouched crop, on tissue pixels only (pixels that the result takes from fill are left
out). The same case without the defect is the yardstick.

    python benchmarks/bench_defects.py [--seeds 0 1] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from common import (
    ISBI,
    RESULTS,
    add_data_arg,
    code_version,
    evaluate,
    load_stack,
    machine_info,
    make_case,
    run_ours,
)


def padding(shape: tuple[int, int, int], rng: np.random.Generator, skip: set[int],
            lo: float = 0.2, hi: float = 0.4) -> np.ndarray:
    """(Z, H, W) bool, True on fill: each section keeps a random rectangle of tissue that
    leaves ``lo``-``hi`` of its area as padding (sections in ``skip`` keep everything)."""
    z, h, w = shape
    fill = np.zeros(shape, bool)
    for i in range(z):
        if i in skip:
            continue
        keep = 1.0 - rng.uniform(lo, hi)
        fy = rng.uniform(np.sqrt(keep), 1.0)  # the rectangle's height share
        fx = keep / fy
        th, tw = int(round(fy * h)), int(round(fx * w))
        y0, x0 = rng.integers(0, h - th + 1), rng.integers(0, w - tw + 1)
        fill[i] = True
        fill[i, y0:y0 + th, x0:x0 + tw] = False
    return fill


def wedge(shape: tuple[int, int, int], z: int, area: float = 0.4) -> np.ndarray:
    """Fill over a corner wedge of section ``z`` (a half-plane at 30 degrees) covering
    ``area`` of it, as a torn or missing piece of a section."""
    _, h, w = shape
    yy, xx = np.mgrid[:h, :w].astype(float)
    d = (yy - h) * np.cos(np.radians(30)) + xx * np.sin(np.radians(30))
    cut = np.quantile(d, area)
    fill = np.zeros(shape, bool)
    fill[z] = d <= cut
    return fill


def pie(shape: tuple[int, int, int], z: int, a0: float = 110, a1: float = 140) -> np.ndarray:
    """Fill over a pie slice of section ``z`` from its top-right corner (angles ``a0``-``a1``
    degrees), as a tear that runs into the section (29 % of a square section)."""
    _, h, w = shape
    yy, xx = np.mgrid[:h, :w].astype(float)
    ang = np.degrees(np.arctan2(yy, xx - w))
    fill = np.zeros(shape, bool)
    fill[z] = (ang > a0) & (ang < a1)
    return fill


def aligned_fill(fill: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Where the aligned sections take their pixels from fill (nearest sample)."""
    z, h, w = fill.shape
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros_like(fill)
    for i in range(z):
        sy = np.clip(np.rint(yy + d[i, 0]).astype(int), 0, h - 1)
        sx = np.clip(np.rint(xx + d[i, 1]).astype(int), 0, w - 1)
        out[i] = fill[i][sy, sx]
    return out


def score(case, run, c, fill, exclude=None) -> dict:
    valid = run["valid"] & ~aligned_fill(fill, run["d"])
    ev = evaluate(case, run["d"], valid, c=c["d"], c_valid=c["valid"], exclude=exclude)
    return {"median": ev["consistency"]["median"], "p95": ev["consistency"]["p95"],
            "per_section": [round(v, 2) for v in ev["consistency_per_section"]],
            "adjacent_ncc": ev["adjacent_ncc"],
            "reported_ncc_after": float(np.nanmean(run["ncc_after"])),
            "flags": run["flags"], "seconds": round(run["seconds"], 1)}


def run(stack, **params) -> dict:
    from napari_ssemnet import align_stack

    t0 = time.perf_counter()
    r = align_stack(stack, device="cpu", **params)
    return {"d": r.displacement, "valid": r.valid, "flags": list(r.flags),
            "ncc_after": r.ncc_after, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arg(ap)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--sections", type=int, default=8)
    ap.add_argument("--crop", type=int, default=384)
    ap.add_argument("--out", default="defects_isbi.json")
    ap.add_argument("--cases", nargs="+", default=None,
                    help="run only the cases whose name contains one of these words")
    args = ap.parse_args()
    machine = machine_info()  # before the runs: their load average is the machine's
    full = load_stack(args.data, ISBI)[:args.sections]
    rows = []
    for seed in args.seeds:
        case = make_case("clean", full, args.crop, seed=seed)
        c = run_ours(case.clean)
        c["ncc_after"] = np.zeros(1)
        base = run(case.mis)
        shape = case.mis.shape
        rng = np.random.default_rng(seed)
        defects = {
            "black padding, every section": (padding(shape, rng, set()), 0),
            "white padding, every section": (padding(shape, rng, set()), 255),
            "black padding, section 3 only": (padding(shape, rng, set(range(shape[0])) - {3}),
                                              0),
            "black missing wedge (40 %), section 3": (wedge(shape, 3), 0),
            "black tear from a corner (29 %), section 3": (pie(shape, 3), 0),
            # last: its draws must not change the padding of the cases above
            "grey (median) padding, every section": (padding(shape, rng, set()), "median"),
        }
        no_fill = np.zeros(shape, bool)
        for name, (fill, value) in defects.items():
            if args.cases and not any(w in name for w in args.cases):
                continue
            stack = case.mis.copy()
            if value == "median":  # each section's own median grey
                for i in range(shape[0]):
                    stack[i][fill[i]] = np.median(case.mis[i])
            else:
                stack[fill] = value
            r = run(stack)
            row = {"seed": seed, "case": name, "fill_fraction": float(fill.mean()),
                   "without": score(case, base, c, no_fill), "with": score(case, r, c, fill)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        # section 4 is section 3 saved twice (scored without section 4)
        if args.cases and not any(w in "section 4 repeats section 3" for w in args.cases):
            continue
        stack = case.mis.copy()
        stack[4] = stack[3]
        r = run(stack)
        row = {"seed": seed, "case": "section 4 repeats section 3", "fill_fraction": 0.0,
               "without": score(case, base, c, no_fill, exclude=[4]),
               "with": score(case, r, c, no_fill, exclude=[4])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| seed | case | without: median / p95 (px) | with: median / p95 (px) | "
          "worst section (px) | adjacent NCC without / with | flags |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["without"], r["with"]
        flags = ", ".join(f"{i}: {f}" for i, f in enumerate(b["flags"]) if f) or "-"
        print(f"| {r['seed']} | {r['case']} | {a['median']:.2f} / {a['p95']:.2f} | "
              f"{b['median']:.2f} / {b['p95']:.2f} | {max(b['per_section']):.1f} | "
              f"{a['adjacent_ncc']:.3f} / {b['adjacent_ncc']:.3f} | {flags} |")
    RESULTS.mkdir(exist_ok=True)
    payload = {"code": code_version(), "machine": machine, "rows": rows}
    (RESULTS / args.out).write_text(json.dumps(payload, indent=1, default=float))


if __name__ == "__main__":
    main()
