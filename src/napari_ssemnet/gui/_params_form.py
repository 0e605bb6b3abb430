"""A form of Qt controls generated from the fields of :class:`AlignParams`.

Names, defaults, limits, choices and tooltips all come from the dataclass metadata, so the
widget cannot drift from the CLI and the Python API.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from ..core.params import AlignParams, knobs

_INT_MAX = 2**31 - 1


def _label(f: dataclasses.Field) -> str:
    text = f.metadata.get("label") or f.name.replace("_", " ")
    return text[0].upper() + text[1:]


def _decimals(step: Any, default: Any, minimum: Any = None) -> int:
    """Decimals for a float spin box: one finer than the step, enough for the default and
    the minimum (Qt rounds the range to the shown decimals)."""

    return min(MAX_DECIMALS, max(2, _needed(step) + 1, _needed(default), _needed(minimum)))


MAX_DECIMALS = 10


def _needed(v: Any) -> int:
    """Decimals that show ``v`` (a float) exactly, at most :data:`MAX_DECIMALS`."""
    if not isinstance(v, float) or v == 0 or not math.isfinite(v):
        return 0
    text = f"{abs(v):.{MAX_DECIMALS}f}".rstrip("0")
    return len(text.split(".")[1]) if "." in text else 0


class _WeightsEdit(QWidget):
    """Line edit + browse button for the weights file path."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.edit = QLineEdit()
        self.edit.setPlaceholderText("(none)")
        self.browse = QPushButton("…")
        self.browse.setMaximumWidth(28)
        self.browse.setToolTip("Choose an encoder weights file (.pt).")
        self.browse.clicked.connect(self._choose)
        lay.addWidget(self.edit)
        lay.addWidget(self.browse)

    def _choose(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Encoder weights", self.edit.text(),
                                              "PyTorch weights (*.pt *.pth);;All files (*)")
        if path:
            self.edit.setText(path)


class ParamsForm(QWidget):
    """Editable :class:`AlignParams`.

    Basic knobs are shown directly, ``advanced`` ones in a collapsible "Advanced" group.
    ``reference`` gets a "use current slice" button (see :attr:`use_current_clicked`).

    Attributes
    ----------
    controls : dict of str to QWidget
        One control per field name.
    """

    changed = Signal()
    use_current_clicked = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controls: dict[str, QWidget] = {}
        self._fields = {f.name: f for f in knobs()}
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        basic = QFormLayout()
        basic.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
        outer.addLayout(basic)
        self.advanced = QCollapsible("Advanced")
        adv_body = QWidget()
        advanced = QFormLayout(adv_body)
        advanced.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
        self.advanced.addWidget(adv_body)
        outer.addWidget(self.advanced)
        self.advanced_form = advanced

        for f in knobs():
            control = self._make_control(f)
            self.controls[f.name] = control
            row: QWidget = control
            if f.name == "reference":
                assert isinstance(control, QSpinBox)
                self._reference_wish, self._clamping = control.value(), False
                self._reference_typed = False
                control.valueChanged.connect(lambda _=None: self._reference_edited())
                # typing the value already shown changes nothing, yet it is a choice; only
                # leaving the box (editingFinished comes on any focus loss) is not
                control.lineEdit().textEdited.connect(
                    lambda _text: setattr(self, "_reference_typed", True))
                control.editingFinished.connect(self._reference_typed_in)
                row = QWidget()
                lay = QHBoxLayout(row)
                lay.setContentsMargins(0, 0, 0, 0)
                self.use_current = QPushButton("use current slice")
                self.use_current.setToolTip("Set the reference to the slice shown in the viewer.")
                self.use_current.clicked.connect(self.use_current_clicked.emit)
                lay.addWidget(control, 1)
                lay.addWidget(self.use_current)
            label = QLabel(_label(f))
            label.setToolTip(f.metadata.get("help", ""))
            form = advanced if f.metadata.get("advanced") else basic
            form.addRow(label, row)
        self._update_weights_enabled()

    # -- construction --------------------------------------------------------------

    def _make_control(self, f: dataclasses.Field) -> QWidget:
        meta = f.metadata
        tip = meta.get("help", "")
        default = f.default
        control: QWidget
        if meta.get("choices"):
            control = QComboBox()
            control.addItems([str(c) for c in meta["choices"]])
            control.setCurrentText(str(default))
            control.currentTextChanged.connect(lambda _=None: self._on_changed())
        elif isinstance(default, bool):  # pragma: no cover - no bool knobs yet
            raise TypeError(f"bool knob {f.name} not supported")
        elif isinstance(default, int):
            control = QSpinBox()
            control.setRange(int(meta["min"]) if meta.get("min") is not None else -_INT_MAX,
                             int(meta["max"]) if meta.get("max") is not None else _INT_MAX)
            if meta.get("step"):
                control.setSingleStep(int(meta["step"]))
            control.setValue(default)
            control.valueChanged.connect(lambda _=None: self._on_changed())
        elif isinstance(default, float):
            control = QDoubleSpinBox()
            control.setDecimals(_decimals(meta.get("step"), default, meta.get("min")))
            control.setProperty("base_decimals", control.decimals())
            control.setRange(float(meta["min"]) if meta.get("min") is not None else -1e12,
                             float(meta["max"]) if meta.get("max") is not None else 1e12)
            if meta.get("step"):
                control.setSingleStep(float(meta["step"]))
            control.setValue(default)
            control.valueChanged.connect(lambda _=None: self._on_changed())
        elif f.name == "weights":
            control = _WeightsEdit()
            control.edit.setText(default)
            control.edit.textChanged.connect(lambda _=None: self._on_changed())
            control.edit.setToolTip(tip)
        else:
            control = QLineEdit(str(default))
            control.textChanged.connect(lambda _=None: self._on_changed())
        control.setToolTip(tip)
        control.setObjectName(f"ssemnet_{f.name}")
        return control

    def _on_changed(self) -> None:
        self._update_weights_enabled()
        self.changed.emit()

    def _update_weights_enabled(self) -> None:
        custom = self.value("features") == "custom"
        self.controls["weights"].setEnabled(custom)

    # -- values --------------------------------------------------------------------

    def value(self, name: str) -> Any:
        """Current value of the control for field ``name``."""
        c = self.controls[name]
        if isinstance(c, QComboBox):
            return c.currentText()
        if isinstance(c, QSpinBox | QDoubleSpinBox):
            return c.value()
        if isinstance(c, _WeightsEdit):
            return c.edit.text().strip()
        return c.text()

    def set_value(self, name: str, value: Any) -> None:
        """Set the control for field ``name`` (clamped by the control's limits)."""
        c = self.controls[name]
        if isinstance(c, QComboBox):
            c.setCurrentText(str(value))
        elif isinstance(c, QSpinBox):
            c.setValue(int(value))
            if name == "reference":  # a choice, even of the value shown or a clamped one
                self._reference_wish = max(0, int(value))
        elif isinstance(c, QDoubleSpinBox):
            # as many decimals as the value needs (0.0015 shown with 2 became 0.0), and back
            # to the box's own for a plain value
            c.setDecimals(max(int(c.property("base_decimals") or 2), _needed(float(value))))
            c.setValue(float(value))
        elif isinstance(c, _WeightsEdit):
            c.edit.setText(str(value))
        else:
            c.setText(str(value))

    def values(self) -> dict[str, Any]:
        """All field values as a dict (not validated)."""
        return {name: self.value(name) for name in self.controls}

    def params(self) -> AlignParams:
        """The current values as :class:`AlignParams`.

        Raises
        ------
        ParameterError
            With a readable message when a combination is invalid.
        """
        return AlignParams(**self.values())

    def set_params(self, params: AlignParams) -> None:
        """Show ``params`` in the controls."""
        for name, value in params.to_dict().items():
            if name in self.controls:
                self.set_value(name, value)

    def set_reference_range(self, n_sections: int | None) -> bool:
        """Clamp the reference spin box to ``0 .. n_sections - 1`` (None: unbounded).

        The value the user chose comes back when a longer stack is chosen again. Returns
        whether it had to be lowered for this stack.
        """
        spin = self.controls["reference"]
        assert isinstance(spin, QSpinBox)
        wish = self._reference_wish
        self._clamping = True
        try:
            spin.setMaximum(_INT_MAX if not n_sections else max(0, n_sections - 1))
            spin.setValue(min(wish, spin.maximum()))
        finally:
            self._clamping = False
        return spin.value() != wish

    def _reference_edited(self) -> None:
        if not self._clamping:
            spin = self.controls["reference"]
            assert isinstance(spin, QSpinBox)
            self._reference_wish = spin.value()

    def _reference_typed_in(self) -> None:
        if self._reference_typed:
            self._reference_typed = False
            self._reference_edited()
