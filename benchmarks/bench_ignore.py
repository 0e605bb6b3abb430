"""Dust that stays at one place of the image (on the camera or the support film) in several
sections, with and without an ``ignore`` mask over it.

ISBI 8 x 384^2 with the benchmark's known misalignment (reference 0), seeds 0-3. A textured
blob (an ellipse of 80 x 140 px, smoothed noise, about as contrasty as membranes) is pasted
into the misaligned sections 3-5 at the same image position. Each section is scored as
bench_chain scores it: the median distance, in px, of the run's total map from our run on
the untouched crop; "off" counts sections more than 10 px away.

    OMP_NUM_THREADS=2 python benchmarks/bench_ignore.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from common import (
    ISBI,
    add_data_arg,
    code_version,
    finish,
    load_stack,
    machine_info,
    make_case,
    total_map,
)

DUSTY = (3, 4, 5)


def dust(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An elliptical blob (mask) and its texture, in the upper right of the image."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    blob = (yy - 0.3 * h) ** 2 / (0.1 * h) ** 2 + (xx - 0.6 * w) ** 2 / (0.18 * w) ** 2 < 1
    tex = ndimage.gaussian_filter(np.random.default_rng(100 + seed).standard_normal(shape), 2)
    return blob, tex


def main() -> None:
    from napari_ssemnet import align_stack

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arg(ap)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--crop", type=int, default=384)
    ap.add_argument("--out", default="ignore_isbi.json")
    args = ap.parse_args()
    machine = machine_info()
    full = load_stack(args.data, ISBI)[:8]
    rows = []
    for seed in args.seeds:
        case = make_case("c", full, args.crop, seed=seed)
        c = align_stack(case.clean, device="cpu").displacement
        dusty = case.mis.copy()
        blob, tex = dust(dusty.shape[1:], seed)
        lo, hi = np.percentile(case.mis[0], [1, 99])
        for z in DUSTY:  # membrane-like contrast: dark, textured
            dusty[z][blob] = lo + (hi - lo) * np.clip(0.35 + 2.5 * tex[blob], 0, 1)
        mask = np.zeros(dusty.shape, bool)
        mask[list(DUSTY)] = blob
        for variant, ignore in (("clean", None), ("dust", None), ("dust, masked", mask)):
            stack = case.mis if variant == "clean" else dusty
            t0 = time.perf_counter()
            r = align_stack(stack, device="cpu", ignore=ignore)
            secs = time.perf_counter() - t0
            t, _ = total_map(case, r.displacement)
            e = np.hypot(t[:, 0] - c[:, 0], t[:, 1] - c[:, 1])
            per = [round(float(np.median(e[z])), 2) for z in range(len(stack))]
            rows.append({"seed": seed, "variant": variant, "per_section": per,
                         "flags": list(r.flags), "seconds": round(secs, 1),
                         "off": sum(v > 10 for v in per)})
            print(f"seed {seed} {variant:13s} {per} {[f or '-' for f in r.flags]} "
                  f"{secs:.1f} s", flush=True)
    for variant in ("clean", "dust", "dust, masked"):
        sel = [r for r in rows if r["variant"] == variant]
        worst = [max(r["per_section"]) for r in sel]
        print(f"{variant:13s} mean of per-section medians "
              f"{np.mean([np.mean(r['per_section'][1:]) for r in sel]):.2f} px, worst section "
              f"per seed {worst}, sections > 10 px: {sum(r['off'] for r in sel)}")
    finish(args.out, {"code": code_version(), "machine": machine, "crop": args.crop,
                      "rows": rows})


if __name__ == "__main__":
    main()
