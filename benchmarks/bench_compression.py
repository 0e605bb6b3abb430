"""What keeping the input's compression costs: the CLI on a zlib-compressed ISBI stack
(30 x 512^2 uint8) and on the VNC stack (20 x 1024^2 uint8), one joint and one block-wise
run each, with ``--compression input`` (zlib, the default for such a file) and ``none``.
Records the output's size on disk and the process' wall time.

    OMP_NUM_THREADS=2 python benchmarks/bench_compression.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tifffile

from common import ISBI, VNC, add_data_arg, code_version, finish, machine_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arg(ap)
    ap.add_argument("--out", default="compression_cpu.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in (ISBI, VNC):
            src = Path(args.data) / name
            if not src.is_file():
                sys.exit(f"error: {src} not found; pass the shared data folder with --data")
            packed = Path(tmp) / f"zlib_{name}"
            tifffile.imwrite(packed, tifffile.imread(src), compression="zlib")
            for mode, extra in (("joint", []), ("blocks of 8", ["--block-size", "8"])):
                for choice in ("input", "none"):
                    out = Path(tmp) / "out.tif"
                    cmd = [sys.executable, "-m", "napari_ssemnet.cli", "align", str(packed),
                           "-o", str(out), "--device", "cpu", "--compression", choice, "-q",
                           *extra]
                    t0 = time.perf_counter()
                    subprocess.run(cmd, check=True, capture_output=True)
                    wall = time.perf_counter() - t0
                    row = {"stack": name, "mode": mode, "compression": choice,
                           "input_mb": packed.stat().st_size / 1e6,
                           "source_mb": src.stat().st_size / 1e6,
                           "output_mb": out.stat().st_size / 1e6, "wall_s": wall}
                    print(f"{name[:4]} {mode:12s} {choice:6s} input {row['input_mb']:6.1f} MB"
                          f" output {row['output_mb']:6.1f} MB  {wall:6.1f} s", flush=True)
                    rows.append(row)
                    out.unlink()
    finish(args.out, {"code": code_version(), "machine": machine_info(), "rows": rows})


if __name__ == "__main__":
    main()
