"""Align a large shared stack from the napari dock widget, in its worker thread or in a child
process (run under Xvfb).

    xvfb-run -a python benchmarks/bench_gui_large.py
    xvfb-run -a python benchmarks/bench_gui_large.py --points vnc:8 --settings 0 auto

Each (stack, setting) runs in a fresh napari session: the stack as published (uint8) is
added as a layer, Align is pressed once with the default parameters and the window is left
alone; a 10 ms QTimer on the GUI thread records how long the event loop could not react.
``--settings`` are values of ``NAPARI_SSEMNET_PROCESS`` (``0``: the worker thread, ``auto``:
a child process for large stacks, ``1``: always). Records the wall time from the press to
the finished result layers, the core's own total, the tick gaps, the napari process's peak
resident set and that of its children, and a digest of the displacement. Writes
``benchmarks/results/gui_large.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def one_point(data: Path, dataset: str, n: int) -> dict:
    import numpy as np
    import tifffile

    os.environ["NAPARI_CONFIG"] = str(Path(tempfile.mkdtemp()) / "settings.yaml")
    import napari
    from napari.settings import get_settings

    from napari_ssemnet.core.process import use_process

    get_settings().application.gui_notification_level = "none"
    stack = tifffile.imread(data / (C.ISBI if dataset == "isbi" else C.VNC))[:n]
    viewer = napari.Viewer(show=True)
    viewer.add_image(stack, name="EM stack")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-ssemnet", "Align EM stack")
    app = napari.qt.get_qapp()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    in_child = use_process(stack.shape)
    wall, gaps = C.timed_align(widget, lambda n: None, 900_000)
    result = widget.results.get("EM stack")
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = {"dataset": dataset, "sections": n, "size": int(stack.shape[1]),
           "setting": os.environ.get("NAPARI_SSEMNET_PROCESS", "auto"),
           "in_child_process": in_child, "outcome": widget.last_outcome,
           "wall_s": round(wall, 2),
           "core_total_s": None if result is None else round(result.timings["total"], 2),
           "tick_gap_ms": {"median": round(float(np.median(gaps)), 1),
                           "p99": round(float(np.percentile(gaps, 99)), 1),
                           "max": round(float(gaps.max()), 1), "n": int(gaps.size)},
           "napari_peak_rss_mb": own.ru_maxrss // 1024,
           "child_peak_rss_mb": kids.ru_maxrss // 1024 if in_child else None,
           "displacement_digest": None if result is None else C.digest(result.displacement)}
    viewer.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_data_arg(parser)
    parser.add_argument("--points", nargs="+", default=["vnc:20"],
                        help="dataset:sections (default: %(default)s)")
    parser.add_argument("--settings", nargs="+", default=["0", "auto"],
                        help="values of NAPARI_SSEMNET_PROCESS (default: %(default)s)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        dataset, n = args.one.split(":")
        print("RESULT " + json.dumps(one_point(args.data, dataset, int(n))), flush=True)
        os._exit(0)  # napari's teardown can crash on software OpenGL (docs/widget.md)
    rows = []
    for point in args.points:
        for setting in args.settings:
            env = {**os.environ, "NAPARI_SSEMNET_PROCESS": setting}
            proc = subprocess.run([sys.executable, __file__, "--data", str(args.data),
                                   "--one", point], capture_output=True, text=True, env=env)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not found:
                print(f"{point} {setting}: failed\n{proc.stderr[-2000:]}")
                continue
            rows.append(json.loads(found[-1][len("RESULT "):]))
            print(json.dumps(rows[-1]), flush=True)
    path = C.finish("gui_large.json", {"machine": C.machine_info(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
