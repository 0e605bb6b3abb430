"""The "Align EM stack" dock widget end to end, with the real core on tiny stacks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, error_messages, make_stack, n_records, run_and_wait, set_fast
from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QSpinBox

from napari_ssemnet import _layers as L
from napari_ssemnet._widget import AlignWidget
from napari_ssemnet.core.errors import SsemnetError
from napari_ssemnet.core.params import knobs


def test_widget_from_manifest_generates_every_knob(viewer_widget):
    viewer, widget = viewer_widget
    assert isinstance(widget, AlignWidget)
    names = [f.name for f in knobs()]
    assert list(widget.form.controls) == names
    for f in knobs():
        control = widget.form.controls[f.name]
        assert control.toolTip() == f.metadata["help"]
        assert widget.form.value(f.name) == f.default
        if isinstance(control, QSpinBox | QDoubleSpinBox) and f.metadata["max"] is not None:
            assert control.maximum() == pytest.approx(f.metadata["max"])
            assert control.minimum() == pytest.approx(f.metadata["min"])
        if f.metadata["choices"]:
            assert isinstance(control, QComboBox)
            items = [control.itemText(i) for i in range(control.count())]
            assert items == list(f.metadata["choices"])
        # advanced knobs live in the collapsible group, the rest do not
        in_advanced = widget.form.advanced.isAncestorOf(control)
        assert in_advanced == bool(f.metadata["advanced"]), f.name
    # the generated form gives back valid default params
    assert widget.form.params().to_dict() == type(widget.form.params())().to_dict()


def test_layer_chooser_lists_only_3d_grayscale(viewer_widget, stack):
    viewer, widget = viewer_widget
    viewer.add_image(stack[0], name="single")
    viewer.add_image(np.zeros((4, 40, 40, 3), np.uint8), name="rgb", rgb=True)
    viewer.add_labels(np.zeros((4, 40, 40), np.uint8), name="labels")
    viewer.add_image(stack > 128, name="mask")  # listed, then refused by Align
    viewer.add_image(stack[:, :20, :20], name="tiny")  # as were these two
    viewer.add_image(stack[:1], name="one section")
    assert widget.layer_combo.count() == 0
    # Align says why none is offered
    widget.align()
    assert not widget.running
    assert "Sections of 20x20 px are too small" in widget.status.text()
    assert "'one section' has 1 section(s)" in widget.status.text()
    viewer.add_image(stack, name="em")
    items = [widget.layer_combo.itemText(i) for i in range(widget.layer_combo.count())]
    assert items == ["em"]
    # reference clamps to the layer's Z range; "use current slice" follows the viewer
    widget.form.set_value("reference", 99)
    assert widget.form.value("reference") == stack.shape[0] - 1
    viewer.dims.set_current_step(0, 2)
    widget.form.use_current.click()
    assert widget.form.value("reference") == 2
    # the stack replaced in place by a shorter one: the range follows
    viewer.layers["em"].data = stack[:2]
    assert widget.form.controls["reference"].maximum() == 1
    viewer.layers["em"].data = stack[:1]  # no longer a stack: no longer offered
    assert widget.layer_combo.count() == 0
    viewer.layers["em"].data = stack[:2]
    assert widget.layer_combo.currentText() == "em"
    viewer.layers.remove("em")
    assert widget.layer_combo.count() == 0


def test_the_reference_comes_back_after_a_shorter_stack_and_small_values_survive(
        viewer_widget):
    viewer, widget = viewer_widget
    viewer.add_image(make_stack(z=8, size=64), name="long")
    viewer.add_image(make_stack(z=4, size=64), name="short")
    widget.set_layer("long")
    widget.form.set_value("reference", 7)
    widget.set_layer("short")  # lowered, and the user is told
    assert widget.form.value("reference") == 3 and "lowered to 3" in widget.status.text()
    widget.set_layer("long")  # was left at 3 without a word
    assert widget.form.value("reference") == 7
    # and the note about 'short' does not stay on the status line
    assert "lowered" not in widget.status.text() and "7 again" in widget.status.text()
    # choosing the value shown is a choice too, kept when the long stack comes back
    widget.set_layer("short")
    viewer.dims.set_current_step(0, 3)
    widget.form.use_current.click()
    widget.set_layer("long")
    assert widget.form.value("reference") == 3
    # leaving the box without typing is no choice (Qt sends editingFinished on focus loss)
    widget.form.set_value("reference", 7)
    widget.set_layer("short")
    spin = widget.form.controls["reference"]
    spin.editingFinished.emit()
    widget.set_layer("long")
    assert widget.form.value("reference") == 7
    # the stale-result note is not hidden by the range note
    widget.form.set_value("reference", 7)
    widget.set_layer("short")
    widget.results["short"] = object()  # stands in for a finished run
    viewer.layers["short"].data = make_stack(z=4, size=64)[::-1].copy()
    assert "changed" in widget.status.text() and "short" not in widget.results
    # a value from the API or a params file is shown, not rounded to the box's decimals
    for name, value in (("smoothness", 0.0015), ("magnitude_penalty", 0.000123),
                        ("smoothness", 2.5e-7)):
        widget.form.set_value(name, value)
        assert widget.form.params().to_dict()[name] == pytest.approx(value), name
    widget.form.set_value("smoothness", 1.0)
    assert widget.form.controls["smoothness"].text() in ("1.00", "1.000")  # narrows again


def test_align_makes_three_layers(qtbot, viewer_widget, stack):
    viewer, widget = viewer_widget
    src = viewer.add_image(stack, name="em")
    before = src.data.copy()
    set_fast(widget)
    seen = []
    widget.worker_started = None
    t0 = time.perf_counter()
    state = run_and_wait(qtbot, widget, widget.align)
    elapsed = time.perf_counter() - t0
    assert state == "done", error_messages()
    z, h, w = stack.shape
    aligned = viewer.layers["em aligned"]
    disp = viewer.layers["em displacement"]
    err = viewer.layers["em NCC error"]
    assert aligned.data.shape == (z, h, w)
    assert aligned.data.dtype == np.uint8  # the source's type, as the CLI writes it
    assert err.data.shape == (z, h, w)
    assert err.colormap.name == "magma"
    res = widget.results["em"]
    np.testing.assert_allclose(err.data, L.local_ncc_error(res.aligned, res.valid,
                                                           flags=res.flags), atol=1e-6)
    assert err.data.max() > 0.1  # real neighbours never match everywhere
    assert disp.data.ndim == 3 and disp.data.shape[1:] == (2, 3)
    # every section has its own arrows, on its own slice
    assert sorted(np.unique(disp.data[:, 0, 0]).astype(int)) == list(range(z))
    assert np.all(disp.data[:, 1, 0] == 0)
    assert "magnitude" in disp.features
    np.testing.assert_allclose(disp.features["magnitude"],
                               np.hypot(disp.data[:, 1, 1], disp.data[:, 1, 2]), rtol=1e-5)
    meta = aligned.metadata[L.META_KEY]
    assert meta["complete"] and meta["state"] == "aligned"
    assert len(meta["ncc_before"]) == z and len(meta["flags"]) == z
    assert meta["source_dtype"] == "uint8"  # what the TIFF writer saves it as
    assert "arrow_note" in disp.metadata[L.META_KEY]
    assert disp.metadata[L.META_KEY]["displacement"].shape == (z, 2, h, w)
    # the reference section stays put
    ref = widget.results["em"].params.reference
    assert np.abs(widget.results["em"].displacement[ref]).max() < 1e-3
    # source untouched, contrast shared
    np.testing.assert_array_equal(src.data, before)
    assert list(aligned.contrast_limits) == list(src.contrast_limits)
    # the plot and the status line show the run
    assert widget.plot.after.size == z
    assert "s/section" in widget.status.text()
    # how to read the arrows (scale and colours were only in the metadata and controls)
    vectors = viewer.layers["em displacement"]
    scale = vectors.metadata[L.META_KEY]["arrow_scale"]
    assert f"Arrows drawn {scale:g}x their length" in widget.status.text()
    still = vectors.features.copy()
    vectors.features = {"magnitude": np.zeros(len(vectors.data))}  # read "0 to 0.0 px"
    assert "have no length" in widget._arrow_text("em")
    limits = vectors.edge_contrast_limits
    vectors.features = {"magnitude": np.full(len(vectors.data), 150.0)}
    vectors.edge_contrast_limits = (0.0, 150.0)
    assert "to 150 px" in widget._arrow_text("em")  # read "1.5e+02 px"
    vectors.edge_contrast_limits = limits
    vectors.features = still
    seen.append(elapsed)
    print(f"align 4x96x96 via widget: {elapsed:.2f} s")
    assert elapsed < 60

    # a second run updates the same layers in place
    ids = [id(viewer.layers[n]) for n in ("em aligned", "em displacement", "em NCC error")]
    n_layers = len(viewer.layers)
    widget.form.set_value("grid_spacing", 48)
    assert run_and_wait(qtbot, widget, widget.align) == "done"
    assert len(viewer.layers) == n_layers
    assert [id(viewer.layers[n]) for n in ("em aligned", "em displacement",
                                           "em NCC error")] == ids
    assert viewer.layers["em aligned"].metadata[L.META_KEY]["params"]["grid_spacing"] == 48


def test_the_status_says_a_poor_section_is_off_alone(qtbot, viewer_widget):
    from napari_ssemnet.core.sample import load_sample

    viewer, widget = viewer_widget
    turned = load_sample()
    turned[6] = np.rot90(turned[6], 3)
    viewer.add_image(turned, name="em")
    widget.form.set_value("device", "cpu")
    assert run_and_wait(qtbot, widget, widget.align) == "done", error_messages()
    assert widget.results["em"].flags[6:] == ["poor_match", ""]
    text = widget.status.text()
    assert "Flagged: 6 (poor_match). Section 6 matches poorly on its own" in text, text


def test_an_ignore_mask_layer_is_left_out_as_the_api_leaves_it_out(qtbot, viewer_widget,
                                                                   stack):
    from napari_ssemnet import align_stack

    viewer, widget = viewer_widget
    viewer.add_image(stack, name="em")
    paint = np.zeros(stack.shape, np.uint8)
    paint[1:3, 10:50, 20:70] = 1
    viewer.add_labels(paint.copy(), name="dust")
    viewer.add_labels(np.zeros((4, 50, 50), np.uint8), name="other size")
    widget.set_layer("em")
    items = [widget.ignore_combo.itemText(i) for i in range(widget.ignore_combo.count())]
    assert items == ["(none)", "dust"]  # only masks of the stack's shape
    assert widget.selected_ignore() is None  # none unless chosen
    widget.set_ignore("dust")
    set_fast(widget)

    def align_then_paint():  # painting on during the run does not change what it reads
        widget.align()
        viewer.layers["dust"].data[:] = 0

    assert run_and_wait(qtbot, widget, align_then_paint) == "done", error_messages()
    viewer.layers["dust"].data = paint.copy()
    res = widget.results["em"]
    api = align_stack(stack, res.params, ignore=paint)
    np.testing.assert_allclose(res.displacement, api.displacement, atol=1e-4)
    plain = align_stack(stack, res.params)
    assert np.abs(plain.displacement - res.displacement).max() > 0.01
    # the error map leaves the painted pixels out, as the NCC does (they showed as error)
    from scipy import ndimage

    core = ndimage.binary_erosion(paint[2] != 0, iterations=8)
    assert viewer.layers["em NCC error"].data[2][core].max() == 0
    assert L.local_ncc_error(plain.aligned, plain.valid, flags=plain.flags)[2][core].max() > 0
    meta = viewer.layers["em aligned"].metadata[L.META_KEY]
    assert meta["ignore"] == "dust" and "'dust' were left out" in widget.status.text()
    viewer.dims.set_current_step(0, 2)
    assert run_and_wait(qtbot, widget, widget.realign) == "done", error_messages()
    assert viewer.layers["em aligned"].metadata[L.META_KEY]["ignore"] == "dust"
    # the mask removed: the chooser forgets it
    viewer.layers.remove("dust")
    assert widget.selected_ignore() is None
    assert widget.ignore_combo.count() == 1


@pytest.mark.parametrize("in_process", [False, True], ids=["thread", "child-process"])
def test_blockwise_align_from_the_widget_matches_the_api(qtbot, viewer_widget, monkeypatch,
                                                         in_process):
    from napari_ssemnet.core.align import align_stack

    # large stacks run in a child process (core.process); the result must be the same
    monkeypatch.setenv("NAPARI_SSEMNET_PROCESS", "1" if in_process else "0")
    viewer, widget = viewer_widget
    stack = make_stack(z=7)
    viewer.add_image(stack, name="em")
    # blocks 2-5 (with the reference), then 6 upwards and 0-1 downwards: sections arrive out
    # of order
    set_fast(widget, block_size=4, reference=3)
    assert run_and_wait(qtbot, widget, widget.align) == "done", error_messages()
    r = align_stack(stack, **FAST, block_size=4, reference=3)
    np.testing.assert_array_equal(widget.results["em"].displacement, r.displacement)
    np.testing.assert_array_equal(widget.results["em"].aligned, r.aligned)
    # the layer holds it in the source's type, rounded
    np.testing.assert_array_equal(viewer.layers["em aligned"].data,
                                  np.clip(np.rint(r.aligned), 0, 255).astype(np.uint8))
    meta = viewer.layers["em aligned"].metadata[L.META_KEY]
    assert meta["complete"] and meta["params"]["block_size"] == 4


def test_user_layer_with_result_name_is_left_alone(qtbot, viewer_widget, stack):
    viewer, widget = viewer_widget
    viewer.add_image(stack, name="em")
    mine = viewer.add_image(np.ones((2, 40, 40)), name="em aligned")
    set_fast(widget)
    assert run_and_wait(qtbot, widget, widget.align) == "done"
    assert np.all(mine.data == 1) and mine.data.shape == (2, 40, 40)
    ours = L.find_result_layer(viewer, "em", L.ROLE_ALIGNED)
    assert ours is not mine and ours.data.shape == stack.shape


def test_preview_then_realign(qtbot, viewer_widget, stack, tmp_path):
    viewer, widget = viewer_widget
    viewer.add_image(stack, name="em")
    set_fast(widget)
    viewer.dims.set_current_step(0, 0)
    widget.preview()  # the box's reference, before any run: Align would not move it
    assert not widget.running and "is the reference section" in widget.status.text()
    viewer.dims.set_current_step(0, 2)
    assert not widget.realign_btn.isEnabled()  # nothing to re-align yet
    # a path left in the greyed-out Weights box is not recorded as if it had been used
    widget.form.set_value("weights", str(tmp_path / "old.pt"))
    assert run_and_wait(qtbot, widget, widget.preview) == "done", error_messages()
    aligned = viewer.layers["em aligned"]
    meta = aligned.metadata[L.META_KEY]
    assert meta["state"] == "preview" and meta["section"] == 2
    assert meta["params"]["weights"] == "" and meta["params"]["features"] != "custom"
    # sections other than the previewed one are the unaligned input
    np.testing.assert_allclose(aligned.data[0], stack[0])
    vec = viewer.layers["em displacement"].data
    assert set(np.unique(vec[:, 0, 0]).astype(int)) == {2}
    assert np.isfinite(meta["ncc_after"][2]) and meta["ncc_after"][0] is None
    # the disabled buttons say it is a Preview (they sent users to File > Save, which refuses)
    assert "Preview of section 2" in widget.save_btn.toolTip()

    assert run_and_wait(qtbot, widget, widget.align) == "done"
    full = widget.results["em"].aligned.copy()
    full_disp = widget.results["em"].displacement.copy()
    input_ncc = np.array(widget.results["em"].ncc_before, float)
    assert widget.realign_btn.isEnabled()
    viewer.dims.set_current_step(0, 1)
    widget.form.set_value("grid_spacing", 24)
    assert run_and_wait(qtbot, widget, widget.realign) == "done", error_messages()
    res = widget.results["em"]
    np.testing.assert_array_equal(res.aligned[3], full[3])  # other sections kept
    assert np.abs(res.displacement[1] - full_disp[1]).max() > 0.05  # and section 1 is new
    np.testing.assert_array_equal(viewer.layers["em displacement"].metadata[L.META_KEY]
                                  ["displacement"][1], res.displacement[1])
    # "before" is still the input's NCC: it took the previous result's, and the plot's
    # grey curve jumped up to the orange one
    np.testing.assert_array_equal(np.array(res.ncc_before, float), input_ncc)
    np.testing.assert_array_equal(widget.plot.before, input_ncc)
    # the run's parameters stay the run's; section 1's own are recorded beside them
    assert res.params.grid_spacing == FAST["grid_spacing"]
    assert res.section_params[1].grid_spacing == 24
    meta = viewer.layers["em aligned"].metadata[L.META_KEY]
    assert meta["state"] == "aligned" and meta["section"] == 1
    assert meta["params"]["grid_spacing"] == FAST["grid_spacing"]
    assert meta["section_params"]["1"]["grid_spacing"] == 24
    assert "Re-aligned section 1" in widget.status.text()
    saved = np.load(widget.save_fields(tmp_path / "f.npz"))
    assert json.loads(str(saved["section_params"]))["1"]["grid_spacing"] == 24
    assert json.loads(str(saved["environment"])) == res.environment  # the run's, from Align
    assert res.environment["torch_threads"] >= 1 and res.environment["device"] == "cpu"
    # the napari writer (File > Save Selected Layer) writes what Save fields writes
    from napari_ssemnet._writer import write_fields

    vectors = viewer.layers["em displacement"]
    written = np.load(write_fields(str(tmp_path / "w.npz"), vectors.data,
                                   {"metadata": vectors.metadata})[0])
    np.testing.assert_array_equal(written["displacement"], saved["displacement"])
    assert json.loads(str(written["section_params"])) == json.loads(str(saved["section_params"]))
    assert json.loads(str(written["environment"])) == res.environment
    # and the links after the re-align (the numbers behind poor_match), both ways alike
    from napari_ssemnet.core.io import pair_array

    np.testing.assert_array_equal(saved["pair_ncc"], pair_array(res.pair_ncc))
    np.testing.assert_array_equal(written["pair_ncc"], saved["pair_ncc"])
    np.testing.assert_array_equal(written["ncc_after"], saved["ncc_after"])

    # the reference stays put: re-aligning it would move it (1.2 px in a review)
    viewer.dims.set_current_step(0, 0)
    before = res.displacement.copy()
    widget.realign()
    assert not widget.running and "reference" in widget.status.text()
    np.testing.assert_array_equal(widget.results["em"].displacement, before)
    widget.preview()  # neither is its preview in the run's frame
    assert not widget.running and "reference" in widget.status.text()

    # a preview is not an alignment: the writer refuses it rather than mislabel it
    viewer.dims.set_current_step(0, 2)
    assert run_and_wait(qtbot, widget, widget.preview) == "done", error_messages()
    vectors = viewer.layers["em displacement"]
    # not a ValueError, which npe2 takes for "no writer" and drops with its message
    with pytest.raises(SsemnetError, match="Preview of section 2") as info:
        viewer.layers.selection = {vectors}
        viewer.layers.save(str(tmp_path / "p.npz"), selected=True, plugin="napari-ssemnet")
    assert not isinstance(info.value, ValueError)
    assert not (tmp_path / "p.npz").exists()

    # new data of the same shape: the old result must not be re-aligned or saved with it
    viewer.layers["em"].data = stack[::-1].copy()
    assert "em" not in widget.results
    assert not widget.realign_btn.isEnabled() and not widget.save_btn.isEnabled()
    assert "changed" in widget.status.text()


def test_a_few_sections_replaced_in_the_layer_keep_the_result_for_re_align(
        qtbot, viewer_widget, stack, tmp_path):
    # new data dropped the whole result, so a section put right in the layer needed a new
    # Align of the whole stack instead of one Re-align
    viewer, widget = viewer_widget
    layer = viewer.add_image(stack, name="em")
    set_fast(widget)
    assert run_and_wait(qtbot, widget, widget.align) == "done", error_messages()
    run = widget.results["em"]
    same = stack.copy()
    layer.data = same  # the same values in a new array: nothing changed
    assert widget.results["em"] is run and not widget.changed
    fixed = stack.copy()
    fixed[2] = np.rot90(stack[2])
    layer.data = fixed
    assert widget.results["em"] is run and widget.changed == {"em": {2}}
    text = widget.status.text()
    assert "Section 2 of 'em' changed since Align" in text and "Re-align" in text
    assert not widget.save_btn.isEnabled() and widget.realign_btn.isEnabled()
    assert "changed since Align" in widget.save_btn.toolTip()
    assert widget.save_fields(tmp_path / "f.npz") is None
    assert not (tmp_path / "f.npz").exists()
    viewer.dims.set_current_step(0, 2)
    assert run_and_wait(qtbot, widget, widget.realign) == "done", error_messages()
    assert not widget.changed and widget.save_btn.isEnabled()
    assert widget.results["em"] is not run
    assert widget.save_fields(tmp_path / "f.npz") is not None
    # Undo puts back the old placement of section 2, which its new data does not fit
    widget.undo_realign()
    assert widget.results["em"] is run and widget.changed == {"em": {2}}
    assert not widget.save_btn.isEnabled()
    # the reference section, or more than a quarter of the stack: another stack
    again = fixed.copy()
    again[run.params.reference] = np.rot90(fixed[run.params.reference])
    layer.data = again
    assert "em" not in widget.results and not widget.changed
    assert "no longer applies" in widget.status.text()
    assert run_and_wait(qtbot, widget, widget.align) == "done", error_messages()
    two = again.copy()
    two[1:3] = again[1:3, ::-1]
    layer.data = two
    assert "em" not in widget.results and "no longer applies" in widget.status.text()


def test_the_plot_does_not_show_a_result_of_a_stack_of_another_length(
        qtbot, viewer_widget):
    # the curves of the old layers stayed, for sections the new stack does not have
    viewer, widget = viewer_widget
    layer = viewer.add_image(make_stack(z=4, size=96), name="em")
    set_fast(widget)
    assert run_and_wait(qtbot, widget, widget.align) == "done", error_messages()
    assert widget.plot.n_sections() == 4
    layer.data = make_stack(z=6, size=96, seed=1)
    assert widget.plot.n_sections() == 0
    assert "stack of 4 sections; this one has 6" in widget.plot.empty_text
    assert run_and_wait(qtbot, widget, widget.align) == "done", error_messages()
    assert widget.plot.n_sections() == 6


def test_undo_puts_back_the_result_from_before_a_realign(qtbot, viewer_widget, stack,
                                                        tmp_path):
    viewer, widget = viewer_widget
    viewer.add_image(stack, name="em")
    set_fast(widget)
    assert not widget.undo_btn.isEnabled()
    assert run_and_wait(qtbot, widget, widget.align) == "done"
    full = widget.results["em"]
    shown = {role: np.array(L.find_result_layer(viewer, "em", role).data)
             for role in (L.ROLE_ALIGNED, L.ROLE_DISPLACEMENT, L.ROLE_NCC_ERROR)}
    ncc_meta = list(viewer.layers["em aligned"].metadata[L.META_KEY]["ncc_after"])
    assert not widget.undo_btn.isEnabled()  # a full run is not undone: Align again
    viewer.dims.set_current_step(0, 2)
    widget.form.set_value("grid_spacing", 16)
    widget.form.set_value("smoothness", 0.0)
    assert run_and_wait(qtbot, widget, widget.realign) == "done", error_messages()
    assert widget.results["em"] is not full
    assert not np.array_equal(widget.results["em"].displacement[2], full.displacement[2])
    assert widget.undo_btn.isEnabled() and "section 2" in widget.undo_btn.toolTip()

    widget.undo_btn.click()
    assert widget.results["em"] is full
    for role, data in shown.items():
        np.testing.assert_array_equal(L.find_result_layer(viewer, "em", role).data, data)
    assert viewer.layers["em aligned"].metadata[L.META_KEY]["ncc_after"] == ncc_meta
    assert "section_params" not in viewer.layers["em aligned"].metadata[L.META_KEY]
    np.testing.assert_array_equal(widget.plot.after, np.array(full.ncc_after, float))
    assert "Undid the Re-align of section 2" in widget.status.text()
    saved = np.load(widget.save_fields(tmp_path / "f.npz"))
    np.testing.assert_array_equal(saved["displacement"], full.displacement)
    assert not widget.undo_btn.isEnabled()  # one level
    widget.undo_realign()
    assert widget.results["em"] is full and "no Re-align" in widget.status.text()

    # a full run after a Re-align leaves nothing to undo; so does new data
    assert run_and_wait(qtbot, widget, widget.realign) == "done", error_messages()
    assert widget.undo_btn.isEnabled()
    assert run_and_wait(qtbot, widget, widget.align) == "done"
    assert not widget.undo_btn.isEnabled()
    assert run_and_wait(qtbot, widget, widget.realign) == "done", error_messages()
    # renamed after the Re-align: the restored layers stay the renamed stack's (they went
    # back to the old name in their metadata, and the next Re-align made a second set)
    viewer.layers["em"].name = "em2"
    widget.undo_btn.click()
    assert "Undid" in widget.status.text()
    for role in (L.ROLE_ALIGNED, L.ROLE_DISPLACEMENT, L.ROLE_NCC_ERROR):
        assert L.find_result_layer(viewer, "em2", role) is not None, role
    assert widget.plot.after.size == stack.shape[0]
    n_layers = len(viewer.layers)
    assert run_and_wait(qtbot, widget, widget.realign) == "done", error_messages()
    assert len(viewer.layers) == n_layers
    viewer.layers["em2"].data = stack[::-1].copy()
    assert not widget.undo_btn.isEnabled() and "em2" not in widget._undo


@pytest.mark.parametrize("in_process", [False, True], ids=["thread", "child-process"])
def test_cancel_stops_quickly_and_restores(qtbot, viewer_widget, monkeypatch, in_process):
    monkeypatch.setenv("NAPARI_SSEMNET_PROCESS", "1" if in_process else "0")
    viewer, widget = viewer_widget
    big = make_stack(z=6, size=160, seed=1)
    viewer.add_image(big, name="em")
    set_fast(widget, iterations=5000, levels=2, tolerance=0.0)
    n_layers = len(viewer.layers)
    widget.align()
    assert widget.running and not widget.align_btn.isEnabled()
    assert not widget.realign_btn.isEnabled() and not widget.preview_btn.isEnabled()
    # the run took its inputs when it started: choosing others now would not reach it
    assert not widget.layer_combo.isEnabled() and not widget.ignore_combo.isEnabled()
    qtbot.waitUntil(lambda: widget.progress.maximum() > 0 and "fit" in widget.status.text(),
                    timeout=30000)
    # one bar for the whole run: past the pre-alignment's share once the fit runs
    assert widget.progress.maximum() == 1000 and widget.progress.value() >= 300
    t0 = time.perf_counter()
    with qtbot.waitSignal(widget.job_finished, timeout=5000) as blocker:
        widget.cancel_btn.click()
    stop_s = time.perf_counter() - t0
    print(f"cancel took {stop_s:.2f} s")
    assert blocker.args[0] == "cancelled"
    assert stop_s < 2.0
    assert len(viewer.layers) == n_layers  # no partial result layers left behind
    assert widget.align_btn.isEnabled() and not widget.cancel_btn.isEnabled()
    assert widget.ignore_combo.isEnabled()
    assert "cancelled" in widget.status.text().lower()


@pytest.mark.parametrize("kind", ["2d", "rgb", "small", "mask", "none"])
def test_bad_layer_shows_error(qtbot, viewer_widget, kind):
    viewer, widget = viewer_widget
    if kind == "mask":
        viewer.add_image(make_stack() > 128, name="bad")
    elif kind == "2d":
        viewer.add_image(make_stack()[0], name="bad")
    elif kind == "rgb":
        viewer.add_image(np.zeros((4, 64, 64, 3), np.uint8), name="bad", rgb=True)
    elif kind == "small":
        viewer.add_image(make_stack(z=3, size=16), name="bad")
    start = n_records()
    widget.align_btn.click()
    qtbot.wait(50)
    errors = error_messages(start)
    assert len(errors) == 1, errors
    expected = {"2d": "single 2D image", "rgb": "RGB", "small": "too small",
                "mask": "boolean mask",
                "none": "No 3D grayscale Image layer"}[kind]
    assert expected in errors[0]
    assert not widget.running and widget.align_btn.isEnabled()
    assert [ly.name for ly in viewer.layers] == ([] if kind == "none" else ["bad"])


def test_bad_parameters_show_error(qtbot, viewer_widget, stack):
    viewer, widget = viewer_widget
    viewer.add_image(stack, name="em")
    widget.form.set_value("features", "custom")  # without a weights file
    start = n_records()
    widget.align_btn.click()
    errors = error_messages(start)
    assert len(errors) == 1 and "weights" in errors[0]
    assert not widget.running
    # the status line says why, instead of showing an earlier outcome
    assert widget.status.text().startswith("Align not started:")
    assert "weights" in widget.status.text()


def test_missing_weights_file_is_a_readable_error(qtbot, viewer_widget, stack, tmp_path):
    viewer, widget = viewer_widget
    viewer.add_image(stack, name="em")
    set_fast(widget, features="custom", weights=str(tmp_path / "nope.pt"))
    start = n_records()
    widget.align_btn.click()  # refused before a run starts
    assert not widget.running
    errors = error_messages(start)
    assert len(errors) == 1 and "nope.pt" in errors[0]
    assert "unexpected" not in errors[0]
    assert widget.status.text().startswith("Align not started:")
    assert "em aligned" not in viewer.layers
    # a file that exists but is not weights still fails in the run, readably
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not weights")
    widget.form.set_value("weights", str(bad))
    start = n_records()
    assert run_and_wait(qtbot, widget, widget.align) == "failed"
    errors = error_messages(start)
    assert len(errors) == 1 and "bad.pt" in errors[0] and "unexpected" not in errors[0]
    assert "em aligned" not in viewer.layers


def test_screenshot_after_alignment_is_not_blank(qtbot, make_napari_viewer, stack):
    viewer = make_napari_viewer(show=True)
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-ssemnet", "Align EM stack")
    viewer.add_image(stack, name="em")
    set_fast(widget)
    assert run_and_wait(qtbot, widget, widget.align) == "done"
    shot = viewer.screenshot(canvas_only=True, flash=False)
    gray = shot[..., :3].astype(float).mean(axis=-1)
    assert gray.std() > 10, gray.std()
    # the widget itself is drawn with readable size
    assert widget.width() > 200 and widget.plot.height() >= 100


def _long_run(qtbot, make_napari_viewer):
    """A docked widget in the middle of a run that would take minutes."""
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("napari-ssemnet", "Align EM stack")
    viewer.add_image(make_stack(z=6, size=160, seed=2), name="em")
    set_fast(widget, iterations=5000, tolerance=0.0)
    widget.align()
    qtbot.waitUntil(lambda: "fit" in widget.status.text(), timeout=30000)
    return viewer, dock, widget


def test_close_viewer_while_running(qtbot, make_napari_viewer):
    _viewer, _dock, widget = _long_run(qtbot, make_napari_viewer)
    worker = widget.worker
    stop = widget._ctl.stop
    widget.close()  # what napari does to dock widgets when its window closes
    assert stop.is_set() and worker.abort_requested
    qtbot.waitUntil(lambda: not worker.is_running, timeout=5000)


def test_closing_the_panel_stops_the_run(qtbot, make_napari_viewer):
    viewer, dock, widget = _long_run(qtbot, make_napari_viewer)
    stop = widget._ctl.stop
    t0 = time.perf_counter()
    with qtbot.waitSignal(widget.job_finished, timeout=5000) as blocker:
        dock.title.close_button.click()  # the panel's own "x"; napari does not close it
    print(f"run stopped {time.perf_counter() - t0:.2f} s after the panel was closed")
    assert stop.is_set() and blocker.args[0] == "cancelled"
    assert [ly.name for ly in viewer.layers] == ["em"]  # streamed sections taken back


def test_renamed_source_keeps_its_result(qtbot, viewer_widget, stack):
    viewer, widget = viewer_widget
    viewer.add_image(stack, name="em")
    set_fast(widget)
    assert run_and_wait(qtbot, widget, widget.align) == "done"
    viewer.add_image(stack[:3], name="other")
    viewer.layers.selection.active = viewer.layers["other"]  # another layer is active
    widget.set_layer("em")
    viewer.layers["em"].name = "em renamed"
    assert widget.layer_combo.currentText() == "em renamed"
    assert set(widget.results) == {"em renamed"}
    names = [ly.name for ly in viewer.layers]
    assert names == ["em renamed", "em renamed aligned", "em renamed displacement",
                     "em renamed NCC error", "other"], names
    assert widget.save_btn.isEnabled() and widget.realign_btn.isEnabled()
    assert widget.plot.after.size == stack.shape[0]
    assert L.find_result_layer(viewer, "em renamed", L.ROLE_ALIGNED) is not None
    # removed, then another stack under the same name and shape: not the old result's
    viewer.layers.remove("em renamed")
    assert not widget.results
    viewer.add_image(stack[::-1].copy(), name="em renamed")
    widget.set_layer("em renamed")
    assert not widget.save_btn.isEnabled() and not widget.realign_btn.isEnabled()
    # the old result layers are still there: the disabled buttons say why, and what to do
    assert "this panel does not hold" in widget.save_btn.toolTip()
    assert "File > Save Selected" in widget.realign_btn.toolTip()


def test_panel_scrolls_instead_of_needing_a_tall_screen(make_napari_viewer):
    from qtpy.QtWidgets import QScrollArea

    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-ssemnet", "Align EM stack")
    widget.form.advanced.expand(animate=False)
    content = widget.findChild(QScrollArea).widget()
    # the parameters scroll; the buttons, the progress and the plot stay in view
    assert content.isAncestorOf(widget.form)
    assert not content.isAncestorOf(widget.align_btn) and not content.isAncestorOf(widget.plot)
    # with Advanced open the parameters alone are taller than the panel has to be
    print("parameters", content.minimumSizeHint().height(), "px; panel at least",
          widget.minimumSizeHint().height(), "px")
    assert content.minimumSizeHint().height() > 500
    assert widget.minimumSizeHint().height() < 450


def test_fast_params_are_valid():
    from napari_ssemnet.core.params import AlignParams

    AlignParams(**FAST)


def test_train_features_switches_to_custom(qtbot, viewer_widget, stack, tmp_path, monkeypatch):
    from napari_ssemnet.gui import _jobs

    monkeypatch.setattr(_jobs, "weights_dir", lambda: tmp_path)
    viewer, widget = viewer_widget
    viewer.add_image(stack, name="em")
    widget.train_steps.setValue(20)
    widget.form.set_value("device", "cpu")
    assert run_and_wait(qtbot, widget, widget.train_btn.click) == "done", error_messages()
    assert widget.form.value("features") == "custom"
    weights = widget.form.value("weights")
    assert weights.startswith(str(tmp_path)) and Path(weights).is_file()
    assert widget.form.controls["weights"].isEnabled()
    # the trained weights are usable for an alignment
    set_fast(widget, features="custom", weights=weights)
    assert run_and_wait(qtbot, widget, widget.align) == "done", error_messages()


def test_cancel_during_training_keeps_the_feature_model(qtbot, viewer_widget, stack, tmp_path,
                                                         monkeypatch):
    from napari_ssemnet.gui import _jobs

    monkeypatch.setattr(_jobs, "weights_dir", lambda: tmp_path)
    viewer, widget = viewer_widget
    viewer.add_image(stack, name="em")
    widget.train_steps.setValue(100000)
    widget.form.set_value("device", "cpu")
    widget.train_btn.click()
    qtbot.waitUntil(lambda: "train" in widget.status.text().lower(), timeout=30000)
    with qtbot.waitSignal(widget.job_finished, timeout=5000) as blocker:
        widget.cancel_btn.click()
    assert blocker.args[0] == "cancelled"
    # nothing half-trained is switched on or left on disk
    assert widget.form.value("features") == "shipped"
    assert list(tmp_path.iterdir()) == []
    assert widget.train_btn.isEnabled() and widget.align_btn.isEnabled()


_REMOVAL_IN_A_SHOWN_VIEWER = """
import os, sys, time
import napari
from qtpy.QtCore import QEventLoop, QTimer
from napari_ssemnet import _layers as L
from napari_ssemnet.core.sample import load_sample

stack = load_sample(misaligned=True)
viewer = napari.Viewer(show=True)
viewer.add_image(stack, name="em")
_dock, widget = viewer.window.add_plugin_dock_widget("napari-ssemnet", "Align EM stack")
app = napari.qt.get_qapp()


def pump(n=10):
    for _ in range(n):
        app.processEvents()
        time.sleep(0.02)


seen = []
mode = os.environ["REMOVAL_MODE"]


def on_insert(event):
    seen.append(event.value.name)
    if mode == "cancel" and len(seen) == 1:  # the first streamed layer: stop now
        widget.cancel()  # the same handler call still adds the displacement layer


viewer.layers.events.inserted.connect(on_insert)
loop = QEventLoop()
widget.job_finished.connect(lambda state: loop.quit())
widget.align()
QTimer.singleShot(120_000, loop.quit)
loop.exec_()
pump()
if mode == "hidden":
    # a finished run whose layers the user hid: the rollback path must survive removing
    # layers that were drawn, then hidden
    for layer in list(viewer.layers)[1:]:
        layer.visible = False
    pump()
    roles = (L.ROLE_ALIGNED, L.ROLE_DISPLACEMENT, L.ROLE_NCC_ERROR)
    widget._rollback({"source": "em", "snapshots": [(r, None, None) for r in roles]})
for z in range(stack.shape[0]):  # draw the canvas a few times afterwards
    viewer.dims.set_current_step(0, z)
    pump(3)
print("OUTCOME", widget.last_outcome, len(seen), len(viewer.layers), flush=True)
viewer.close()
"""


@pytest.mark.parametrize("mode, expected", [("cancel", "OUTCOME cancelled 2 1"),
                                            ("hidden", "OUTCOME done 3 1")])
def test_removing_result_layers_does_not_crash_a_shown_viewer(tmp_path, mode, expected):
    # With the canvas really drawing (shown window), removing the two partial layers of a
    # cancelled run in one go, or removing a layer that was drawn and then hidden, made the
    # next draw segfault (napari 0.9.2 + Mesa); a subprocess keeps a crash contained.
    import subprocess
    import sys

    env = {**os.environ, "NAPARI_CONFIG": str(tmp_path / "settings.yaml"),
           "REMOVAL_MODE": mode}
    res = subprocess.run([sys.executable, "-c", _REMOVAL_IN_A_SHOWN_VIEWER], env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("OUTCOME")][-1]
    assert line == expected, line  # outcome, result layers created, layers left


def _menu_action(menu, text):
    menu.aboutToShow.emit()  # napari fills plugin submenus when they are shown
    for action in menu.actions():
        if action.menu() is not None:
            found = _menu_action(action.menu(), text)
            if found is not None:
                return found
        elif action.text().replace("&", "") == text:
            return action
    return None


def test_the_apply_button_reuses_an_apply_panel_opened_from_the_menu(make_napari_viewer,
                                                                    qtbot):
    # with a display name other than the package name, the menu's panel and the button's
    # panel had two titles, and the button opened a second Apply panel
    viewer = make_napari_viewer()
    bar = viewer.window._qt_window.menuBar()
    plugins = next(a.menu() for a in bar.actions() if "Plugins" in a.text())
    for text in ("Apply saved fields", "Align EM stack"):
        action = _menu_action(plugins, text)
        assert action is not None, text
        action.trigger()
    align = next(d.widget() for name, d in viewer.window._dock_widgets.items()
                 if name.startswith("Align EM stack"))
    align._open_apply_widget()
    names = list(viewer.window._dock_widgets)
    assert sorted(names) == ["Align EM stack (napari-ssemnet)",
                             "Apply saved fields (napari-ssemnet)"], names


def _hold_after_sections(monkeypatch, *counts: int):
    """Make the Align job pause after each of ``counts`` streamed sections until that hold's
    ``release`` is set (or the run is cancelled), as a slow render would; returns
    ``{count: (held, release)}`` events."""
    import threading

    from napari_ssemnet.core.align import SectionResult
    from napari_ssemnet.gui import _jobs as jobs

    real = jobs.align_job
    holds = {n: (threading.Event(), threading.Event()) for n in counts}

    def paused(stack, params, stop, *, ignore=None):
        gen, seen = real(stack, params, stop=stop, ignore=ignore), 0
        while True:
            try:
                event = next(gen)
            except StopIteration as done:
                return done.value
            yield event
            if isinstance(event, SectionResult):
                seen += 1
                if seen in holds:
                    held, release = holds[seen]
                    held.set()
                    while not (release.is_set() or stop.is_set()):
                        time.sleep(0.01)

    monkeypatch.setattr(jobs, "align_job", paused)
    return holds


def test_a_cancelled_rerun_gives_back_the_result_layers_with_their_metadata(
        qtbot, viewer_widget, monkeypatch):
    # the rollback assigned napari's own metadata dict back to the layer, which empties it:
    # the next run no longer recognised its layers and made "em aligned [1]"
    viewer, widget = viewer_widget
    stack = make_stack(z=5, size=96)
    viewer.add_image(stack, name="em")
    set_fast(widget)
    assert run_and_wait(qtbot, widget, widget.align) == "done"
    before = {n: viewer.layers[n].metadata[L.META_KEY].copy()
              for n in ("em aligned", "em displacement")}
    data_before = viewer.layers["em aligned"].data.copy()
    held, _release = _hold_after_sections(monkeypatch, 2)[2]
    widget.form.set_value("grid_spacing", 48)
    with qtbot.waitSignal(widget.job_finished, timeout=60000) as blocker:
        widget.align()
        qtbot.waitUntil(held.is_set, timeout=60000)
        qtbot.wait(100)  # the streamed sections reach the layers
        widget.cancel()
    assert blocker.args[0] == "cancelled"
    for name, meta in before.items():
        now = viewer.layers[name].metadata[L.META_KEY]
        assert now.keys() == meta.keys() and now["params"] == meta["params"], name
        assert now["complete"] and now["params"]["grid_spacing"] == 32
    np.testing.assert_array_equal(viewer.layers["em aligned"].data, data_before)
    monkeypatch.undo()
    n_layers = len(viewer.layers)
    assert run_and_wait(qtbot, widget, widget.align) == "done"
    assert len(viewer.layers) == n_layers  # the same layers updated, no "[1]" copies


def test_sections_edited_in_place_during_a_run_are_marked_changed(
        qtbot, viewer_widget, monkeypatch):
    # napari sends no event for an in-place edit: the result was kept as if made from the
    # new data, and Save fields wrote it
    viewer, widget = viewer_widget
    layer = viewer.add_image(make_stack(z=5, size=96), name="em")
    set_fast(widget)
    for z, kept in [(3, True), (0, False)]:  # 0: the reference
        holds = _hold_after_sections(monkeypatch, 1)
        with qtbot.waitSignal(widget.job_finished, timeout=60000) as blocker:
            widget.align()
            qtbot.waitUntil(holds[1][0].is_set, timeout=60000)
            layer.data[z] = layer.data[z][::-1].copy()
            holds[1][1].set()
        monkeypatch.undo()
        assert blocker.args[0] == "done"
        if kept:
            assert widget.changed["em"] == {3} and not widget.save_btn.isEnabled()
            assert "Section 3 of 'em' changed during the run" in widget.status.text()
        else:
            assert "em" not in widget.results and "not kept" in widget.status.text()


def test_sections_edited_in_place_during_a_realign_are_marked_changed(
        qtbot, viewer_widget, monkeypatch):
    # the Re-align job fingerprinted its section only as it ended, so an edit made during
    # it was taken as the data it had aligned, and other sections' edits went unseen
    import threading

    from napari_ssemnet.core import align as core_align

    viewer, widget = viewer_widget
    layer = viewer.add_image(make_stack(z=8, size=96), name="em")  # a quarter: 2
    set_fast(widget)
    assert run_and_wait(qtbot, widget, widget.align) == "done", error_messages()
    real = core_align.iter_align_section
    held, release = threading.Event(), threading.Event()

    def paused(*args, should_stop=None, **kwargs):
        gen = real(*args, should_stop=should_stop, **kwargs)
        first = next(gen)
        held.set()
        while not (release.is_set() or should_stop()):
            time.sleep(0.01)
        yield first
        return (yield from gen)

    # an edit between runs is found by the next Re-align (of another section)
    layer.data[5] = layer.data[5][::-1].copy()
    viewer.dims.set_current_step(0, 2)
    assert run_and_wait(qtbot, widget, widget.realign) == "done", error_messages()
    assert widget.changed["em"] == {5}
    assert "Section 5 of 'em' changed since Align" in widget.status.text()
    viewer.dims.set_current_step(0, 5)  # and the edited section re-aligned is set right
    assert run_and_wait(qtbot, widget, widget.realign) == "done", error_messages()
    assert "em" not in widget.changed and widget.save_btn.isEnabled()
    viewer.dims.set_current_step(0, 2)
    for edit, kept in [((2, 4), True), ((0,), False)]:  # 0: the reference
        held.clear()
        release.clear()
        monkeypatch.setattr(core_align, "iter_align_section", paused)
        with qtbot.waitSignal(widget.job_finished, timeout=60000) as blocker:
            widget.realign()
            qtbot.waitUntil(held.is_set, timeout=60000)
            for z in edit:
                layer.data[z] = layer.data[z][::-1].copy()
            release.set()
        monkeypatch.undo()
        assert blocker.args[0] == "done", error_messages()
        if kept:
            assert widget.changed["em"] == {2, 4} and not widget.save_btn.isEnabled()
            assert "Sections 2, 4 of 'em' changed during the run" in widget.status.text()
            # what was edited is found again: the fingerprints are those of the old data
            assert widget._changed_sections("em", layer.data) == [2, 4]
        else:
            assert "em" not in widget.results and "not kept" in widget.status.text()


def test_a_result_layer_deleted_during_a_cancelled_rerun_stays_deleted(
        qtbot, viewer_widget, monkeypatch):
    # the run made the deleted layer again from the sections it streamed next, and Cancel
    # ("result layers restored") left that partial layer on top of the others
    viewer, widget = viewer_widget
    viewer.add_image(make_stack(z=5, size=96), name="em")
    set_fast(widget)
    assert run_and_wait(qtbot, widget, widget.align) == "done"
    holds = _hold_after_sections(monkeypatch, 1, 3)
    with qtbot.waitSignal(widget.job_finished, timeout=60000) as blocker:
        widget.align()
        qtbot.waitUntil(holds[1][0].is_set, timeout=60000)
        qtbot.wait(100)
        viewer.layers.remove("em aligned")
        holds[1][1].set()
        qtbot.waitUntil(holds[3][0].is_set, timeout=60000)
        qtbot.waitUntil(lambda: "em aligned" in viewer.layers, timeout=10000)  # made again
        widget.cancel()
    assert blocker.args[0] == "cancelled"
    assert "em aligned" not in viewer.layers
    assert viewer.layers["em displacement"].metadata[L.META_KEY]["complete"]


def test_results_keep_the_sources_placement_when_it_is_deleted_during_the_run(
        qtbot, viewer_widget, monkeypatch):
    viewer, widget = viewer_widget
    stack = make_stack(z=5, size=96)
    # a rotated layer in nm: the results must lie on it, not only share its scale
    src = viewer.add_image(stack, name="em", scale=(50, 4, 4), translate=(100, 20, 30),
                           rotate=20, units=("nm", "nm", "nm"))
    world = np.asarray(src.extent.world)
    set_fast(widget)
    held, release = _hold_after_sections(monkeypatch, 2)[2]
    with qtbot.waitSignal(widget.job_finished, timeout=60000) as blocker:
        widget.align()
        qtbot.waitUntil(held.is_set, timeout=60000)
        qtbot.wait(100)
        aligned = viewer.layers["em aligned"]
        # sections not aligned yet show the input, not an opaque black slab
        shown = widget._job["stream"]["vectors"]  # the two sections streamed so far
        todo = [z for z in range(5) if z not in shown]
        assert len(shown) == 2 and aligned.metadata[L.META_KEY]["sections_done"] >= 1
        np.testing.assert_array_equal(aligned.data[todo], stack[todo])
        viewer.layers.remove("em")
        release.set()
    assert blocker.args[0] == "done"
    assert not widget.results and "'em' was removed during the run" in widget.status.text()
    assert "hold its alignment" in widget.status.text()  # it said they showed "old data"
    for name in ("em aligned", "em displacement", "em NCC error"):
        layer = viewer.layers[name]
        assert list(layer.scale) == [50, 4, 4] and list(layer.translate) == [100, 20, 30], name
        assert [str(u) for u in layer.units] == ["nanometer"] * 3, name
        if name != "em displacement":  # vectors' extent is that of their arrows
            np.testing.assert_allclose(layer.extent.world, world, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(layer.rotate, src.rotate, atol=1e-12, err_msg=name)


def test_results_follow_a_placement_set_on_the_source_during_the_run(
        qtbot, viewer_widget, monkeypatch):
    # the results were placed as the source was when Align started: a pixel size typed in
    # meanwhile left them, silently, at scale 1 beside the stack
    viewer, widget = viewer_widget
    src = viewer.add_image(make_stack(z=5, size=96), name="em")
    set_fast(widget)
    held, release = _hold_after_sections(monkeypatch, 2)[2]
    with qtbot.waitSignal(widget.job_finished, timeout=60000) as blocker:
        widget.align()
        qtbot.waitUntil(held.is_set, timeout=60000)
        qtbot.waitUntil(lambda: "em aligned" in viewer.layers, timeout=10000)
        assert list(viewer.layers["em aligned"].scale) == [1, 1, 1]
        src.scale, src.translate, src.units = (50, 4, 4), (100, 20, 30), ("nm",) * 3
        release.set()
    assert blocker.args[0] == "done" and "em" in widget.results
    world = np.asarray(src.extent.world)
    for name in ("em aligned", "em displacement", "em NCC error"):
        layer = viewer.layers[name]
        assert list(layer.scale) == [50, 4, 4] and list(layer.translate) == [100, 20, 30], name
        assert [str(u) for u in layer.units] == ["nanometer"] * 3, name
        if name != "em displacement":
            np.testing.assert_allclose(layer.extent.world, world, atol=1e-6, err_msg=name)


def test_a_lazy_layer_is_read_in_the_worker_not_on_the_gui_thread(qtbot, viewer_widget):
    # a dask or zarr stack read by the Align click froze napari for the whole read
    import threading

    import dask
    import dask.array as da

    viewer, widget = viewer_widget
    stack = make_stack(z=5, size=96)
    on_gui = []

    def load(block, block_info=None):
        if threading.current_thread() is threading.main_thread():
            on_gui.append(block_info[0]["chunk-location"][0])
        return block

    lazy = da.from_array(stack, chunks=(1, 96, 96)).map_blocks(load, dtype=stack.dtype)
    with dask.config.set(scheduler="synchronous"):  # reads run in the thread that asks
        viewer.add_image(lazy, name="em")
        set_fast(widget)
        qtbot.wait(50)
        before = len(on_gui)
        with qtbot.waitSignal(widget.job_finished, timeout=60000) as blocker:
            widget.align()
            assert on_gui[before:] == []  # the click itself read nothing
        assert blocker.args[0] == "done", error_messages()
    r = widget.results["em"]
    assert r.aligned.shape == stack.shape
    assert viewer.layers["em aligned"].data.dtype == stack.dtype


def test_a_lazy_layer_with_nan_is_refused_with_the_usual_message(qtbot, viewer_widget):
    import dask.array as da

    viewer, widget = viewer_widget
    stack = make_stack(z=4, size=96).astype(np.float32)
    stack[2, 10, 10] = np.nan
    viewer.add_image(da.from_array(stack, chunks=(1, 96, 96)), name="em")
    set_fast(widget)
    start = n_records()
    assert run_and_wait(qtbot, widget, widget.align) == "failed"
    assert any("NaN" in m and "section(s) 2" in m for m in error_messages(start))
    assert "em aligned" not in viewer.layers


def test_a_numpy_layer_is_scanned_for_nan_in_the_worker(qtbot, viewer_widget, monkeypatch):
    # the NaN scan of a big float stack (0.4-0.6 s for 30 x 4096^2) ran on the GUI thread
    import threading

    import napari_ssemnet._widget as W

    viewer, widget = viewer_widget
    stack = make_stack(z=4, size=96).astype(np.float32)
    stack[1, 5, 5] = np.inf
    viewer.add_image(stack, name="em")
    set_fast(widget)
    threads = []
    real = W.check_stack
    monkeypatch.setattr(W, "check_stack", lambda *a, **k: (
        threads.append(threading.current_thread() is threading.main_thread()), real(*a, **k))[1])
    start = n_records()
    assert run_and_wait(qtbot, widget, widget.align) == "failed"
    assert threads == [False]
    assert any("NaN or infinite" in m and "section(s) 1" in m for m in error_messages(start))
    assert "em aligned" not in viewer.layers


def test_cancel_during_a_slow_lazy_read(qtbot, viewer_widget, monkeypatch):
    # np.asarray(dask) cannot be interrupted: the read goes in pieces, Cancel between them
    import dask.array as da

    import napari_ssemnet._widget as W

    viewer, widget = viewer_widget
    stack = make_stack(z=6, size=96)
    loaded = []

    def slow(block, block_info=None):
        loaded.append(block_info[0]["chunk-location"][0])
        time.sleep(0.3)
        return block

    monkeypatch.setattr(W, "READ_CHUNK_BYTES", 96 * 96)  # one section per piece
    viewer.add_image(da.from_array(stack, chunks=(1, 96, 96)).map_blocks(slow, dtype=stack.dtype),
                     name="em")
    set_fast(widget)
    with qtbot.waitSignal(widget.job_finished, timeout=30000) as blocker:
        widget.align()
        qtbot.waitUntil(lambda: "reading layer" in widget.status.text()
                        and widget.progress.value() >= 1, timeout=10000)
        assert widget.progress.format().startswith("read")
        widget.cancel_btn.click()
    assert blocker.args[0] == "cancelled"
    assert len(set(loaded)) < 6  # stopped before the end of the read
    assert "em aligned" not in viewer.layers


def test_a_long_layer_name_does_not_widen_the_panel(make_napari_viewer, qtbot, stack):
    # a 33-character file name, opened before the panel, pushed the form 25 px past the
    # dock's scroll area, hiding every "+" button
    from qtpy.QtWidgets import QScrollArea

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1280, 800)
    viewer.add_image(stack, name="isbi2012_train_volume_30x512x512_aligned_v2")
    _, widget = viewer.window.add_plugin_dock_widget("napari-ssemnet", "Align EM stack")
    qtbot.wait(300)
    assert widget.layer_combo.currentText() == "isbi2012_train_volume_30x512x512_aligned_v2"
    scroll = widget.findChild(QScrollArea)
    assert scroll.widget().width() <= scroll.viewport().width()


def test_both_panels_fit_a_small_window_without_overlapping(make_napari_viewer, qtbot):
    # with the Apply panel open at about 1089 x 655 the plot (fixed at 130 px) was drawn
    # over the Save / Apply buttons
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1089, 655)
    _, widget = viewer.window.add_plugin_dock_widget("napari-ssemnet", "Align EM stack")
    viewer.window.add_plugin_dock_widget("napari-ssemnet", "Apply saved fields")
    widget.plot.set_data([0.1, 0.2, 0.15], [0.3, 0.35, 0.3])
    widget.status.setText("Aligned 8 sections on cpu in 2.9 s (0.36 s/section). Mean NCC "
                          "0.120 → 0.345.")
    qtbot.wait(300)
    _check_no_overlap(widget)
    viewer.window._qt_window.resize(1089, 560)  # napari holds it at its own minimum
    qtbot.wait(300)
    _check_no_overlap(widget)


def test_a_long_message_in_the_apply_panel_does_not_squeeze_its_rows(make_napari_viewer,
                                                                     qtbot):
    # a three-line error squeezed the Layer, Interpolation and Apply rows to 17 px (of 25),
    # clipping their text and overlapping the fields-file box
    from napari_ssemnet._widget import ApplyFieldsWidget

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    viewer.window.add_plugin_dock_widget("napari-ssemnet", "Align EM stack")
    _, panel = viewer.window.add_plugin_dock_widget("napari-ssemnet", "Apply saved fields")
    assert isinstance(panel, ApplyFieldsWidget)
    panel.status.setText("Not applied: '/some/long/path/to/a/folder/fields.npz' has no "
                         "'displacement' array (it has: foo); is it a fields file written by "
                         "napari-ssemnet?")
    qtbot.wait(300)
    for w in (panel.layer_combo, panel.order_combo, panel.apply_btn, panel.path_edit):
        assert w.height() >= w.minimumSizeHint().height(), w
    rows = [panel.layer_combo, panel.path_edit, panel.order_combo, panel.apply_btn]
    tops = [w.mapTo(panel, w.rect().topLeft()).y() for w in rows]
    bottoms = [t + w.height() for t, w in zip(tops, rows, strict=True)]
    assert all(b <= t for b, t in zip(bottoms[:-1], tops[1:], strict=True)), (tops, bottoms)


def _check_no_overlap(widget):

    def box(w):
        top = w.mapTo(widget, w.rect().topLeft()).y()
        return top, top + w.height()

    plot_top, plot_bottom = box(widget.plot)
    save_top, _ = box(widget.save_btn)
    _, status_bottom = box(widget.status)
    assert widget.plot.height() >= widget.plot.minimumHeight() >= 90
    assert status_bottom <= plot_top and plot_bottom <= save_top, (status_bottom, plot_top,
                                                                   plot_bottom, save_top)


def test_a_lazy_layer_that_fails_to_load_is_a_readable_error(qtbot, viewer_widget):
    import dask.array as da

    viewer, widget = viewer_widget
    stack = make_stack(z=4, size=96)

    def missing_chunk(block, block_info=None):
        if block_info[0]["chunk-location"][0] == 2:
            raise OSError("chunk 2 is missing on the server")
        return block

    lazy = da.from_array(stack, chunks=(1, 96, 96)).map_blocks(missing_chunk,
                                                               dtype=stack.dtype)
    viewer.add_image(lazy, name="em")
    set_fast(widget)
    start = n_records()
    assert run_and_wait(qtbot, widget, widget.align) == "failed"
    messages = error_messages(start)
    assert any("Could not read layer 'em'" in m and "chunk 2 is missing" in m
               for m in messages), messages
    assert not any("bug in napari-ssemnet" in m for m in messages)


def test_a_layer_selected_during_the_run_stays_selected(qtbot, viewer_widget, monkeypatch):
    # every redraw of the streamed layers took the selection back to the source (the user
    # could not adjust the aligned layer's contrast while the run went on)
    holds = _hold_after_sections(monkeypatch, 1, 3)
    viewer, widget = viewer_widget
    viewer.add_image(make_stack(z=5, size=96), name="em")
    set_fast(widget)
    with qtbot.waitSignal(widget.job_finished, timeout=60000):
        widget.align()
        qtbot.waitUntil(holds[1][0].is_set, timeout=60000)
        qtbot.waitUntil(lambda: "em aligned" in viewer.layers, timeout=10000)
        viewer.layers.selection.active = viewer.layers["em aligned"]  # the user picks it
        qtbot.wait(700)  # longer than the redraw interval: the next section is drawn
        holds[1][1].set()
        qtbot.waitUntil(holds[3][0].is_set, timeout=60000)
        qtbot.wait(100)
        assert viewer.layers.selection.active.name == "em aligned"
        assert widget.layer_combo.currentText() == "em"
        holds[3][1].set()


def test_advice_after_a_run_is_in_the_status_and_a_warning(qtbot, viewer_widget):
    from napari.utils.notifications import NotificationSeverity, notification_manager

    from napari_ssemnet.core.sample import load_sample
    from napari_ssemnet.core.synth import apply_misalignment, random_misalignment

    viewer, widget = viewer_widget
    sample = load_sample(misaligned=False).astype(np.float32)
    e = random_misalignment(sample.shape, seed=0, scale=0.1, rotation_deg=3, shift_frac=0.03)
    viewer.add_image(apply_misalignment(sample, e), name="scaled")
    for name, value in {"levels": 1, "iterations": 10, "features": "pixels",
                        "prealign": "rigid", "device": "cpu"}.items():
        widget.form.set_value(name, value)
    start = n_records()
    assert run_and_wait(qtbot, widget, widget.align) == "done", error_messages(start)
    warned = [str(n.message) for n in notification_manager.records[start:]
              if n.severity == NotificationSeverity.WARNING]
    assert any("differ in scale" in w and "Pre-alignment 'affine'" in w for w in warned), warned
    assert "differ in scale" in widget.status.text()
