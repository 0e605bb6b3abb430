"""Where the consistency error on ISBI comes from (the experiments behind docs/benchmarks.md,
"What limits consistency").

Three experiments on ISBI sections 0-5, 384^2 crop, reference 0:

* ``parts``: consistency when the known misalignment is cut down to some of its parts
  (translations only, down to +-2.5 px);
* ``oracle``: the fit started from the TRUE pre-alignment (the affine part of the known field
  composed with the pre-alignment found on the untouched crop), with and without the fit;
* ``landscape``: pixel NCC of adjacent untouched sections against an integer translation
  (+-16 px), best and second-best peak;
* ``copies``: four copies of ONE real section (256^2), each but the first moved by a known
  rotation (+-2 deg), shift (+-2 %) and smooth elastic field (1.5 px node std): with no
  tissue change, how much of the known motion does the fit leave, with its regularisers and
  iteration budget, and without them?
* ``floor``: the benchmark itself (6 x 384^2, the benchmark misalignment, consistency as
  in ``sweep_consistency.py``) on six copies of ONE real section: the score with no tissue
  change between neighbours, i.e. the part of the error that the fit's regularisers and
  iteration budget cause on their own;
* ``split``: the consistency residual ``t - c`` of each section split into its mean
  (translation), its least-squares linear part and the rest, per section (median length of
  each part, mean over seeds).

    OMP_NUM_THREADS=2 python benchmarks/diag_consistency.py parts
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from napari_ssemnet.core import prealign  # noqa: E402

CROP = 384
PARTS = {
    "all (benchmark misalignment)": {},
    "no elastic": {"elastic_px": 0.0},
    "rigid only": {"elastic_px": 0.0, "scale": 0.0, "shear": 0.0},
    "translation only (+-31 px)": {"elastic_px": 0.0, "scale": 0.0, "shear": 0.0,
                                   "rotation_deg": 0.0},
    "translation only (+-10 px)": {"elastic_px": 0.0, "scale": 0.0, "shear": 0.0,
                                   "rotation_deg": 0.0, "shift_frac": 0.02},
    "translation only (+-2.5 px)": {"elastic_px": 0.0, "scale": 0.0, "shear": 0.0,
                                    "rotation_deg": 0.0, "shift_frac": 0.005},
}
FROZEN = {"magnitude_penalty": 1e4, "learning_rate": 1e-4}  # the fit barely moves


def consistency(full, seeds, params, *, oracle: bool = False) -> dict:
    """Mean over seeds of the consistency median / p95, and the per-seed values."""
    orig = prealign.prealign_stack
    state: dict = {}

    def patched(norm, blank, **kw):
        mats, conf = yield from orig(norm, blank, **kw)
        if state.get("record"):
            state["c"] = mats.copy()
        elif oracle:
            mats = np.stack([np.linalg.inv(e) @ m for e, m in zip(state["E"], state["c"],
                                                                   strict=True)])
        return mats, conf

    prealign.prealign_stack = patched
    try:
        rows = []
        c = None
        for seed in seeds:
            case = C.make_case("diag", full, CROP, seed=seed)
            if c is None:
                state["record"] = True
                c = C.run_ours(C.untouched_case(case).clean, **params)
                state["record"] = False
            state["E"] = [affine_part(case, z) for z in range(full.shape[0])]
            r = C.run_ours(case.mis.copy(), **params)
            ev = C.evaluate(case, r["d"], r["valid"], c=c["d"], c_valid=c["valid"])
            rows.append(ev["consistency"])
    finally:
        prealign.prealign_stack = orig
    return {"median": float(np.mean([r["median"] for r in rows])),
            "p95": float(np.mean([r["p95"] for r in rows])), "per_seed": rows}


def affine_part(case: C.Case, z: int) -> np.ndarray:
    """Least-squares affine map p -> p + e(p) of section z, crop pixels, (3, 3)."""
    oy, ox = case.offset
    n = case.crop
    yy, xx = np.meshgrid(np.arange(float(n)), np.arange(float(n)), indexing="ij")
    e = case.e_full[z][:, oy:oy + n, ox:ox + n]
    x = np.stack([yy.ravel(), xx.ravel(), np.ones(yy.size)], 1)
    y = np.stack([yy.ravel() + e[0].ravel(), xx.ravel() + e[1].ravel()], 1)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    m = np.eye(3)
    m[:2] = coef.T
    return m


def landscape(full: np.ndarray, radius: int = 16) -> None:
    from scipy import ndimage as ndi

    print("| pair | best shift (dy, dx) | NCC | second peak (> 3 px away) | NCC | NCC at 0 |\n"
          "|---|---|---|---|---|---|")
    o = (full.shape[1] - CROP) // 2
    for a in range(full.shape[0] - 1):
        fa = ndi.gaussian_filter(full[a], 1.0)
        fb = ndi.gaussian_filter(full[a + 1], 1.0)
        ca = fa[o + radius:o + CROP - radius, o + radius:o + CROP - radius]
        ca = (ca - ca.mean()) / ca.std()
        s = np.zeros((2 * radius + 1,) * 2)
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                cb = fb[o + radius + dy:o + CROP - radius + dy,
                        o + radius + dx:o + CROP - radius + dx]
                s[dy + radius, dx + radius] = float((ca * (cb - cb.mean()) / cb.std()).mean())
        i = np.unravel_index(s.argmax(), s.shape)
        s2 = s.copy()
        s2[max(0, i[0] - 3):i[0] + 4, max(0, i[1] - 3):i[1] + 4] = -1
        j = np.unravel_index(s2.argmax(), s2.shape)
        print(f"| {a}-{a + 1} | ({i[0] - radius}, {i[1] - radius}) | {s.max():.3f} | "
              f"({j[0] - radius}, {j[1] - radius}) | {s2.max():.3f} | "
              f"{s[radius, radius]:.3f} |")


COPIES_VARIANTS = {
    "levels 3, 60 iterations (the base of the rows below)": {},
    "the package defaults (levels 4, 150 iterations)": {"levels": 4, "iterations": 150},
    "fit frozen (pre-alignment only)": FROZEN,
    "no regularisers": {"smoothness": 0.0, "magnitude_penalty": 0.0},
    "600 iterations, no early stop": {"iterations": 600, "tolerance": 0.0},
    "no regularisers, 600 iterations, no early stop": {
        "smoothness": 0.0, "magnitude_penalty": 0.0, "iterations": 600, "tolerance": 0.0},
}


def copies(full: np.ndarray, seeds) -> None:
    import torch

    from napari_ssemnet import align_stack
    from napari_ssemnet.core import warp
    from napari_ssemnet.core.synth import apply_misalignment, random_misalignment

    o = (full.shape[1] - 256) // 2
    stack = np.stack([full[3, o:o + 256, o:o + 256]] * 4).astype(np.float32)
    print("| variant | endpoint error median / p95 (px), mean of sections 1-3 and seeds |\n"
          "|---|---|")
    for name, params in COPIES_VARIANTS.items():
        meds, p95s = [], []
        for seed in seeds:
            e = random_misalignment(stack.shape, rotation_deg=2, shift_frac=0.02, scale=0.0,
                                    shear=0.0, elastic_px=1.5, seed=seed)
            mis = apply_misalignment(stack, e)
            r = align_stack(mis, **{"levels": 3, "iterations": 60, "device": "cpu", **params})
            err = warp.compose(torch.from_numpy(e), torch.from_numpy(r.displacement)).norm(
                dim=1).numpy()
            for z in range(1, 4):
                inner = np.zeros_like(r.valid[z])
                inner[16:-16, 16:-16] = r.valid[z][16:-16, 16:-16]
                meds.append(np.median(err[z][inner]))
                p95s.append(np.percentile(err[z][inner], 95))
        print(f"| {name} | {np.mean(meds):.2f} / {np.mean(p95s):.2f} |", flush=True)


FLOOR_VARIANTS = {
    "defaults": {},
    "fit frozen (pre-alignment only)": FROZEN,
    "smoothness 0": {"smoothness": 0.0},
    "magnitude_penalty 0": {"magnitude_penalty": 0.0},
    "600 iterations, no early stop": {"iterations": 600, "tolerance": 0.0},
    "no regularisers": {"smoothness": 0.0, "magnitude_penalty": 0.0},
    "no regularisers, 600 iterations, no early stop": {
        "smoothness": 0.0, "magnitude_penalty": 0.0, "iterations": 600, "tolerance": 0.0},
}


def floor(full: np.ndarray, seeds, section: int = 3) -> None:
    from sweep_consistency import run_variant

    copies_full = np.stack([full[section]] * full.shape[0]).astype(np.float32)
    print(f"| variant (copies of section {section}) | consistency median / p95 (px) | "
          "per section 1-5 (median) |\n|---|---|---|")
    for name, params in FLOOR_VARIANTS.items():
        clean = run_variant(copies_full, CROP, dict(params), list(seeds), hard_case=False)["clean"]
        per = np.mean([row["per_section"] for row in clean["seeds"]], axis=0)
        print(f"| {name} | {clean['mean_median']:.2f} / {clean['mean_p95']:.2f} | "
              f"{', '.join(f'{v:.2f}' for v in per)} |", flush=True)


SPLIT_VARIANTS = {"defaults": {}, "fit frozen (pre-alignment only)": FROZEN}


def split(full: np.ndarray, seeds) -> None:
    yy, xx = np.meshgrid(np.arange(CROP), np.arange(CROP), indexing="ij")
    half = CROP / 2
    print("| variant | section | residual | translation | linear part | rest |\n"
          "|---|---|---|---|---|---|")
    for name, params in SPLIT_VARIANTS.items():
        first = C.make_case("diag", full, CROP, seed=seeds[0])
        c = C.run_ours(C.untouched_case(first).clean, **dict(params))
        rows = []
        for seed in seeds:
            case = C.make_case("diag", full, CROP, seed=seed)
            r = C.run_ours(case.mis.copy(), **dict(params))
            t, _ = C.total_map(case, r["d"])
            both = r["valid"] & c["valid"]
            for z in range(1, full.shape[0]):
                m = both[z]
                res = (t[z] - c["d"][z])[:, m].T
                basis = np.stack([np.ones(m.sum()), (yy[m] - half) / half,
                                  (xx[m] - half) / half], 1)
                coef, *_ = np.linalg.lstsq(basis, res, rcond=None)
                linear = basis[:, 1:] @ coef[1:]
                rest = res - basis @ coef
                rows.append((z, np.median(np.hypot(*res.T)), np.hypot(*coef[0]),
                             np.median(np.hypot(*linear.T)), np.median(np.hypot(*rest.T))))
        a = np.array(rows)
        for z in [*range(1, full.shape[0]), None]:
            sel = a if z is None else a[a[:, 0] == z]
            print(f"| {name} | {'all' if z is None else z} | "
                  + " | ".join(f"{v:.2f}" for v in sel[:, 1:].mean(axis=0)) + " |", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_data_arg(p)
    p.add_argument("experiment", choices=["parts", "oracle", "landscape", "copies", "floor",
                                           "split"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    full = C.load_stack(args.data, C.ISBI)[:6]
    base = dict(C.MISALIGNMENT)
    if args.experiment == "landscape":
        landscape(full)
        return
    if args.experiment == "copies":
        copies(full, args.seeds)
        return
    if args.experiment == "floor":
        floor(full, args.seeds)
        return
    if args.experiment == "split":
        split(full, args.seeds)
        return
    print("| experiment | consistency median / p95 (px), mean of seeds |\n|---|---|")
    if args.experiment == "parts":
        for name, change in PARTS.items():
            C.MISALIGNMENT.clear()
            C.MISALIGNMENT.update({**base, **change})
            for label, params in [("defaults", {}), ("pre-alignment only", FROZEN)]:
                r = consistency(full, args.seeds, params)
                print(f"| {name}, {label} | {r['median']:.2f} / {r['p95']:.2f} |", flush=True)
    else:
        for name, change in [("benchmark misalignment", {}), ("no elastic", {"elastic_px": 0.0})]:
            C.MISALIGNMENT.clear()
            C.MISALIGNMENT.update({**base, **change})
            for label, params in [("true pre-alignment, no fit", FROZEN),
                                  ("true pre-alignment + default fit", {}),
                                  ("true pre-alignment + fit, 1 level", {"levels": 1})]:
                r = consistency(full, args.seeds, params, oracle=True)
                print(f"| {name}: {label} | {r['median']:.2f} / {r['p95']:.2f} |", flush=True)
    C.MISALIGNMENT.clear()
    C.MISALIGNMENT.update(base)


if __name__ == "__main__":
    main()
