"""Time a full run and a Re-align of one section with and without sampling the held sections
once per level (``core.fit.SAMPLE_HELD_ONCE``).

    OMP_NUM_THREADS=2 python benchmarks/bench_realign.py
    OMP_NUM_THREADS=2 python benchmarks/bench_realign.py --point isbi:8 --section 3

Each setting runs in a fresh process, in its main thread: a whole-stack run of the shared
stack as published (default parameters, seed 0), then ``align_section`` of one section from
that run's field (what the widget's Re-align does). Records the fit and total times of both
and how far the two settings' fields are apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def one_point(data: Path, dataset: str, n: int, z: int, once: bool, save: Path) -> dict:
    from napari_ssemnet import AlignParams
    from napari_ssemnet.core import fit
    from napari_ssemnet.core.align import align_section, align_stack

    fit.SAMPLE_HELD_ONCE = once
    stack = C.load_stack(data, C.ISBI if dataset == "isbi" else C.VNC)[:n]
    params = AlignParams(seed=0)
    r = align_stack(stack, params=params)
    t0 = time.perf_counter()
    s = align_section(stack, z, params, previous_displacement=r.displacement)
    section_s = time.perf_counter() - t0
    np.savez(save, full=r.displacement, section=s.displacement)
    return {"dataset": dataset, "sections": n, "size": stack.shape[1], "section": z,
            "sample_held_once": once, "full_total_s": round(r.timings["total"], 2),
            "full_fit_s": round(r.timings["fit"], 2), "realign_s": round(section_s, 2),
            "saved": str(save)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_data_arg(parser)
    parser.add_argument("--point", default="vnc:8", help="dataset:sections (default: %(default)s)")
    parser.add_argument("--section", type=int, default=4)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        dataset, n, once = args.one.split(":")
        print("RESULT " + json.dumps(one_point(args.data, dataset, int(n), args.section,
                                               once == "1", args.save)))
        return
    rows = []
    tmp = Path(tempfile.mkdtemp())
    for once in ("0", "1"):
        row, err = C.run_child([sys.executable, __file__, "--data", str(args.data),
                                "--section", str(args.section), "--save", str(tmp / f"{once}.npz"),
                                "--one", f"{args.point}:{once}"])
        if row is None:
            print(f"{args.point} once={once}: {err}")
            return
        rows.append(row)
        print(json.dumps(row), flush=True)
    a, b = np.load(tmp / "0.npz"), np.load(tmp / "1.npz")
    apart = {k: float(np.abs(a[k] - b[k]).max()) for k in ("full", "section")}
    print(f"largest difference between the settings (px): {apart}")
    path = C.finish("realign_cpu.json", {"machine": C.machine_info(), "rows": rows,
                                          "max_abs_difference_px": apart})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
