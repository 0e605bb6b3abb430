"""A small NCC-vs-section plot drawn with QPainter (no plotting dependency)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from qtpy.QtCore import QPointF, QRectF, QSize, Qt, Signal
from qtpy.QtGui import QColor, QFont, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

BEFORE_COLOR = QColor(150, 150, 150)
AFTER_COLOR = QColor(255, 160, 40)
CURRENT_COLOR = QColor(90, 170, 255)
FLAG_COLOR = QColor(230, 60, 60)
NO_DATA_TEXT = "no alignment yet"
HEADER = 20
"""Pixels above the plot frame for the current section's readout and the legend."""


class NccPlot(QWidget):
    """Adjacent-section NCC before (grey) and after (orange) alignment, per section.

    The current slice is marked with a blue line; flagged sections with red ticks. Clicking
    the plot emits :attr:`section_clicked` with the nearest section index.
    """

    section_clicked = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.before = np.zeros(0)
        self.after = np.zeros(0)
        self.flags: list[str] = []
        self.empty_text = NO_DATA_TEXT
        self.current: int | None = None
        # 130 px when there is room, down to 90 when the dock area is short (the Apply
        # panel open on a small screen): a fixed height made the panel overlap itself
        self.setMinimumHeight(90)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Maximum)
        self.setToolTip("Mean NCC (normalised cross-correlation: 1 for identical images, 0 for "
                        "unrelated ones) of each section with its neighbours: grey before, "
                        "orange after alignment. Real neighbouring sections differ, so about "
                        "0.3-0.4 after alignment is usual for ssTEM: compare a section with "
                        "its neighbours, not with 1. Red ticks mark flagged sections; the "
                        "line above the plot names the flag. Click to jump to a section.")

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt API
        return QSize(super().sizeHint().width(), 130)

    def set_data(self, before: Sequence[float | None] | None,
                 after: Sequence[float | None] | None, flags: Sequence[str] | None = None,
                 *, empty_text: str = NO_DATA_TEXT) -> None:
        """Show new curves (None / NaN entries leave gaps); ``empty_text`` is shown when
        there are none."""
        self.before = _arr(before)
        self.after = _arr(after)
        self.flags = list(flags or [])
        self.empty_text = empty_text
        self.update()

    def set_current(self, z: int | None) -> None:
        """Mark section ``z``."""
        if z != self.current:
            self.current = z
            self.update()

    def n_sections(self) -> int:
        return max(self.before.size, self.after.size, len(self.flags))

    # -- drawing -------------------------------------------------------------------

    def _plot_rect(self) -> QRectF:
        # the strip above the frame holds the readout and the legend, clear of the curves
        return QRectF(34, HEADER, max(10, self.width() - 42), max(10, self.height() - HEADER - 18))

    def _x(self, z: float, rect: QRectF) -> float:
        n = self.n_sections()
        if n <= 1:
            return rect.center().x()
        return rect.left() + rect.width() * z / (n - 1)

    def _y_range(self) -> tuple[float, float]:
        vals = np.concatenate([self.before, self.after])
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            return 0.0, 1.0
        lo, hi = float(vals.min()), float(vals.max())
        lo = math.floor(lo * 10) / 10
        hi = math.ceil(hi * 10) / 10
        if hi - lo < 0.1:
            hi = lo + 0.1
        return lo, hi

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        pal = self.palette()
        p.fillRect(self.rect(), pal.base())
        text = pal.text().color()
        font = QFont(p.font())
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.85))
        p.setFont(font)
        rect = self._plot_rect()
        n = self.n_sections()
        lo, hi = self._y_range()
        p.setPen(QPen(text, 1))
        p.drawRect(rect)
        p.drawText(QRectF(0, rect.top() - 4, 32, 14), Qt.AlignRight, f"{hi:.1f}")
        p.drawText(QRectF(0, rect.bottom() - 10, 32, 14), Qt.AlignRight, f"{lo:.1f}")
        p.save()
        p.translate(9, rect.center().y())
        p.rotate(-90)
        p.drawText(QRectF(-20, -8, 40, 14), Qt.AlignCenter, "NCC")
        p.restore()
        if n == 0:
            p.drawText(rect.adjusted(4, 0, -4, 0), Qt.AlignCenter | Qt.TextWordWrap,
                       self.empty_text)
            p.end()
            return
        p.drawText(QRectF(rect.left(), rect.bottom() + 2, 40, 14), Qt.AlignLeft, "0")
        p.drawText(QRectF(rect.right() - 60, rect.bottom() + 2, 60, 14), Qt.AlignRight,
                   f"{n - 1}")
        p.drawText(QRectF(rect.left(), rect.bottom() + 2, rect.width(), 14), Qt.AlignCenter,
                   "section")

        def y_of(v: float) -> float:
            return rect.bottom() - rect.height() * (v - lo) / (hi - lo)

        for values, color in ((self.before, BEFORE_COLOR), (self.after, AFTER_COLOR)):
            path = QPainterPath()
            pen_down = False
            for i, v in enumerate(values):
                if not np.isfinite(v):
                    pen_down = False
                    continue
                pt = QPointF(self._x(i, rect), y_of(v))
                if pen_down:
                    path.lineTo(pt)
                else:
                    path.moveTo(pt)
                    pen_down = True
            p.setPen(QPen(color, 2))
            p.drawPath(path)
            if values.size <= 64:
                p.setBrush(color)
                for i, v in enumerate(values):
                    if np.isfinite(v):
                        p.drawEllipse(QPointF(self._x(i, rect), y_of(v)), 2.0, 2.0)
                p.setBrush(Qt.NoBrush)
        if self.current is not None and 0 <= self.current < n:
            x = self._x(self.current, rect)
            p.setPen(QPen(CURRENT_COLOR, 1.5, Qt.DashLine))
            p.drawLine(QPointF(x, rect.top()), QPointF(x, rect.bottom()))
            p.setPen(QPen(text, 1))
            room = rect.width() - 100
            p.drawText(QRectF(rect.left(), 2, room, 14), Qt.AlignLeft,
                       p.fontMetrics().elidedText(self.readout(), Qt.ElideRight, int(room)))
        # over the current-section line, which hid the tick of the section being looked at
        for i, flag in enumerate(self.flags):
            if flag:
                p.setPen(QPen(FLAG_COLOR, 3))
                x = self._x(i, rect)
                p.drawLine(QPointF(x, rect.bottom()), QPointF(x, rect.bottom() - 10))
        # legend
        p.setPen(QPen(BEFORE_COLOR, 2))
        p.drawText(QRectF(rect.right() - 100, 2, 48, 14), Qt.AlignRight, "before")
        p.setPen(QPen(AFTER_COLOR, 2))
        p.drawText(QRectF(rect.right() - 48, 2, 48, 14), Qt.AlignRight, "after")
        p.end()

    def readout(self) -> str:
        """The line above the plot: the current section, its flag, its NCC before and after
        (the flag first: a narrow panel cuts the end of the line off)."""
        z = self.current
        if z is None or not 0 <= z < self.n_sections():
            return ""
        label = f"z={z}"
        if z < len(self.flags) and self.flags[z]:
            label += f" {self.flags[z]}"
        found = {name: values[z] for name, values in (("before", self.before),
                                                       ("after", self.after))
                 if z < values.size and np.isfinite(values[z])}
        if len(found) == 2:
            return label + f": NCC {found['before']:.3f} → {found['after']:.3f}"
        return label + "".join(f": {k} {v:.3f}" for k, v in found.items())

    def mousePressEvent(self, event) -> None:  # noqa: N802 - Qt API
        n = self.n_sections()
        if n == 0:
            return
        rect = self._plot_rect()
        pos = event.pos()
        frac = (pos.x() - rect.left()) / max(rect.width(), 1)
        z = int(round(min(max(frac, 0.0), 1.0) * (n - 1)))
        self.section_clicked.emit(z)


def _arr(values: Sequence[float | None] | None) -> np.ndarray:
    if values is None:
        return np.zeros(0)
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)
