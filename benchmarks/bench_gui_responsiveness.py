"""How long does the napari event loop stall while the dock widget aligns? (run under Xvfb)

    xvfb-run -a python benchmarks/bench_gui_responsiveness.py

Opens the shipped sample in a real napari window and presses Align ``--runs`` times while
the window is left alone (the first is what a newcomer waits for; it includes loading the
encoder and creating the result layers), then once more while a 10 ms QTimer on the GUI
thread moves the Z slider every tick. The gaps between ticks are the time the GUI could not
react. For comparison the same alignment runs in a plain Python thread with the viewer open
and idle. Prints and writes ``benchmarks/results/gui_responsiveness.json``: wall time from
the button press to the finished layers, the core's own timings, and the gap statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="Align presses without scrolling")
    args = ap.parse_args()
    load_before = os.getloadavg()
    os.environ["NAPARI_CONFIG"] = str(Path(tempfile.mkdtemp()) / "settings.yaml")
    import napari
    from napari.settings import get_settings

    from napari_ssemnet.core.sample import load_sample

    get_settings().application.gui_notification_level = "none"
    stack = load_sample(misaligned=True)
    viewer = napari.Viewer(show=True)
    viewer.add_image(stack, name="EM stack")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-ssemnet", "Align EM stack")
    app = napari.qt.get_qapp()
    for _ in range(10):
        app.processEvents()
        time.sleep(0.02)

    def press_align() -> float:
        return C.timed_align(widget, lambda n: None)[0]

    idle_runs = []
    for _ in range(args.runs):
        wall = press_align()
        timings = widget.results["EM stack"].timings
        idle_runs.append({"wall_s": round(wall, 2),
                          "timings_s": {k: round(v, 2) for k, v in timings.items()}})
        print(f"Align, window left alone: {wall:.2f} s (core: "
              + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()) + ")", flush=True)
        for _ in range(10):
            app.processEvents()
            time.sleep(0.02)

    import threading

    from napari_ssemnet import align_stack

    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("r", align_stack(stack)))
    t0 = time.perf_counter()
    thread.start()
    while thread.is_alive():
        app.processEvents()
        time.sleep(0.01)
    plain = {"wall_s": round(time.perf_counter() - t0, 2),
             "timings_s": {k: round(v, 2) for k, v in box["r"].timings.items()}}
    print(f"align_stack in a plain thread, viewer idle: {plain['wall_s']:.2f} s", flush=True)

    # the scrolling run starts as the first one did: only the source layer (more layers make
    # every redraw dearer)
    for layer in list(viewer.layers):
        if layer.name != "EM stack":
            viewer.layers.remove(layer)
            app.processEvents()  # one removal per draw: see docs/widget.md, "Known problems"
    widget.results.clear()
    for _ in range(10):
        app.processEvents()
        time.sleep(0.02)
    # interact like a user scrolling through the stack during the run
    wall, gaps = C.timed_align(
        widget, lambda n: viewer.dims.set_current_step(0, n % stack.shape[0]))
    load = os.getloadavg()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU used",
        "stack": list(stack.shape),
        "idle_runs": idle_runs,
        "plain_thread_viewer_idle": plain,
        "outcome": widget.last_outcome,
        "status": widget.status.text(),
        "scrolling_align_wall_s": round(wall, 2),
        "tick_gap_ms": {"median": float(np.median(gaps)), "p99": float(np.percentile(gaps, 99)),
                        "max": float(gaps.max()), "n": int(gaps.size)},
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load],
    }
    viewer.close()
    print(json.dumps(result, indent=1))
    out = ROOT / "benchmarks" / "results" / "gui_responsiveness.json"
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
