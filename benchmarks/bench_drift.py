"""What does an aligner do to a stack that is already aligned? (ISBI, published alignment)

    OMP_NUM_THREADS=2 python benchmarks/bench_drift.py [--data DIR] [--sections 6 30]

Aligns the untouched ISBI sections 0..N-1 (centre 384^2 crop, the benchmark's untouched
crop) with several settings of ours and with pystackreg rigid, and reports per section the
median displacement over the valid pixels and the rotation and shift of a least-squares
affine fit to the field, plus the mean adjacent-section NCC of the result (the published
alignment's own NCC is the "identity" row). Neighbour-matching aligners follow the apparent
motion between real neighbouring sections, so none of them returns the identity. Prints
markdown and writes ``benchmarks/results/drift_isbi.json``.
"""

from __future__ import annotations

import argparse

import numpy as np

from common import ISBI, add_data_arg, finish, load_stack, machine_info, run_ours, run_stackreg
from napari_ssemnet.core import metrics

CROP, OFFSET = 384, 64
VARIANTS = {
    "ours (defaults, reference 0)": {},
    "ours reference = middle": {"reference": "middle"},
    "ours prealign=none": {"prealign": "none"},
    "ours prealign=none, magnitude_penalty=1e4": {"prealign": "none",
                                                  "magnitude_penalty": 1e4},
    "ours rigid yardstick (prealign=rigid, magnitude_penalty=1e4)": {
        "prealign": "rigid", "magnitude_penalty": 1e4},
}


def affine_of(d: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """Rotation (deg) and shift length (px, at the crop centre) of the affine map that fits
    the backward field ``d`` (2, H, W) best on ``valid``."""
    h, w = d.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy, xx = yy - (h - 1) / 2, xx - (w - 1) / 2
    m = valid.ravel()
    a = np.stack([yy.ravel(), xx.ravel(), np.ones(h * w)], 1)[m]
    coef_y = np.linalg.lstsq(a, (yy.ravel() + d[0].ravel())[m], rcond=None)[0]
    coef_x = np.linalg.lstsq(a, (xx.ravel() + d[1].ravel())[m], rcond=None)[0]
    rot = np.degrees(np.arctan2(coef_y[1] - coef_x[0], coef_y[0] + coef_x[1]))
    return float(rot), float(np.hypot(coef_y[2], coef_x[2]))


def describe(stack: np.ndarray, res: dict) -> dict:
    d, valid = res["d"], res["valid"]
    rows = [affine_of(d[z], valid[z]) for z in range(len(d))]
    med = [float(np.median(np.hypot(d[z, 0], d[z, 1])[valid[z]])) for z in range(len(d))]
    aligned = np.stack([_resample(stack[z], d[z]) for z in range(len(d))])
    ncc = metrics.adjacent_ncc(aligned, valid)
    return {"median_px": med, "rotation_deg": [r for r, _ in rows],
            "shift_px": [s for _, s in rows], "adjacent_ncc": float(np.nanmean(ncc)),
            "seconds": res["seconds"]}


def _resample(section: np.ndarray, d: np.ndarray) -> np.ndarray:
    from napari_ssemnet.core.io import apply_displacement_section

    return apply_displacement_section(section, d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arg(ap)
    ap.add_argument("--sections", type=int, nargs="+", default=[6])
    args = ap.parse_args()
    full = load_stack(args.data, ISBI)
    out = {"machine": machine_info(), "crop": CROP, "runs": {}}
    for n in args.sections:
        stack = np.ascontiguousarray(full[:n, OFFSET:OFFSET + CROP, OFFSET:OFFSET + CROP])
        ident = {"d": np.zeros((n, 2, CROP, CROP), np.float32),
                 "valid": np.ones((n, CROP, CROP), bool), "seconds": 0.0}
        runs = {"identity (the published alignment)": describe(stack, ident)}
        variants = VARIANTS if n <= 6 else {k: VARIANTS[k] for k in list(VARIANTS)[:2]}
        for name, params in variants.items():
            params = dict(params)
            if params.get("reference") == "middle":
                params["reference"] = n // 2
            runs[name] = describe(stack, run_ours(stack, **params))
        runs["pystackreg rigid (previous)"] = describe(stack, run_stackreg(stack, "rigid"))
        out["runs"][str(n)] = runs
        print(f"\nISBI sections 0-{n - 1}, {CROP}^2 crop: median |d| (px) per section, "
              "largest |rotation|, mean adjacent NCC")
        print("| aligner | median px per section | max rotation (deg) | adjacent NCC |")
        print("|---|---|---|---|")
        for name, r in runs.items():
            meds = ", ".join(f"{m:.1f}" for m in r["median_px"])
            print(f"| {name} | {meds} | {max(abs(x) for x in r['rotation_deg']):.2f} | "
                  f"{r['adjacent_ncc']:.3f} |", flush=True)
    finish("drift_isbi.json", out)


if __name__ == "__main__":
    main()
