"""Files: TIFF in via napari's builtin reader, fields out and back onto labels, writers."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import error_messages, n_records, run_and_wait, set_fast

from napari_ssemnet import _layers as L
from napari_ssemnet._writer import apply_displacement, load_fields, write_fields, write_tiff
from napari_ssemnet.core.io import as_dtype, read_resolution


def test_tiff_opens_with_builtin_reader_and_aligns(qtbot, viewer_widget, stack, tmp_path):
    viewer, widget = viewer_widget
    path = tmp_path / "em.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    layers = viewer.open(str(path))
    assert len(layers) == 1 and layers[0].data.shape == stack.shape
    assert widget.layer_combo.currentText() == "em"  # offered without any other step
    set_fast(widget)
    assert run_and_wait(qtbot, widget, widget.align) == "done", error_messages()
    assert viewer.layers["em aligned"].data.shape == stack.shape


def test_a_file_of_sections_of_different_sizes_that_napari_opened_is_refused(
        qtbot, viewer_widget, stack, tmp_path):
    # napari's reader left out the page of another size (5 of 6 sections) or mixed sizes in
    # a folder, and the widget aligned what it got
    viewer, widget = viewer_widget
    path = tmp_path / "ragged.tif"
    with tifffile.TiffWriter(path) as tw:
        for z, sec in enumerate(stack):
            tw.write(sec[4:-4, 4:-4] if z == 2 else sec, photometric="minisblack",
                     metadata=None)
    layers = viewer.open(str(path))
    assert layers[0].data.shape[0] == stack.shape[0] - 1  # napari's own reading
    set_fast(widget)
    start = n_records()
    assert run_and_wait(qtbot, widget, widget.align) == "failed"
    errors = error_messages(start)
    assert len(errors) == 1 and "sections differ in size" in errors[0], errors
    assert "read_stack(" in errors[0] and "ragged aligned" not in viewer.layers
    # the same stack opened as the message says is aligned
    from napari_ssemnet.core.io import read_stack

    with pytest.warns(UserWarning, match="centred on a"):
        viewer.add_image(read_stack(path), name="padded")
    widget.layer_combo.setCurrentText("padded")
    assert run_and_wait(qtbot, widget, widget.align) == "done", error_messages()
    assert viewer.layers["padded aligned"].data.shape == stack.shape


def test_the_saved_aligned_stack_keeps_the_source_files_compression_and_miniswhite(
        qtbot, viewer_widget, stack, tmp_path):
    # napari's save of the aligned layer came out uncompressed and with 0 as black
    viewer, widget = viewer_widget
    path = tmp_path / "em.tif"
    tifffile.imwrite(path, stack, photometric="miniswhite", compression="zlib")
    viewer.open(str(path))
    set_fast(widget)
    assert run_and_wait(qtbot, widget, widget.align) == "done", error_messages()
    # read when the run started: a save after the file moved away still has them
    path.rename(tmp_path / "moved.tif")
    viewer.layers.selection = {viewer.layers["em aligned"]}
    out = viewer.layers.save(str(tmp_path / "aligned.tif"), selected=True,
                             plugin="napari-ssemnet")[0]
    with tifffile.TiffFile(out) as tif:
        page = tif.pages.first
        assert int(page.compression) == 8 and int(page.photometric) == 0
    np.testing.assert_array_equal(tifffile.imread(out),
                                  as_dtype(widget.results["em"].aligned, np.uint8))
    # a layer made from an array has no file: written plainly, as before
    viewer.add_image(stack, name="mem")
    widget.set_layer("mem")
    assert run_and_wait(qtbot, widget, widget.align) == "done", error_messages()
    viewer.layers.selection = {viewer.layers["mem aligned"]}
    out = viewer.layers.save(str(tmp_path / "mem.tif"), selected=True,
                             plugin="napari-ssemnet")[0]
    with tifffile.TiffFile(out) as tif:
        assert int(tif.pages.first.compression) == 1
        assert int(tif.pages.first.photometric) == 1


def test_save_fields_then_apply_to_labels(qtbot, make_napari_viewer, stack, tmp_path):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-ssemnet", "Align EM stack")
    viewer.add_image(stack, name="em")
    set_fast(widget)
    assert run_and_wait(qtbot, widget, widget.align) == "done"
    out = widget.save_fields(tmp_path / "f.npz")
    disp, params = load_fields(out)
    np.testing.assert_array_equal(disp, widget.results["em"].displacement)
    assert params["grid_spacing"] == 32

    labels = np.zeros(stack.shape, np.uint16)
    labels[:, 20:60, 30:70] = 7
    labels[:, 70:90, 10:30] = 300
    viewer.add_labels(labels, name="seg")
    _, apply_w = viewer.window.add_plugin_dock_widget("napari-ssemnet", "Apply saved fields")
    apply_w.layer_combo.setCurrentText("seg")
    apply_w.path_edit.setText(str(out))
    assert apply_w.apply() is not None  # a worker: the GUI stays responsive
    qtbot.waitUntil(lambda: apply_w.last_result is not None, timeout=30_000)
    result = apply_w.last_result
    assert L.layer_kind(result) == "labels"
    assert result.name == "seg fields applied" and result.data.dtype == np.uint16
    assert set(np.unique(result.data)) <= {0, 7, 300}  # nearest neighbour: no mixed labels
    np.testing.assert_array_equal(viewer.layers["seg"].data, labels)  # source untouched
    # the same fields on the image reproduce the aligned layer
    again = apply_displacement(stack, disp, order=1)
    ref = widget.results["em"].aligned
    valid = widget.results["em"].valid
    assert np.abs(again.astype(np.float32) - ref)[valid].mean() < 1.0

    # applied to the aligned source itself: a layer of its own, Align's result kept
    aligned_meta = dict(viewer.layers["em aligned"].metadata[L.META_KEY])
    apply_w.layer_combo.setCurrentText("em")
    apply_w.last_result = None
    apply_w.apply()
    qtbot.waitUntil(lambda: apply_w.last_result is not None, timeout=30_000)
    assert apply_w.last_result.name == "em fields applied"
    # in the image's own type, rounded, as Align and the command line write it
    assert apply_w.last_result.data.dtype == stack.dtype
    np.testing.assert_array_equal(apply_w.last_result.data, as_dtype(again, stack.dtype))
    assert viewer.layers["em aligned"].metadata[L.META_KEY] == aligned_meta
    widget._update_plot()
    assert widget.plot.after.size == stack.shape[0]


def test_apply_fields_wrong_shape_is_an_error(qtbot, make_napari_viewer, tmp_path):
    from napari_ssemnet._writer import save_fields

    viewer = make_napari_viewer()
    _, apply_w = viewer.window.add_plugin_dock_widget("napari-ssemnet", "Apply saved fields")
    viewer.add_labels(np.zeros((3, 40, 40), np.uint8), name="seg")
    path = save_fields(tmp_path / "f.npz", np.zeros((4, 2, 50, 50), np.float32))
    apply_w.layer_combo.setCurrentText("seg")
    apply_w.path_edit.setText(path)
    start = n_records()
    worker = apply_w.apply()
    assert worker is not None
    qtbot.waitUntil(lambda: len(error_messages(start)) > 0, timeout=30_000)
    qtbot.waitUntil(lambda: apply_w.apply_btn.isEnabled(), timeout=30_000)
    errors = error_messages(start)
    assert len(errors) == 1 and "shape" in errors[0]
    assert [ly.name for ly in viewer.layers] == ["seg"]
    assert apply_w.last_result is None
    # an unreadable file is a readable error too, not a traceback
    apply_w.path_edit.setText(str(tmp_path / "missing.npz"))
    start = n_records()
    apply_w.apply()
    qtbot.waitUntil(lambda: len(error_messages(start)) > 0, timeout=30_000)
    assert "missing.npz" in error_messages(start)[0]
    qtbot.waitUntil(lambda: apply_w.apply_btn.isEnabled(), timeout=30_000)
    assert apply_w.status.text().startswith("Not applied:") and "missing.npz" in \
        apply_w.status.text()
    # the layer list follows renames, and stays on the chosen layer
    viewer.add_labels(np.zeros((3, 40, 40), np.uint8), name="first")
    viewer.layers.move(len(viewer.layers) - 1, 0)
    apply_w.layer_combo.setCurrentText("seg")
    viewer.layers["seg"].name = "segmentation"
    items = [apply_w.layer_combo.itemText(i) for i in range(apply_w.layer_combo.count())]
    assert sorted(items) == ["first", "segmentation"]
    assert apply_w.layer_combo.currentText() == "segmentation"


def test_writers(tmp_path, stack):
    paths = write_tiff(str(tmp_path / "a.tif"), stack.astype(np.float32), {})
    np.testing.assert_array_equal(tifffile.imread(paths[0]), stack.astype(np.float32))
    # an aligned stack goes back to its source's type, as from the command line
    aligned = stack.astype(np.float32) + 0.6
    aligned[0, 0, :2] = (-3.0, 300.0)
    meta = L.result_metadata(L.ROLE_ALIGNED, "em", extra={"source_dtype": "uint8"})
    back = tifffile.imread(write_tiff(str(tmp_path / "b.tif"), aligned, {"metadata": meta})[0])
    assert back.dtype == np.uint8 and back[0, 0, 0] == 0 and back[0, 0, 1] == 255
    np.testing.assert_array_equal(back[1], np.clip(np.rint(aligned[1]), 0, 255))
    # the layer's scale and units become the file's pixel size and section spacing
    for dtype in (np.uint8, np.int16):  # ImageJ metadata, and plain TIFF tags only
        path = write_tiff(str(tmp_path / f"s_{dtype.__name__}.tif"), stack.astype(dtype),
                          {"scale": [50.0, 4.0, 5.0], "units": ("nanometer",) * 3})[0]
        res = read_resolution(path)
        assert res["resolution"] == pytest.approx((0.2, 0.25))
        # int16: unit and spacing were lost (plain tags, no unit); now kept in the
        # description, with the tags in centimetres
        assert res["spacing"] == 50.0 and res["unit"] == "nm"
    for scale, units, want in [
            ([0.05, 4.0, 4.0], ("micrometer", "nanometer", "nanometer"), (50.0, "nm", 0.25)),
            ([0.05, 0.004, 4.0], ("micrometer",) * 2 + ("nanometer",), (50.0, "nm", 0.25)),
            ([500.0, 40.0, 40.0], ("angstrom",) * 3, (50.0, "nm", 0.25)),  # was unit "A"
            ([1.0, 1.0, 1.0], ("nanometer",) * 3, (1.0, "nm", 1.0))]:  # was no unit at all
        path = write_tiff(str(tmp_path / "u.tif"), stack, {"scale": scale, "units": units})[0]
        res = read_resolution(path)
        assert (res["spacing"], res["unit"]) == pytest.approx(want[:2])
        # 1 px per unit is ImageJ's default: the file may leave the tags out
        assert res.get("resolution", (1.0, 1.0)) == pytest.approx((want[2], want[2]))
    disp = np.ones((4, 2, 96, 96), np.float32)
    meta = L.result_metadata(L.ROLE_DISPLACEMENT, "em", params={"window": 2},
                             extra={"displacement": disp})
    paths = write_fields(str(tmp_path / "f"), np.zeros((1, 2, 3)), {"metadata": meta})
    assert paths == [str(tmp_path / "f.npz")]
    back, params = load_fields(paths[0])
    np.testing.assert_array_equal(back, disp)
    # vectors layers this plugin did not make are refused
    assert write_fields(str(tmp_path / "g.npz"), np.zeros((1, 2, 3)), {"metadata": {}}) == []


def test_a_labels_layer_saves_with_the_plugins_tiff_writer(make_napari_viewer, tmp_path):
    # only image layers were registered: napari's own writer then dropped the pixel size
    viewer = make_napari_viewer()
    labels = np.zeros((3, 40, 40), np.uint32)
    labels[:, 5:20, 5:20] = 4_000_000_000
    viewer.add_labels(labels, name="seg", scale=(50, 4, 4), units=("nm",) * 3)
    viewer.layers.selection = {viewer.layers["seg"]}
    paths = viewer.layers.save(str(tmp_path / "seg.tif"), selected=True,
                               plugin="napari-ssemnet")
    assert paths == [str(tmp_path / "seg.tif")]
    np.testing.assert_array_equal(tifffile.imread(paths[0]), labels)
    res = read_resolution(paths[0])
    assert res["unit"] == "nm" and res["spacing"] == 50.0
    assert res["resolution"] == pytest.approx((0.25, 0.25))


def test_apply_refuses_linear_on_labels_and_skips_multiscale(qtbot, make_napari_viewer, tmp_path):
    # linear on a Labels layer gave float data to a Labels layer: napari raised in a Qt slot
    # and the whole application aborted
    from napari_ssemnet._writer import save_fields

    viewer = make_napari_viewer()
    _, apply_w = viewer.window.add_plugin_dock_widget("napari-ssemnet", "Apply saved fields")
    viewer.add_labels(np.zeros((3, 40, 40), np.uint16), name="seg")
    base = np.zeros((3, 64, 64), np.uint8)
    viewer.add_image([base, base[:, ::2, ::2]], multiscale=True, name="pyramid")
    items = [apply_w.layer_combo.itemText(i) for i in range(apply_w.layer_combo.count())]
    assert items == ["seg"]  # a multiscale layer would be read at its lowest level
    path = save_fields(tmp_path / "f.npz", np.zeros((3, 2, 40, 40), np.float32))
    apply_w.layer_combo.setCurrentText("seg")
    apply_w.path_edit.setText(str(path))
    apply_w.order_combo.setCurrentText("linear")
    start = n_records()
    assert apply_w.apply() is None  # refused at once, no worker
    assert "nearest" in error_messages(start)[0] and "Labels" in error_messages(start)[0]
    assert apply_w.status.text().startswith("Not applied:")
    assert [ly.name for ly in viewer.layers] == ["seg", "pyramid"]


def test_apply_on_a_boolean_image_gives_0_1_not_a_dilated_mask(qtbot, make_napari_viewer,
                                                               tmp_path):
    from napari_ssemnet._writer import save_fields

    viewer = make_napari_viewer()
    _, apply_w = viewer.window.add_plugin_dock_widget("napari-ssemnet", "Apply saved fields")
    mask = np.zeros((3, 40, 40), bool)
    mask[:, 10:26, 10:26] = True
    viewer.add_image(mask, name="mask")
    disp = np.zeros((3, 2, 40, 40), np.float32)
    disp[:, 1] = 0.5  # half a pixel: every edge pixel is blended
    apply_w.layer_combo.setCurrentText("mask")
    apply_w.path_edit.setText(str(save_fields(tmp_path / "f.npz", disp)))
    apply_w.apply()
    qtbot.waitUntil(lambda: apply_w.last_result is not None, timeout=30_000)
    out = apply_w.last_result.data
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}
    want = as_dtype(apply_displacement(mask.astype(np.uint8), disp, order=1), np.uint8)
    np.testing.assert_array_equal(out, want)


def test_fields_from_the_command_line_open_as_arrows_and_save_back(make_napari_viewer,
                                                                   stack, tmp_path):
    import json

    from napari_ssemnet import cli
    from napari_ssemnet._reader import get_reader

    src = tmp_path / "em.tif"
    tifffile.imwrite(src, stack, photometric="minisblack")
    fields = tmp_path / "em_fields.npz"
    assert cli.main(["align", str(src), "-o", str(tmp_path / "em_aligned.tif"), "--fields",
                     str(fields), "--iterations", "5", "--levels", "1", "--features",
                     "pixels", "--prealign", "translation", "--grid-spacing", "32",
                     "--device", "cpu"]) == 0
    viewer = make_napari_viewer()
    # napari's builtin reader also takes *.npz: a user picks this one in napari's dialog
    layers = viewer.open(str(fields), plugin="napari-ssemnet")
    assert [ly.name for ly in layers] == ["em_fields displacement"]
    vec = layers[0]
    entry = vec.metadata[L.META_KEY]
    saved = np.load(fields)
    np.testing.assert_array_equal(entry["displacement"], saved["displacement"])
    assert entry["params"] == json.loads(str(saved["params"]))
    assert entry["flags"] == [str(f) for f in saved["flags"]]
    assert entry["environment"]["command"][:2] == ["napari-ssemnet", "align"]
    assert len(entry["pair_ncc"]) == len(saved["pair_ncc"]) > 0
    # one arrow grid per section, pointing along the stored field (arrows are (z, y, x))
    assert set(np.unique(vec.data[:, 0, 0]).astype(int)) == set(range(stack.shape[0]))
    z, y, x = vec.data[-1, 0].astype(int)
    np.testing.assert_allclose(vec.data[-1, 1, 1:], saved["displacement"][z, :, y, x],
                               atol=1e-5)
    # the napari writer saves the layer back to the same arrays
    viewer.layers.selection = {vec}
    viewer.layers.save(str(tmp_path / "again.npz"), selected=True, plugin="napari-ssemnet")
    again = np.load(tmp_path / "again.npz")
    for key in ("displacement", "flags", "ncc_before", "ncc_after", "pair_ncc"):
        np.testing.assert_array_equal(again[key], saved[key])
    assert json.loads(str(again["params"])) == json.loads(str(saved["params"]))
    # other .npz files are left to other readers, and a damaged fields file says what it is
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    assert get_reader(str(tmp_path / "other.npz")) is None
    assert get_reader(str(tmp_path / "em_aligned.tif")) is None
    bad = tmp_path / "bad.npz"
    np.savez(bad, displacement=np.zeros((2, 3)))
    with pytest.raises(Exception, match="expected"):
        viewer.open(str(bad), plugin="napari-ssemnet")


def test_fields_saved_from_a_placed_layer_reopen_over_it(qtbot, viewer_widget, stack,
                                                         tmp_path):
    # the reader drew them at scale 1: nowhere near a layer in nm, so no arrow showed
    viewer, widget = viewer_widget
    src = viewer.add_image(stack, name="em", scale=(50, 4, 4), translate=(0, 8, 12),
                           units=("nm", "nm", "nm"))
    set_fast(widget)
    assert run_and_wait(qtbot, widget, widget.align) == "done", error_messages()
    made = viewer.layers["em displacement"]
    path = widget.save_fields(tmp_path / "f.npz")
    opened = viewer.open(path, plugin="napari-ssemnet")[0]
    for layer in (made, opened):
        np.testing.assert_allclose(layer.scale, src.scale)
        np.testing.assert_allclose(layer.translate, src.translate)
        assert [str(u) for u in layer.units] == ["nanometer"] * 3
    np.testing.assert_allclose(opened.affine.affine_matrix, made.affine.affine_matrix)
    # the napari writer keeps it, and a damaged entry costs the placement, not the layer
    viewer.layers.selection = {opened}
    again = viewer.layers.save(str(tmp_path / "again.npz"), selected=True,
                               plugin="napari-ssemnet")[0]
    np.testing.assert_allclose(viewer.open(again, plugin="napari-ssemnet")[0].scale, src.scale)
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["placement"] = np.array('{"scale": [0, "x"], "translate": [1, 2, 3]}')
    np.savez(tmp_path / "odd.npz", **arrays)
    odd = viewer.open(str(tmp_path / "odd.npz"), plugin="napari-ssemnet")[0]
    np.testing.assert_allclose(odd.scale, (1, 1, 1))
    np.testing.assert_allclose(odd.translate, (1, 2, 3))
