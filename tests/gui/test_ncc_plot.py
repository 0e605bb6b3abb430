"""gui._ncc_plot: the per-section NCC plot under the Align panel's buttons."""

from __future__ import annotations

from napari_ssemnet.gui._ncc_plot import FLAG_COLOR, NccPlot


def test_the_current_sections_flag_is_named_and_its_tick_stays_visible(qtbot):
    plot = NccPlot()
    qtbot.addWidget(plot)
    plot.resize(300, 130)
    plot.set_data([0.1, 0.1, 0.2], [0.3, None, 0.35], flags=["", "blank", ""])
    plot.set_current(1)
    assert plot.readout() == "z=1 blank: before 0.100"
    plot.set_current(2)
    assert plot.readout() == "z=2: NCC 0.200 → 0.350"
    # the flag comes first: the line is cut to the room left of the legend, and on the
    # panel's plot "flagged: poor_match" was cut to "flagged: po"
    plot.set_data([0.1, -0.054], [0.3, 0.026], flags=["", "low_confidence"])
    plot.set_current(1)
    assert plot.readout().startswith("z=1 low_confidence: NCC -0.054 → 0.026")
    # on the section shown, the current-section line was drawn over the red tick and hid it
    plot.set_current(1)
    image = plot.grab().toImage()
    rect = plot._plot_rect()
    x, bottom = round(plot._x(1, rect)), round(rect.bottom())
    reds = [image.pixelColor(x + dx, bottom - dy) for dx in (-1, 0, 1) for dy in range(2, 9)]
    assert any(c.red() > 200 and c.green() < 100 and c.blue() < 100 for c in reds), FLAG_COLOR
    assert "normalised cross-correlation" in plot.toolTip()
