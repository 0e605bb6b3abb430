"""Dock widgets: "Align EM stack" and "Apply saved fields".

:class:`AlignWidget` is a thin controller over :mod:`napari_ssemnet.core`:

* the parameter form is generated from :class:`~napari_ssemnet.core.params.AlignParams`;
* every computation runs in a napari ``thread_worker`` generator (:mod:`.gui._jobs`) that
  yields the core's progress events; only the main thread (the handlers here) touches
  layers;
* results go to three layers per source layer (see :mod:`._layers`), updated in place on
  re-runs; a cancelled or failed run restores them to their state before the run.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QEvent, QSize, Qt, Signal
from qtpy.QtWidgets import (
    QApplication,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from . import _layers as L
from .core.align import (
    AlignmentResult,
    Progress,
    SectionResult,
    check_layout,
    check_stack,
    placed_through_text,
    resolve_params,
)
from .core.errors import InputError, SsemnetError
from .core.io import as_dtype, pair_array, pair_rows, read_compression, read_resolution
from .core.params import TRAIN_STEPS, AlignParams
from .gui import _jobs as jobs
from .gui._ncc_plot import NccPlot
from .gui._params_form import ParamsForm
from .gui._progress import overall_fraction

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

STREAM_INTERVAL = 0.5
"""Seconds between redraws of the result layers while sections stream in."""


def show_error(message: str) -> None:
    """Show an error notification (indirection so tests can see what was shown)."""
    from napari.utils.notifications import show_error as _show_error

    _show_error(message)


def show_warning(message: str) -> None:
    """Show a warning notification (advice after a run that succeeded)."""
    from napari.utils.notifications import show_warning as _show_warning

    _show_warning(message)


def show_info(message: str) -> None:
    from napari.utils.notifications import show_info as _show_info

    _show_info(message)


def notify_failure(failure: jobs.Failure, action: str) -> None:
    """Readable message for user errors; short generic one + logged traceback for bugs."""
    if failure.user_facing:
        show_error(str(failure.exc))
    else:
        log.error("napari-ssemnet: %s failed unexpectedly:\n%s", action, failure.traceback)
        show_error(f"{action} failed with an unexpected error ({type(failure.exc).__name__}: "
                   f"{failure.exc}). This is a bug in napari-ssemnet; the full traceback is in "
                   "the log.")


def usable_reason(layer: Any) -> str | None:
    """Why ``layer`` cannot be aligned, or None when it can (3D grayscale Image)."""
    from napari.layers import Image

    if not isinstance(layer, Image):
        return f"'{layer.name}' is a {type(layer).__name__} layer, not an Image"
    if L.is_result_layer(layer):
        return f"'{layer.name}' is a napari-ssemnet result layer"
    if layer.rgb:
        return f"'{layer.name}' is RGB; convert it to grayscale first"
    if layer.multiscale:
        return f"'{layer.name}' is multiscale; open its full-resolution level as a layer"
    if layer.ndim != 3:
        return (f"'{layer.name}' is {layer.ndim}D; a stack of sections (Z, H, W) is needed"
                if layer.ndim != 2 else f"'{layer.name}' is a single 2D image, not a stack")
    if np.dtype(getattr(layer.data, "dtype", np.float32)) == bool:  # offered, then refused
        return f"'{layer.name}' is a boolean mask, not an image (Apply fields takes masks)"
    try:  # too few or too small sections: offered, then refused by Align
        check_layout(layer.data.shape, layer.data.dtype, name=f"layer '{layer.name}'")
    except SsemnetError as exc:
        return str(exc).rstrip(".")
    return None


class _RunControl:
    """The running job's stop flag and worker, kept apart from the widget.

    Teardown handlers (``destroyed``, ``aboutToQuit``) hold this object, not the widget, so
    they still work once Qt has deleted the widget and do not keep it alive.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.worker: Any = None

    def abort(self, *_: Any) -> None:
        """Ask the running job to stop (at its next yield or stop check)."""
        self.stop.set()
        worker = self.worker
        if worker is not None:
            try:
                worker.quit()
            except RuntimeError:  # already deleted by Qt
                pass


class AlignWidget(QWidget):
    """The "Align EM stack" dock widget.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Injected by napari.
    """

    job_finished = Signal(str)
    """Emitted on the main thread when a job ends: ``"done"``, ``"cancelled"`` or
    ``"failed"``."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._ctl = _RunControl()
        self._job: dict[str, Any] | None = None
        self.results: dict[str, AlignmentResult] = {}
        # per source: the result and layers from before its last Re-align (one level)
        self._undo: dict[str, dict[str, Any]] = {}
        # per source: a fingerprint of each section the result was made from, and the
        # sections whose data has changed since (their result needs a Re-align)
        self._digests: dict[str, list[bytes]] = {}
        self.changed: dict[str, set[int]] = {}
        # per source: the NCC error map of its result, which a Re-align updates in part
        self._errors: dict[str, np.ndarray] = {}
        self._reference_note: str | None = None  # the status "Reference lowered" note
        self.last_outcome: str | None = None
        self._build_ui()
        self._connect_viewer()
        self._refresh_layers()
        # A run must not outlive the window: stop it when Qt destroys us or the app quits.
        self.destroyed.connect(self._ctl.abort)
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._ctl.abort)

    # -- UI ------------------------------------------------------------------------

    def _build_ui(self) -> None:
        # the parameters scroll, so that the panel fits a laptop screen (1366x768) with
        # Advanced open; the buttons, the progress and the plot below them stay in view
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 6)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        content = QWidget()
        scroll.setWidget(content)
        outer.addWidget(scroll, 1)
        lay = QVBoxLayout(content)
        lay.setContentsMargins(6, 6, 6, 6)

        top = QFormLayout()
        self.layer_combo = _name_combo()
        self.layer_combo.setToolTip("The 3D grayscale Image layer (Z, H, W) to align. It is "
                                    "never modified; results go to new layers.")
        top.addRow("Stack layer", self.layer_combo)
        self.ignore_combo = _name_combo()
        self.ignore_combo.setToolTip(
            "Optional: a Labels layer of the stack's shape whose painted pixels (dust, a fold, "
            "a stain, a film edge) are left out of the alignment, as padding is; the sections "
            "are still warped whole. As the command line's --ignore MASK.tif and "
            "align_stack(ignore=...). Paint one with Layers > New Labels Layer.")
        top.addRow("Ignore mask", self.ignore_combo)
        lay.addLayout(top)

        self.form = ParamsForm()
        lay.addWidget(self.form)

        train_row = QHBoxLayout()
        self.train_btn = QPushButton("Train features on this stack")
        self.train_btn.setToolTip("Fit the feature encoder (CAE) to this stack, self-supervised, "
                                  "save the weights to the user cache and switch the feature "
                                  "model to 'custom'. Worth it for EM that looks unlike the "
                                  "shipped training data.")
        self.train_steps = QSpinBox()
        self.train_steps.setRange(10, 100000)
        self.train_steps.setSingleStep(100)
        self.train_steps.setValue(TRAIN_STEPS)
        self.train_steps.setToolTip("Training steps (Adam, batches of patches).")
        self.train_steps.setSuffix(" steps")
        train_row.addWidget(self.train_btn, 1)
        train_row.addWidget(self.train_steps)
        lay.addLayout(train_row)
        lay.addStretch(1)
        lay = QVBoxLayout()  # the part that does not scroll
        lay.setContentsMargins(6, 0, 6, 0)
        outer.addLayout(lay)

        buttons = QGridLayout()
        self.align_btn = QPushButton("Align")
        self.align_btn.setToolTip("Align the whole stack onto the reference section.")
        self.align_btn.setDefault(True)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setToolTip("Stop the running job; layers go back to how they were.")
        self.preview_btn = QPushButton("Preview section")
        self.preview_btn.setToolTip("Align only the section shown in the viewer against its "
                                    "neighbours (held as they are), to try parameters quickly.")
        self.realign_btn = QPushButton("Re-align section")
        self._realign_tip = ("After a full run: align the current section again with the "
                             "parameters above, neighbours fixed at the result, and keep it in "
                             "the result.")
        self.realign_btn.setToolTip(self._realign_tip)
        self.undo_btn = QPushButton("Undo")
        self._undo_tip = ("Undo the last Re-align of this layer: the section, its arrows, "
                          "the NCC and the saved fields go back to how they were before it.")
        self.undo_btn.setToolTip(self._undo_tip)
        buttons.addWidget(self.align_btn, 0, 0, 1, 2)
        buttons.addWidget(self.cancel_btn, 0, 2)
        buttons.addWidget(self.preview_btn, 1, 0)
        buttons.addWidget(self.realign_btn, 1, 1)
        buttons.addWidget(self.undo_btn, 1, 2)
        lay.addLayout(buttons)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        lay.addWidget(self.progress)
        self.status = _WrappedLabel("Ready.", min_lines=2)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        lay.addWidget(self.status)

        self.plot = NccPlot()
        lay.addWidget(self.plot)

        files = QHBoxLayout()
        self.save_btn = QPushButton("Save fields…")
        self._save_tip = ("Write the displacement fields (Z, 2, H, W) of the last run on this "
                          "layer to an .npz file (key 'displacement').")
        self.save_btn.setToolTip(self._save_tip)
        self.apply_btn = QPushButton("Apply fields to layer…")
        self.apply_btn.setToolTip("Open the 'Apply saved fields' panel to warp another layer "
                                  "(e.g. labels) with saved fields.")
        files.addWidget(self.save_btn)
        files.addWidget(self.apply_btn)
        lay.addLayout(files)

        self.align_btn.clicked.connect(self.align)
        self.cancel_btn.clicked.connect(self.cancel)
        self.preview_btn.clicked.connect(self.preview)
        self.realign_btn.clicked.connect(self.realign)
        self.undo_btn.clicked.connect(self.undo_realign)
        self.train_btn.clicked.connect(self.train_features)
        self.save_btn.clicked.connect(self._save_fields_dialog)
        self.apply_btn.clicked.connect(self._open_apply_widget)
        self.layer_combo.currentTextChanged.connect(self._on_layer_changed)
        self.form.use_current_clicked.connect(self._use_current_slice)
        self.plot.section_clicked.connect(self._jump_to_section)
        self._set_running(False)
        # scroll vertically only: the panel is as wide as its widest row
        bar = max(scroll.verticalScrollBar().sizeHint().width(),
                  scroll.style().pixelMetric(scroll.style().PM_ScrollBarExtent))
        scroll.setMinimumWidth(content.minimumSizeHint().width() + bar + 8)

    def _connect_viewer(self) -> None:
        ev = self.viewer.layers.events
        ev.inserted.connect(self._on_layers_changed)
        ev.removed.connect(self._on_layers_changed)
        self._names: dict[str, str] = {}  # layer.unique_id -> name, to follow renames
        for layer in self.viewer.layers:
            self._watch(layer)
        self.viewer.dims.events.current_step.connect(self._on_step)

    def _watch(self, layer: Any) -> None:
        self._names[str(layer.unique_id)] = layer.name
        layer.events.name.connect(self._on_layer_renamed)
        layer.events.data.connect(self._on_layer_data)

    @property
    def worker(self) -> Any:
        """The running napari worker, or None."""
        return self._ctl.worker

    # -- layer chooser -------------------------------------------------------------

    def _on_layers_changed(self, event: Any = None) -> None:
        kind = getattr(event, "type", "") if event is not None else ""
        if kind == "inserted":
            self._watch(event.value)
        elif kind == "removed" and not L.is_result_layer(event.value):
            # results are kept by name: another stack added under this name must not get
            # this one's fields and Re-align base
            name = event.value.name
            self._names.pop(str(event.value.unique_id), None)
            self._drop_result(name)
            if self._job is not None and self._job.get("source") == name:
                self._job["stale"] = "removed"
        self._refresh_layers()

    def _on_layer_renamed(self, event: Any) -> None:
        layer = event.source
        uid = str(layer.unique_id)
        old, new = self._names.get(uid), layer.name
        self._names[uid] = new
        chosen = self.layer_combo.currentText()
        if old and old != new and not L.is_result_layer(layer):
            self._follow_rename(old, new)
        # the chooser stays on the layer it showed, under its new name
        self._refresh_layers(prefer=new if old and chosen == old else None)

    def _follow_rename(self, old: str, new: str) -> None:
        """Results of a renamed source layer stay its results (and keep matching names)."""
        for store in (self.results, self._undo, self._digests, self.changed, self._errors):
            if old in store:
                store[new] = store.pop(old)
        if self._job is not None and self._job.get("source") == old:
            self._job["source"] = new
        for role in L.ROLES:
            res = L.find_result_layer(self.viewer, old, role)
            if res is None:
                continue
            res.metadata[L.META_KEY]["source"] = new
            if res.name == L.layer_name(old, role):
                res.name = L.layer_name(new, role)

    def _on_layer_data(self, event: Any = None) -> None:
        if event is None or L.is_result_layer(event.source):
            return
        name = event.source.name
        changed = self._changed_sections(name, event.source.data)
        stale = False
        if changed is not None:
            if changed:
                self.changed[name] = self.changed.get(name, set()) | set(changed)
                self._undo.pop(name, None)  # what it would put back fits the old data
        else:
            # new data, even of the same shape: the stored result (fields, Re-align's base)
            # is for the old data and must not be saved or mixed with the new
            stale = self._drop_result(name)
        if self._job is not None and self._job.get("source") == name:
            self._job["stale"] = "changed"
            stale = True
        listed = name in [self.layer_combo.itemText(i) for i in range(self.layer_combo.count())]
        if listed != (usable_reason(event.source) is None):  # e.g. now a single section
            self._refresh_layers()
        elif name == self.layer_combo.currentText():  # maybe another number of sections
            self._on_layer_changed(name)
        if stale:  # after the range check, whose note it would otherwise hide
            self.status.setText(f"The data of '{name}' changed: its alignment result no longer "
                                "applies (the result layers show the old data); press Align.")
        elif changed and not (self._job is not None and self._job.get("source") == name):
            self.status.setText(self._changed_text(name))
        self._update_buttons()

    def _drop_result(self, name: str) -> bool:
        """Forget ``name``'s result and what goes with it; whether there was one."""
        self._undo.pop(name, None)
        self._digests.pop(name, None)
        self.changed.pop(name, None)
        self._errors.pop(name, None)
        return self.results.pop(name, None) is not None

    def _changed_sections(self, name: str, data: Any) -> list[int] | None:
        """The sections of ``name``'s new ``data`` that differ from those its result was
        made from, when the result still holds for the others: a few sections (at most a
        quarter) replaced in an in-memory array of the same shape and type, not the
        reference. None: the result no longer applies."""
        result, digests = self.results.get(name), self._digests.get(name)
        if (result is None or not digests or not isinstance(data, np.ndarray)
                or data.shape != result.aligned.shape or data.nbytes > CHANGE_CHECK_BYTES):
            return None
        changed = jobs.changed_sections(data, digests)
        return changed if _result_holds(changed, result.params.reference, len(digests)) \
            else None

    def _changed_text(self, name: str) -> str:
        sections = sorted(self.changed.get(name, ()))
        which = (f"Section {sections[0]}" if len(sections) == 1
                 else "Sections " + ", ".join(map(str, sections)))
        return (f"{which} of '{name}' changed since Align: the result layers show the old "
                f"data there. Re-align section on {'it' if len(sections) == 1 else 'each'} "
                "(placed again from scratch when the old placement no longer fits); Save "
                "fields waits until then, or press Align.")

    def _refresh_layers(self, prefer: str | None = None) -> None:
        current = prefer or self.layer_combo.currentText()
        names = [ly.name for ly in self.viewer.layers if usable_reason(ly) is None]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)
        else:
            active = self.viewer.layers.selection.active
            if active is not None and active.name in names:
                self.layer_combo.setCurrentText(active.name)
        self.layer_combo.blockSignals(False)
        self._on_layer_changed(self.layer_combo.currentText())

    def _refresh_ignore(self) -> None:
        """The Labels layers of the chosen stack's shape, after "(none)"."""
        layer = self.selected_layer()
        shape = tuple(layer.data.shape) if layer is not None else None
        names = [ly.name for ly in self.viewer.layers
                 if L.layer_kind(ly) == "labels" and shape is not None
                 and tuple(ly.data.shape) == shape]
        current = self.ignore_combo.currentText()
        self.ignore_combo.blockSignals(True)
        self.ignore_combo.clear()
        self.ignore_combo.addItems([NO_MASK, *names])
        self.ignore_combo.setCurrentText(current if current in names else NO_MASK)
        self.ignore_combo.blockSignals(False)

    def selected_ignore(self) -> Any | None:
        """The chosen ignore mask layer (None for "(none)" or one that is gone)."""
        name = self.ignore_combo.currentText()
        if name and name != NO_MASK and name in self.viewer.layers:
            return self.viewer.layers[name]
        return None

    def set_ignore(self, layer: Any | None) -> None:
        """Choose ``layer`` (or its name; None: no mask) as the ignore mask."""
        self._refresh_ignore()
        self.ignore_combo.setCurrentText(
            NO_MASK if layer is None else layer if isinstance(layer, str) else layer.name)

    def selected_layer(self) -> Any | None:
        """The layer chosen in the combo box (None if there is none)."""
        name = self.layer_combo.currentText()
        if name and name in self.viewer.layers:
            return self.viewer.layers[name]
        return None

    def set_layer(self, layer: Any) -> None:
        """Choose ``layer`` (or its name) in the combo box."""
        name = layer if isinstance(layer, str) else layer.name
        self._refresh_layers()
        self.layer_combo.setCurrentText(name)

    def _on_layer_changed(self, name: str) -> None:
        self._refresh_ignore()
        layer = self.selected_layer()
        lowered_before = self._reference_note is not None \
            and self.status.text() == self._reference_note
        self._reference_note = None
        if self.form.set_reference_range(layer.data.shape[0] if layer is not None else None):
            self._reference_note = (f"Reference lowered to {self.form.value('reference')}, the "
                                    f"last section of '{name}'; it goes back with a longer "
                                    "stack.")
            self.status.setText(self._reference_note)
        elif lowered_before:  # that note was about another layer: no longer true
            self.status.setText(f"Reference {self.form.value('reference')} again, for "
                                f"'{name}'.")
        self._update_plot()
        self._update_buttons()

    def _no_layer_message(self) -> str:
        reasons = [r for r in (usable_reason(ly) for ly in self.viewer.layers) if r]
        msg = "No 3D grayscale Image layer to align: open a stack of sections (Z, H, W) first"
        if reasons:
            more = f"; and {len(reasons) - 6} more" if len(reasons) > 6 else ""
            msg += " (" + "; ".join(reasons[:6]) + more + ")"
        return msg + "."

    # -- slice tracking ------------------------------------------------------------

    def current_section(self, layer: Any | None = None) -> int:
        """Index of the section the viewer shows, in the layer's data coordinates."""
        layer = layer or self.selected_layer()
        if layer is None:
            return 0
        point = np.asarray(self.viewer.dims.point)[-layer.ndim:]
        try:
            z = float(np.asarray(layer.world_to_data(point))[0])
        except Exception:  # odd transforms: fall back to the raw slider index
            z = float(self.viewer.dims.current_step[-layer.ndim])
        return int(np.clip(round(z), 0, layer.data.shape[0] - 1))

    def _on_step(self, event: Any = None) -> None:
        if self.selected_layer() is not None:
            self.plot.set_current(self.current_section())

    def _use_current_slice(self) -> None:
        self.form.set_value("reference", self.current_section())

    def _jump_to_section(self, z: int) -> None:
        layer = self.selected_layer()
        if layer is None:
            return
        world = np.asarray(layer.data_to_world([z, 0, 0]))
        axis = self.viewer.dims.ndim - layer.ndim
        self.viewer.dims.set_point(axis, float(world[0]))

    def _update_plot(self) -> None:
        layer = self.selected_layer()
        meta = None
        if layer is not None:
            res_layer = L.find_result_layer(self.viewer, layer.name, L.ROLE_ALIGNED)
            if res_layer is not None:
                meta = res_layer.metadata.get(L.META_KEY)
        count = len(meta.get("ncc_after") or ()) if meta else 0
        shape = getattr(layer.data, "shape", None) if layer is not None else None
        if count and shape and count != shape[0]:
            # the stack was replaced by one of another length since: the curves were of
            # other sections, and the cursor ran past them
            self.plot.set_data(None, None, None, empty_text=(
                f"the result layers are from a stack of {count} sections; this one has "
                f"{shape[0]}: press Align"))
        elif meta:
            self.plot.set_data(meta.get("ncc_before"), meta.get("ncc_after"), meta.get("flags"))
        else:
            self.plot.set_data(None, None, None)
        self._on_step()

    # -- running jobs ----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._job is not None

    def _set_running(self, running: bool) -> None:
        for w in (self.align_btn, self.preview_btn, self.realign_btn, self.undo_btn,
                  self.train_btn, self.form, self.layer_combo, self.ignore_combo,
                  self.save_btn, self.train_steps):
            w.setEnabled(not running)
        self.cancel_btn.setEnabled(running)
        if not running:
            self._update_buttons()

    def _update_buttons(self) -> None:
        if self.running:
            return
        layer = self.selected_layer()
        has_result = layer is not None and self._result_for(layer) is not None
        changed = bool(layer is not None and self.changed.get(layer.name))
        self.realign_btn.setEnabled(has_result)
        self.save_btn.setEnabled(has_result and not changed)
        undo = self._undo_entry(layer) if has_result else None
        self.undo_btn.setEnabled(undo is not None)
        self.undo_btn.setToolTip(self._undo_tip + (
            f"\n\nUndoes the Re-align of section {undo['z']}." if undo is not None else
            "\n\nDisabled: nothing to undo (Undo takes back the last Re-align only, "
            "once; Align and new data clear it)."))
        why = ""  # Qt shows a disabled button's tooltip: say why it is disabled
        if layer is not None and not has_result:
            shown = L.find_result_layer(self.viewer, layer.name, L.ROLE_DISPLACEMENT)
            meta = shown.metadata.get(L.META_KEY, {}) if shown is not None else {}
            if meta.get("state") == "preview":
                why = (f"\n\nDisabled: the result layers show a Preview of section "
                       f"{meta.get('section')}, not an alignment; press Align first.")
            elif shown is not None:
                why = (f"\n\nDisabled: the result layers of '{layer.name}' come from a run "
                       "this panel does not hold (it was closed, or the layers were opened "
                       "again). Press Align; or save the fields with File > Save Selected "
                       "Layer(s) on the displacement layer.")
            else:
                why = f"\n\nDisabled: press Align to align '{layer.name}' first."
        self.realign_btn.setToolTip(self._realign_tip + why)
        if has_result and changed:
            why = ("\n\nDisabled: " + self._changed_text(layer.name).split(": ", 1)[0]
                   + "; Re-align those sections (or press Align) first.")
        self.save_btn.setToolTip(self._save_tip + why)

    def _undo_entry(self, layer: Any) -> dict[str, Any] | None:
        """What Undo would put back for ``layer``: only while the result it undoes is still
        the layer's result."""
        undo = self._undo.get(layer.name)
        return undo if undo is not None and undo["after"] is self.results.get(layer.name) \
            else None

    def _result_for(self, layer: Any) -> AlignmentResult | None:
        result = self.results.get(layer.name)
        if result is not None and result.aligned.shape != tuple(layer.data.shape):
            return None
        return result

    def _prepare(self, what: str) -> tuple[Any, np.ndarray, AlignParams] | None:
        """Common checks before a job; shows an error and returns None if it cannot run."""
        if self.running:
            show_error("napari-ssemnet is already running; cancel it first.")
            return None
        layer = self.selected_layer()
        if layer is None:
            self._refuse(what, self._no_layer_message())
            return None
        try:
            params = self.form.params()
            # the form keeps a greyed-out weights path: resolved, it is not recorded as used
            params = resolve_params(params, {})
            if (what != "Training" and params.features == "custom"
                    and not Path(params.weights).is_file()):
                raise SsemnetError(f"The weights file {params.weights!r} does not exist; "
                                   "choose it again or train features on this stack.")
            # only the shape here; values (a lazy read, NaNs) are checked in the worker
            stack = layer.data
            check_layout(stack.shape, stack.dtype, name=f"layer '{layer.name}'")
            if not 0 <= params.reference < stack.shape[0]:
                raise SsemnetError(f"Reference section {params.reference} is outside the "
                                   f"layer's sections 0-{stack.shape[0] - 1}.")
        except (SsemnetError, ValueError) as exc:
            self._refuse(what, str(exc))
            return None
        except Exception as exc:  # e.g. a lazy array that fails to load
            log.exception("napari-ssemnet: could not read layer %s", layer.name)
            self._refuse(what, f"could not read layer '{layer.name}' "
                               f"({type(exc).__name__}: {exc}).")
            return None
        return layer, stack, params

    def _refuse(self, what: str, message: str) -> None:
        """A job that did not start: notification, and the status line says so too (it
        must not keep showing the last run's outcome)."""
        show_error(message)
        self.status.setText(f"{what} not started: {message}")

    def _start(self, kind: str, func: Any, *args: Any, **info: Any) -> None:
        from napari.qt.threading import create_worker

        self._ctl.stop = threading.Event()
        self._job = {"kind": kind, "t0": time.perf_counter(), "outcome": None,
                     "stream": None, "snapshots": [], **info}
        extra = {}
        if "source" in info:  # placed as the source is now, even if it is deleted meanwhile
            self._job["transform"] = self._source_transform(info["source"])
            if func is _read_then:
                layers = self.viewer.layers
                extra["source_file"] = _source_file(
                    layers[info["source"]] if info["source"] in layers else None)
        worker = create_worker(func, *args, stop=self._ctl.stop, _start_thread=False, **extra)
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self._ctl.worker = worker
        self._set_running(True)
        self.progress.setRange(0, 0)  # busy until the first event
        self.status.setText(f"{_ACTIONS[kind]}: starting…")
        worker.start()

    def align(self) -> None:
        """Align the whole selected stack (the Align button)."""
        ready = self._prepare("Align")
        if ready is None:
            return
        layer, stack, params = ready
        mask = self.selected_ignore()
        self._start("align", _read_then,
                    functools.partial(jobs.align_job, ignore=_mask_data(mask)),
                    stack, layer.name, params, source=layer.name, shape=tuple(stack.shape),
                    params=params, dtype=str(stack.dtype),
                    ignore=None if mask is None else mask.name)

    def preview(self) -> None:
        """Align the current section only, neighbours held fixed (the Preview button)."""
        self._section("preview")

    def realign(self) -> None:
        """Re-align the current section and keep it in the result (after a full run)."""
        self._section("realign")

    def _section(self, kind: str) -> None:
        ready = self._prepare("Preview" if kind == "preview" else "Re-align")
        if ready is None:
            return
        layer, stack, params = ready
        base = self._result_for(layer)
        if kind == "realign" and base is None:
            self._refuse("Re-align", f"Re-align needs a full alignment of '{layer.name}' "
                                     "first; press Align.")
            return
        z = self.current_section(layer)
        what = "Preview" if kind == "preview" else "Re-align"
        if base is not None and z == base.params.reference:
            self._refuse(what, f"Section {z} is the reference of this alignment: it "
                               "stays where it is, and the others were aligned onto it. "
                               f"{what} another section, or align again with another "
                               "reference.")
            return
        if base is None and z == params.reference:  # Align would not move it: no preview
            self._refuse(what, f"Section {z} is the reference section: Align keeps it where "
                               "it is and aligns the others onto it. Preview another "
                               "section, or pick another reference section.")
            return
        if base is not None:  # the section goes into that run's frame, whatever the box says
            params = params.replace(reference=base.params.reference)
        mask = self.selected_ignore()
        error = self._errors.get(layer.name) if base is not None else None
        self._start(kind, _read_then,
                    functools.partial(jobs.section_job, ignore=_mask_data(mask),
                                      base_error=error, fingerprint=kind == "realign"),
                    stack, layer.name, z, params, base, source=layer.name,
                    shape=tuple(stack.shape), params=params, z=z, dtype=str(stack.dtype),
                    ignore=None if mask is None else mask.name)

    def train_features(self) -> None:
        """Train the feature encoder on the selected stack, then use it ('custom')."""
        ready = self._prepare("Training")
        if ready is None:
            return
        layer, stack, params = ready
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in layer.name)
        out = jobs.weights_dir() / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}.pt"
        train = functools.partial(jobs.train_job, steps=int(self.train_steps.value()),
                                  seed=params.seed, device=params.device, out_path=str(out))
        self._start("train", _read_then, train, stack, layer.name, source=layer.name,
                    shape=tuple(stack.shape))

    def cancel(self) -> None:
        """Stop the running job at its next progress event (the Cancel button)."""
        if not self.running:
            return
        self.status.setText("Cancelling…")
        self._ctl.abort()

    # -- worker signal handlers (main thread) ----------------------------------------

    def _on_yielded(self, event: Any) -> None:
        job = self._job
        if job is None:
            return
        if isinstance(event, _Read):  # the layer's data, read in the worker
            job["stack"] = event.stack
            return
        if isinstance(event, Progress):
            elapsed = time.perf_counter() - job["t0"]
            frac = overall_fraction(event)
            if frac is None:  # a stage without a known share: its own steps
                total = max(int(event.total), 1)
                self.progress.setRange(0, total)
                self.progress.setValue(min(int(event.step), total))
                self.progress.setFormat(f"{event.stage} %v/%m")
            else:  # the whole run on one bar, never going back
                frac = job["frac"] = max(frac, job.get("frac", 0.0))
                self.progress.setRange(0, 1000)
                self.progress.setValue(int(round(frac * 1000)))
                self.progress.setFormat(f"%p% — {event.stage}")
            text = f"{_ACTIONS[job['kind']]} on {self._device_text()} — {event.stage}"
            if event.message:
                text += f": {event.message}"
            text += f" — {elapsed:.0f} s"
            # time left only for training, whose steps take equal time: for an alignment the
            # stage shares vary too much (estimates from fixed shares were 2x too high on
            # 10 x 320^2 and 2x too low on 30 x 512^2)
            left = elapsed * (1 - frac) / frac if frac else 0.0
            if event.stage == "train" and frac and frac >= 0.1 and elapsed >= 3 and left >= 1:
                text += f", about {left:.0f} s left"
            self.status.setText(text)
        elif isinstance(event, SectionResult) and job["kind"] == "align":
            self._stream_section(event)

    def _device_text(self) -> str:
        dev = self.form.value("device")
        if dev != "auto":
            return dev
        job = self._job or {}
        if "device" not in job:
            import sys

            torch = sys.modules.get("torch")  # already imported by the worker; never import
            cuda = bool(torch is not None and torch.cuda.is_available())
            job["device"] = "cuda" if cuda else "cpu"
        return job["device"]

    def _on_returned(self, outcome: Any) -> None:
        if self._job is not None:
            self._job["outcome"] = outcome

    def _on_finished(self) -> None:
        job, self._job = self._job, None
        self._ctl.worker = None
        from .core.memory import release_gpu_cache

        release_gpu_cache()  # napari lives on: a finished run's GPU memory goes back
        if job is None:
            return
        outcome = job.get("outcome")
        state = "failed"
        try:
            if outcome is None or isinstance(outcome, jobs.Cancelled):
                self._rollback(job)
                state = "cancelled"
                self.status.setText(f"{_ACTIONS[job['kind']]} cancelled"
                                    + ("; result layers restored." if job["kind"] == "align"
                                       else "."))
            elif isinstance(outcome, jobs.Failure):
                self._rollback(job)
                notify_failure(outcome, _ACTIONS[job["kind"]])
                self.status.setText(f"{_ACTIONS[job['kind']]} failed: {outcome.exc}")
            elif isinstance(outcome, jobs.AlignOutcome):
                self._finish_align(job, outcome)
                state = "done"
            elif isinstance(outcome, jobs.SectionOutcome):
                self._finish_section(job, outcome)
                state = "done"
            elif isinstance(outcome, jobs.TrainOutcome):
                self._finish_train(job, outcome)
                state = "done"
        except Exception as exc:  # never let a handler error escape into Qt
            log.exception("napari-ssemnet: could not show the result")
            self._rollback(job)
            show_error(f"Could not show the result ({type(exc).__name__}: {exc}). This is a bug "
                       "in napari-ssemnet; the traceback is in the log.")
        finally:
            self.progress.setRange(0, 1)
            self.progress.setValue(1 if state == "done" else 0)
            self.progress.setFormat("done" if state == "done" else state)
            self._set_running(False)
            self.last_outcome = state
            self.job_finished.emit(state)

    # -- streaming a full run into layers --------------------------------------------

    def _source_transform(self, source: str) -> dict[str, Any]:
        layer = self.viewer.layers[source] if source in self.viewer.layers else None
        if layer is None:
            return {"placement": None, "contrast_limits": None, "colormap": "gray"}
        path = _source_file(layer)
        # the file it was opened from: the TIFF writer keeps its compression and MinIsWhite
        # for the aligned stack. Read now, so that a save still has them once the file has
        # been moved or deleted
        codec, white = None, False
        if path is not None and os.path.isfile(path):
            codec = read_compression(path)
            white = read_resolution(path).get("photometric") == "miniswhite"
        return {"placement": L.placement(layer), "contrast_limits": list(layer.contrast_limits),
                "colormap": layer.colormap.name, "source_file": path,
                "source_compression": codec, "source_miniswhite": white}

    def _placement_now(self, source: str, tf: dict[str, Any]) -> dict[str, Any] | None:
        """The source layer's placement as it is now, else the one taken at the start.

        Read at every write, so that a scale or translation the user sets on the source
        during a run moves its result layers too (they used to stay where the run began).
        """
        if source in self.viewer.layers:
            tf["placement"] = L.placement(self.viewer.layers[source])
        return tf["placement"]

    def _snapshot(self, job: dict[str, Any], roles: tuple[str, ...]) -> None:
        """Remember the result layers' state so a cancelled run can put it back."""
        job["snapshots"].extend(self._layer_states(job["source"], roles))

    def _layer_states(self, source: str, roles: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
        states = []
        for role in roles:
            layer = L.find_result_layer(self.viewer, source, role)
            state = None
            if layer is not None:
                # a copy: napari's metadata setter empties the dict it is given back, and
                # streaming updates the nested entry in place
                state = {"data": layer.data, "metadata": _copy_dicts(layer.metadata)}
                if L.layer_kind(layer) == "vectors":
                    state.update(features=layer.features.copy(), length=layer.length,
                                 edge_contrast_limits=tuple(layer.edge_contrast_limits))
                else:
                    state["contrast_limits"] = list(layer.contrast_limits)
            states.append((role, layer, state))
        return states

    def _rollback(self, job: dict[str, Any]) -> None:
        self._restore_layers(job["source"], job.get("snapshots", []))
        job["snapshots"] = []

    def _restore_layers(self, source: str, states: list[tuple[str, Any, Any]]) -> None:
        """Put result layers back as ``_layer_states`` found them; layers that did not exist
        then are removed (those the user removed since stay removed, and so does a partial
        layer the run made again in their place)."""
        created = []
        for role, layer, state in states:
            current = L.find_result_layer(self.viewer, source, role)
            if state is None:
                if current is not None:  # created since: remove it
                    created.append(current)
                continue
            if layer is None or layer not in self.viewer.layers:
                if current is not None and current is not layer:
                    created.append(current)
                continue
            layer.data = state["data"]
            if "features" in state:
                layer.features = state["features"]
                layer.length = state["length"]
                layer.edge_color = "magnitude"
                layer.edge_contrast_limits = state["edge_contrast_limits"]
            else:
                layer.contrast_limits = state["contrast_limits"]
            layer.metadata = _copy_dicts(state["metadata"])
            entry = layer.metadata.get(L.META_KEY)
            if isinstance(entry, dict):  # the source may have been renamed since
                entry["source"] = source
        for layer in created:
            L.remove_layer(self.viewer, layer)

    def _stream_section(self, sec: SectionResult) -> None:
        job = self._job
        assert job is not None
        source = job["source"]
        tf = job["transform"]
        z_count, h, w = job["shape"]
        stream = job["stream"]
        if stream is None:
            self._snapshot(job, (L.ROLE_ALIGNED, L.ROLE_DISPLACEMENT))
            # sections not aligned yet show the input, not black (an opaque layer of zeros
            # on top hid the whole canvas until the section in view was done)
            stream = job["stream"] = {
                "aligned": np.array(job["stack"], dtype=job["dtype"]),
                "vectors": {}, "magnitude": {}, "flags": [""] * z_count,
            }
        stream["aligned"][sec.z] = as_dtype(sec.aligned, job["dtype"])
        vec, mag = L.section_vectors(sec.displacement, sec.z, valid=sec.valid)
        stream["vectors"][sec.z] = vec
        stream["magnitude"][sec.z] = mag
        stream["flags"][sec.z] = sec.flag
        self.status.setText(f"Align: section {sec.z + 1}/{z_count} ready"
                            + (f" ({sec.flag})" if sec.flag else ""))
        # redrawing the layers for every section slowed the run down (the window repaint shares
        # the CPU with the worker); the finished run shows every section anyway
        now = time.perf_counter()
        if stream.get("aligned_layer") and now - stream.get("drawn", 0.0) < STREAM_INTERVAL:
            return
        stream["drawn"] = now
        done = sorted(stream["vectors"])
        meta_kw = {"flags": stream["flags"], "params": job["params"].to_dict(),
                   "complete": False, "state": "running",
                   "extra": {"sections_done": len(done)}}
        layer = L.find_result_layer(self.viewer, source, L.ROLE_ALIGNED)
        new = layer is None or L.find_result_layer(self.viewer, source,
                                                    L.ROLE_DISPLACEMENT) is None
        place = self._placement_now(source, tf)
        if layer is None or not stream.get("aligned_layer"):
            data = L.aligned_layer_data(
                stream["aligned"], source, contrast_limits=tf["contrast_limits"],
                colormap=tf["colormap"], placement=place,
                metadata=L.result_metadata(L.ROLE_ALIGNED, source, **meta_kw))
            L.upsert_layer(self.viewer, data, role=L.ROLE_ALIGNED, source_name=source)
            stream["aligned_layer"] = True
        else:
            layer.metadata[L.META_KEY].update(sections_done=len(done))
            for key, value in (place or {}).items():
                setattr(layer, key, value)
            layer.refresh()
        vectors = np.concatenate([stream["vectors"][z] for z in done])
        mags = np.concatenate([stream["magnitude"][z] for z in done])
        data = L.displacement_layer_data(
            vectors, mags, source, section_shape=(h, w), placement=place,
            metadata=L.result_metadata(L.ROLE_DISPLACEMENT, source, **meta_kw))
        L.upsert_layer(self.viewer, data, role=L.ROLE_DISPLACEMENT, source_name=source)
        if new:  # a new layer takes the selection, and the chooser would follow it
            self._select(source)

    def _show_layers(self, source: str, *, aligned: np.ndarray, valid: np.ndarray,
                     displacement: np.ndarray, ncc_error: np.ndarray, meta_kw: dict[str, Any],
                     transform: dict[str, Any],
                     vector_sections: list[int] | None = None) -> None:
        """Add or update the three result layers for ``source``, placed as the source layer
        is now (else by ``transform``, the source's when the run started)."""
        tf = transform
        place = self._placement_now(source, tf)
        extra = dict(meta_kw.pop("extra", {}) or {})

        def meta(role: str, more: dict[str, Any] | None = None) -> dict[str, Any]:
            return L.result_metadata(role, source, extra={**extra, **(more or {})}, **meta_kw)

        # in the source's type (rounded), as the command line writes it: every napari
        # writer then saves what the CLI would, and a uint8 stack costs 1 byte a pixel
        dtype = extra.get("source_dtype")
        shown = as_dtype(aligned, dtype) if dtype else aligned
        L.upsert_layer(self.viewer, L.aligned_layer_data(
            shown, source, contrast_limits=tf["contrast_limits"], colormap=tf["colormap"],
            placement=place, metadata=meta(L.ROLE_ALIGNED)),
            role=L.ROLE_ALIGNED, source_name=source)
        vectors, mags = L.stack_vectors(displacement, valid=valid, sections=vector_sections)
        L.upsert_layer(self.viewer, L.displacement_layer_data(
            vectors, mags, source, section_shape=aligned.shape[1:], placement=place,
            metadata=meta(L.ROLE_DISPLACEMENT, {"displacement": displacement})),
            role=L.ROLE_DISPLACEMENT, source_name=source)
        L.upsert_layer(self.viewer, L.ncc_error_layer_data(
            ncc_error, source, placement=place,
            metadata=meta(L.ROLE_NCC_ERROR, {"sigma": 8.0})),
            role=L.ROLE_NCC_ERROR, source_name=source)
        self._select(source)

    def _select(self, source: str) -> None:
        """Keep the source layer selected so the widget's chooser does not jump."""
        if source in self.viewer.layers:
            self.viewer.layers.selection.active = self.viewer.layers[source]

    def _finish_align(self, job: dict[str, Any], outcome: jobs.AlignOutcome) -> None:
        res = outcome.result
        source = job["source"]
        self._undo.pop(source, None)  # its layers are replaced: nothing left to go back to
        self._show_layers(
            source, transform=job["transform"], aligned=res.aligned, valid=res.valid,
            displacement=res.displacement,
            ncc_error=outcome.ncc_error,
            meta_kw={"ncc_before": res.ncc_before, "ncc_after": res.ncc_after,
                     "flags": res.flags, "params": res.params.to_dict(),
                     "extra": {"timings": dict(res.timings), "device": res.device,
                               "source_dtype": job["dtype"], "ignore": job.get("ignore"),
                               **_source_file_meta(job),
                               "environment": dict(res.environment),
                               "pair_ncc": pair_rows(res.pair_ncc)}})
        edited = list(outcome.edited)
        if edited and not job.get("stale") and not _result_holds(
                edited, res.params.reference, len(outcome.digests)):
            job["stale"] = "edited"
            self._drop_result(source)  # an older result does not fit the data now either
        if not job.get("stale"):
            self.results[source] = res
            self._digests[source] = list(outcome.digests)
            self.changed.pop(source, None)
            if edited:  # changed in place during the run: as if after it
                self.changed[source] = set(edited)
            self._errors[source] = outcome.ncc_error
        self._update_plot()
        z = res.aligned.shape[0]
        total = res.timings.get("total", time.perf_counter() - job["t0"])
        text = (f"Aligned {z} sections on {res.device} in {total:.1f} s "
                f"({total / max(z, 1):.2f} s/section). "
                f"Mean NCC {np.nanmean(res.ncc_before):.3f} → {np.nanmean(res.ncc_after):.3f}.")
        if job.get("ignore"):
            text += f" Pixels painted in '{job['ignore']}' were left out."
        if res.flagged:
            text += " Flagged: " + ", ".join(f"{i} ({res.flags[i]})" for i in res.flagged[:6])
            more = len(res.flagged) - 6
            text += (f" and {more} more (red ticks in the plot)." if more > 0 else ".")
            story = placed_through_text(res.flags, res.params.reference)
            text += "".join(f" {line[0].upper()}{line[1:]}." for line in story[:2])
        text += self._arrow_text(source)
        if job.get("stale") == "removed":  # the layers stay: they may be all the user has
            text += (f" {self._stale_text(job, source)} during the run: these layers hold "
                     "its alignment, but Save fields and Re-align need the layer itself.")
        elif job.get("stale"):
            text += (f" {self._stale_text(job, source)} during the run: these layers show "
                     "the old data, and the result is not kept (press Align again).")
        elif edited:
            text += " " + self._changed_text(source).replace("since Align", "during the run")
        for note in res.notes:  # advice (e.g. another pre-alignment): a notification too
            note = note.replace("prealign=", "Pre-alignment ")  # the widget's own label
            text += f" {note}"
            show_warning(note)
        self.status.setText(text)

    def _finish_section(self, job: dict[str, Any], out: jobs.SectionOutcome) -> None:
        source = job["source"]
        commit = job["kind"] == "realign" and out.result is not None
        state = "aligned" if commit or out.result is not None else "preview"
        if job["kind"] == "preview":
            state = "preview"
        sections = None if out.result is not None else [out.z]
        extra: dict[str, Any] = {"section": out.z, "source_dtype": job["dtype"],
                                 "ignore": job.get("ignore"),
                                 **_source_file_meta(job)}
        if state == "preview":
            extra["note"] = (f"Preview of section {out.z}; other sections are "
                             + ("the last full run." if out.result is not None
                                else "unaligned."))
        params = out.params.to_dict()
        if commit:  # the run's parameters, and those of its re-aligned sections
            params = out.result.params.to_dict()
            extra.update(timings=dict(out.result.timings), device=out.result.device,
                         environment=dict(out.result.environment),
                         pair_ncc=pair_rows(out.result.pair_ncc))
            extra["section_params"] = {str(k): p.to_dict()
                                       for k, p in sorted(out.result.section_params.items())}
        # changed in place during the job, or since the run (other than z, which was
        # re-aligned on the data it had as the job began)
        stored = self._digests.get(source) or []
        since = ({k for k, (a, b) in enumerate(zip(out.digests, stored, strict=True)) if a != b}
                 - {out.z} if len(stored) == len(out.digests) else set())
        edited = sorted(set(out.edited) | since)
        if commit and edited and not job.get("stale") and not _result_holds(
                sorted(set(self.changed.get(source, ())) | set(edited)),
                out.result.params.reference, len(out.aligned)):
            job["stale"] = "edited"
            self._drop_result(source)  # the run's result does not fit the data now either
        keep = commit and not job.get("stale")
        if keep:
            digests = self._digests.get(source)
            undo = {"before": self.results.get(source), "after": out.result, "z": out.z,
                    "changed": set(self.changed.get(source, ())),
                    "error": self._errors.get(source),
                    "digest": digests[out.z] if digests else None,
                    "states": self._layer_states(source, (L.ROLE_ALIGNED, L.ROLE_DISPLACEMENT,
                                                          L.ROLE_NCC_ERROR))}
        self._show_layers(
            source, transform=job["transform"], aligned=out.aligned, valid=out.valid,
            displacement=out.displacement,
            ncc_error=out.ncc_error, vector_sections=sections,
            meta_kw={"ncc_before": out.ncc_before, "ncc_after": out.ncc_after,
                     "flags": out.flags, "params": params, "state": state,
                     "complete": out.result is not None, "extra": extra})
        if keep:
            self.results[source] = out.result
            self._undo[source] = undo
            self._errors[source] = out.ncc_error
            if source in self._digests and out.digests:
                self._digests[source][out.z] = out.digests[out.z]  # re-aligned on this data
            # changed in place during the job (z too): as if after it
            left = (self.changed.get(source, set()) - {out.z}) | set(edited)
            if left:
                self.changed[source] = left
            else:
                self.changed.pop(source, None)
        self._update_plot()
        sec = out.section
        b = getattr(sec, "ncc_before", float("nan"))
        a = getattr(sec, "ncc_after", float("nan"))
        verb = "Re-aligned" if commit else "Preview of"
        # the plot's "before" is the unaligned input; this one is the section as it was
        was = " (as the run placed it)" if out.result is not None else ""
        self.status.setText(f"{verb} section {out.z} in {out.seconds:.1f} s: NCC with neighbours "
                            f"{b:.3f}{was} → {a:.3f}"
                            + (f" ({out.flags[out.z]})" if out.flags[out.z] else "") + "."
                            + (" Placed again from scratch: the run's placement matched the "
                               "neighbour towards the reference less than half as well."
                               if getattr(sec, "placed_again", False) else "")
                            + (f" {self._stale_text(job, source)} meanwhile: not kept."
                               if job.get("stale") else "")
                            + (" " + self._changed_text(source).replace(
                                   "since Align", "during the run"
                                   if set(edited) <= set(out.edited) else "since Align")
                               if keep and edited else "")
                            + (" The NCC went down; the section is kept as re-aligned: "
                               "press Undo to go back, or re-align it with other parameters."
                               if keep and a < b else ""))

    def undo_realign(self) -> None:
        """Put back the result and layers from before the last Re-align of the selected
        layer (the Undo button; one level)."""
        if self.running:
            return
        layer = self.selected_layer()
        undo = self._undo_entry(layer) if layer is not None else None
        if undo is None:
            self._refuse("Undo", "there is no Re-align of this layer to undo (Undo takes "
                                 "back the last Re-align only, once).")
            return
        source, z = layer.name, undo["z"]
        del self._undo[source]
        self._restore_layers(source, undo["states"])
        # a Re-align needs a full run first: there is always a result to go back to
        self.results[source] = undo["before"]
        if undo["error"] is not None:
            self._errors[source] = undo["error"]
        if undo["changed"]:  # a section re-aligned after its data changed is so again
            self.changed[source] = set(undo["changed"])
        if undo["digest"] is not None and source in self._digests:
            self._digests[source][z] = undo["digest"]
        self._update_plot()
        self._update_buttons()
        self._select(source)
        back, gone = (float(r.ncc_after[z]) for r in (undo["before"], undo["after"]))
        self.status.setText(f"Undid the Re-align of section {z}: its NCC with neighbours is "
                            f"{back:.3f} again ({gone:.3f} after the Re-align).")

    def _arrow_text(self, source: str) -> str:
        """How to read the arrows (their scale and colours are otherwise only in the layer's
        metadata and controls)."""
        vectors = L.find_result_layer(self.viewer, source, L.ROLE_DISPLACEMENT)
        meta = vectors.metadata.get(L.META_KEY, {}) if vectors is not None else {}
        if "arrow_scale" not in meta:
            return ""
        mags = np.asarray(vectors.features.get("magnitude", []), dtype=float)
        if not mags.size or not np.nanmax(mags) > 0.05:  # a 0.0 px colour scale read as a bug
            return " No section moved by more than 0.05 px, so the arrows have no length."
        hi = float(np.asarray(vectors.edge_contrast_limits)[1])
        shown = f"{hi:.2g}" if hi < 10 else f"{hi:.0f}"  # not 1.5e+02
        return (f" Arrows drawn {meta['arrow_scale']:g}x their length; colour: shift from 0 "
                f"(dark purple) to {shown} px or more (yellow).")

    @staticmethod
    def _stale_text(job: dict[str, Any], source: str) -> str:
        if job.get("stale") == "removed":
            return f"The layer '{source}' was removed"
        return f"The data of '{source}' changed"

    def _finish_train(self, job: dict[str, Any], out: jobs.TrainOutcome) -> None:
        self.form.set_value("weights", out.path)
        self.form.set_value("features", "custom")
        loss = out.info.get("train_loss")
        self.status.setText(f"Trained features in {out.seconds:.0f} s"
                            + (f" (loss {loss})" if loss else "")
                            + f"; saved to {out.path}. Feature model set to 'custom'.")
        show_info(f"Encoder trained on '{job['source']}' and saved to {out.path}.")

    # -- files -----------------------------------------------------------------------

    def save_fields(self, path: str | Path) -> str | None:
        """Write the selected layer's last displacement fields to ``path`` (.npz)."""
        from ._writer import save_fields

        layer = self.selected_layer()
        result = self._result_for(layer) if layer is not None else None
        if result is None:
            show_error("No alignment result for this layer yet; press Align first.")
            return None
        if self.changed.get(layer.name):
            show_error(self._changed_text(layer.name))
            return None
        try:
            return save_fields(path, result.displacement, params=result.params,
                               flags=result.flags,
                               section_params=result.section_params_json(),
                               environment=result.environment,
                               placement=L.placement(layer),
                               ncc_before=result.ncc_before, ncc_after=result.ncc_after,
                               pair_ncc=pair_array(result.pair_ncc))
        except (OSError, SsemnetError, ValueError) as exc:
            show_error(f"Could not save fields to {path}: {exc}")
            return None

    def _save_fields_dialog(self) -> None:
        layer = self.selected_layer()
        default = f"{layer.name} fields.npz" if layer is not None else "fields.npz"
        path, _ = QFileDialog.getSaveFileName(self, "Save displacement fields", default,
                                              "NumPy fields (*.npz)")
        if path:
            written = self.save_fields(path)  # the name it was written under (.npz added)
            if written:
                self.status.setText(f"Fields saved to {written}.")

    def _open_apply_widget(self) -> None:
        try:
            self.viewer.window.add_plugin_dock_widget("napari-ssemnet", "Apply saved fields")
        except Exception as exc:  # e.g. plugin not registered in a bare test viewer
            show_error(f"Could not open 'Apply saved fields': {exc}")

    # -- teardown --------------------------------------------------------------------

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        self._ctl.abort()
        super().closeEvent(event)

    def event(self, ev: QEvent) -> bool:
        # napari's "close this panel" button takes the widget out of its dock
        # (setParent(None)) without closing it: the run must stop with the panel
        if ev.type() == QEvent.ParentChange and self.parent() is None and self.running:
            _CLOSING.add(self)  # alive until the run has put the layers back
            self.job_finished.connect(lambda *_: _CLOSING.discard(self))
            self.cancel()
        return super().event(ev)


_CLOSING: set[AlignWidget] = set()


def _copy_dicts(d: Any) -> Any:
    """``d`` with every nested dict and list copied (arrays and other values shared)."""
    if isinstance(d, dict):
        return {k: _copy_dicts(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_copy_dicts(v) for v in d]
    return d


NO_MASK = "(none)"
"""The Ignore mask chooser's entry for no mask."""


def _result_holds(changed: list[int], reference: int, n_sections: int) -> bool:
    """Whether a result still holds for the sections not in ``changed``: the reference
    kept, and at most a quarter of the sections changed."""
    return reference not in changed and len(changed) <= max(1, n_sections // 4)


def _source_file_meta(job: dict[str, Any]) -> dict[str, Any]:
    """The source file's path, codec and MinIsWhite as read when the run started, for the
    result layers' metadata (the TIFF writer uses them)."""
    t = job["transform"]
    return {k: t.get(k) for k in ("source_file", "source_compression", "source_miniswhite")}


def _mask_data(layer: Any | None) -> Any:
    """An ignore mask layer's data as the core takes it (None: no mask): for an in-memory
    layer a boolean copy made now, so that painting on during the run does not change what
    the run reads (1 byte a pixel); a lazy one as it is, read in the worker."""
    if layer is None:
        return None
    data = layer.data
    return data != 0 if isinstance(data, np.ndarray) else data


def _name_combo() -> QComboBox:
    """A layer chooser whose width does not follow its longest name (a long file name pushed
    the whole form past the dock's right edge, hiding buttons)."""
    combo = QComboBox()
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(12)
    return combo


_ACTIONS = {"align": "Alignment", "preview": "Preview", "realign": "Re-align",
            "train": "Feature training"}


class _Read:
    """Yielded by a job entry once it has read the layer's data (a lazy layer in the
    worker, never on the GUI thread)."""

    def __init__(self, stack: np.ndarray) -> None:
        self.stack = stack


CHANGE_CHECK_BYTES = 256 * 2**20
"""New data of a layer up to this size is compared section by section with the data of its
result (about 0.3 s on the GUI thread here); a bigger change drops the result."""

READ_CHUNK_BYTES = 64 * 2**20
"""A lazy layer is read in pieces of about this size, so that Cancel is seen between them."""


def _read_lazy(data: Any, name: str, stop: threading.Event):
    """A lazy layer's data read in pieces, with a bar of its own (a slow read is seen as
    such); None when stopped."""
    z = data.shape[0]
    per = max(1, int(READ_CHUNK_BYTES // max(1, data.dtype.itemsize * data.shape[1]
                                             * data.shape[2])))
    stack = np.empty(tuple(data.shape), data.dtype)
    for z0 in range(0, z, per):
        yield Progress("read", z0, z, f"reading layer '{name}'")
        if stop.is_set():
            return None
        stack[z0:z0 + per] = np.asarray(data[z0:z0 + per])
    yield Progress("read", z, z, f"reading layer '{name}'")
    return stack


def _read(data: Any, name: str, stop: threading.Event):
    """The layer's data as a checked array, read and checked here (in the worker: a lazy
    layer's read, and the NaN scan of a big float stack, would freeze napari on the GUI
    thread). Yields a :class:`_Read` and progress events, returns the array, a
    :class:`jobs.Failure` if it cannot be read or used, or :class:`jobs.Cancelled`."""
    label = f"layer '{name}'"
    try:
        if isinstance(data, np.ndarray):
            stack = check_stack(data, name=label)  # no copy: the layer's own array
        else:
            stack = yield from _read_lazy(data, name, stop)
            if stack is None:
                return jobs.Cancelled()
            stack = check_stack(stack, name=label)
    except (SsemnetError, ValueError) as exc:  # NaNs, a wrong shape: said for the user
        return jobs._failure(exc)
    except Exception as exc:  # a lazy array that fails to load (a missing zarr chunk...)
        import traceback

        log.exception("napari-ssemnet: could not read layer %s", name)
        return jobs.Failure(SsemnetError(f"Could not read layer '{name}' "
                                         f"({type(exc).__name__}: {exc})."),
                            traceback.format_exc(), True)
    yield _Read(stack)
    return stack


def _source_file(layer: Any) -> str | None:
    """The file or folder napari opened ``layer`` from, or None."""
    path = getattr(getattr(layer, "source", None), "path", None)
    return str(path) if isinstance(path, str | Path) else None


def _ragged_source(path: str | None, name: str) -> jobs.Failure | None:
    """A failure when napari opened the layer from a file or folder whose sections differ in
    size: its reader then drops pages of another size, or hands back pieces of several
    shapes, so the layer is not the file's stack."""
    if path is None or not os.path.exists(path):
        return None
    from .core.io import section_boxes, size_range

    layout = section_boxes(path)
    if layout is None:
        return None
    return jobs.Failure(InputError(
        f"Layer '{name}' was opened from {path}, whose {len(layout[1])} sections differ in "
        f"size ({size_range(*layout)}). napari's reader cannot open those as "
        "one stack (it leaves out pages of another size, or mixes sizes), so the layer is "
        "not that stack. Open it in napari's console with: from napari_ssemnet.core.io "
        f"import read_stack; viewer.add_image(read_stack({path!r})). That centres each "
        "section on one canvas; align that layer."), "", True)


def _read_then(job: Any, data: Any, name: str, *args: Any, stop: threading.Event,
               source_file: str | None = None):
    """Worker entry: read the layer's data (see :func:`_read`), then run
    ``job(stack, *args, stop=stop)``; first, a layer napari opened from a file whose sections
    differ in size is refused (:func:`_ragged_source`)."""
    ragged = _ragged_source(source_file, name)
    if ragged is not None:
        return ragged
    stack = yield from _read(data, name, stop)
    if isinstance(stack, jobs.Failure | jobs.Cancelled):
        return stack
    return (yield from job(stack, *args, stop=stop))


# -- "Apply saved fields" ----------------------------------------------------------------


class _WrappedLabel(QLabel):
    """A word-wrapped label that asks for the height of all its lines (at least
    ``min_lines``): in a panel kept at its minimum height (the dock area is shared), a
    three-line message squeezed the rows above it to 17 px, and the Align panel's four-line
    status slid under the plot, and the plot onto the buttons."""

    def __init__(self, text: str = "", *, min_lines: int = 0) -> None:
        super().__init__(text)
        self.setWordWrap(True)
        self._floor = min_lines * self.fontMetrics().lineSpacing() + 4 if min_lines else 0

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt API
        hint = super().minimumSizeHint()
        height = max(hint.height(), self._floor)
        if self.wordWrap() and self.width() > 0 and self.text():
            height = max(height, self.heightForWidth(self.width()))
        return QSize(hint.width(), height)

    def resizeEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        super().resizeEvent(event)
        if event.oldSize().width() != event.size().width():
            self.updateGeometry()  # its lines, and so its height, follow the width


class ApplyFieldsWidget(QWidget):
    """Warp a layer with displacement fields saved by napari-ssemnet (CLI or widget).

    Labels use nearest-neighbour sampling so label values stay intact; images bilinear.
    The result goes to ``"<name> fields applied"`` (a new layer of the same type; applying
    again updates it).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        lay = QVBoxLayout(self)
        box = QGroupBox("Apply saved displacement fields")
        form = QFormLayout(box)
        self.layer_combo = _name_combo()
        self.layer_combo.setToolTip("A 3D Image or Labels layer with the same (Z, H, W) as the "
                                    "stack the fields were computed on.")
        form.addRow("Layer", self.layer_combo)
        path_row = QHBoxLayout()
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("fields .npz")
        browse = QPushButton("…")
        browse.setMaximumWidth(28)
        browse.clicked.connect(self._browse)
        path_row.addWidget(self.path_edit, 1)
        path_row.addWidget(browse)
        form.addRow("Fields file", path_row)
        self.order_combo = QComboBox()
        self.order_combo.addItems(["auto", "nearest", "linear"])
        self.order_combo.setToolTip("auto: nearest for Labels (keeps label values), linear for "
                                    "images.")
        form.addRow("Interpolation", self.order_combo)
        self.apply_btn = QPushButton("Apply")
        form.addRow(self.apply_btn)
        lay.addWidget(box)
        self.status = _WrappedLabel("")  # outside the form: a wrapped line keeps its height
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        # only the height it needs: the Align panel's parameters share the dock area
        self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Maximum)
        self.apply_btn.clicked.connect(self.apply)
        self.last_result: Any | None = None
        self._worker: Any | None = None
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._refresh)
        self._refresh()

    def _refresh(self, event: Any = None) -> None:
        from napari.layers import Image, Labels

        if event is not None and getattr(event, "type", "") == "inserted":
            event.value.events.name.connect(self._refresh)
        current = self.layer_combo.currentText()
        if event is not None and getattr(event, "type", "") == "name" and \
                getattr(event, "source", None) is not None and current not in self.viewer.layers:
            current = event.source.name  # the chosen layer was renamed: stay on it
        names = [ly.name for ly in self.viewer.layers
                 if isinstance(ly, Image | Labels) and ly.ndim == 3
                 and not getattr(ly, "rgb", False) and not getattr(ly, "multiscale", False)
                 and not L.is_result_layer(ly)]
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Displacement fields", self.path_edit.text(),
                                              "NumPy fields (*.npz);;All files (*)")
        if path:
            self.path_edit.setText(path)

    def apply(self) -> Any | None:
        """Warp the chosen layer in a worker thread (the Apply button).

        Returns the started worker, or None when the input is refused at once. The result
        layer is added on the main thread when the worker returns; it is then also in
        :attr:`last_result` (None after an error).
        """
        from napari.qt.threading import create_worker

        self.last_result = None  # also when refused at once: it is the result of this press
        name = self.layer_combo.currentText()
        if not name or name not in self.viewer.layers:
            return self._refuse("Choose a 3D Image or Labels layer to apply the fields to.")
        layer = self.viewer.layers[name]
        path = self.path_edit.text().strip()
        if not path:
            return self._refuse("Choose a fields file (.npz) written by napari-ssemnet.")
        is_labels = L.layer_kind(layer) == "labels"
        choice = self.order_combo.currentText()
        order = (0 if is_labels else 1) if choice == "auto" else int(choice == "linear")
        if is_labels and order == 1:
            return self._refuse(f"'{name}' is a Labels layer: linear interpolation would blend "
                                "label ids into values that are not labels. Choose 'auto' or "
                                "'nearest'.")
        self.apply_btn.setEnabled(False)
        self.status.setText(f"Applying {Path(path).name} to '{name}'…")
        # layer.data may be lazy (dask, zarr): it is read in the worker, not here
        worker = create_worker(_apply_job, layer.data, path, name, order, _start_thread=False)
        worker.returned.connect(lambda out: self._on_applied(out, layer, path, order, is_labels))
        worker.finished.connect(lambda: self.apply_btn.setEnabled(True))
        self._worker = worker  # keep a reference until it finishes
        worker.start()
        return worker

    def _refuse(self, message: str) -> None:
        show_error(message)
        self.status.setText(f"Not applied: {message}")

    def _on_applied(self, outcome: Any, layer: Any, path: str, order: int,
                    is_labels: bool) -> None:
        if isinstance(outcome, jobs.Failure):
            notify_failure(outcome, "Applying fields")
            self.status.setText(f"Not applied: {outcome.exc}" if outcome.user_facing
                                else "Not applied: unexpected error (see the log).")
            return
        name = layer.name
        if name not in self.viewer.layers:
            self.status.setText(f"'{name}' was removed while the fields were applied.")
            return
        # its own role: applying fields to an aligned source must not replace Align's result
        meta = L.result_metadata(L.ROLE_APPLIED, name, extra={"fields_file": str(path),
                                                              "order": order})
        kwargs: dict[str, Any] = {"name": L.layer_name(name, L.ROLE_APPLIED), "metadata": meta,
                                  **L.placement(layer)}
        if not is_labels:
            kwargs["contrast_limits"] = list(layer.contrast_limits)
            kwargs["colormap"] = layer.colormap.name
        try:
            out = L.upsert_layer(self.viewer,
                                 (outcome, kwargs, "labels" if is_labels else "image"),
                                 role=L.ROLE_APPLIED, source_name=name)
        except Exception as exc:  # an error in a Qt slot would abort napari
            log.exception("napari-ssemnet: could not show the applied fields")
            show_error(f"Could not show the result ({type(exc).__name__}: {exc}). This is a "
                       "bug in napari-ssemnet; the traceback is in the log.")
            self.status.setText("Not applied: the result could not be shown (see the log).")
            return
        self.status.setText(f"Applied {Path(path).name} to '{name}' "
                            f"({'nearest' if order == 0 else 'linear'}) → '{out.name}'.")
        self.last_result = out


def _apply_job(layer_data: Any, path: str, name: str, order: int) -> Any:
    """Worker: load the fields, check their shape, warp the layer's data; the warped array
    or a :class:`jobs.Failure` (never raises, so every error reaches the user)."""
    from ._writer import apply_displacement, load_fields

    try:
        data = np.asarray(layer_data)
        disp, _params = load_fields(path)
        if disp.shape[0] != data.shape[0] or disp.shape[2:] != data.shape[1:]:
            raise SsemnetError(f"The fields in {Path(path).name} are for a stack of shape "
                               f"{(disp.shape[0], *disp.shape[2:])}, but '{name}' has "
                               f"shape {data.shape}.")
        out = apply_displacement(data, disp, order=order)
        # an image keeps its type, as with Align and the command line (rounded, clipped); a
        # boolean image becomes 0/1 as the command line writes it (a cast to bool would
        # make every blended edge pixel True)
        want = np.dtype(np.uint8) if data.dtype == bool else data.dtype
        return as_dtype(out, want) if out.dtype != want else out
    except OSError as exc:  # unreadable file: the message is for the user
        return jobs.Failure(exc, "", True)
    except Exception as exc:
        return jobs._failure(exc)

