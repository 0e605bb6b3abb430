"""Fixtures for the Qt tests (run under ``xvfb-run -a pytest tests/gui``).

``make_napari_viewer`` and ``qtbot`` come from napari's and pytest-qt's pytest plugins,
which register themselves through entry points.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, shift

# Small and quick: 2 CPU cores should run an alignment in a few seconds.
FAST = {"levels": 1, "iterations": 15, "grid_spacing": 32, "features": "pixels",
        "prealign": "translation", "device": "cpu"}


def make_stack(z: int = 4, size: int = 96, seed: int = 0, offset: float = 3.0) -> np.ndarray:
    """Blobby EM-like sections, each shifted by a few pixels against the previous one."""
    rng = np.random.default_rng(seed)
    base = gaussian_filter(rng.normal(size=(size + 32, size + 32)), 3.0)
    base += 0.5 * gaussian_filter(rng.normal(size=base.shape), 1.0)
    sections = []
    for k in range(z):
        drift = gaussian_filter(rng.normal(size=base.shape), 3.0) * 0.3  # tissue changes
        moved = shift(base + drift, (offset * k, -offset * 0.5 * k), order=1, mode="reflect")
        sections.append(moved[16:16 + size, 16:16 + size])
    stack = np.stack(sections)
    stack = (stack - stack.min()) / (stack.max() - stack.min())
    return (stack * 255).astype(np.uint8)


@pytest.fixture
def stack() -> np.ndarray:
    return make_stack()


@pytest.fixture
def viewer_widget(make_napari_viewer):
    """A viewer with the "Align EM stack" widget docked from the plugin manifest."""
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-ssemnet", "Align EM stack")
    yield viewer, widget
    if widget.running:  # never leave a worker behind a closing viewer
        widget.cancel()
        widget.worker.await_workers(5000)


def set_fast(widget, **more) -> None:
    """Put the FAST parameters (plus ``more``) into the widget's generated form."""
    for name, value in {**FAST, **more}.items():
        widget.form.set_value(name, value)


def error_messages(since: int = 0) -> list[str]:
    """Error notifications napari received (after the first ``since`` records)."""
    from napari.utils.notifications import NotificationSeverity, notification_manager

    return [str(n.message) for n in notification_manager.records[since:]
            if n.severity == NotificationSeverity.ERROR]


def n_records() -> int:
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)


def run_and_wait(qtbot, widget, action, timeout: int = 60000) -> str:
    """Click ``action`` and wait for the job to end; returns the job state."""
    with qtbot.waitSignal(widget.job_finished, timeout=timeout) as blocker:
        action()
    return blocker.args[0]
