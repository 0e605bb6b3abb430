"""Do sections that end far off get a flag? Damaged and misplaced sections on 8 ISBI
sections with the benchmark's known misalignment, at two crop sizes and two references.

Cases: the misaligned crop as is (``clean``), the hard case (section 3 blank, gain jitter,
noise), a tear from a corner of section 3 (29 %, black), a fold in section 3 (the lower
half moved up by 30 px with a dark band at the seam, as tissue squeezed into a fold), and
with reference 0 only: sections 3 and 4 swapped, section 4 from another animal (VNC), and
section 4 turned by 90 deg. Each section is scored as bench_chain scores it (median px
against our run on the untouched crop with the same reference); a section more than 10 px
off with no flag is a silent failure, a flagged section within 5 px a false alarm.

``--part intact`` runs stacks with no damaged section instead (ISBI 6 x 384^2 seeds 0-15
with and without the hard case, VNC 8 x 512^2 seeds 0-3 likewise, 30 ISBI sections at
384^2 misaligned and untouched, and the shipped sample), for the false alarms of the check
of the links after the fit. Both parts record each run's pair NCCs after alignment as
ratios of its yardstick (``core.align.link_yardstick``), the numbers behind
``POOR_MATCH_RATIO`` and ``GAP_MATCH_RATIO``.

    OMP_NUM_THREADS=2 python benchmarks/bench_damage_flags.py [--part damage|intact|both]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import tifffile

from bench_defects import pie
from common import (
    ISBI,
    VNC,
    add_data_arg,
    code_version,
    finish,
    load_stack,
    machine_info,
    make_case,
    total_map,
)

SWAP = [0, 1, 2, 4, 3, 5, 6, 7]
HARD = {"gain_jitter": 0.2, "noise": 0.1, "blank": 3}


def fold(section: np.ndarray, band: int = 30) -> np.ndarray:
    """``section`` with its lower half moved up by ``band`` px (the bottom filled black) and
    a dark seam where the tissue folded."""
    out = section.copy()
    h = section.shape[0]
    y0 = h // 2
    out[y0:h - band] = section[y0 + band:]
    out[h - band:] = 0
    out[y0:y0 + 6] = section.min()
    return out


def cases(base, hard, stranger: np.ndarray, c_run: np.ndarray, ref: int) -> dict:
    """name -> (stack, case to score against, untouched field, sections not scored)."""
    out = {"clean": (base.mis.copy(), base, c_run, ()),
           "hard": (hard.mis.copy(), hard, c_run, (3,))}
    s = base.mis.copy()
    s[3][pie(s.shape, 3)[3]] = 0
    out["tear3"] = (s, base, c_run, ())
    s = base.mis.copy()
    s[3] = fold(s[3])
    out["fold3"] = (s, base, c_run, ())
    if ref == 0:
        swapped = copy.copy(base)
        swapped.full, swapped.e_full = base.full[SWAP], base.e_full[SWAP]
        out["swap34"] = (base.mis[SWAP].copy(), swapped, c_run[SWAP], ())
        s = base.mis.copy()
        s[4] = stranger
        out["foreign4"] = (s, base, c_run, (4,))
        s = base.mis.copy()
        s[4] = np.rot90(s[4])
        out["rot90_4"] = (s, base, c_run, (4,))
    return out


def link_ratios(r) -> dict[str, float]:
    """The run's pair NCCs after alignment over its yardstick, by "a-b"."""
    from napari_ssemnet.core import align

    if not hasattr(align, "link_yardstick"):  # code from before the check (a "before" run)
        return {}
    y = align.link_yardstick(r.pair_ncc)
    return {f"{a}-{b}": (round(v / y, 3) if y else None) for (a, b), v in r.pair_ncc.items()}


def intact(args) -> list[dict]:
    """Runs on stacks without a damaged section: which sections get flagged, and how low
    their pairs go against the yardstick."""
    from napari_ssemnet import align_stack
    from napari_ssemnet.core.sample import load_sample

    isbi, vnc = load_stack(args.data, ISBI), load_stack(args.data, VNC)
    stacks = [("sample", load_sample()),
              ("isbi 30 x 384 misaligned", make_case("c", isbi, 384, seed=0).mis),
              ("isbi 30 x 384 untouched", make_case("c", isbi, 384, seed=0).clean)]
    for seed in range(4):
        stacks.append((f"vnc 8 x 512 seed {seed}", make_case("c", vnc[:8], 512, seed=seed).mis))
        stacks.append((f"vnc 8 x 512 hard seed {seed}",
                       make_case("h", vnc[:8], 512, seed=seed, **HARD).mis))
    for seed in range(16):
        stacks.append((f"isbi 6 x 384 seed {seed}", make_case("c", isbi[:6], 384, seed=seed).mis))
        stacks.append((f"isbi 6 x 384 hard seed {seed}",
                       make_case("h", isbi[:6], 384, seed=seed, **HARD).mis))
    rows = []
    for name, stack in stacks:
        r = align_stack(stack, device="cpu")
        ratios = link_ratios(r)
        adjacent = [v for k, v in ratios.items() if int(k.split("-")[1]) - int(k.split("-")[0])
                    == 1]
        gaps = [v for k, v in ratios.items() if int(k.split("-")[1]) - int(k.split("-")[0]) > 1]
        adjacent = [v for v in adjacent if v is not None]  # None: no yardstick
        gaps = [v for v in gaps if v is not None]
        low, low_gap = min(adjacent, default=None), min(gaps, default=None)
        rows.append({"stack": name, "flags": list(r.flags), "link_ratios": ratios,
                     "lowest_adjacent": low, "lowest_gap": low_gap,
                     "poor_match": [z for z, f in enumerate(r.flags) if f == "poor_match"]})
        print(f"{name:28s} lowest adjacent {low} gap {low_gap} "
              f"flags {[f or '-' for f in r.flags]}", flush=True)
    return rows


def main() -> None:
    from napari_ssemnet import align_stack

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arg(ap)
    ap.add_argument("--part", choices=("damage", "intact", "both"), default="both")
    ap.add_argument("--crops", type=int, nargs="+", default=[256, 320])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--refs", type=int, nargs="+", default=[0, 4])
    ap.add_argument("--out", default="damage_flags_isbi.json")
    args = ap.parse_args()
    machine = machine_info()  # before the runs: their load average is the machine's
    full = load_stack(args.data, ISBI)[:8]
    rows = []
    if args.part == "intact":
        args.crops = []  # no damaged cases
    for crop in args.crops:
        stranger = tifffile.imread(args.data / VNC, key=5)[300:300 + crop, 300:300 + crop]
        for seed in args.seeds:
            for ref in args.refs:
                base = make_case("c", full, crop, seed=seed, reference=ref)
                hard = make_case("h", full, crop, seed=seed, reference=ref, **HARD)
                c_run = align_stack(base.clean, device="cpu", reference=ref).displacement
                for name, (stack, case, c, bad) in cases(base, hard, stranger, c_run,
                                                         ref).items():
                    t0 = time.perf_counter()
                    r = align_stack(stack, device="cpu", reference=ref)
                    secs = time.perf_counter() - t0
                    t, _ = total_map(case, r.displacement)
                    e = np.hypot(t[:, 0] - c[:, 0], t[:, 1] - c[:, 1])
                    err = [None if z in bad else round(float(np.median(e[z])), 1)
                           for z in range(8)]
                    silent = [z for z, v in enumerate(err) if v is not None and v > 10
                              and not r.flags[z]]
                    alarm = [z for z, v in enumerate(err) if v is not None and v < 5
                             and r.flags[z]]
                    rows.append({"crop": crop, "seed": seed, "reference": ref, "case": name,
                                 "per_section": err, "flags": list(r.flags),
                                 "replaced_unflagged": [z for z in bad if not r.flags[z]
                                                        and name != "hard"],
                                 "link_ratios": link_ratios(r),
                                 "off_unflagged": silent, "flagged_within_5px": alarm,
                                 "seconds": round(secs, 1)})
                    print(f"{crop} seed {seed} ref {ref} {name:8s} {err} "
                          f"{[f or '-' for f in r.flags]} silent {silent} alarm {alarm}",
                          flush=True)
    n_silent = sum(len(r["off_unflagged"]) for r in rows)
    n_off = sum(sum(v is not None and v > 10 for v in r["per_section"]) for r in rows)
    n_alarm = sum(len(r["flagged_within_5px"]) for r in rows)
    n_replaced = sum(r["case"] in ("foreign4", "rot90_4") for r in rows)
    n_replaced_silent = sum(len(r["replaced_unflagged"]) for r in rows)
    print(f"{n_silent} of {n_off} sections more than 10 px off carry no flag; "
          f"{n_alarm} flagged sections are within 5 px; {n_replaced_silent} of {n_replaced} "
          "foreign or turned sections carry no flag")
    intact_rows = intact(args) if args.part != "damage" else []
    finish(args.out, {"code": code_version(), "machine": machine, "rows": rows,
                      "off_by_10px": n_off, "off_unflagged": n_silent,
                      "flagged_within_5px": n_alarm, "replaced_sections": n_replaced,
                      "replaced_unflagged": n_replaced_silent, "intact": intact_rows})


if __name__ == "__main__":
    main()
