"""A bad section in the chain: sections out of order, a section from elsewhere, runs of two
and three lost (blank) sections, on 8 ISBI sections (256^2 crop) with the benchmark's known
misalignment.

The pre-alignment places each section from its nearest placed neighbours towards the
reference, so a wrong match there moves every later section with it. Scored per section as
the benchmark scores consistency (median px against our run on the untouched crop; for the
swap, the truth and the untouched run are swapped too), with the flags each section gets:
every section that ends far off should be flagged.

    python benchmarks/bench_chain.py [--seeds 1 2] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import tifffile

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

CASES = ("baseline", "swap34", "foreign4", "blank2", "blank3")
SWAP = [0, 1, 2, 4, 3, 5, 6, 7]


def per_section(case, d: np.ndarray, c: np.ndarray) -> list[float]:
    t, _ = total_map(case, d)
    r = np.hypot(t[:, 0] - c[:, 0], t[:, 1] - c[:, 1])
    return [float(np.median(r[z])) for z in range(d.shape[0])]


def main() -> None:
    from napari_ssemnet import align_stack

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arg(ap)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="chain_isbi.json")
    args = ap.parse_args()
    machine = machine_info()  # before the runs: their load average is the machine's
    full = load_stack(args.data, ISBI)[:8]
    stranger = tifffile.imread(args.data / VNC, key=5)[300:556, 300:556]  # another animal
    rows = []
    for seed in args.seeds:
        base = make_case("c", full, 256, seed=seed)
        c_run = align_stack(base.clean, device="cpu").displacement
        for name in CASES:
            stack, case, ref, bad = base.mis.copy(), base, c_run, ()
            if name == "swap34":
                stack, case, ref = stack[SWAP], copy.copy(base), c_run[SWAP]
                case.full, case.e_full = base.full[SWAP], base.e_full[SWAP]
            elif name == "foreign4":
                stack[4], bad = stranger, (4,)
            elif name == "blank2":
                stack[3:5], bad = 0, (3, 4)
            elif name == "blank3":
                stack[3:6], bad = 0, (3, 4, 5)
            t0 = time.perf_counter()
            r = align_stack(stack, device="cpu")
            secs = time.perf_counter() - t0
            err = per_section(case, r.displacement, ref)
            off = [z for z in range(8) if z not in bad and err[z] > 10.0]
            silent = [z for z in off if not r.flags[z]]
            rows.append({"seed": seed, "case": name, "seconds": round(secs, 1),
                         "per_section": [None if z in bad else round(v, 1)
                                         for z, v in enumerate(err)],
                         "flags": list(r.flags), "off_by_10px": off, "off_unflagged": silent})
            print(f"seed {seed} {name:9s} {rows[-1]['per_section']} flags {r.flags} "
                  f"off>10px {off} unflagged {silent}", flush=True)
    finish(args.out, {"code": code_version(), "machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
