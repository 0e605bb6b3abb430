"""Pre-alignment and alignment at the section-placement limits of issue #2.

ISBI sections 0-7, each section except the reference rotated by up to +-5 deg, shifted by up
to +-15 % of the full width (77 px), scaled and sheared by up to 2 % and bent by a 2 px
elastic field; applied to the full 512^2 sections, then the centre 320^2 is cropped (no fill
border). Seeds 0-3, with and without a blank section 3. Reports the endpoint error against
the nominal truth (which includes the real apparent motion of the ISBI neighbours, 3-10 px
here), adjacent NCC and flags: a failed pre-alignment shows as an endpoint error of tens to
hundreds of pixels.

    OMP_NUM_THREADS=2 python benchmarks/bench_placement.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

LIMITS = {"rotation_deg": 5.0, "shift_frac": 0.15, "scale": 0.02, "shear": 0.02,
          "elastic_px": 2.0, "reference": 0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_data_arg(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--crop", type=int, default=320)
    p.add_argument("--output", default="placement_isbi.json")
    args = p.parse_args(argv)
    C.MISALIGNMENT.update(LIMITS)
    full = C.load_stack(args.data, C.ISBI)[:8]
    out = {"machine": C.machine_info(), "dataset": "ISBI 2012 sections 0-7", "crop": args.crop,
           "misalignment": LIMITS, "runs": []}
    print("| seed | blank | endpoint median / p95 (px) | per section (median px) | adjacent NCC "
          "| flags | wall (s) |\n|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        for blank in (None, 3):
            case = C.make_case("placement", full, args.crop, seed=seed, blank=blank)
            r = C.run_ours(case.mis.copy())
            ev = C.evaluate(case, r["d"], r["valid"], exclude=[blank] if blank else [])
            row = {"seed": seed, "blank": blank, "fill_fraction": case.fill_fraction,
                   "seconds": r["seconds"], "flags": r["flags"], **ev}
            out["runs"].append(row)
            C.save_json(args.output, out)
            per = ", ".join(f"{v:.1f}" for v in ev["endpoint_per_section"])
            print(f"| {seed} | {blank if blank is not None else '-'} | "
                  f"{ev['endpoint']['median']:.1f} / {ev['endpoint']['p95']:.1f} | {per} | "
                  f"{ev['adjacent_ncc']:.3f} | {','.join(f or '-' for f in r['flags'])} | "
                  f"{r['seconds']:.1f} |", flush=True)
    ends = np.array([r["endpoint"]["median"] for r in out["runs"]])
    print(f"\nruns with endpoint median > 30 px (failed): {(ends > 30).sum()} of {len(ends)}")


if __name__ == "__main__":
    main()
