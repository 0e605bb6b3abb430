"""core.io: TIFF stacks, NPZ fields and re-applying fields."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import tifffile

from napari_ssemnet.core.errors import InputError
from napari_ssemnet.core.io import (
    FieldSections,
    FolderStack,
    PageStack,
    SectionsPadded,
    apply_displacement,
    apply_displacement_section,
    load_fields,
    load_fields_params,
    open_stack,
    read_resolution,
    read_stack,
    save_fields,
    section_boxes,
    tiff_write_kwargs,
    write_stack,
)
from napari_ssemnet.core.params import AlignParams


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_round_trip(tmp_path, dtype):
    arr = (np.random.default_rng(0).random((3, 40, 50)) * 200).astype(dtype)
    path = write_stack(tmp_path / "new" / "dir" / "s.tif", arr)
    back = read_stack(path)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, arr)


def test_pixel_size_and_spacing_round_trip(tmp_path):
    src = tmp_path / "ij.tif"
    tifffile.imwrite(src, np.zeros((4, 40, 40), np.uint16), imagej=True,
                     resolution=(250.0, 250.0), metadata={"spacing": 0.05, "unit": "um"})
    res = read_resolution(src)
    assert res == {"resolution": (250.0, 250.0), "resolutionunit": 1, "spacing": 0.05,
                   "unit": "um"}
    out = write_stack(tmp_path / "out.tif", np.ones((4, 40, 40), np.uint16), resolution=res)
    assert read_resolution(out) == res
    np.testing.assert_array_equal(read_stack(out), 1)
    # a type ImageJ cannot hold: a plain TIFF, the pixel size in centimetre tags that other
    # readers understand, unit and spacing in tifffile's description (both were lost)
    out = write_stack(tmp_path / "f64.tif", np.ones((4, 40, 40)), resolution=res)
    assert read_resolution(out) == res
    with tifffile.TiffFile(out) as tif:
        assert tif.pages.first.resolutionunit == 3  # CENTIMETER
        assert tif.pages.first.resolution == pytest.approx((2.5e6, 2.5e6))
        assert tif.series[0].axes == "ZYX"  # tifffile read "QYX" without it
    assert read_resolution(write_stack(tmp_path / "plain.tif", np.ones((4, 40, 40)))) == {}
    # over 4 GB ImageJ files come out as one page for other readers: BigTIFF instead
    kw = tiff_write_kwargs(res, np.uint8, 5 * 2**30)
    assert kw["bigtiff"] and "imagej" not in kw and kw["metadata"]["spacing"] == 0.05
    assert tiff_write_kwargs(res, np.uint8, 3 * 2**30)["imagej"]  # ImageJ's form up to 4 GB


def test_three_section_stack_is_not_written_as_rgb(tmp_path):
    arr = np.random.default_rng(1).integers(0, 255, (3, 48, 48)).astype(np.uint8)
    path = write_stack(tmp_path / "s.tif", arr)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 3
    np.testing.assert_array_equal(read_stack(path), arr)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_stack(tmp_path / "nope.tif")


def test_not_a_tiff(tmp_path):
    path = tmp_path / "x.tif"
    path.write_text("this is not an image")
    with pytest.raises(InputError, match="not a readable TIFF"):
        read_stack(path)


def test_truncated_tiff(tmp_path):
    path = write_stack(tmp_path / "s.tif", np.zeros((4, 64, 64), np.uint8) + 7)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable TIFF"):
        read_stack(path)
    # compressed and cut after its first pages: not "a single 2D image"
    rng = np.random.default_rng(0)
    path = write_stack(tmp_path / "z.tif", rng.integers(0, 255, (6, 96, 96), np.uint8),
                       compression="zlib")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    for reader in (read_stack, open_stack):
        with pytest.raises(InputError, match="could only be read in part.*is the file complete"):
            reader(path)


def _read_both(path):
    """read_stack's and open_stack's arrays, and the SectionsPadded warnings of each."""
    out = []
    for reader in (read_stack, open_stack):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            got = reader(path)
            arr = np.stack([np.asarray(got[z]) for z in range(got.shape[0])])
            getattr(got, "close", lambda: None)()
        out.append((arr, [w for w in seen if issubclass(w.category, SectionsPadded)]))
    return out


def test_a_page_of_another_size_is_centred_on_the_canvas_not_read_as_junk(tmp_path):
    # tifffile looks at pages 0, 1, 7 and the last only, then reads all with page 0's layout:
    # the odd page came back as junk rows from the bytes after it
    path = tmp_path / "mixed.tif"
    pages = [np.full((200 if k == 5 else 256, 256), k + 1, np.uint8) for k in range(8)]
    with tifffile.TiffWriter(path) as tw:
        for page in pages:
            tw.write(page, photometric="minisblack", metadata=None)
    for arr, padded in _read_both(path):
        assert arr.shape == (8, 256, 256) and len(padded) == 1
        assert "200x256 to 256x256" in str(padded[0].message)
        np.testing.assert_array_equal(arr[5, 28:228], 6)  # (256 - 200) // 2 rows above
        assert not arr[5, :28].any() and not arr[5, 228:].any()
        np.testing.assert_array_equal(arr[[0, 4, 7]], np.stack([pages[k] for k in (0, 4, 7)]))
    assert section_boxes(path) == ((256, 256), [(0, 0, 256, 256)] * 5 + [(28, 0, 200, 256)]
                                   + [(0, 0, 256, 256)] * 2)
    # pages of another type are still refused (with tifffile's metadata: one series per page)
    path = tmp_path / "shaped.tif"
    with tifffile.TiffWriter(path) as tw:
        for k in range(4):
            tw.write(np.full((256, 256), k, np.uint16 if k == 2 else np.uint8),
                     photometric="minisblack")
    for reader in (read_stack, open_stack):
        with pytest.raises(InputError, match="different types.*page 2 is uint16"):
            reader(path)


def test_a_page_in_a_series_of_its_own_is_not_dropped(tmp_path):
    # tifffile made a second series of the odd page, and only the first was read: the
    # section was lost without a word, and fields went onto the wrong sections
    a = np.stack([np.full((64, 64), k + 1, np.uint8) for k in range(6)])
    for odd in (3, 5):
        path = tmp_path / f"odd{odd}.tif"
        with tifffile.TiffWriter(path) as tw:
            for k in range(6):
                tw.write(a[k] if k != odd else a[k, :40, :40], photometric="minisblack",
                         metadata=None)
        for arr, padded in _read_both(path):
            assert arr.shape == (6, 64, 64) and len(padded) == 1
            np.testing.assert_array_equal(arr[odd, 12:52, 12:52], odd + 1)
            assert arr[odd].sum() == 40 * 40 * (odd + 1)
            keep = [k for k in range(6) if k != odd]
            np.testing.assert_array_equal(arr[keep], a[keep])
    # a page too small for a section is named, not padded
    path = tmp_path / "tiny.tif"
    with tifffile.TiffWriter(path) as tw:
        for k in range(6):
            tw.write(a[k] if k != 2 else a[k, :20, :64], photometric="minisblack",
                     metadata=None)
    for reader in (read_stack, open_stack):
        with pytest.raises(InputError, match="Page 2 of .* is 20x64 px, too small"):
            reader(path)
    # like pages written one by one with tifffile's metadata: one series each, all read
    path = tmp_path / "one_by_one.tif"
    with tifffile.TiffWriter(path) as tw:
        for k in range(6):
            tw.write(a[k], photometric="minisblack")
    np.testing.assert_array_equal(read_stack(path), a)
    opened = open_stack(path)
    assert not isinstance(opened, np.ndarray)  # read a page at a time, not whole
    np.testing.assert_array_equal(np.stack([opened[z] for z in range(6)]), a)
    opened.close()
    # a thumbnail (a reduced-resolution page) is not a section: the stack reads as before
    path = tmp_path / "thumb.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(a[:5], photometric="minisblack", metadata=None)
        tw.write(a[0, ::4, ::4], photometric="minisblack", subfiletype=1, metadata=None)
    for reader in (read_stack, open_stack):
        got = reader(path)
        np.testing.assert_array_equal(np.stack([got[z] for z in range(5)]), a[:5])
        assert got.shape == (5, 64, 64)
        getattr(got, "close", lambda: None)()
    # sections appended to a stack in two writes: one stack, in page order
    path = tmp_path / "appended.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(a[:3], photometric="minisblack")
        tw.write(a[3:], photometric="minisblack")
    for reader in (read_stack, open_stack):
        got = reader(path)
        np.testing.assert_array_equal(np.stack([got[z] for z in range(6)]), a)
        getattr(got, "close", lambda: None)()


def test_a_stack_of_three_saved_as_rgb_gets_a_hint(tmp_path):
    path = tmp_path / "three.tif"
    # what tifffile 2025-2026 writes for a (3, H, W) array without a photometric
    tifffile.imwrite(path, np.zeros((3, 64, 64), np.uint8), photometric="rgb",
                     planarconfig="separate")
    with pytest.raises(InputError, match="RGB.*photometric='minisblack'"):
        read_stack(path)


def test_rgb_tiff(tmp_path):
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, np.zeros((3, 64, 64, 3), np.uint8))
    with pytest.raises(InputError, match="RGB") as info:
        read_stack(path)
    assert "grayscale" in str(info.value)


def test_single_image_and_4d(tmp_path):
    tifffile.imwrite(tmp_path / "one.tif", np.zeros((64, 64), np.uint8))
    with pytest.raises(InputError, match=r"single 2D image of shape \(64, 64\)"):
        read_stack(tmp_path / "one.tif")
    tifffile.imwrite(tmp_path / "4d.tif", np.zeros((2, 3, 64, 64), np.uint8),
                     photometric="minisblack")
    with pytest.raises(InputError, match=r"\(2, 3, 64, 64\).*\(Z, H, W\)"):
        read_stack(tmp_path / "4d.tif")


def test_nan_stack_is_refused(tmp_path):
    arr = np.zeros((2, 64, 64), np.float32)
    arr[1, 3, 3] = np.nan
    write_stack(tmp_path / "nan.tif", arr)
    with pytest.raises(InputError, match="NaN"):
        read_stack(tmp_path / "nan.tif")


@pytest.mark.parametrize("compression, kind", [(None, np.memmap), ("zlib", PageStack)])
def test_open_stack_reads_sections_on_demand(tmp_path, compression, kind):
    arr = (np.random.default_rng(2).random((5, 40, 48)) * 60000).astype(np.uint16)
    path = write_stack(tmp_path / "s.tif", arr, compression=compression)
    stack = open_stack(path)
    try:
        assert isinstance(stack, kind)
        assert stack.shape == (5, 40, 48) and stack.dtype == np.uint16 and len(stack) == 5
        for z in (0, 4, -1):
            np.testing.assert_array_equal(np.asarray(stack[z]), arr[z])
        if kind is np.memmap:
            with pytest.raises(ValueError):  # opened read-only: the file cannot change
                stack[0, 0, 0] = 1
    finally:
        if hasattr(stack, "close"):
            stack.close()


def test_folder_of_sections_in_natural_order(tmp_path):
    arr = (np.random.default_rng(4).random((11, 40, 48)) * 250).astype(np.uint8)
    folder = tmp_path / "sections"
    folder.mkdir()
    for z in range(11):  # s1 ... s11: plain name order would put s10, s11 before s2
        tifffile.imwrite(folder / f"s{z + 1}.tif", arr[z])
    (folder / "notes.txt").write_text("not a section")
    np.testing.assert_array_equal(read_stack(folder), arr)
    stack = open_stack(folder)
    assert isinstance(stack, FolderStack) and stack.shape == (11, 40, 48)
    np.testing.assert_array_equal(stack[10], arr[10])


def test_a_folder_of_sections_of_different_sizes_is_centred_on_one_canvas(tmp_path):
    rng = np.random.default_rng(5)
    shapes = [(40, 48), (37, 48), (40, 41), (34, 44)]
    sections = [(rng.random(s) * 250 + 1).astype(np.uint8) for s in shapes]
    folder = tmp_path / "ragged"
    folder.mkdir()
    for z, sec in enumerate(sections):
        tifffile.imwrite(folder / f"s{z}.tif", sec)
    boxes = [(0, 0, 40, 48), (1, 0, 37, 48), (0, 3, 40, 41), (3, 2, 34, 44)]
    assert section_boxes(folder) == ((40, 48), boxes)
    for arr, padded in _read_both(folder):
        assert arr.shape == (4, 40, 48) and arr.dtype == np.uint8
        assert len(padded) == 1 and "3 of 4 are centred on a 40x48 px canvas" in str(
            padded[0].message)
        for z, (top, left, h, w) in enumerate(boxes):
            np.testing.assert_array_equal(arr[z, top:top + h, left:left + w], sections[z])
            assert arr[z].astype(int).sum() == sections[z].astype(int).sum()  # 0 around it
    with pytest.warns(SectionsPadded):
        opened = open_stack(folder)
    assert opened.boxes == boxes
    opened.close()
    # sections of one size have no layout
    same = tmp_path / "same"
    same.mkdir()
    for z in range(3):
        tifffile.imwrite(same / f"s{z}.tif", sections[0])
    assert section_boxes(same) is None
    assert section_boxes(tmp_path / "missing") is None


def test_folder_of_sections_errors_name_the_file(tmp_path):
    for name, files, words in [
        ("empty", {}, "holds 0 TIFF file"),
        ("types", {"a1.tif": (40, 48), "a2.tif": ((40, 48), np.uint16)},
         "a2.tif.* is uint16, but a1.tif is uint8.*same data type"),
        ("tiny", {"a1.tif": (40, 48), "a2.tif": (20, 48)}, "a2.tif.*20x48 px, too small"),
        ("stack", {"a1.tif": (40, 48), "a2.tif": (2, 40, 48)}, "a2.tif.*one grayscale 2D"),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        for fname, shape in files.items():
            shape, dtype = shape if isinstance(shape[0], tuple) else (shape, np.uint8)
            tifffile.imwrite(folder / fname, np.zeros(shape, dtype), photometric="minisblack")
        for reader in (read_stack, open_stack):
            with pytest.raises(InputError, match=words):
                reader(folder)


def test_open_stack_refuses_what_read_stack_refuses(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((3, 64, 64, 3), np.uint8))
    tifffile.imwrite(tmp_path / "one.tif", np.zeros((64, 64), np.uint8))
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((3, 16, 16), np.uint8),
                     photometric="minisblack")
    (tmp_path / "x.tif").write_text("this is not an image")
    path = write_stack(tmp_path / "cut.tif", np.zeros((4, 64, 64), np.uint8) + 7)
    path.write_bytes(path.read_bytes()[:3000])
    nan = np.zeros((2, 64, 64), np.float32)
    nan[1, 3, 3] = np.nan
    write_stack(tmp_path / "nan.tif", nan)
    for name, words in [("rgb.tif", "RGB"), ("one.tif", "single 2D image"),
                        ("small.tif", "too small"), ("x.tif", "not a readable TIFF"),
                        ("cut.tif", "not a readable TIFF"), ("nan.tif", "NaN"),
                        ("missing.tif", "does not exist")]:
        with pytest.raises(InputError, match=words):
            open_stack(tmp_path / name)


def test_field_sections_stream_what_load_fields_reads(tmp_path):
    disp = np.random.default_rng(3).normal(size=(3, 2, 40, 50)).astype(np.float32)
    path = save_fields(tmp_path / "f.npz", disp, params=AlignParams(), flags=["", "blank", ""])
    with FieldSections(path) as fields:
        assert fields.shape == (3, 2, 40, 50)
        got = np.stack(list(fields))
    np.testing.assert_array_equal(got, load_fields(path)[0])
    # a Fortran-ordered array (written by another tool) is read whole, as load_fields does
    np.savez(tmp_path / "fortran.npz", displacement=np.asfortranarray(disp.astype(np.float64)))
    with FieldSections(tmp_path / "fortran.npz") as fields:
        np.testing.assert_array_equal(np.stack(list(fields)), disp)
    np.savez(tmp_path / "ints.npz", displacement=np.zeros((3, 2, 8, 8), np.int32))
    np.savez(tmp_path / "other.npz", something=np.zeros(3))
    for name, words in [("ints.npz", "expected float"), ("other.npz", "no 'displacement'")]:
        with pytest.raises(InputError, match=words):
            FieldSections(tmp_path / name)


def test_fields_round_trip_with_params_flags_and_extras(tmp_path):
    disp = np.random.default_rng(2).normal(size=(3, 2, 20, 24)).astype(np.float32)
    params = AlignParams(grid_spacing=32, prealign="affine")
    path = save_fields(tmp_path / "sub" / "f.npz", disp, params=params,
                       flags=["", "blank", ""], ncc_before=np.array([0.1, np.nan, 0.2]),
                       ncc_after=np.array([0.3, np.nan, 0.4]))
    back, p = load_fields(path)
    np.testing.assert_array_equal(back, disp)
    assert back.dtype == np.float32
    assert AlignParams.from_dict(p) == params
    back2, p2, extra = load_fields(path, with_extra=True)
    assert extra["flags"].tolist() == ["", "blank", ""]
    np.testing.assert_array_equal(extra["ncc_after"], [0.3, np.nan, 0.4])
    # the raw file layout other tools rely on: plain arrays, params as a JSON string
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) >= {"displacement", "params", "flags"}
        assert json.loads(str(npz["params"]))["grid_spacing"] == 32
    # dict params and no params
    _, p3 = load_fields(save_fields(tmp_path / "g.npz", disp, params={"window": 1}))
    assert p3 == {"window": 1}
    _, p4 = load_fields(save_fields(tmp_path / "h.npz", disp))
    assert p4 is None
    # the name is kept whatever the case of its suffix; .npz added when there is none
    assert save_fields(tmp_path / "UP.NPZ", disp) == tmp_path / "UP.NPZ"
    assert save_fields(tmp_path / "bare", disp) == tmp_path / "bare.npz"
    assert sorted(f.name for f in tmp_path.iterdir() if f.is_file()) == [
        "UP.NPZ", "bare.npz", "g.npz", "h.npz"]
    with pytest.raises(InputError, match="not valid JSON"):
        save_fields(tmp_path / "j.npz", disp, params="{bad")


def test_load_fields_params_reads_the_parameters_alone(tmp_path):
    disp = np.zeros((2, 2, 8, 8), np.float32)
    params = AlignParams(grid_spacing=32)
    path = save_fields(tmp_path / "f.npz", disp, params=params)
    assert AlignParams.from_dict(load_fields_params(path)) == params
    assert load_fields_params(save_fields(tmp_path / "n.npz", disp)) is None
    # a displacement that load_fields refuses is never read: the parameters still come back
    np.savez(tmp_path / "nan.npz", displacement=np.full((2, 2, 8, 8), np.nan, np.float32),
             params=np.array(params.to_json()))
    with pytest.raises(InputError):
        load_fields(tmp_path / "nan.npz")
    assert AlignParams.from_dict(load_fields_params(tmp_path / "nan.npz")) == params
    np.savez(tmp_path / "other.npz", params=np.array("{}"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "text.npz", displacement=disp, params=np.array("{bad"))
    for name, words in [("other.npz", "no 'displacement'"), ("bad.npz", "not a fields file"),
                        ("text.npz", "not valid JSON"), ("nope.npz", "does not exist")]:
        with pytest.raises(InputError, match=words):
            load_fields_params(tmp_path / name)


def test_load_fields_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_fields(tmp_path / "nope.npz")
    for reader in (load_fields, FieldSections):
        with pytest.raises(InputError, match="is a folder"):
            reader(tmp_path)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(InputError, match="not a readable fields file"):
        load_fields(bad)
    # a stack picked by mistake: numpy alone would say it holds pickled data
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(InputError, match="is not a fields file") as info:
        load_fields(tmp_path / "stack.tif")
    assert "pickle" not in str(info.value)
    with pytest.raises(InputError, match="is not a fields file"):
        FieldSections(tmp_path / "stack.tif")
    np.savez(tmp_path / "other.npz", image=np.zeros((2, 3)))
    with pytest.raises(InputError, match="no 'displacement'"):
        load_fields(tmp_path / "other.npz")
    np.save(tmp_path / "plain.npy", np.zeros((2, 2, 8, 8), np.float32))
    for reader in (load_fields, FieldSections):  # was a TypeError about context managers
        with pytest.raises(InputError, match="single .npy array"):
            reader(tmp_path / "plain.npy")
    nan = np.zeros((3, 2, 8, 8), np.float32)
    nan[2, 1, 3, 3] = np.nan  # was applied, its pixels filled with 0 without a word
    with pytest.raises(InputError, match="section 2 has NaN"):  # nor is it written
        save_fields(tmp_path / "nan.npz", nan)
    np.savez(tmp_path / "nan.npz", displacement=nan)
    with pytest.raises(InputError, match="section 2 has NaN"):
        load_fields(tmp_path / "nan.npz")
    with pytest.raises(InputError, match="section 2 has NaN"), \
            FieldSections(tmp_path / "nan.npz") as sections:
        list(sections)
    disp = np.zeros((3, 2, 8, 8), np.float32)
    with pytest.raises(InputError, match="not a string"):  # stored as 'b', 'l', 'a', ...
        save_fields(tmp_path / "f.npz", disp, flags="blank")
    with pytest.raises(InputError, match="must be an AlignParams"):
        save_fields(tmp_path / "f.npz", disp, params=[1, 2])
    save_fields(tmp_path / "f.npz", disp, params={"reference": np.int64(1)})  # TypeError
    import types

    save_fields(tmp_path / "m.npz", disp, params=types.MappingProxyType({"reference": 1}))
    assert load_fields(tmp_path / "f.npz")[1] == {"reference": 1}
    np.savez(tmp_path / "shape.npz", displacement=np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(InputError, match=r"\(Z, 2, H, W\)"):
        load_fields(tmp_path / "shape.npz")
    obj = np.empty(2, dtype=object)
    np.savez(tmp_path / "obj.npz", displacement=obj)
    with pytest.raises(InputError, match="not a readable fields file"):
        load_fields(tmp_path / "obj.npz")  # never unpickles


def test_apply_to_read_only_float_sections_warns_nothing():
    # apply-fields hands memory-mapped (read-only) float32 sections and fields to torch
    sec = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    disp = np.full((2, 40, 50), 0.5, np.float32)
    sec.setflags(write=False)
    disp.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = apply_displacement_section(sec, disp)
    assert out.shape == sec.shape


def test_apply_displacement_bilinear_and_input_untouched():
    stack = (np.arange(2 * 30 * 40) % 251).reshape(2, 30, 40).astype(np.uint8)
    before = stack.copy()
    disp = np.zeros((2, 2, 30, 40), np.float32)
    disp[1, 0], disp[1, 1] = 2.0, -3.0
    out = apply_displacement(stack, disp)
    np.testing.assert_array_equal(stack, before)
    assert out.dtype == np.float32 and out.shape == stack.shape
    np.testing.assert_allclose(out[0], stack[0], atol=2e-3)  # float32 grid maths
    np.testing.assert_allclose(out[1, :-2, 3:], stack[1, 2:, :-3], atol=2e-3)
    assert (out[1, -2:] == 0).all() and (out[1, :, :3] == 0).all()


@pytest.mark.parametrize("dtype, big", [(np.uint16, 300), (np.int32, 2**30 + 7),
                                        (np.uint8, 255)])
def test_apply_displacement_nearest_keeps_labels(dtype, big):
    labels = np.zeros((2, 40, 40), dtype)
    labels[:, 5:20, 5:25] = 7
    labels[:, 22:35, 10:30] = big
    disp = np.random.default_rng(3).normal(0, 1.5, (2, 2, 40, 40)).astype(np.float32)
    out = apply_displacement(labels, disp, order=0)
    assert out.dtype == dtype
    assert set(np.unique(out).tolist()) <= {0, 7, big}
    assert (out == big).sum() > 100
    # an integer shift moves every label exactly; what comes from outside is 0
    shift = np.zeros((2, 2, 40, 40), np.float32)
    shift[:, 0], shift[:, 1] = 2.0, -3.0  # out(y, x) = labels(y + 2, x - 3)
    moved = apply_displacement(labels, shift, order=0)
    np.testing.assert_array_equal(moved[:, :-2, 3:], labels[:, 2:, :-3])
    assert not moved[:, -2:].any() and not moved[:, :, :3].any()


def test_apply_displacement_shape_mismatch():
    with pytest.raises(InputError, match=r"\(3, 2, 20, 20\).*\(2, 20, 20\)"):
        apply_displacement(np.zeros((2, 20, 20)), np.zeros((3, 2, 20, 20), np.float32))
    with pytest.raises(InputError, match="order"):
        apply_displacement(np.zeros((2, 20, 20)), np.zeros((2, 2, 20, 20)), order=3)


@pytest.mark.parametrize("as_folder", [False, True])
def test_masks_are_read_as_uint8_only_when_asked(tmp_path, as_folder):
    mask = np.zeros((3, 40, 40), bool)
    mask[:, 10:20, 5:30] = True
    mask[1, :5] = True
    if as_folder:  # one single-section file per section
        path = tmp_path
        for z in range(3):
            tifffile.imwrite(path / f"m{z}.tif", mask[z], photometric="minisblack")
    else:
        path = tmp_path / "mask.tif"
        tifffile.imwrite(path, mask, photometric="minisblack")  # one bit per pixel
    for reader in (read_stack, open_stack):
        with pytest.raises(InputError, match="boolean mask"):
            reader(path)
        got = reader(path, masks=True)
        assert got.dtype == np.uint8 and got.shape == mask.shape
        np.testing.assert_array_equal(np.stack([got[z] for z in range(3)]), mask)
        if isinstance(got, PageStack):
            got.close()


def test_a_folder_of_sections_gives_its_first_sections_pixel_size(tmp_path):
    from napari_ssemnet.core.io import read_resolution

    for z in range(3):
        tifffile.imwrite(tmp_path / f"s{z}.tif", np.zeros((40, 40), np.uint8),
                         resolution=(250.0, 250.0), resolutionunit=3)
    assert read_resolution(tmp_path) == {"resolution": (250.0, 250.0), "resolutionunit": 3}
    assert read_resolution(tmp_path / "missing") == {}


def test_a_folder_of_mask_sections_gives_its_pixel_size_too(tmp_path):
    from napari_ssemnet.core.io import read_resolution

    for z in range(2):
        tifffile.imwrite(tmp_path / f"m{z}.tif", np.zeros((40, 40), bool),
                         resolution=(2.0, 2.0), resolutionunit=3, photometric="minisblack")
    assert read_resolution(tmp_path) == {"resolution": (2.0, 2.0), "resolutionunit": 3}


def test_fields_given_a_folder_are_refused_not_written_beside_it(tmp_path):
    disp = np.zeros((2, 2, 8, 8), np.float32)
    for target in (str(tmp_path) + "/", tmp_path):
        with pytest.raises(InputError, match="is a folder"):
            save_fields(target, disp)
    assert not (tmp_path.parent / (tmp_path.name + ".npz")).exists()
    with pytest.raises(InputError, match="no file name"):  # napari's Save of an empty name
        save_fields(tmp_path / ".npz", disp)


def test_a_section_file_cut_short_is_named(tmp_path):
    folder = tmp_path / "sections"
    folder.mkdir()
    for k in range(3):
        tifffile.imwrite(folder / f"s{k}.tif", np.full((64, 64), k, np.uint8))
    data = (folder / "s1.tif").read_bytes()
    (folder / "s1.tif").write_bytes(data[:600])  # the header survives, the pixels do not
    for reader in (read_stack, open_stack):
        with pytest.raises(InputError, match="s1.tif"):
            s = reader(folder)
            np.stack([s[z] for z in range(3)])


def test_an_ome_tiffs_pixel_size_is_kept_for_the_output(tmp_path):
    from napari_ssemnet.core.io import read_resolution, tiff_write_kwargs

    a = np.zeros((4, 64, 64), np.uint8)
    path = tmp_path / "in.ome.tif"
    tifffile.imwrite(path, a, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 4, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 4,
        "PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 0.05, "PhysicalSizeZUnit": "µm"})
    res = read_resolution(path)  # was empty: the output said 1 pixel per no unit
    assert res == {"resolution": (0.25, 0.25), "resolutionunit": 1, "unit": "nm",
                   "spacing": 50.0}
    # in angstrom: written as nm, since ImageJ's description is ASCII (the write failed)
    tifffile.imwrite(tmp_path / "a.ome.tif", a, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 40, "PhysicalSizeXUnit": "Å"})
    assert read_resolution(tmp_path / "a.ome.tif")["unit"] == "nm"
    assert read_resolution(tmp_path / "a.ome.tif")["resolution"] == (0.25, 0.25)
    kw = tiff_write_kwargs({"unit": "Å", "spacing": 1.0}, a.dtype, a.nbytes)
    assert kw["metadata"]["unit"] == "nm" and kw["metadata"]["spacing"] == pytest.approx(0.1)
    kw = tiff_write_kwargs({"unit": "Ångström", "spacing": 1.0}, a.dtype, a.nbytes)
    tifffile.imwrite(tmp_path / "w.tif", a, **kw)  # an odd unit is dropped, not a failure
    assert "unit" not in kw["metadata"]
    tifffile.imwrite(tmp_path / "out.tif", a, **tiff_write_kwargs(res, a.dtype, a.nbytes))
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        assert tif.pages.first.resolution == (0.25, 0.25)
        assert tif.imagej_metadata["unit"] == "nm" and tif.imagej_metadata["spacing"] == 50.0


def test_an_imagej_pixel_size_in_angstrom_is_restated_in_nm(tmp_path):
    from napari_ssemnet.core.io import read_resolution, tiff_write_kwargs

    # 40 Å pixels, 500 Å sections; Fiji writes the unit as the escape \u00C5
    a = np.zeros((3, 32, 32), np.uint8)
    tifffile.imwrite(tmp_path / "in.tif", a, imagej=True, resolution=(0.025, 0.025),
                     metadata={"axes": "ZYX", "unit": "\\u00C5", "spacing": 500.0})
    res = read_resolution(tmp_path / "in.tif")  # the unit was dropped, the numbers kept
    assert res["unit"] == "nm" and res["spacing"] == pytest.approx(50.0)
    assert res["resolution"] == pytest.approx((0.25, 0.25))
    tifffile.imwrite(tmp_path / "out.tif", a, **tiff_write_kwargs(res, a.dtype, a.nbytes))
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        assert tif.imagej_metadata["unit"] == "nm"
        assert tif.imagej_metadata["spacing"] == pytest.approx(50.0)
        assert tif.pages.first.resolution == pytest.approx((0.25, 0.25))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint32, np.int32, np.int64,
                                   np.uint64])
def test_as_dtype_rounds_and_saturates_without_wrapping(dtype):
    from napari_ssemnet.core.io import as_dtype

    info = np.iinfo(dtype)
    # the type's extremes as float32 holds them (2**32 - 1 is stored as 2**32), beyond them,
    # and ordinary values: the brightest pixels of 32- and 64-bit stacks came out black
    values = np.array([float(info.max), float(info.max) * 2, float(info.min),
                       float(info.min) - 1e3, 2.4, 2.6, np.nan, np.inf], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value encountered in cast"
        out = as_dtype(values.reshape(2, 4), dtype)
    assert out.dtype == dtype and out.shape == (2, 4)
    # NaN is 0 in every type (it was 2**31 in uint32, the minimum in int32)
    np.testing.assert_array_equal(out.ravel(), np.array(
        [info.max, info.max, info.min, info.min, 2, 3, 0, info.max], dtype))
    assert as_dtype(np.asarray(np.nan, np.float32), dtype) == 0  # 0-d: a ValueError


def test_a_pipe_is_refused_not_read(tmp_path):
    import os

    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes here")
    os.mkfifo(tmp_path / "pipe.tif")  # reading it waited for a writer for ever
    for reader in (read_stack, open_stack):
        with pytest.raises(InputError, match="not a regular file"):
            reader(tmp_path / "pipe.tif")


def test_apply_displacement_refuses_fields_and_values_it_cannot_use():
    stack = np.ones((2, 32, 32), np.float64)
    disp = np.zeros((2, 2, 32, 32), np.float32)
    bad = disp.copy()
    bad[1, 0, 4, 4] = np.nan  # came out as 0 there, without a word
    with pytest.raises(InputError, match="NaN or infinite"):
        apply_displacement(stack, bad)
    with pytest.raises(InputError, match="must be real"):  # a ComplexWarning, then a result
        apply_displacement(stack, disp.astype(np.complex64))
    with pytest.raises(InputError, match="beyond the float32 range"):  # it returned NaN
        apply_displacement(stack * 1e300, disp)
    np.testing.assert_array_equal(apply_displacement(stack * 1e300, disp, order=0),
                                  stack * 1e300)  # nearest keeps the values as they are


def test_a_min_is_white_stack_is_written_back_min_is_white(tmp_path):
    from napari_ssemnet.core.io import read_resolution, tiff_write_kwargs

    a = np.zeros((3, 32, 32), np.uint8)
    for imagej in (False, True):  # raw values kept, so MinIsBlack showed it inverted
        tifffile.imwrite(tmp_path / "in.tif", a, photometric="miniswhite", imagej=imagej,
                         resolution=(0.25, 0.25),
                         metadata={"axes": "ZYX", "spacing": 50.0, "unit": "nm"})
        res = read_resolution(tmp_path / "in.tif")
        assert res["photometric"] == "miniswhite"
        tifffile.imwrite(tmp_path / "out.tif", a, **tiff_write_kwargs(res, a.dtype, a.nbytes))
        with tifffile.TiffFile(tmp_path / "out.tif") as tif:
            assert tif.pages.first.photometric == 0  # MINISWHITE
            assert tif.pages.first.resolution == (0.25, 0.25)
    tifffile.imwrite(tmp_path / "black.tif", a, photometric="minisblack")
    assert "photometric" not in read_resolution(tmp_path / "black.tif")


def test_a_truncated_file_is_one_error_without_tifffile_log_lines(tmp_path, capfd, caplog):
    path = tmp_path / "full.tif"
    tifffile.imwrite(path, np.zeros((4, 96, 96), np.uint8), photometric="minisblack")
    data = path.read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[:int(len(data) * 0.6)])
    capfd.readouterr()
    with pytest.raises(InputError, match="not a readable TIFF"):
        open_stack(tmp_path / "cut.tif")  # block-wise runs and apply-fields open it so
    printed = capfd.readouterr().err
    assert "invalid page offset" not in printed + caplog.text


def test_running_out_of_memory_while_reading_a_page_is_not_called_damage(tmp_path):
    tifffile.imwrite(tmp_path / "z.tif", np.zeros((3, 64, 64), np.uint8),
                     compression="zlib", photometric="minisblack")
    stack = open_stack(tmp_path / "z.tif")

    class Page:
        def asarray(self):
            raise MemoryError("Unable to allocate 4.0 GiB")

    stack._pages = [Page()] * 3
    with pytest.raises(MemoryError):  # "not a readable TIFF file" sent users to a good file
        stack[1]
    stack.close()


def test_fiji_zunit_and_a_folder_of_sections_keep_their_units(tmp_path):
    a = np.zeros((3, 32, 32), np.uint8)
    # Fiji's zunit: 0.05 micron sections with nm pixels were written as 0.05 nm
    tifffile.imwrite(tmp_path / "zu.tif", a, imagej=True, resolution=(0.25, 0.25),
                     metadata={"axes": "ZYX", "unit": "nm", "spacing": 0.05,
                               "zunit": "micron"})
    res = read_resolution(tmp_path / "zu.tif")
    assert res["unit"] == "nm" and res["spacing"] == pytest.approx(50.0)
    # sections saved one by one from Fiji: the unit was dropped, leaving 0.25 px per nothing
    folder = tmp_path / "secs"
    folder.mkdir()
    for k in range(3):
        tifffile.imwrite(folder / f"s{k}.tif", a[k], imagej=True, resolution=(0.25, 0.25),
                         metadata={"unit": "nm", "spacing": 50.0})
    res = read_resolution(folder)
    assert res["unit"] == "nm" and res["resolution"] == (0.25, 0.25)


def test_read_compression_names_a_codec_to_write_the_aligned_copy_with(tmp_path):
    from napari_ssemnet.core.io import read_compression

    stack = (np.arange(2 * 40 * 40) % 251).astype(np.uint8).reshape(2, 40, 40)
    assert read_compression(write_stack(tmp_path / "plain.tif", stack)) is None
    for codec, code in (("zlib", 8), ("lzma", 34925)):
        path = write_stack(tmp_path / f"{codec}.tif", stack, compression=codec)
        with tifffile.TiffFile(path) as tif:
            assert int(tif.pages.first.compression) == code
        assert read_compression(path) == codec
    folder = tmp_path / "sections"
    folder.mkdir()
    for i, sec in enumerate(stack):
        tifffile.imwrite(folder / f"s{i}.tif", sec, compression="zlib")
    assert read_compression(folder) == "zlib"
    # no file, no TIFF, the sample: uncompressed, never an error
    assert read_compression(tmp_path / "missing.tif") is None
    (tmp_path / "notes.tif").write_text("not a TIFF")
    assert read_compression(tmp_path / "notes.tif") is None
    assert read_compression(None) is None
