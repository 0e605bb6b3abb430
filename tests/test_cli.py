"""The napari-ssemnet command line (in-process via cli.main, plus real subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_ssemnet import __version__, cli
from napari_ssemnet.core.features import CAE, load_weights
from napari_ssemnet.core.io import load_fields, read_stack, write_stack
from napari_ssemnet.core.params import AlignParams, knobs
from napari_ssemnet.core.sample import load_sample

TINY = ["--iterations", "5", "--levels", "1", "--features", "pixels", "--prealign",
        "translation", "--grid-spacing", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_tif(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny.tif"
    write_stack(path, load_sample(misaligned=True)[:4, 100:196, 100:196])
    return path


def _exe() -> list[str]:
    found = shutil.which("napari-ssemnet")
    return [found] if found else [sys.executable, "-m", "napari_ssemnet.cli"]


def test_every_param_has_an_option_with_the_same_default():
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices["align"]
    options = {a.dest: a for a in sub._actions}
    for f in knobs():
        action = options[f.name]
        assert cli.option_name(f.name) in action.option_strings
        assert f"(default: {f.default if f.default != '' else repr('')})" in action.help
        if f.metadata.get("choices"):
            assert list(action.choices) == list(f.metadata["choices"])
    # nothing given -> exactly AlignParams(); each option parsed from its own default text
    args = parser.parse_args(["align", "in.tif", "-o", "out.tif"])
    assert cli.params_from_args(args) == AlignParams()
    argv = ["align", "in.tif", "-o", "out.tif"]
    for f in knobs():
        if f.default != "":
            argv += [cli.option_name(f.name), str(f.default)]
    assert cli.params_from_args(parser.parse_args(argv)) == AlignParams()


def test_align_writes_tiff_and_fields(tiny_tif, tmp_path, capsys):
    out, fields = tmp_path / "a" / "al.tif", tmp_path / "f.npz"
    code = cli.main(["align", str(tiny_tif), "-o", str(out), "--fields", str(fields),
                     "--smoothness", "2.5", "--neighbour-decay", "0.25", *TINY])
    assert code == 0
    stack = read_stack(tiny_tif)
    aligned = read_stack(out)
    assert aligned.shape == stack.shape and aligned.dtype == stack.dtype
    disp, params = load_fields(fields)
    assert disp.shape == (4, 2, 96, 96) and disp.dtype == np.float32
    expected = AlignParams(iterations=5, levels=1, features="pixels", prealign="translation",
                           grid_spacing=32, device="cpu", smoothness=2.5, neighbour_decay=0.25)
    assert params == expected.to_dict()
    _, _, extra = load_fields(fields, with_extra=True)
    assert extra["flags"].shape == (4,) and extra["ncc_after"].shape == (4,)
    text = capsys.readouterr().out
    assert "mean adjacent NCC" in text


def test_params_file_is_loaded_and_overridden(tiny_tif, tmp_path):
    pfile = tmp_path / "p.json"
    pfile.write_text(AlignParams(window=1, grid_spacing=48).to_json())
    args = cli.build_parser().parse_args(["align", "x.tif", "-o", "y.tif", "--params",
                                          str(pfile), "--grid-spacing", "40"])
    p = cli.params_from_args(args)
    assert p.window == 1 and p.grid_spacing == 40


@pytest.mark.parametrize("argv_tail, words", [
    (["missing.tif"], ["does not exist"]),
    (["NOTTIFF"], ["not a readable TIFF"]),
    (["TINY", "--grid-spacing", "-8"], ["grid_spacing"]),
    (["TINY", "--reference", "9"], ["Reference section 9"]),
    (["TINY", "--features", "custom"], ["weights"]),
    ([], ["No input"]),
])
def test_bad_input_is_one_error_line(tiny_tif, tmp_path, capsys, argv_tail, words):
    bad = tmp_path / "x.tif"
    bad.write_text("hello")
    tail = [{"NOTTIFF": str(bad), "TINY": str(tiny_tif),
             "missing.tif": str(tmp_path / "missing.tif")}.get(a, a) for a in argv_tail]
    code = cli.main(["align", *tail, "-o", str(tmp_path / "o.tif"), *TINY[:2]])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "o.tif").exists()


def test_stack_too_big_for_free_memory_is_one_error_line(tiny_tif, tmp_path, capsys,
                                                         monkeypatch):
    from napari_ssemnet.core import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 10 * 2**20)
    code = cli.main(["align", str(tiny_tif), "-o", str(tmp_path / "o.tif"), *TINY])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: Aligning 4 sections of 96x96 px needs about")
    assert not (tmp_path / "o.tif").exists()


def test_align_sample_default_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["align", "--sample", "--fields", "s.npz", *TINY])
    assert code == 0
    aligned = read_stack(tmp_path / cli.SAMPLE_OUTPUT)
    assert aligned.shape == (8, 320, 320) and aligned.dtype == np.uint8
    assert load_fields(tmp_path / "s.npz")[0].shape == (8, 2, 320, 320)


def test_ctrl_c_cancels_with_exit_130(tiny_tif, tmp_path, monkeypatch, capsys):
    import napari_ssemnet.core.align as core_align

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(core_align, "align_stack", interrupted)
    code = cli.main(["align", str(tiny_tif), "-o", str(tmp_path / "o.tif"), *TINY])
    assert code == 130 and "cancelled" in capsys.readouterr().err
    assert not (tmp_path / "o.tif").exists()


def test_progress_printer_tty_and_pipe():
    import io

    from napari_ssemnet.core.align import Progress

    pipe = io.StringIO()
    p = cli.ProgressPrinter(pipe, tty=False)
    for i in range(50):
        p(Progress("fit level 1/1", i + 1, 50, "loss"))
    p(Progress("render", 1, 2))
    p.close()
    assert pipe.getvalue().splitlines() == ["fit level 1/1: loss", "render"]
    term = io.StringIO()
    t = cli.ProgressPrinter(term, tty=True)
    for i in range(1000):  # fast events are throttled to ~10 redraws a second
        t(Progress("fit", i + 1, 1000))
    t.close()
    text = term.getvalue()
    assert "\r" in text and text.count("\r") < 50 and "1000/1000" in text


def test_train_features_writes_loadable_weights(tiny_tif, tmp_path, capsys):
    out = tmp_path / "w" / "enc.pt"
    code = cli.main(["train-features", str(tiny_tif), "-o", str(out), "--steps", "3",
                     "--device", "cpu", "-q"])
    assert code == 0
    model = load_weights(out)
    assert isinstance(model, CAE)
    assert "tiny.tif sha256:" in model.info["inputs"]
    assert model.info["steps"] == "3"
    # and it can be used for alignment straight away
    code = cli.main(["align", str(tiny_tif), "-o", str(tmp_path / "o.tif"),
                     *TINY[:4], "--features", "custom", "--weights", str(out), "-q"])
    assert code == 0


def test_subprocess_version_and_align(tiny_tif, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    res = subprocess.run([*_exe(), "--version"], capture_output=True, text=True, timeout=60,
                         env=env)
    assert res.returncode == 0 and res.stdout.strip() == f"napari-ssemnet {__version__}"
    out, fields = tmp_path / "al.tif", tmp_path / "f.npz"
    res = subprocess.run([*_exe(), "align", str(tiny_tif), "-o", str(out), "--fields",
                          str(fields), *TINY], capture_output=True, text=True, timeout=120,
                         env=env)
    assert res.returncode == 0, res.stderr
    assert read_stack(out).shape == (4, 96, 96)
    disp, params = load_fields(fields)
    assert disp.shape == (4, 2, 96, 96) and params["iterations"] == 5
    assert "prealign" in res.stderr  # one line per stage when stderr is not a terminal
    bad = subprocess.run([*_exe(), "align", str(tmp_path / "nope.tif"), "-o", str(out)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("error:") and json.dumps(bad.stderr).count("\\n") == 1


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_blockwise_align_streams_to_disk_and_matches_the_api(tiny_tif, tmp_path, capsys,
                                                             compression):
    from napari_ssemnet.core.align import align_stack

    stack = read_stack(tiny_tif)
    src = tmp_path / "in.tif"
    write_stack(src, stack, compression=compression)  # zlib: read page by page
    out, fields = tmp_path / "o" / "al.tif", tmp_path / "f" / "f.npz"
    code = cli.main(["align", str(src), "-o", str(out), "--fields", str(fields),
                     "--block-size", "3", "--window", "1", *TINY])
    assert code == 0
    assert "in 2 blocks of at most 3 sections" in capsys.readouterr().out
    r = align_stack(stack, AlignParams(block_size=3, window=1, iterations=5, levels=1,
                                       features="pixels", prealign="translation",
                                       grid_spacing=32, device="cpu"))
    disp, params, extra = load_fields(fields, with_extra=True)
    np.testing.assert_array_equal(disp, r.displacement)
    assert params["block_size"] == 3 and list(extra["flags"]) == r.flags
    np.testing.assert_allclose(extra["ncc_after"], r.ncc_after)
    aligned = read_stack(out)
    assert aligned.dtype == stack.dtype
    np.testing.assert_array_equal(aligned, np.clip(np.rint(r.aligned), 0, 255))
    # the working files are gone
    assert sorted(p.name for p in out.parent.iterdir()) == ["al.tif"]
    assert sorted(p.name for p in fields.parent.iterdir()) == ["f.npz"]


def test_block_size_covering_a_compressed_stack_runs_the_joint_fit(tiny_tif, tmp_path):
    src = write_stack(tmp_path / "in.tif", read_stack(tiny_tif), compression="zlib")
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    assert cli.main(["align", str(src), "-o", str(a), *TINY]) == 0
    assert cli.main(["align", str(src), "-o", str(b), "--block-size", "4", *TINY]) == 0
    np.testing.assert_array_equal(read_stack(a), read_stack(b))


def test_blockwise_cancel_keeps_an_existing_output_and_leaves_no_files(tiny_tif, tmp_path,
                                                                      monkeypatch, capsys):
    import napari_ssemnet.core.blocks as blocks

    real = blocks.iter_align_blocks

    def interrupted(*args, **kwargs):
        gen = real(*args, **kwargs)
        yield next(gen)
        raise KeyboardInterrupt

    monkeypatch.setattr(blocks, "iter_align_blocks", interrupted)
    out = tmp_path / "al.tif"
    out.write_bytes(b"the user's earlier result")
    code = cli.main(["align", str(tiny_tif), "-o", str(out), "--fields",
                     str(tmp_path / "f.npz"), "--block-size", "3", "--window", "1", *TINY])
    assert code == 130 and "cancelled" in capsys.readouterr().err
    assert out.read_bytes() == b"the user's earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["al.tif"]


def test_block_size_below_window_plus_two_is_one_error_line(tiny_tif, tmp_path, capsys):
    code = cli.main(["align", str(tiny_tif), "-o", str(tmp_path / "o.tif"),
                     "--block-size", "3", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: Parameter 'block_size'") and "window + 2" in err
    assert not (tmp_path / "o.tif").exists()


def test_blockwise_without_disk_space_is_one_error_line(tiny_tif, tmp_path, monkeypatch,
                                                       capsys):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    code = cli.main(["align", str(tiny_tif), "-o", str(tmp_path / "o.tif"), "--block-size",
                     "3", "--window", "1", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "GB of disk" in err and "0.0 GB is free" in err
    assert list(tmp_path.iterdir()) == []


def test_apply_fields_reproduces_the_aligned_stack_and_keeps_labels(tiny_tif, tmp_path,
                                                                   capsys):
    from napari_ssemnet.core.io import apply_displacement

    out, fields = tmp_path / "al.tif", tmp_path / "f.npz"
    assert cli.main(["align", str(tiny_tif), "-o", str(out), "--fields", str(fields),
                     *TINY]) == 0
    # the same fields on the same stack give the aligned stack again
    again = tmp_path / "again.tif"
    assert cli.main(["apply-fields", str(fields), str(tiny_tif), "-o", str(again)]) == 0
    np.testing.assert_array_equal(read_stack(again), read_stack(out))
    # labels: nearest neighbour, ids and dtype kept, exactly as the API does it
    disp, _ = load_fields(fields)
    labels = (np.arange(4 * 96 * 96, dtype=np.uint32).reshape(4, 96, 96) // 37) + 70000
    lab_in = write_stack(tmp_path / "labels.tif", labels, compression="zlib")  # page by page
    lab_out = tmp_path / "labels_aligned.tif"
    assert cli.main(["apply-fields", str(fields), str(lab_in), "-o", str(lab_out),
                     "--labels", "-q"]) == 0
    got = read_stack(lab_out)
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, apply_displacement(labels, disp, order=0))
    assert set(np.unique(got)) <= set(np.unique(labels)) | {0}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "again.tif", "al.tif", "f.npz", "labels.tif", "labels_aligned.tif"]


def test_apply_fields_bad_input_is_one_error_line(tiny_tif, tmp_path, capsys):
    from napari_ssemnet.core.io import save_fields

    wrong = save_fields(tmp_path / "wrong.npz", np.zeros((3, 2, 96, 96), np.float32))
    (tmp_path / "junk.npz").write_text("not a zip")
    for fields, words in [(wrong, "for a stack of 3 sections of 96x96 px"),
                          (tmp_path / "junk.npz", "is not a fields file"),
                          (tmp_path / "missing.npz", "does not exist")]:
        code = cli.main(["apply-fields", str(fields), str(tiny_tif), "-o",
                         str(tmp_path / "o.tif")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error:") and words in err, err
    assert not (tmp_path / "o.tif").exists()


def test_blockwise_run_stopped_then_resumed_matches_an_uninterrupted_one(tiny_tif, tmp_path,
                                                                        monkeypatch, capsys):
    import napari_ssemnet.core.blocks as blocks

    opts = ["--block-size", "3", "--window", "1", *TINY]
    full = tmp_path / "full.tif"
    assert cli.main(["align", str(tiny_tif), "-o", str(full), "--fields",
                     str(tmp_path / "full.npz"), *opts]) == 0
    real = blocks.iter_align_blocks

    def interrupted_after_first_block(*args, on_block=None, **kwargs):
        def saved(st):
            on_block(st)
            raise KeyboardInterrupt  # as a second Ctrl-C would

        return (yield from real(*args, on_block=saved, **kwargs))

    monkeypatch.setattr(blocks, "iter_align_blocks", interrupted_after_first_block)
    out, fields = tmp_path / "o" / "al.tif", tmp_path / "o" / "f.npz"
    argv = ["align", str(tiny_tif), "-o", str(out), "--fields", str(fields), *opts]
    capsys.readouterr()
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "stopped after block 1 of 2" in err and "--resume" in err
    assert not out.exists() and len(list(out.parent.iterdir())) == 3  # the working files
    # other options do not resume it
    assert cli.main([*argv[:-len(opts)], "--block-size", "3", "--window", "1", *TINY[:-2],
                     "--device", "cpu", "--smoothness", "2", "--resume"]) == 2
    assert "other parameters" in capsys.readouterr().err
    monkeypatch.setattr(blocks, "iter_align_blocks", real)
    assert cli.main([*argv, "--resume"]) == 0
    assert "resuming at block 2 of 2" in capsys.readouterr().out
    np.testing.assert_array_equal(read_stack(out), read_stack(full))
    np.testing.assert_array_equal(load_fields(fields)[0],
                                  load_fields(tmp_path / "full.npz")[0])
    assert sorted(p.name for p in out.parent.iterdir()) == ["al.tif", "f.npz"]
    # nothing left to resume
    assert cli.main([*argv, "--resume"]) == 2
    assert "Nothing to resume" in capsys.readouterr().err


def test_a_second_blockwise_run_on_the_same_output_is_refused(tiny_tif, tmp_path, capsys):
    out = tmp_path / "al.tif"
    lock = tmp_path / ".al.tif.lock"
    lock.write_text(str(os.getppid()))  # a process that is running: this test's parent
    argv = ["align", str(tiny_tif), "-o", str(out), "--block-size", "3", "--window", "1",
            *TINY]
    assert cli.main(argv) == 2
    assert "Another napari-ssemnet run" in capsys.readouterr().err
    assert lock.read_text() == str(os.getppid()) and not out.exists()
    lock.write_text("999999999")  # left behind by a process that no longer runs
    assert cli.main(argv) == 0 and out.exists() and not lock.exists()


def test_align_a_folder_of_sections_whole_and_blockwise(tiny_tif, tmp_path):
    stack = read_stack(tiny_tif)
    folder = tmp_path / "sections"
    folder.mkdir()
    for z, sec in enumerate(stack):
        write_stack(folder / f"sec_{z:03d}.tif", sec)
    a, b, c = tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "c.tif"
    assert cli.main(["align", str(tiny_tif), "-o", str(a), *TINY]) == 0
    assert cli.main(["align", str(folder), "-o", str(b), *TINY]) == 0
    np.testing.assert_array_equal(read_stack(b), read_stack(a))
    opts = ["--block-size", "3", "--window", "1", *TINY]
    assert cli.main(["align", str(tiny_tif), "-o", str(a), *opts]) == 0
    assert cli.main(["align", str(folder), "-o", str(c), *opts]) == 0
    np.testing.assert_array_equal(read_stack(c), read_stack(a))


def test_output_that_would_replace_the_input_is_refused(tiny_tif, tmp_path, capsys):
    src = tmp_path / "in.tif"
    src.write_bytes(tiny_tif.read_bytes())
    before = src.read_bytes()
    folder = tmp_path / "sections"
    folder.mkdir()
    for z, sec in enumerate(read_stack(tiny_tif)):
        write_stack(folder / f"s{z}.tif", sec)
    fields = tmp_path / "f.npz"
    assert cli.main(["align", str(src), "-o", str(tmp_path / "a.tif"), "--fields",
                     str(fields), *TINY]) == 0
    for argv in (["align", str(src), "-o", str(src), *TINY],
                 ["align", str(src), "-o", str(src), "--block-size", "3", "--window", "1",
                  *TINY],
                 ["align", str(folder), "-o", str(folder / "s9.tif"), *TINY],
                 ["apply-fields", str(fields), str(src), "-o", str(src)]):
        assert cli.main(argv) == 2
        assert "would replace the input" in capsys.readouterr().err
    assert src.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == [f"s{z}.tif" for z in range(4)]
