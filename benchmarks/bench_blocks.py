"""Memory and time of the command line, whole stack against block-wise (``--block-size``).

Builds a misaligned uint8 TIFF from the VNC raw stack (the benchmark misalignment of
``core.synth.random_misalignment`` on each full section; more sections than the data's 20
run back and forth through the stack, 0-19, 19-0, 0-19, ..., so that neighbours stay real
neighbours, and such points are for time and memory only), then runs
``napari-ssemnet align IN.tif -o OUT.tif --fields FIELDS.npz [--block-size B]`` in a fresh
child process per point. The child samples ``/proc/self/status`` every 10 ms: ``RssAnon``
(memory the process itself holds: what the memory check and an out-of-memory kill are about)
and ``RssFile`` (pages of the memory-mapped input and outputs, which the kernel can drop or
write back). Linux only.

    OMP_NUM_THREADS=2 python benchmarks/bench_blocks.py
    OMP_NUM_THREADS=2 python benchmarks/bench_blocks.py --points 16:0 16:8 64:8

``--apply N`` times ``napari-ssemnet apply-fields`` against the API's
``apply_displacement`` (stack and fields read whole) on N x 1024^2.

``--seams B [B ...]`` measures what blocks cost in accuracy instead: all 30 ISBI sections
(384^2 crop) with the benchmark misalignment, aligned as one joint fit and in blocks of each B;
per section the consistency with the same variant's run on the untouched crop, and the
adjacent NCC, with the sections that start a block marked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

DEFAULT_POINTS = ["16:0", "16:8", "32:0", "32:8", "64:8"]  # SECTIONS:BLOCK_SIZE (0 = whole)


def _status_mb() -> tuple[float, float]:
    anon = file = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) / 1024
            elif line.startswith("RssFile:"):
                file = int(line.split()[1]) / 1024
    return anon, file


def make_input(data: Path, n: int, folder: Path, seed: int = 0) -> Path:
    """A misaligned (n, 1024, 1024) uint8 TIFF from the VNC raw stack."""
    from napari_ssemnet.core.io import write_stack
    from napari_ssemnet.core.synth import apply_misalignment, random_misalignment

    src = C.load_stack(data, C.VNC)
    reps = -(-n // src.shape[0])
    stack = np.concatenate([src if r % 2 == 0 else src[::-1] for r in range(reps)])[:n]
    e = random_misalignment(stack.shape, rotation_deg=4, shift_frac=0.06, scale=0.02,
                            shear=0.02, elastic_px=2, reference=0, seed=seed)
    mis = apply_misalignment(stack, e)
    path = folder / f"vnc_mis_{n}.tif"
    write_stack(path, np.clip(np.rint(mis), 0, 255).astype(np.uint8))
    return path


def measured(run) -> dict:
    """Call ``run()`` (returning an exit code) while sampling this process's memory."""
    peaks = {"anon": 0.0, "file": 0.0}
    running = [True]

    def sample() -> None:
        while running[0]:
            anon, file = _status_mb()
            peaks["anon"] = max(peaks["anon"], anon)
            peaks["file"] = max(peaks["file"], file)
            time.sleep(0.01)

    import torch  # noqa: F401 - counted in the baseline, as the CLI imports it anyway

    base_anon, base_file = _status_mb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    code = run()
    seconds = time.perf_counter() - t0
    running[0] = False
    sampler.join()
    if code:
        raise SystemExit(f"error: the command line exited with {code}")
    return {"seconds": seconds, "baseline_anon_mb": base_anon,
            "added_anon_mb": peaks["anon"] - base_anon, "peak_file_mb": peaks["file"],
            "baseline_file_mb": base_file}


def one_point(src: Path, block_size: int, out_dir: Path) -> dict:
    from napari_ssemnet import cli

    argv = ["align", str(src), "-o", str(out_dir / "aligned.tif"), "--fields",
            str(out_dir / "fields.npz"), "-q", "--device", "cpu"]
    if block_size:
        argv += ["--block-size", str(block_size)]
    row = measured(lambda: cli.main(argv))
    fields = np.load(out_dir / "fields.npz")
    return {"block_size": block_size, **row,
            "ncc_after_mean": float(np.nanmean(fields["ncc_after"])),
            "ncc_before_mean": float(np.nanmean(fields["ncc_before"])),
            "flags": [str(f) for f in fields["flags"] if f]}


def apply_point(src: Path, fields: Path, how: str, out_dir: Path) -> dict:
    """``apply-fields`` from the command line, or the API's ``apply_displacement`` on the
    stack and fields read whole."""
    from napari_ssemnet import cli

    if how == "cli":
        argv = ["apply-fields", str(fields), str(src), "-o", str(out_dir / "out.tif"), "-q"]
        return {"how": how, **measured(lambda: cli.main(argv))}

    def api() -> int:
        import tifffile

        from napari_ssemnet.core.io import apply_displacement, load_fields

        disp, _ = load_fields(fields)
        apply_displacement(tifffile.imread(src), disp)
        return 0

    return {"how": how, **measured(api)}


def bench_apply(data: Path, n: int, output: str) -> None:
    """apply-fields against the API on n x 1024^2 (a constant shift as the fields: the
    resampling does not depend on them)."""
    from napari_ssemnet.core.io import save_fields

    out = {"machine": C.machine_info(), "sections": n, "size": 1024, "points": []}
    print("| sections x 1024^2 | how | wall (s) | anonymous memory added (MB) | mapped file "
          "pages at peak (MB) |\n|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = make_input(data, n, Path(tmp))
        disp = np.zeros((n, 2, 1024, 1024), np.float32)
        disp[:, 0], disp[:, 1] = 2.5, -1.25
        fields = save_fields(Path(tmp) / "fields.npz", disp)
        del disp
        for how in ("cli", "api"):
            row, err = C.run_child([sys.executable, __file__, "--data", str(data),
                                    "--one-apply", str(src), str(fields), how])
            if row is None:
                print(f"| {n} | {how} | failed: {err} |", flush=True)
                out["points"].append({"how": how, "error": err})
                continue
            print(f"| {n} | {how} | {row['seconds']:.1f} | {row['added_anon_mb']:.0f} | "
                  f"{row['peak_file_mb']:.0f} |", flush=True)
            out["points"].append(row)
    C.finish(output, out)


def seams(data: Path, block_sizes: list[int], seed: int = 0, reference: int = 0) -> dict:
    """Consistency per section of joint and block-wise runs on ISBI 30 x 384^2, with
    ``reference`` as the aligners' reference and the section the misalignment leaves."""
    from napari_ssemnet.core.blocks import block_plan

    full = C.load_stack(data, C.ISBI)
    case = C.make_case("seams", full, 384, seed=seed, reference=reference)
    untouched = C.untouched_case(case)
    out: dict = {"sections": int(full.shape[0]), "crop": 384, "seed": seed,
                 "reference": reference, "variants": {}}
    print("| variant | consistency median / p95 (px) | at block starts: median of the "
          "per-section medians | elsewhere | adjacent NCC | s |\n|---|---|---|---|---|---|",
          flush=True)
    for b in [0, *block_sizes]:
        kw = {"block_size": b, "reference": reference} if b else {"reference": reference}
        c = C.run_ours(untouched.clean.copy(), **kw)
        r = C.run_ours(case.mis.copy(), **kw)
        ev = C.evaluate(case, r["d"], r["valid"], c=c["d"], c_valid=c["valid"])
        zs = [z for z in range(full.shape[0]) if z != reference]
        per = dict(zip(zs, ev["consistency_per_section"], strict=True))
        starts: list[int] = []
        if b:
            _, later = block_plan(full.shape[0], reference, b, 2)
            starts = [s if s > reference else e - 1 for s, e in later]  # next to done ones
        at = [per[z] for z in starts]
        rest = [v for z, v in per.items() if z not in starts]
        label = f"block_size={b}" if b else "joint"
        out["variants"][label] = {"consistency": ev["consistency"],
                                  "per_section": ev["consistency_per_section"],
                                  "sections": zs,
                                  "block_starts": starts, "adjacent_ncc": ev["adjacent_ncc"],
                                  "pair_ncc": ev["pair_ncc"], "seconds": r["seconds"]}
        print(f"| {label} | {ev['consistency']['median']:.2f} / "
              f"{ev['consistency']['p95']:.2f} | "
              f"{np.median(at) if at else float('nan'):.2f} | {np.median(rest):.2f} | "
              f"{ev['adjacent_ncc']:.3f} | {r['seconds']:.1f} |", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_data_arg(p)
    p.add_argument("--points", nargs="+", default=DEFAULT_POINTS,
                   help="SECTIONS:BLOCK_SIZE, 0 for the whole stack, e.g. 32:0 32:8")
    p.add_argument("--output", default="blocks_cpu.json", help="JSON under benchmarks/results/")
    p.add_argument("--seams", nargs="+", type=int, metavar="B",
                   help="accuracy along ISBI 30 x 384^2 for these block sizes instead")
    p.add_argument("--reference", type=int, default=0,
                   help="with --seams: the reference section (default 0)")
    p.add_argument("--apply", type=int, metavar="N",
                   help="time apply-fields against the API on N x 1024^2 instead")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--one-apply", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one_apply:
        src, fields, how = args.one_apply
        with tempfile.TemporaryDirectory() as tmp:
            print("RESULT " + json.dumps(apply_point(Path(src), Path(fields), how,
                                                     Path(tmp))))
        return
    if args.apply:
        bench_apply(args.data, args.apply,
                    args.output if args.output != "blocks_cpu.json" else "apply_cpu.json")
        return
    if args.seams:
        res = seams(args.data, args.seams, reference=args.reference)
        name = "blocks_seams_isbi.json" if args.reference == 0 else (
            f"blocks_seams_isbi_ref{args.reference}.json")
        C.save_json(args.output if args.output != "blocks_cpu.json" else name,
                    {"machine": C.machine_info(), **res})
        return
    if args.one:
        src, block = args.one
        with tempfile.TemporaryDirectory() as tmp:
            print("RESULT " + json.dumps(one_point(Path(src), int(block), Path(tmp))))
        return
    from napari_ssemnet.core.blocks import held_shape
    from napari_ssemnet.core.memory import estimate_peak_bytes

    out = {"machine": C.machine_info(), "points": []}
    print(f"load average before: {os.getloadavg()}", flush=True)
    print("| sections x 1024^2 | block size | wall (s) | s/section | anonymous memory added "
          "(MB) | estimate (MB) | mapped file pages at peak (MB) | NCC before / after |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        inputs: dict[int, Path] = {}
        for point in args.points:
            n, block = (int(v) for v in point.split(":"))
            if n not in inputs:
                inputs[n] = make_input(args.data, n, Path(tmp))
            row, err = C.run_child([sys.executable, __file__, "--data", str(args.data),
                                    "--one", str(inputs[n]), str(block)])
            if row is None:
                print(f"| {n} | {block} | failed: {err} |", flush=True)
                out["points"].append({"point": point, "error": err})
                continue
            held = held_shape(block, (n, 1024, 1024)) if block else (n, 1024, 1024)
            row.update(sections=n, size=1024,
                       estimate_mb=estimate_peak_bytes(held) / 2**20)
            print(f"| {n} | {block or 'whole'} | {row['seconds']:.1f} | "
                  f"{row['seconds'] / n:.2f} | {row['added_anon_mb']:.0f} | "
                  f"{row['estimate_mb']:.0f} | {row['peak_file_mb']:.0f} | "
                  f"{row['ncc_before_mean']:.3f} / {row['ncc_after_mean']:.3f} |", flush=True)
            out["points"].append(row)
            C.save_json(args.output, out)
    C.finish(args.output, out)


if __name__ == "__main__":
    main()
