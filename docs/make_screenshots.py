"""Regenerate the screenshots in docs/images (run under a display, e.g. ``xvfb-run -a``).

    xvfb-run -a python docs/make_screenshots.py [--tif STACK.tif] [--out docs/images]

Opens the bundled sample (or a crop of ``--tif`` with a known misalignment added), runs the
"Align EM stack" widget with its defaults, and saves:

* ``widget.png``: the whole napari window with the dock widget after alignment;
* ``aligned_canvas.png``: the canvas with the aligned section, arrows and NCC error;
* ``before_canvas.png``: the same section before alignment.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def load_stack(tif: str | None) -> np.ndarray:
    if tif is None:
        from napari_ssemnet.core.sample import load_sample

        return load_sample(misaligned=True)
    import tifffile

    from napari_ssemnet.core.synth import apply_misalignment, random_misalignment

    src = tifffile.imread(tif)[:8, :256, :256]
    e = random_misalignment(src.shape, seed=3)
    return np.clip(apply_misalignment(src, e), 0, 255).astype(np.uint8)


def _close_toasts(viewer) -> None:
    """Close notification pop-ups so they do not cover the canvas."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tif", help="stack to crop and misalign instead of the bundled sample")
    ap.add_argument("--out", default=str(Path(__file__).parent / "images"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import os
    import tempfile

    # a throw-away settings file, so the change below does not touch the user's napari settings
    os.environ["NAPARI_CONFIG"] = str(Path(tempfile.mkdtemp()) / "settings.yaml")
    import napari
    from napari.settings import get_settings
    from qtpy.QtCore import QEventLoop, QTimer

    # keep toasts (e.g. backend deprecation notices) off the screenshots
    get_settings().application.gui_notification_level = "none"
    stack = load_stack(args.tif)
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 1000)
    if args.tif is None:  # as a user opens it (File > Open Sample), with its voxel size
        viewer.open_sample("napari-ssemnet", "em_misaligned")
    else:
        viewer.add_image(stack, name="EM stack (misaligned)")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-ssemnet", "Align EM stack")
    z_show = min(3, stack.shape[0] - 1)
    viewer.dims.set_current_step(0, z_show)
    for _ in range(5):
        napari.qt.get_qapp().processEvents()
        time.sleep(0.05)
    viewer.reset_view()
    viewer.screenshot(str(out / "before_canvas.png"), canvas_only=True, flash=False)

    loop = QEventLoop()
    widget.job_finished.connect(lambda state: loop.quit())
    t0 = time.perf_counter()
    widget.align()
    QTimer.singleShot(600_000, loop.quit)
    loop.exec_()
    print(f"alignment of {stack.shape} took {time.perf_counter() - t0:.1f} s: "
          f"{widget.last_outcome}; {widget.status.text()}")
    viewer.dims.set_current_step(0, z_show)
    widget.form.advanced.expand(animate=False)
    for _ in range(10):
        napari.qt.get_qapp().processEvents()
        time.sleep(0.05)
    viewer.reset_view()
    _close_toasts(viewer)
    napari.qt.get_qapp().processEvents()
    viewer.screenshot(str(out / "aligned_canvas.png"), canvas_only=True, flash=False)
    viewer.screenshot(str(out / "widget.png"), canvas_only=False, flash=False)
    viewer.close()


if __name__ == "__main__":
    main()
