"""Accuracy on real EM with known misalignments (DESIGN.md section 6).

ISBI (default): sections 0-5, known misalignment on the full 512^2 sections, centre 384^2 crop.
Two cases: ``clean`` (geometry only) and ``hard`` (section 3 blank, +-20 % gain, 10 % noise).
Per method: consistency median/p95, endpoint error median/p95 against the nominal truth,
adjacent NCC of the aligned stack (clean intensities resampled through the method's map) next
to the untouched crop aligned rigidly, wall time.

VNC (``--dataset vnc``): 8 sections, misalignment on the full 1024^2 sections, centre 512^2
crop; mean adjacent NCC of every method on the SAME pixels (intersection of all methods' valid
masks), plus endpoint error.

    OMP_NUM_THREADS=2 python benchmarks/bench_accuracy.py
    OMP_NUM_THREADS=2 python benchmarks/bench_accuracy.py --dataset vnc
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

OURS = {
    "ours (defaults)": {},
    "ours features=pixels": {"features": "pixels"},
    "ours prealign=affine": {"prealign": "affine"},
}
RIGID_YARDSTICK = {"prealign": "rigid", "magnitude_penalty": 1e4}
PEERS = ["pystackreg rigid", "pystackreg affine", "elastix rigid+affine",
         "elastix rigid+affine+bspline64"]
# the slowest variant last, so that a cut-short run still has the main rows
ORDER = ["ours (defaults)", "ours features=pixels", *PEERS, "ours prealign=affine"]


def run_method(name: str, stack: np.ndarray) -> dict:
    if name in OURS:
        return C.run_ours(stack, **OURS[name])
    if name == "ours rigid (yardstick)":
        return C.run_ours(stack, **RIGID_YARDSTICK)
    if name.startswith("pystackreg"):
        return C.run_stackreg(stack, name.split()[1])
    if name.startswith("elastix"):
        return C.run_elastix(stack, name.split()[1])
    raise ValueError(name)


def fmt(v: float, nd: int = 2) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{nd}f}"


def isbi(args) -> None:
    full = C.load_stack(args.data, C.ISBI)[:6]
    methods = [m for m in ORDER if not args.methods or any(s in m for s in args.methods)]
    with_peers = any(m in PEERS for m in methods)  # --methods ours runs without them installed
    if with_peers:
        print("convention checks: pystackreg field error "
              f"{C.check_stackreg_convention(full[2, 64:448, 64:448]):.3f} px, elastix "
              f"{C.check_elastix_convention(full[2, 64:448, 64:448]):.3f} px", flush=True)
    out = {"machine": C.machine_info(), "dataset": "ISBI 2012 sections 0-5",
           "crop": args.crop, "misalignment": C.MISALIGNMENT, "seeds": args.seeds, "runs": []}
    untouched_cache: dict[str, dict] = {}
    for seed in args.seeds:
        cases = [C.make_case("clean", full, args.crop, seed=seed),
                 C.make_case("hard", full, args.crop, seed=seed, gain_jitter=0.2, noise=0.1,
                             blank=3)]
        base = C.untouched_case(cases[0])
        if "untouched" not in untouched_cache:
            # yardsticks: the untouched crop as it is, and aligned rigidly
            ident = np.zeros((6, 2, args.crop, args.crop), np.float32)
            yard = {"untouched, not aligned": C.evaluate(base, ident, C.inside_mask(ident))}
            for name in ["ours rigid (yardstick)"] + (["pystackreg rigid"] if with_peers else []):
                r = run_method(name, base.clean)
                yard[f"untouched aligned by {name}"] = C.evaluate(base, r["d"], r["valid"])
                print(name, "on untouched: adjacent NCC",
                      fmt(yard[f"untouched aligned by {name}"]["adjacent_ncc"], 3), flush=True)
            untouched_cache["untouched"] = yard
            out["yardsticks"] = yard
        for case in cases:
            for name in methods:
                if name not in untouched_cache:
                    untouched_cache[name] = run_method(name, base.clean)
                c = untouched_cache[name]
                r = run_method(name, case.mis)
                row = {"seed": seed, "case": case.name, "method": name,
                       "seconds": r["seconds"], "flags": r["flags"],
                       "fill_fraction": case.fill_fraction}
                if r["d"] is None or c["d"] is None:
                    row["error"] = r.get("error") or c.get("error")
                else:
                    exclude = [case.blank] if case.blank is not None else []
                    row.update(C.evaluate(case, r["d"], r["valid"], c=c["d"],
                                          c_valid=c["valid"], exclude=exclude))
                    row["adjacent_ncc_untouched_by_same_method"] = C.evaluate(
                        base, c["d"], c["valid"])["adjacent_ncc"]
                out["runs"].append(row)
                C.save_json(args.output, out)
                print(line(row), flush=True)
    print_isbi_table(out)


def line(row: dict) -> str:
    if "error" in row:
        return f"| {row['case']} | {row['seed']} | {row['method']} | {row['error']} |"
    return (f"| {row['case']} | {row['seed']} | {row['method']} | "
            f"{fmt(row['consistency']['median'])} / {fmt(row['consistency']['p95'])} | "
            f"{fmt(row['endpoint']['median'])} / {fmt(row['endpoint']['p95'])} | "
            f"{fmt(row['adjacent_ncc'], 3)} | {row['seconds']:.1f} | "
            f"{','.join(f or '-' for f in row['flags']) if row['flags'] else ''} |")


def print_isbi_table(out: dict) -> None:
    print("\n| untouched yardstick | adjacent NCC |\n|---|---|")
    for k, v in out["yardsticks"].items():
        print(f"| {k} | {fmt(v['adjacent_ncc'], 3)} |")
    print("\n| case | seed | method | consistency median / p95 (px) | endpoint median / p95 "
          "(px) | adjacent NCC | wall (s) | flags |\n|---|---|---|---|---|---|---|---|")
    for row in out["runs"]:
        print(line(row))


def vnc(args) -> None:
    full = C.load_stack(args.data, C.VNC)[: args.sections]
    crop = args.crop
    case = C.make_case("vnc", full, crop, seed=args.seeds[0])
    methods = [m for m in ORDER if not args.methods or any(s in m for s in args.methods)]
    out = {"machine": C.machine_info(), "dataset": f"VNC stack 1 sections 0-{args.sections - 1}",
           "crop": crop, "misalignment": C.MISALIGNMENT, "seed": args.seeds[0], "runs": []}
    results = {}
    ident = np.zeros((args.sections, 2, crop, crop), np.float32)
    results["source as published (no misalignment)"] = {"d": ident, "valid": np.ones(
        (args.sections, crop, crop), bool), "seconds": 0.0, "flags": None,
        "case": C.untouched_case(case)}
    results["misaligned, not aligned"] = {"d": ident, "valid": np.ones_like(
        results["source as published (no misalignment)"]["valid"]), "seconds": 0.0,
        "flags": None}
    for name in methods:
        results[name] = run_method(name, case.mis)
        print(name, f"{results[name]['seconds']:.1f} s", flush=True)
    ok = [r for r in results.values() if r["d"] is not None]
    common_valid = np.logical_and.reduce([r["valid"] for r in ok])
    for name, r in results.items():
        row = {"method": name, "seconds": r["seconds"], "flags": r["flags"]}
        if r["d"] is None:
            row["error"] = r.get("error")
        else:
            ev_case = r.get("case", case)
            ev = C.evaluate(ev_case, r["d"], common_valid)
            own = C.evaluate(ev_case, r["d"], r["valid"])
            row.update({"adjacent_ncc_same_pixels": ev["adjacent_ncc"],
                        "pair_ncc_same_pixels": ev["pair_ncc"],
                        "adjacent_ncc_own_valid": own["adjacent_ncc"],
                        "endpoint": own["endpoint"]})
        out["runs"].append(row)
    out["common_valid_fraction"] = float(common_valid[1:].mean())
    C.save_json(args.output, out)
    print(f"\nVNC, {args.sections} sections, {crop}^2 crop; same pixels = "
          f"{out['common_valid_fraction']:.1%} of the crop")
    print("| method | adjacent NCC (same pixels) | endpoint median / p95 (px) | wall (s) |\n"
          "|---|---|---|---|")
    for row in out["runs"]:
        if "error" in row:
            print(f"| {row['method']} | {row['error']} | | |")
            continue
        print(f"| {row['method']} | {fmt(row['adjacent_ncc_same_pixels'], 3)} | "
              f"{fmt(row['endpoint']['median'])} / {fmt(row['endpoint']['p95'])} | "
              f"{row['seconds']:.1f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_data_arg(p)
    p.add_argument("--dataset", choices=["isbi", "vnc"], default="isbi")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--crop", type=int, default=None,
                   help="centre crop side (default 384 for ISBI, 512 for VNC)")
    p.add_argument("--sections", type=int, default=8, help="VNC sections")
    p.add_argument("--methods", nargs="*", default=None,
                   help="substrings of the method names to run (default: all)")
    p.add_argument("--output", default=None, help="JSON name under benchmarks/results/")
    args = p.parse_args(argv)
    if args.dataset == "isbi":
        args.crop = args.crop or 384
        args.output = args.output or "accuracy_isbi.json"
        isbi(args)
    else:
        args.crop = args.crop or 512
        args.output = args.output or "accuracy_vnc.json"
        vnc(args)


if __name__ == "__main__":
    main()
