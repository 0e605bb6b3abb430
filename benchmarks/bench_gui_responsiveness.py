"""How long does the napari event loop stall while the dock widget aligns? (run under Xvfb)

    xvfb-run -a python benchmarks/bench_gui_responsiveness.py

Opens the shipped sample in a real napari window, presses Align, and meanwhile ticks a
10 ms QTimer on the GUI thread while moving the Z slider every tick. The gaps between ticks
are the time the GUI could not react. Prints the wall time of the run (the "newcomer to an
aligned sample" figure) and the gap statistics, and writes them to
``benchmarks/results/gui_responsiveness.json``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    os.environ["NAPARI_CONFIG"] = str(Path(tempfile.mkdtemp()) / "settings.yaml")
    import napari
    from napari.settings import get_settings
    from qtpy.QtCore import QEventLoop, QTimer

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

    ticks: list[float] = []

    def tick() -> None:
        ticks.append(time.perf_counter())
        # interact like a user scrolling through the stack during the run
        viewer.dims.set_current_step(0, len(ticks) % stack.shape[0])

    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    loop = QEventLoop()
    widget.job_finished.connect(lambda state: loop.quit())
    timer.start()
    t0 = time.perf_counter()
    widget.align()
    QTimer.singleShot(600_000, loop.quit)
    loop.exec_()
    wall = time.perf_counter() - t0
    timer.stop()
    gaps = np.diff(np.array(ticks)) * 1000.0
    load = os.getloadavg()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU used",
        "stack": list(stack.shape),
        "outcome": widget.last_outcome,
        "status": widget.status.text(),
        "align_wall_s": round(wall, 2),
        "tick_gap_ms": {"median": float(np.median(gaps)), "p99": float(np.percentile(gaps, 99)),
                        "max": float(gaps.max()), "n": int(gaps.size)},
        "load_avg_after": [round(x, 2) for x in load],
    }
    viewer.close()
    print(json.dumps(result, indent=1))
    out = ROOT / "benchmarks" / "results" / "gui_responsiveness.json"
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
