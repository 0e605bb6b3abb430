"""A magnification step in the stack: later sections imaged larger than the earlier ones.

ISBI sections 0-7 with the benchmark misalignment (seeds 0-3), and sections 4-7 also
magnified by a factor about the centre (as after a change of microscope setting between two
imaging sessions), applied to the full 512^2 sections before the 384^2 crop. Consistency
against our run on the untouched crop (as in ``sweep_consistency.py``), per section, for the
rigid (default) and the affine pre-alignment, with the fit and with it frozen; and whether
the run gave any advice (``AlignmentResult.notes``).

    OMP_NUM_THREADS=2 python benchmarks/bench_magnification.py --factors 1.0 1.05 1.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from napari_ssemnet.core import warp  # noqa: E402
from napari_ssemnet.core.synth import random_misalignment  # noqa: E402

CROP = 384
FIRST_MAGNIFIED = 4
FROZEN = {"magnitude_penalty": 1e4, "learning_rate": 1e-4}
VARIANTS = {"rigid": {}, "affine": {"prealign": "affine"}, "rigid, fit frozen": FROZEN,
            "affine, fit frozen": {"prealign": "affine", **FROZEN}}


def magnified_case(full: np.ndarray, seed: int, factor: float) -> C.Case:
    """The benchmark case of ``seed`` with sections >= FIRST_MAGNIFIED magnified."""
    z, h, w = full.shape
    e = random_misalignment(full.shape, seed=seed, **C.MISALIGNMENT)
    pts = warp.level_points(h, w)
    centre = torch.tensor([(h - 1) / 2, (w - 1) / 2])
    # magnified(p) = misaligned(centre + (p - centre) / factor)
    q = centre + (pts - centre) / factor
    with torch.no_grad():
        e_q, _ = warp.sample(torch.from_numpy(e), q[None].expand(z, -1, -1, -1).contiguous(),
                             padding_mode="border")
    e_mag = (q[None] + e_q.permute(0, 2, 3, 1) - pts[None]).permute(0, 3, 1, 2).numpy()
    e_mag[:FIRST_MAGNIFIED] = e[:FIRST_MAGNIFIED]
    return C.make_case("magnification", full, CROP, seed=seed, fields=e_mag)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_data_arg(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--factors", type=float, nargs="+", default=[1.0, 1.05, 1.1])
    p.add_argument("--output", default="magnification_isbi.json")
    args = p.parse_args(argv)
    full = C.load_stack(args.data, C.ISBI)[:8].astype(np.float32)
    out = {"machine": C.machine_info(), "dataset": "ISBI 2012 sections 0-7", "crop": CROP,
           "first_magnified": FIRST_MAGNIFIED, "seeds": args.seeds, "rows": []}
    print("| factor | variant | consistency median (mean of seeds) | per section 1-7 | "
          "runs with advice | runs with a flag |\n|---|---|---|---|---|---|")
    cases = {(f, seed): magnified_case(full, seed, f) for f in args.factors for seed in args.seeds}
    for name, params in VARIANTS.items():
        c = C.run_ours(C.untouched_case(C.make_case("magnification", full, CROP, seed=0)).clean,
                       **dict(params))
        for factor in args.factors:
            meds, per, advised, flagged = [], [], 0, 0
            for seed in args.seeds:
                case = cases[factor, seed]
                r = C.run_ours(case.mis.copy(), **dict(params))
                ev = C.evaluate(case, r["d"], r["valid"], c=c["d"], c_valid=c["valid"])
                meds.append(ev["consistency"]["median"])
                per.append(ev["consistency_per_section"])
                advised += bool(r["notes"])
                flagged += any(r["flags"])
            sections = np.mean(per, axis=0)
            print(f"| {factor} | {name} | {np.mean(meds):.2f} | "
                  f"{', '.join(f'{v:.1f}' for v in sections)} | {advised} of {len(args.seeds)} | "
                  f"{flagged} of {len(args.seeds)} |",
                  flush=True)
            out["rows"].append({"factor": factor, "variant": name, "params": params,
                                "median": float(np.mean(meds)),
                                "per_section": sections.tolist(), "advised": advised,
                                "flagged": flagged, "per_seed": meds})
    C.finish(args.output, out)


if __name__ == "__main__":
    main()
