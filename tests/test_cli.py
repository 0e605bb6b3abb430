"""The napari-ssemnet command line (in-process via cli.main, plus real subprocesses)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_ssemnet import __version__, cli
from napari_ssemnet.core.errors import SsemnetError
from napari_ssemnet.core.features import CAE, load_weights
from napari_ssemnet.core.io import apply_displacement, load_fields, read_stack, write_stack
from napari_ssemnet.core.params import AlignParams, knobs
from napari_ssemnet.core.sample import load_sample

TINY = ["--iterations", "5", "--levels", "1", "--features", "pixels", "--prealign",
        "translation", "--grid-spacing", "32", "--device", "cpu"]


@contextlib.contextmanager
def _held_lock(lock: Path, pid: int):
    """``lock`` held as a running napari-ssemnet run holds it: a kernel lock, and its id."""
    import fcntl

    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write(str(pid))
        fh.flush()
        yield


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
    # whole numbers written as floats, as AlignParams(reference=2.0) and --params take them
    args = parser.parse_args(["align", "in.tif", "-o", "o.tif", "--reference", "2.0",
                              "--grid-spacing", "3.2e1"])
    assert (args.reference, args.grid_spacing) == (2, 32)
    assert AlignParams(reference=2.0).reference == 2
    for bad in ("2.5", "two", "nan", "inf"):
        with pytest.raises(SystemExit):
            parser.parse_args(["align", "in.tif", "-o", "o.tif", "--reference", bad])


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
    # the pairs behind ncc_after (and the poor_match check): rows (a, b, NCC)
    assert extra["pair_ncc"].shape == (3, 3) and extra["pair_ncc"][:, :2].tolist() == [
        [0, 1], [1, 2], [2, 3]]
    assert abs(extra["pair_ncc"][0, 2] - extra["ncc_after"][0]) < 1e-9
    assert str(extra["version"]) == __version__ and str(extra["device_used"]) == "cpu"
    env = json.loads(str(extra["environment"]))  # what a methods section needs
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()
    assert env["napari_ssemnet"] == __version__ and env["device"] == "cpu"
    assert env["command"][:3] == ["napari-ssemnet", "align", str(tiny_tif)]
    assert "weights_digest" not in env  # the shipped or pixel features: nothing to digest
    text = capsys.readouterr().out
    assert "mean adjacent NCC" in text and "stages: prepare" in text
    assert "reading and writing included" in text.splitlines()[-1]


def test_summary_json_for_pipelines(tiny_tif, tmp_path, capsys):
    summary = tmp_path / "s" / "run.json"
    out = tmp_path / "al.tif"
    for extra in ([], ["--block-size", "3", "--window", "1"]):
        assert cli.main(["align", str(tiny_tif), "-o", str(out), "--summary-json",
                         str(summary), *TINY, *extra, "-q"]) == 0
        data = json.loads(summary.read_text())
        assert data["version"] == __version__ and data["device"] == "cpu"
        assert (data["sections"], data["height"], data["width"]) == (4, 96, 96)
        assert data["params"]["iterations"] == 5 and len(data["flags"]) == 4
        assert len(data["ncc_after"]) == 4 and data["wall_seconds"] > 0
        # the links behind ncc_after: section 1's value is the mean of its two pairs
        pairs = {(a, b): v for a, b, v in data["pair_ncc"]}
        assert list(pairs) == [(0, 1), (1, 2), (2, 3)]
        assert abs((pairs[(0, 1)] + pairs[(1, 2)]) / 2 - data["ncc_after"][1]) < 1e-9
        # the yardstick poor_match measured them against: each section's better pair, median
        best = [max(v for (a, b), v in pairs.items() if z in (a, b)) for z in range(4)]
        assert abs(data["link_yardstick"] - float(np.median(best))) < 1e-9
        assert data["blocks"] == (2 if extra else None)
        assert data["output_dtype"] == "input" and data["resumed"] is False
        assert data["environment"]["torch_threads"] == torch.get_num_threads()
        assert data["environment"]["date"].endswith("Z")
    assert sorted(p.name for p in summary.parent.iterdir()) == ["run.json"]
    # the summary gives the run's parameters back (it was refused: 15 unknown "parameters")
    assert cli.load_params_file(summary) == AlignParams.from_dict(data["params"])
    code = cli.main(["align", str(tiny_tif), "-o", str(out), "--summary-json", str(out),
                     *TINY])
    assert code == 2 and "--summary-json name the same file" in capsys.readouterr().err


def test_a_rerun_from_parameters_of_before_a_new_parameter_says_how_to_repeat_it(
        tiny_tif, tmp_path, capsys):
    # records written before linear_penalty and shift_penalty name neither; the defaults
    # then refit differently without a word
    old = AlignParams().to_dict()
    for name in cli.ADDED_LATER:
        del old[name]
    record = tmp_path / "old.json"
    record.write_text(json.dumps(old))
    out, fields = tmp_path / "o.tif", tmp_path / "f.npz"
    assert cli.main(["align", str(tiny_tif), "-o", str(out), "--params", str(record),
                     "--fields", str(fields), *TINY, "-q"]) == 0
    err = capsys.readouterr().err
    assert "was written before linear_penalty, shift_penalty existed" in err, err
    assert "add --linear-penalty 1.0 --shift-penalty 1.0 to repeat" in err
    assert load_fields(fields)[1]["linear_penalty"] == 0.1
    # as the note says: the old fit, and then no note
    assert cli.main(["align", str(tiny_tif), "-o", str(out), "--params", str(record),
                     "--linear-penalty", "1.0", "--shift-penalty", "1.0", "--fields",
                     str(fields), *TINY, "-q"]) == 0
    assert "written before" not in capsys.readouterr().err
    assert load_fields(fields)[1]["shift_penalty"] == 1.0
    # a file of a few overrides is not a record of an older run
    few = tmp_path / "few.json"
    few.write_text(json.dumps({"window": 1}))
    assert cli.main(["align", str(tiny_tif), "-o", str(out), "--params", str(few), *TINY,
                     "-q"]) == 0
    assert "written before" not in capsys.readouterr().err


def test_a_rerun_from_results_made_on_another_device_says_it_will_differ(tiny_tif, tmp_path,
                                                                       capsys):
    # device "auto" in a GPU run's files sent the rerun to the CPU without a word
    summary, fields, out = tmp_path / "s.json", tmp_path / "f.npz", tmp_path / "o.tif"
    no_device = TINY[:-2]
    assert TINY[-2:] == ["--device", "cpu"]
    assert cli.main(["align", str(tiny_tif), "-o", str(out), "--summary-json", str(summary),
                     "--fields", str(fields), *no_device, "-q"]) == 0
    assert json.loads(summary.read_text())["params"]["device"] == "auto"
    from napari_ssemnet.core.device import pick_device

    here = pick_device("auto").type
    other = "cuda" if here == "cpu" else "cpu"
    assert cli.recorded_run(summary)["device"] == cli.recorded_run(fields)["device"] == here
    assert cli.recorded_run(summary)["output_dtype"] == "input"
    assert cli.recorded_run(tmp_path / "none.json") == {}
    capsys.readouterr()
    for params_file in (summary, fields):  # made here: no note
        assert cli.main(["align", str(tiny_tif), "-o", str(out), "--params", str(params_file),
                         *no_device, "-q"]) == 0
        assert "device" not in capsys.readouterr().err
    data = json.loads(summary.read_text())
    data["device"] = "cuda:0" if other == "cuda" else "cpu"  # as another machine wrote it
    gpu = tmp_path / "other.json"
    gpu.write_text(json.dumps(data))
    assert cli.main(["align", str(tiny_tif), "-o", str(out), "--params", str(gpu),
                     *no_device, "-q"]) == 0
    err = capsys.readouterr().err
    assert f"made with device {other} and this run uses {here}" in err
    assert f"add --device {other}" in err
    assert cli.main(["align", str(tiny_tif), "-o", str(out), "--params", str(gpu), *TINY,
                     "-q"]) == 0  # a device typed: the user chose it
    assert "device" not in capsys.readouterr().err


def test_a_rerun_from_a_summary_writes_the_same_data_type(tiny_tif, tmp_path):
    summary, out = tmp_path / "s.json", tmp_path / "o.tif"
    assert cli.main(["align", str(tiny_tif), "-o", str(out), "--summary-json", str(summary),
                     "--output-dtype", "float32", *TINY, "-q"]) == 0
    assert tifffile.imread(out).dtype == np.float32
    again = tmp_path / "again.tif"
    assert cli.main(["align", str(tiny_tif), "-o", str(again), "--params", str(summary),
                     *TINY, "-q"]) == 0  # it wrote the input's uint8
    assert tifffile.imread(again).dtype == np.float32
    assert cli.main(["align", str(tiny_tif), "-o", str(again), "--params", str(summary),
                     "--output-dtype", "input", *TINY, "-q"]) == 0
    assert tifffile.imread(again).dtype == tifffile.imread(tiny_tif).dtype != np.float32
    plain = tmp_path / "p.json"  # a parameters file says nothing of the output
    plain.write_text(AlignParams().to_json())
    assert cli.main(["align", str(tiny_tif), "-o", str(again), "--params", str(plain),
                     *TINY, "-q"]) == 0
    assert tifffile.imread(again).dtype == tifffile.imread(tiny_tif).dtype


def test_a_params_path_that_is_no_params_file_says_what_it_is(tmp_path):
    with pytest.raises(SsemnetError, match="is a folder"):
        cli.load_params_file(tmp_path)  # it said "does not exist"
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SsemnetError, match="nested too deeply"):  # a RecursionError
        cli.load_params_file(tmp_path / "deep.json")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.json")
        with pytest.raises(SsemnetError, match="not a regular file"):
            cli.load_params_file(tmp_path / "pipe.json")


def test_weights_in_a_params_file_without_custom_features_get_a_note(tiny_tif, tmp_path,
                                                                     capsys):
    pfile = tmp_path / "p.json"
    pfile.write_text(json.dumps({"weights": "w/my.pt"}))  # ran the shipped model silently
    summary = tmp_path / "s.json"
    code = cli.main(["align", str(tiny_tif), "-o", str(tmp_path / "o.tif"), "--params",
                     str(pfile), "--summary-json", str(summary), *TINY, "-q"])
    assert code == 0 and "is not used: features is 'pixels'" in capsys.readouterr().err
    assert json.loads(summary.read_text())["params"]["weights"] == ""


def test_fields_and_weights_names_say_what_the_file_is(tiny_tif, tmp_path, capsys):
    for argv, words in [
            (["align", str(tiny_tif), "-o", str(tmp_path / "a.tif"), "--fields",
              str(tmp_path / "b.tif"), *TINY], "give it a .npz name"),  # wrote b.tif.npz
            (["train-features", str(tiny_tif), "-o", str(tmp_path / "w.tif"), "--steps", "1"],
             "name the file .pt")]:
        assert cli.main(argv) == 2 and words in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # a dot in a name is no suffix of another format: run.v2 still becomes run.v2.npz
    assert cli.main(["align", str(tiny_tif), "-o", str(tmp_path / "a.tif"), "--fields",
                     str(tmp_path / "run.v2"), *TINY, "-q"]) == 0
    assert (tmp_path / "run.v2.npz").is_file()


def test_params_file_is_loaded_and_overridden(tiny_tif, tmp_path):
    pfile = tmp_path / "p.json"
    pfile.write_text(AlignParams(window=1, grid_spacing=48).to_json())
    args = cli.build_parser().parse_args(["align", "x.tif", "-o", "y.tif", "--params",
                                          str(pfile), "--grid-spacing", "40"])
    p = cli.params_from_args(args)
    assert p.window == 1 and p.grid_spacing == 40


def test_a_relative_weights_path_in_a_params_file_is_found_next_to_it(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "w.pt").write_bytes(b"x")
    pfile = tmp_path / "run" / "p.json"
    pfile.write_text(json.dumps({"features": "custom", "weights": "w.pt"}))
    monkeypatch.chdir(tmp_path)  # "w.pt" is not here: it is next to the file
    assert cli.load_params_file(pfile).weights == str((tmp_path / "run" / "w.pt").resolve())
    (tmp_path / "w.pt").write_bytes(b"y")  # one in the working folder wins, as before
    assert cli.load_params_file(pfile).weights == "w.pt"


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


@pytest.mark.parametrize("extra", [[], ["--block-size", "3", "--window", "1"]])
def test_a_reference_out_of_range_is_named_before_the_stack_is_read(
        tiny_tif, tmp_path, capsys, monkeypatch, extra):
    import napari_ssemnet.core.io as core_io

    def no_read(*args, **kwargs):
        raise AssertionError("the stack was read")

    monkeypatch.setattr(core_io, "read_stack", no_read)
    monkeypatch.setattr(core_io, "open_stack", no_read)
    code = cli.main(["align", str(tiny_tif), "-o", str(tmp_path / "o.tif"), "--reference",
                     "4", *extra, *TINY])
    assert code == 2 and "sections 0 to 3" in capsys.readouterr().err
    assert core_io.section_count(tmp_path) is None  # no sections: the readers explain
    assert core_io.section_count(tmp_path / "missing.tif") is None


@pytest.mark.parametrize("damage", ["corrupt page", "nan"])
def test_a_bad_late_section_stops_a_blockwise_run_before_its_first_block(
        tmp_path, capsys, damage):
    # a page that does not decode gave a traceback after two blocks; a NaN in the last
    # section ended the run after them, with --resume advice that met it again
    stack = load_sample(misaligned=True)[:8, 100:196, 100:196].astype(np.float32)
    if damage == "nan":
        stack[7, 3, 3] = np.nan
    path = tmp_path / "in.tif"
    tifffile.imwrite(path, stack, compression="zlib", photometric="minisblack")
    if damage == "corrupt page":
        with tifffile.TiffFile(path) as tif:
            offset = tif.pages[7].dataoffsets[0]
        with open(path, "r+b") as fh:
            fh.seek(offset)
            fh.write(bytes(200))
    out = tmp_path / "out" / "a.tif"
    code = cli.main(["align", str(path), "-o", str(out), "--block-size", "4", "--window", "1",
                     *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "resume" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert ("section(s) 7" if damage == "nan" else "Section 7") in err
    assert not out.parent.exists() or not list(out.parent.iterdir())  # no working files


def test_stack_too_big_for_free_memory_is_one_error_line(tiny_tif, tmp_path, capsys,
                                                         monkeypatch):
    from napari_ssemnet.core import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 10 * 2**20)
    code = cli.main(["align", str(tiny_tif), "-o", str(tmp_path / "o.tif"), *TINY])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == cli.EXIT_RESOURCE and len(lines) == 1, err
    assert lines[0].startswith("error: Aligning 4 sections of 96x96 px needs about")
    assert not (tmp_path / "o.tif").exists()


def test_align_sample_default_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["align", "--sample", "--fields", "s.npz", *TINY])
    assert code == 0
    aligned = read_stack(tmp_path / cli.SAMPLE_OUTPUT)
    assert aligned.shape == (8, 320, 320) and aligned.dtype == np.uint8
    assert load_fields(tmp_path / "s.npz")[0].shape == (8, 2, 320, 320)
    # ISBI's 4 nm pixels and 50 nm sections (it was written as 1 pixel per no unit)
    from napari_ssemnet.core.io import read_resolution

    res = read_resolution(tmp_path / cli.SAMPLE_OUTPUT)
    assert res["unit"] == "nm" and res["spacing"] == 50.0
    assert np.allclose(res["resolution"], (0.25, 0.25))


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
    assert pipe.getvalue().splitlines() == ["[0:00:00] fit level 1/1: loss",
                                            "[0:00:00] render"]
    # a batch job's log gets a line every log_interval seconds with the stage's progress
    log = io.StringIO()
    p = cli.ProgressPrinter(log, tty=False, log_interval=0.0)
    for i in range(3):
        p(Progress("prealign", i + 1, 4, f"section {i + 2}"))
    assert log.getvalue().splitlines() == [
        "[0:00:00] prealign: section 2", "[0:00:00] prealign 2/4 (50%): section 3",
        "[0:00:00] prealign 3/4 (75%): section 4"]
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
    fields = tmp_path / "o.npz"
    code = cli.main(["align", str(tiny_tif), "-o", str(tmp_path / "o.tif"), "--fields",
                     str(fields), *TINY[:4], "--features", "custom", "--weights", str(out),
                     "-q"])
    assert code == 0
    # the path alone says nothing once the file is overwritten: its content is recorded
    env = json.loads(str(load_fields(fields, with_extra=True)[2]["environment"]))
    assert env["weights_digest"] == cli.file_digest(out)
    # a folder of sections trains too (its digest covers the section files)
    folder = tmp_path / "sections"
    folder.mkdir()
    for z, sec in enumerate(tifffile.imread(tiny_tif)):
        tifffile.imwrite(folder / f"s{z}.tif", sec)
    code = cli.main(["train-features", str(folder), "-o", str(tmp_path / "f.pt"), "--steps",
                     "2", "--device", "cpu", "-q"])
    assert code == 0 and "sections sha256:" in load_weights(tmp_path / "f.pt").info["inputs"]


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


def test_working_files_of_a_killed_run_are_removed(tiny_tif, tmp_path, capsys):
    # (a block-wise run's files are kept for --resume: test_sigterm_stops_cleanly_...)
    out, fields = tmp_path / "al.tif", tmp_path / "f.npz"
    stale = [tmp_path / ".al.tif.joint-partial.tif", tmp_path / ".f.npz.partial.npz"]
    for f in stale:
        f.write_bytes(b"\0" * 3000)  # what a run killed while writing leaves
    kept = tmp_path / ".other.tif.joint-partial.tif"  # another output's: not this run's
    kept.write_bytes(b"x")
    live = tmp_path / ".al.tif.joint.partial.tif"  # the block-wise TIFF of -o al.tif.joint
    live.write_bytes(b"y")
    assert cli.main(["align", str(tiny_tif), "-o", str(out), "--fields", str(fields),
                     *TINY]) == 0
    err = capsys.readouterr().err
    assert not any(f.exists() for f in stale) and kept.exists()
    assert "removed .al.tif.joint-partial.tif (0.0 MB)" in err and "interrupted run" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".other.tif.joint-partial.tif", ".al.tif.joint.partial.tif", "al.tif", "f.npz"])


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_signal_between_the_two_renames_does_not_part_the_outputs(tiny_tif, tmp_path,
                                                                    monkeypatch, capsys):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    # Python's Ctrl-C handler, or SIG_IGN when the tests run in the background (nohup, &)
    sigint_before = signal.getsignal(signal.SIGINT)
    out, fields = tmp_path / "al.tif", tmp_path / "f.npz"
    handlers_after = []
    real_finish = cli._finish_outputs

    def finish(*args, **kwargs):
        real_finish(*args, **kwargs)
        handlers_after.append((signal.getsignal(signal.SIGINT),
                               signal.getsignal(signal.SIGTERM)))

    monkeypatch.setattr(cli, "_finish_outputs", finish)
    out.write_bytes(b"old")
    fields.write_bytes(b"old")
    real = cli._install
    calls = []

    def install_then_terminate(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 1:  # the fields are in place, the TIFF is not yet
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli, "_install", install_then_terminate)
    assert cli.main(["align", str(tiny_tif), "-o", str(out), "--fields", str(fields),
                     *TINY]) == 0
    assert out.read_bytes() != b"old" and fields.read_bytes() != b"old"
    assert "SIGTERM while the outputs were put in place" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
    # right after the renames the run's own handlers are back (Ctrl-C and SIGTERM stop it)
    (sigint, sigterm), = handlers_after
    assert sigint is sigint_before and sigterm.__name__ == "handler"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_stop_after_the_cores_last_check_still_stops(tiny_tif, tmp_path, monkeypatch,
                                                       capsys):
    # it said "stopping (SIGTERM)", then wrote the outputs and exited 0
    import signal

    import napari_ssemnet.core.align as core_align

    real = core_align.align_stack

    def finishes_after_the_signal(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # after the core's last look at should_stop
        return result

    monkeypatch.setattr(core_align, "align_stack", finishes_after_the_signal)
    out = tmp_path / "al.tif"
    assert cli.main(["align", str(tiny_tif), "-o", str(out), *TINY]) == cli.EXIT_TERMINATED
    err = capsys.readouterr().err
    assert "stopping (SIGTERM)" in err and "stopped by SIGTERM" in err
    assert not out.exists()


def test_ctrl_c_while_the_blockwise_fields_are_written_leaves_no_half_file(
        tiny_tif, tmp_path, monkeypatch, capsys):
    import napari_ssemnet.core.io as core_io

    real = core_io.save_fields

    def interrupted(path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(core_io, "save_fields", interrupted)
    out, fields = tmp_path / "al.tif", tmp_path / "f.npz"
    assert cli.main(["align", str(tiny_tif), "-o", str(out), "--fields", str(fields),
                     "--block-size", "3", "--window", "1", *TINY]) == 130
    monkeypatch.setattr(core_io, "save_fields", real)
    assert not (tmp_path / ".f.npz.partial.npz").exists()
    assert "--resume writes them" in capsys.readouterr().err  # every block is kept


def _terminate_during_fit(argv: list[str], env: dict, when: str = "fit level"
                          ) -> subprocess.CompletedProcess:
    """Run the CLI, send SIGTERM once a log line contains ``when``, and collect what it
    said."""
    import signal

    proc = subprocess.Popen([*_exe(), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    lines = []
    for line in proc.stderr:  # one line per stage start: the log of a batch job
        lines.append(line)
        if when in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(argv, proc.returncode, out, "".join(lines) + err)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_stops_cleanly_and_a_blockwise_run_resumes(tiny_tif, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    long_fit = [*TINY, "--iterations", "2000", "--tolerance", "0"]  # seconds, not ms
    out = tmp_path / "al.tif"
    out.write_bytes(b"the user's earlier result")
    res = _terminate_during_fit(["align", str(tiny_tif), "-o", str(out), "--fields",
                                 str(tmp_path / "f.npz"), *long_fit], env)
    assert res.returncode == 143, res.stderr
    assert "stopping (SIGTERM)" in res.stderr and "stopped by SIGTERM" in res.stderr
    assert "Traceback" not in res.stderr
    assert out.read_bytes() == b"the user's earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["al.tif"]  # no working files
    # block-wise: the finished block is kept, and the same command with --resume finishes
    out.unlink()
    block = ["align", str(tiny_tif), "-o", str(out), "--block-size", "3", "--window", "1"]
    res = _terminate_during_fit([*block, *long_fit], env, when="fit level 1/1: block 2/2")
    assert res.returncode == 143, res.stderr
    assert "stopped after block 1 of 2; the same command with --resume" in res.stderr
    done = subprocess.run([*_exe(), *block, *long_fit, "--resume"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert read_stack(out).shape == (4, 96, 96)


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
    assert code == cli.EXIT_RESOURCE and "of disk" in err and "0.0 MB is free" in err
    assert list(tmp_path.iterdir()) == []


def test_apply_fields_reproduces_the_aligned_stack_and_keeps_labels(tiny_tif, tmp_path,
                                                                   capsys):

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


def _codec(path: Path) -> int:
    with tifffile.TiffFile(path) as tif:
        return int(tif.pages.first.compression)


def test_the_written_tiff_keeps_the_input_compression(tiny_tif, tmp_path):
    # a zlib stack came back uncompressed, three times its size on disk
    zlib_in = write_stack(tmp_path / "in" / "z.tif", read_stack(tiny_tif), compression="zlib")
    assert _codec(zlib_in) == 8 and _codec(tiny_tif) == 1
    runs = {"joint": [], "blocks": ["--block-size", "3", "--window", "1"]}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.tif"
        assert cli.main(["align", str(zlib_in), "-o", str(out), "--fields",
                         str(tmp_path / f"{name}.npz"), *TINY, *extra, "-q"]) == 0
        assert _codec(out) == 8, name
        plain = tmp_path / f"{name}_plain.tif"
        assert cli.main(["align", str(zlib_in), "-o", str(plain), "--compression", "none",
                         *TINY, *extra, "-q"]) == 0
        assert _codec(plain) == 1
        np.testing.assert_array_equal(read_stack(out), read_stack(plain))
        packed = tmp_path / f"{name}_packed.tif"
        assert cli.main(["align", str(tiny_tif), "-o", str(packed), "--compression", "zlib",
                         *TINY, *extra, "-q"]) == 0
        assert _codec(packed) == 8
    # the block-wise run's uncompressed working copy is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in"] + [f"{n}{x}" for n in runs for x in (".tif", ".npz", "_plain.tif",
                                                    "_packed.tif")])
    applied = tmp_path / "applied.tif"
    assert cli.main(["apply-fields", str(tmp_path / "joint.npz"), str(zlib_in), "-o",
                     str(applied), "-q"]) == 0
    assert _codec(applied) == 8
    np.testing.assert_array_equal(read_stack(applied), read_stack(tmp_path / "joint.tif"))


def test_an_ignore_mask_from_the_command_line(tiny_tif, tmp_path, capsys):
    stack = read_stack(tiny_tif)
    mask = np.zeros(stack.shape, np.uint8)
    mask[1:3, 20:60, 30:80] = 1
    mask_tif = write_stack(tmp_path / "in" / "mask.tif", mask)
    summary = tmp_path / "s.json"
    blocks = ["--block-size", "3", "--window", "1"]
    for name, extra in (("joint", []), ("blocks", blocks)):
        out = tmp_path / f"{name}.tif"
        assert cli.main(["align", str(tiny_tif), "-o", str(out), "--ignore", str(mask_tif),
                         "--fields", str(tmp_path / f"{name}.npz"), "--summary-json",
                         str(summary), *TINY, *extra, "-q"]) == 0
        assert json.loads(summary.read_text())["ignore"] == str(mask_tif)
        from napari_ssemnet import align_stack

        api = align_stack(stack, AlignParams.from_dict(
            json.loads(summary.read_text())["params"]), ignore=mask)
        np.testing.assert_allclose(load_fields(tmp_path / f"{name}.npz")[0],
                                   api.displacement, atol=1e-4)
    plain = align_stack(stack, AlignParams.from_dict(json.loads(summary.read_text())["params"]))
    assert np.abs(plain.displacement - api.displacement).max() > 0.01  # the mask mattered
    capsys.readouterr()
    # a rerun from the summary without the mask is told that the mask is not a parameter
    assert cli.main(["align", str(tiny_tif), "-o", str(tmp_path / "again.tif"), "--params",
                     str(summary), *TINY, "-q"]) == 0
    assert f"left out the pixels of --ignore {mask_tif}" in capsys.readouterr().err
    assert cli.main(["align", str(tiny_tif), "-o", str(tmp_path / "again.tif"), "--params",
                     str(summary), "--ignore", str(mask_tif), *TINY, "-q"]) == 0
    assert "--ignore" not in capsys.readouterr().err
    short = write_stack(tmp_path / "in" / "short.tif", mask[:3])
    assert cli.main(["align", str(tiny_tif), "-o", str(tmp_path / "x.tif"), "--ignore",
                     str(short), *TINY]) == 2
    err = capsys.readouterr().err
    assert "--ignore mask" in err and "has shape (3, 96, 96)" in err, err
    assert not (tmp_path / "x.tif").exists()
    assert cli.main(["align", str(tiny_tif), "-o", str(mask_tif), "--ignore", str(mask_tif),
                     *TINY]) == 2  # it is an input: never overwritten
    assert read_stack(mask_tif).max() == 1


def test_apply_fields_bad_input_is_one_error_line(tiny_tif, tmp_path, capsys):
    from napari_ssemnet.core.io import save_fields

    wrong = save_fields(tmp_path / "wrong.npz", np.zeros((3, 2, 96, 96), np.float32))
    (tmp_path / "junk.npz").write_text("not a zip")
    nan = np.zeros((4, 2, 96, 96), np.float32)
    nan[3, 0, 50, 50] = np.inf
    np.savez(tmp_path / "nan.npz", displacement=nan)  # the last section: after the others
    nan = tmp_path / "nan.npz"
    for fields, words in [(wrong, "for a stack of 3 sections of 96x96 px"),
                          (nan, "section 3 has NaN or infinite values"),
                          (tmp_path / "junk.npz", "is not a fields file"),
                          (tmp_path / "missing.npz", "does not exist")]:
        code = cli.main(["apply-fields", str(fields), str(tiny_tif), "-o",
                         str(tmp_path / "o.tif")])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # after the progress lines of a late refusal
        assert code == 2 and last.startswith("error:") and words in last, err
    assert not (tmp_path / "o.tif").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.npz", "nan.npz", "wrong.npz"]


def _uninterrupted_blockwise(tiny_tif: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """Block-wise options and the result of a run of them that nothing stopped
    (``full.tif`` and ``full.npz`` in ``tmp_path``)."""
    opts = ["--block-size", "3", "--window", "1", *TINY]
    full = tmp_path / "full.tif"
    assert cli.main(["align", str(tiny_tif), "-o", str(full), "--fields",
                     str(tmp_path / "full.npz"), *opts]) == 0
    return opts, full


def test_blockwise_run_stopped_then_resumed_matches_an_uninterrupted_one(tiny_tif, tmp_path,
                                                                        monkeypatch, capsys):
    import napari_ssemnet.core.blocks as blocks

    opts, full = _uninterrupted_blockwise(tiny_tif, tmp_path)
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
    assert "other parameters (smoothness)" in capsys.readouterr().err
    monkeypatch.setattr(blocks, "iter_align_blocks", real)
    # the same command without --resume would throw the finished block away: refused
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "1 of 2 blocks done" in err and "add --resume" in err
    assert len(list(out.parent.iterdir())) == 3  # the work is still there
    assert cli.main([*argv, "--resume"]) == 0
    said = capsys.readouterr().out
    assert "resuming at block 2 of 2" in said and "include the blocks of the stopped" in said
    np.testing.assert_array_equal(read_stack(out), read_stack(full))
    np.testing.assert_array_equal(load_fields(fields)[0],
                                  load_fields(tmp_path / "full.npz")[0])
    assert sorted(p.name for p in out.parent.iterdir()) == ["al.tif", "f.npz"]
    # nothing left to resume: a requeued job that always says --resume simply runs
    out.unlink()
    assert cli.main([*argv, "--resume"]) == 0
    said = capsys.readouterr()
    assert "nothing to resume" in said.err and "stopped run" not in said.out
    np.testing.assert_array_equal(read_stack(out), read_stack(full))
    # and so does a stack aligned in one piece
    assert cli.main([*argv[:-len(opts)], *TINY, "--resume"]) == 0
    assert "aligned in one piece" in capsys.readouterr().err


def test_a_restaged_input_still_resumes_and_other_options_never_discard_blocks(
        tiny_tif, tmp_path, monkeypatch, capsys):
    # a job that copies its input to scratch again (new path, new time) could not resume,
    # and the same command without --resume then threw the finished blocks away
    import napari_ssemnet.core.blocks as blocks

    opts, full = _uninterrupted_blockwise(tiny_tif, tmp_path)
    real = blocks.iter_align_blocks

    def stop_after_first_block(*args, on_block=None, **kwargs):
        def saved(st):
            on_block(st)
            raise KeyboardInterrupt

        return (yield from real(*args, on_block=saved, **kwargs))

    staged = tmp_path / "scratch1" / "in.tif"
    staged.parent.mkdir()
    shutil.copy(tiny_tif, staged)
    out = tmp_path / "o" / "al.tif"
    monkeypatch.setattr(blocks, "iter_align_blocks", stop_after_first_block)
    assert cli.main(["align", str(staged), "-o", str(out), *opts]) == 130
    monkeypatch.setattr(blocks, "iter_align_blocks", real)
    # other options, with or without --resume: refused, and the blocks are still there
    for extra in ([], ["--resume"]):
        assert cli.main(["align", str(staged), "-o", str(out), *opts, "--smoothness", "2",
                         *extra]) == 2
        assert "smoothness" in capsys.readouterr().err
        assert len(list(out.parent.iterdir())) == 3
    # --resume with the block size forgotten: not a one-piece run beside orphaned blocks
    assert cli.main(["align", str(staged), "-o", str(out), *TINY, "--resume"]) == 2
    assert "1 block(s) done" in capsys.readouterr().err and not out.exists()
    restaged = tmp_path / "scratch2" / "in.tif"  # the same bytes, elsewhere, later
    restaged.parent.mkdir()
    shutil.copy(tiny_tif, restaged)
    os.utime(restaged, (1e9, 1e9))
    capsys.readouterr()
    assert cli.main(["align", str(restaged), "-o", str(out), *opts, "--resume"]) == 0
    assert "resuming at block 2 of 2" in capsys.readouterr().out
    np.testing.assert_array_equal(read_stack(out), read_stack(full))


def test_a_resumed_run_sees_every_byte_of_the_input_and_the_weights(tmp_path):
    # a digest of 16 sampled chunks let a resume take an input with 3000 pixels changed
    # between them, and other weights under the same file name went unnoticed
    import argparse

    from napari_ssemnet.core.features import CAE, save_weights
    from napari_ssemnet.core.params import AlignParams

    data = np.random.default_rng(0).integers(0, 255, (8, 512, 512), np.uint8)
    path = tmp_path / "in.tif"
    write_stack(path, data)
    assert path.stat().st_size > 16 * 65536  # the old sampling did not read all of it
    weights = tmp_path / "w.pt"
    torch.manual_seed(0)
    save_weights(CAE(), weights)
    args = argparse.Namespace(sample=False, input=str(path))
    params = AlignParams(features="custom", weights=str(weights))

    def ident() -> str:
        return cli._run_identity(args, params, data.shape, np.dtype(np.uint8))

    first = ident()
    assert ident() == first
    data[2, 200:210, 300:600] ^= 1  # 3000 pixels between the old sample points
    write_stack(path, data)
    changed = ident()
    assert changed != first and "input's content changed" in cli._what_changed(first, changed)
    torch.manual_seed(1)
    save_weights(CAE(), weights)  # other weights, same name
    assert "other weights" in cli._what_changed(changed, ident())
    # the record of an earlier version cannot be compared: not blamed on the input
    older = json.loads(changed)
    del older["identity"]
    assert "another napari-ssemnet version" in cli._what_changed(json.dumps(older), changed)


def test_a_second_blockwise_run_on_the_same_output_is_refused(tiny_tif, tmp_path, capsys):
    out = tmp_path / "al.tif"
    lock = tmp_path / ".al.tif.lock"
    argv = ["align", str(tiny_tif), "-o", str(out), "--block-size", "3", "--window", "1",
            *TINY]
    with _held_lock(lock, os.getppid()):  # another run holds it
        assert cli.main(argv) == cli.EXIT_BUSY
    assert f"Another napari-ssemnet run (process {os.getppid()})" in capsys.readouterr().err
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


def test_a_folder_of_sections_of_different_sizes_is_aligned_on_one_canvas(tmp_path, capsys):
    # raw sections are often imaged or cropped to slightly different sizes; each is centred
    # on the largest size, so that its tissue stays where it was in the uncropped section
    stack = load_sample(misaligned=True)
    cut = [0, 3, 6, 2, 8, 4, 1, 5]  # px cropped from every side of each section
    folder = tmp_path / "ragged"
    folder.mkdir()
    for z, k in enumerate(cut):
        write_stack(folder / f"s{z}.tif", stack[z, k:stack.shape[1] - k, k:stack.shape[2] - k])
    whole = tmp_path / "whole.tif"
    write_stack(whole, stack)
    fields = {}
    for name, src in (("whole", whole), ("ragged", folder)):
        assert cli.main(["align", str(src), "-o", str(tmp_path / f"{name}_out.tif"),
                         "--fields", str(tmp_path / f"{name}.npz"), "-q"]) == 0
        fields[name] = load_fields(tmp_path / f"{name}.npz")[0]
    err = capsys.readouterr().err
    assert "note: " in err and "from 304x304 to 320x320 px); 7 of 8 are centred" in err, err
    assert read_stack(tmp_path / "ragged_out.tif").shape == stack.shape
    # the lost borders move the result a little (0.70-1.79 px per section on the dev box);
    # sections placed at the corner instead of centred were 12.4 px off
    gap = np.hypot(*(fields["ragged"] - fields["whole"]).transpose(1, 0, 2, 3))
    per_section = np.median(gap[:, 20:-20, 20:-20], axis=(1, 2))
    assert per_section[0] < 1e-3 and per_section.max() < 3.0, per_section
    # block by block, the sections are read and padded one at a time
    assert cli.main(["align", str(folder), "-o", str(tmp_path / "blocks.tif"), "--block-size",
                     "4", "--window", "1", *TINY, "-q"]) == 0
    assert read_stack(tmp_path / "blocks.tif").shape == stack.shape
    assert "7 of 8 are centred" in capsys.readouterr().err


def test_advice_about_the_pre_alignment_is_a_note_and_in_the_summary(tmp_path, capsys):
    from napari_ssemnet.core.synth import apply_misalignment, random_misalignment

    sample = load_sample(misaligned=False).astype(np.float32)
    e = random_misalignment(sample.shape, seed=0, scale=0.1, rotation_deg=3, shift_frac=0.03)
    src = write_stack(tmp_path / "scaled.tif", apply_misalignment(sample, e))
    summary = tmp_path / "s.json"
    quick = ["--levels", "1", "--iterations", "10", "--features", "pixels", "--device", "cpu"]
    assert cli.main(["align", str(src), "-o", str(tmp_path / "a.tif"), "--summary-json",
                     str(summary), *quick, "-q"]) == 0
    err = capsys.readouterr().err
    assert "note: Neighbouring sections seem to differ in scale" in err, err
    notes = json.loads(summary.read_text())["notes"]
    assert len(notes) == 1 and "prealign='affine'" in notes[0]
    assert cli.main(["align", str(src), "-o", str(tmp_path / "a.tif"), "--summary-json",
                     str(summary), *quick, "--prealign", "affine", "-q"]) == 0
    assert "differ in scale" not in capsys.readouterr().err
    assert json.loads(summary.read_text())["notes"] == []


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
        err = capsys.readouterr().err
        # a new file in an input folder would become one of its sections
        assert "would replace the input" in err or "inside the input folder" in err, err
    assert src.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == [f"s{z}.tif" for z in range(4)]


# -- output safety: hard links, working names, pre-flight checks, locks, closed stdout ------


def _zero_fields(path: Path, z: int = 4, shift: float = 0.0) -> Path:
    from napari_ssemnet.core.io import save_fields

    return save_fields(path, np.full((z, 2, 96, 96), shift, np.float32))


def test_a_hard_link_to_an_input_is_refused_as_an_output(tiny_tif, tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    src = d / "input.tif"
    src.write_bytes(tiny_tif.read_bytes())
    before = src.read_bytes()
    os.link(src, d / "hard2.tif")
    os.link(src, d / "hard3.npz")
    folder = tmp_path / "sections"
    folder.mkdir()
    for z, sec in enumerate(read_stack(tiny_tif)):
        write_stack(folder / f"s{z}.tif", sec)
    os.link(folder / "s2.tif", tmp_path / "elsewhere.tif")  # a section, linked outside
    fields = _zero_fields(tmp_path / "f.npz")
    os.link(fields, tmp_path / "fields_link.tif")
    blocks = ["--block-size", "3", "--window", "1"]
    for argv in (["align", str(src), "-o", str(d / "hard2.tif"), *TINY],
                 ["align", str(src), "-o", str(d / "hard2.tif"), *blocks, *TINY],
                 ["align", str(src), "-o", str(tmp_path / "a.tif"), "--fields",
                  str(d / "hard3.npz"), *TINY],
                 ["align", str(src), "-o", str(tmp_path / "a.tif"), "--fields",
                  str(d / "hard3"), *blocks, *TINY],  # .npz is appended: the same file
                 ["align", str(folder), "-o", str(tmp_path / "elsewhere.tif"), *TINY],
                 ["apply-fields", str(fields), str(src), "-o", str(d / "hard2.tif")],
                 ["apply-fields", str(fields), str(src), "-o",
                  str(tmp_path / "fields_link.tif")]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "would replace the input" in err and len(err.splitlines()) == 1, err
    assert src.read_bytes() == before and (d / "hard2.tif").read_bytes() == before
    assert (tmp_path / "elsewhere.tif").read_bytes() == (folder / "s2.tif").read_bytes()
    assert load_fields(tmp_path / "fields_link.tif")[0].shape == (4, 2, 96, 96)
    assert not (tmp_path / "a.tif").exists()


def test_joint_align_writes_under_a_working_name_and_renames_it(tiny_tif, tmp_path,
                                                                monkeypatch, capsys):
    import napari_ssemnet.core.io as core_io

    out = tmp_path / "al.tif"
    out.write_bytes(b"the user's earlier result")
    real = core_io.write_stack

    def disk_full(path, arr, **kwargs):
        Path(path).write_bytes(b"half a TIFF")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(core_io, "write_stack", disk_full)
    argv = ["align", str(tiny_tif), "-o", str(out), "--fields", str(tmp_path / "f.npz"),
            *TINY]
    assert cli.main(argv) == cli.EXIT_RESOURCE
    assert "No space left" in capsys.readouterr().err
    assert out.read_bytes() == b"the user's earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["al.tif"]  # no working files
    # a hard link at -o is replaced, not written through
    monkeypatch.setattr(core_io, "write_stack", real)
    os.link(out, tmp_path / "other.tif")
    assert cli.main(argv) == 0
    assert (tmp_path / "other.tif").read_bytes() == b"the user's earlier result"
    assert read_stack(out).shape == (4, 96, 96)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["al.tif", "f.npz", "other.tif"]


def test_train_features_refuses_to_overwrite_an_input_stack(tiny_tif, tmp_path, capsys):
    src = tmp_path / "in.tif"
    src.write_bytes(tiny_tif.read_bytes())
    before = src.read_bytes()
    os.link(src, tmp_path / "link.pt")
    for target in (src, tmp_path / "link.pt"):
        code = cli.main(["train-features", str(tiny_tif), str(src), "-o", str(target),
                         "--steps", "1", "--device", "cpu", "-q"])
        err = capsys.readouterr().err
        assert code == 2 and "would replace the input" in err, err
    assert src.read_bytes() == before == (tmp_path / "link.pt").read_bytes()


class _ClosedPipe:
    """A stdout whose reader went away."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("blocks", [[], ["--block-size", "3", "--window", "1"]])
def test_a_closed_stdout_costs_no_output_file(tiny_tif, tmp_path, monkeypatch, capsys,
                                              blocks):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    out, fields = tmp_path / "al.tif", tmp_path / "f.npz"
    code = cli.main(["align", str(tiny_tif), "-o", str(out), "--fields", str(fields), "-q",
                     *blocks, *TINY])
    assert code == 0, capsys.readouterr().err
    assert read_stack(out).shape == (4, 96, 96)
    assert load_fields(fields)[0].shape == (4, 2, 96, 96)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["al.tif", "f.npz"]
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert cli.main(["apply-fields", str(fields), str(tiny_tif), "-o",
                     str(tmp_path / "ap.tif"), "-q"]) == 0
    assert read_stack(tmp_path / "ap.tif").shape == (4, 96, 96)


def test_subprocess_piped_into_head_writes_every_file(tiny_tif, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out, fields = tmp_path / "al.tif", tmp_path / "f.npz"
    proc = subprocess.Popen([*_exe(), "align", str(tiny_tif), "-o", str(out), "--fields",
                             str(fields), "-q", *TINY], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    first = proc.stdout.readline()  # as `| head -1` does
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert first.startswith(b"aligning ")
    assert err == "", err
    assert read_stack(out).shape == (4, 96, 96)
    assert load_fields(fields)[0].shape == (4, 2, 96, 96)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if an alignment, a resampling or a training starts."""
    import napari_ssemnet.core.align as core_align
    import napari_ssemnet.core.blocks as core_blocks
    import napari_ssemnet.core.features as core_features
    import napari_ssemnet.core.io as core_io

    def ran(*args, **kwargs):
        raise AssertionError("the work started before the output was checked")

    for mod, name in ((core_align, "align_stack"), (core_blocks, "iter_align_blocks"),
                      (core_io, "read_stack"), (core_io, "open_stack"),
                      (core_features, "train_encoder")):
        monkeypatch.setattr(mod, name, ran)


_PROC = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")


@pytest.mark.parametrize("opts, words", [
    pytest.param(["-o", "/proc/nope/a.tif"], "Cannot write the output file", marks=_PROC),
    (["-o", "DIR"], "is a folder"),
    (["-o", "FILE/a.tif"], "is a file, not a folder"),
    pytest.param(["-o", "OK", "--fields", "/proc/nope/f.npz"], "Cannot write the fields file",
                 marks=_PROC),
    pytest.param(["-o", "OK", "--fields", "/proc/nope/f.npz", "--block-size", "3",
                  "--window", "1"], "Cannot write the fields file", marks=_PROC),
    (["-o", "OK", "--fields", "DIR.npz"], "is a folder"),
    (["-o", "OK", "--fields", "FILE/f"], "is a file, not a folder"),
    (["-o", "OK", "--fields", "DIR/.npz"], "has no file name"),  # not a hidden .npz.npz
])
def test_bad_output_paths_fail_before_the_alignment(tiny_tif, tmp_path, capsys, no_work,
                                                    opts, words):
    (tmp_path / "DIR").mkdir()
    (tmp_path / "DIR.npz").mkdir()
    (tmp_path / "FILE").write_text("a file")
    names = {"DIR": "DIR", "DIR.npz": "DIR.npz", "FILE/a.tif": "FILE/a.tif",
             "FILE/f": "FILE/f", "OK": "ok.tif"}
    opts = [str(tmp_path / names[o]) if o in names else o for o in opts]
    code = cli.main(["align", str(tiny_tif), *opts, *TINY])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert words in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DIR", "DIR.npz", "FILE"]


def test_bad_output_paths_of_apply_fields_and_train_features(tiny_tif, tmp_path, capsys,
                                                             no_work):
    fields = _zero_fields(tmp_path / "f.npz")
    (tmp_path / "FILE").write_text("a file")
    bad = [str(tmp_path / "FILE" / "x.tif"), str(tmp_path)]
    if Path("/proc/self").is_dir():
        bad.append("/proc/nope/t.tif")  # used to be a traceback (mkdir outside the try)
    for target in bad:
        for argv in (["apply-fields", str(fields), str(tiny_tif), "-o", target],
                     ["train-features", str(tiny_tif), "-o", target, "--steps", "1"]):
            code = cli.main(argv)
            err = capsys.readouterr().err
            assert code == 2 and len(err.splitlines()) == 1, err
            assert err.startswith("error: ") and "Traceback" not in err
            assert ".probe" not in err  # named a "displacement" working file for weights
    # a torch file under a .safetensors name: other tools would misread it (and torch.load
    # by name picked its safetensors loader, so align refused what train-features wrote)
    code = cli.main(["train-features", str(tiny_tif), "-o", str(tmp_path / "w.safetensors"),
                     "--steps", "1"])
    assert code == 2 and "name the file .pt" in capsys.readouterr().err


def test_folders_made_for_a_failed_run_are_removed(tiny_tif, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "al.tif"
    fields = tmp_path / "new2" / "f.npz"
    code = cli.main(["align", str(tmp_path / "missing.tif"), "-o", str(out), "--fields",
                     str(fields), *TINY])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_apply_fields_takes_a_boolean_mask(tiny_tif, tmp_path, capsys):
    import tifffile

    from napari_ssemnet.core.io import apply_displacement

    fields = _zero_fields(tmp_path / "f.npz", shift=2.5)
    mask = read_stack(tiny_tif) > 120
    src = tmp_path / "mask.tif"
    tifffile.imwrite(src, mask, photometric="minisblack")  # one bit per pixel
    assert tifffile.TiffFile(src).series[0].dtype == bool
    folder = tmp_path / "mask_sections"  # the same mask as a folder of one-bit files
    folder.mkdir()
    for z, sec in enumerate(mask):
        tifffile.imwrite(folder / f"s{z}.tif", sec, photometric="minisblack")
    disp, _ = load_fields(fields)
    for opt, order, given in (["--labels"], 0, src), ([], 1, src), (["--labels"], 0, folder):
        out = tmp_path / f"m{order}_{given.name}.tif"
        code = cli.main(["apply-fields", str(fields), str(given), "-o", str(out), "-q", *opt])
        assert code == 0, capsys.readouterr().err
        got = read_stack(out)
        assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 1}
        want = apply_displacement(mask.astype(np.uint8), disp, order=order)
        np.testing.assert_array_equal(got, np.rint(want).astype(np.uint8))


def test_apply_fields_messages_speak_of_apply_fields(tiny_tif, tmp_path, capsys):
    import tifffile

    fields = _zero_fields(tmp_path / "f.npz")
    flat = write_stack(tmp_path / "flat.tif", read_stack(tiny_tif)[0])
    flat_mask = tmp_path / "flat_mask.tif"
    tifffile.imwrite(flat_mask, read_stack(tiny_tif)[0] > 100, photometric="minisblack")
    for src in (flat, flat_mask):
        code = cli.main(["apply-fields", str(fields), str(src), "-o", str(tmp_path / "o.tif")])
        err = capsys.readouterr().err
        assert code == 2 and "(Z, H, W) is needed" in err and "align" not in err, err
    sub = cli.build_parser()._subparsers._group_actions[0].choices["apply-fields"]
    labels = next(a for a in sub._actions if a.dest == "labels")
    assert "boolean mask" in labels.help and "uint8 0/1" in labels.help


@pytest.mark.parametrize("argv, cmd", [
    (["align", "x.tif", "-o", "y.tif", "--grid-spacing", "abc"], "align"),
    (["align", "x.tif", "-o", "y.tif", "--prealign", "nope"], "align"),
    (["align", "x.tif", "-o", "y.tif", "--bogus"], "align"),
    (["align", "x.tif", "-o", "y.tif", "--iter", "5"], "align"),  # no abbreviations
    (["apply-fields", "f.npz", "x.tif"], "apply-fields"),
    (["train-features", "-o", "w.pt"], "train-features"),
    (["train-features", "x.tif", "-o", "w.pt", "--steps", "many"], "train-features"),
    (["bogus"], None),
])
def test_usage_errors_are_one_line(capsys, argv, cmd):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    hint = f"napari-ssemnet {cmd} --help" if cmd else "napari-ssemnet --help"
    assert lines[0].endswith(f"(see '{hint}')")


@pytest.mark.parametrize("argv, hint", [
    (["align", "x.tif", "-o", "y.tif", "--grid-spaceing", "32"], "; did you mean --grid-spacing?"),
    (["align", "x.tif", "-o", "y.tif", "--smoothnes=2", "--windw", "1"],
     "; did you mean --smoothness or --window?"),
    (["apply-fields", "f.npz", "x.tif", "-o", "y.tif", "--label"], "; did you mean --labels?"),
    (["align", "x.tif", "-o", "y.tif", "--bogus"], None),  # nothing close: no guess
])
def test_a_misspelt_option_gets_the_nearest_name(capsys, argv, hint):
    with pytest.raises(SystemExit):
        cli.main(argv)
    err = capsys.readouterr().err
    if hint is None:
        assert "did you mean" not in err
    else:
        assert hint in err, err


def test_a_second_joint_run_on_the_same_output_is_refused(tiny_tif, tmp_path, capsys,
                                                          monkeypatch):
    import napari_ssemnet.core.align as core_align

    out = tmp_path / "al.tif"
    lock = tmp_path / ".al.tif.lock"
    argv = ["align", str(tiny_tif), "-o", str(out), *TINY]
    with _held_lock(lock, os.getppid()):
        assert cli.main(argv) == cli.EXIT_BUSY
    assert "Another napari-ssemnet run" in capsys.readouterr().err
    assert lock.read_text() == str(os.getppid()) and not out.exists()
    lock.unlink()
    # while a run goes on, its lock is there, rw-r--r--
    real, seen = core_align.align_stack, []

    def watched(*args, **kwargs):
        seen.append(lock.stat().st_mode & 0o777)
        return real(*args, **kwargs)

    monkeypatch.setattr(core_align, "align_stack", watched)
    old = os.umask(0o022)
    try:
        assert cli.main(argv) == 0
    finally:
        os.umask(old)
    assert seen == [0o644] and out.exists() and not lock.exists()


def test_outputs_keep_the_pixel_size_and_section_spacing(tiny_tif, tmp_path, capsys):
    from napari_ssemnet.core.io import read_resolution

    src = tmp_path / "ij.tif"
    tifffile.imwrite(src, tifffile.imread(tiny_tif), imagej=True, resolution=(250.0, 250.0),
                     metadata={"spacing": 0.05, "unit": "um"})
    res = read_resolution(src)
    assert res["spacing"] == 0.05 and res["resolution"] == (250.0, 250.0)
    joint, blocks = tmp_path / "joint.tif", tmp_path / "blocks.tif"
    assert cli.main(["align", str(src), "-o", str(joint), "--fields", str(tmp_path / "f.npz"),
                     "-q", *TINY]) == 0
    assert cli.main(["align", str(src), "-o", str(blocks), "--block-size", "3", "--window",
                     "1", "-q", *TINY]) == 0
    assert read_resolution(joint) == res and read_resolution(blocks) == res
    np.testing.assert_array_equal(tifffile.imread(joint).shape, tifffile.imread(src).shape)
    applied = tmp_path / "applied.tif"
    assert cli.main(["apply-fields", str(tmp_path / "f.npz"), str(src), "-o", str(applied),
                     "-q"]) == 0
    assert read_resolution(applied) == res
    with tifffile.TiffFile(applied) as tif:  # one ZYX series, not pages ImageJ calls channels
        assert tif.series[0].axes == "ZYX" and len(tif.series) == 1
        want = tifffile.imread(joint).shape
        assert tif.series[0].shape == want and tif.imagej_metadata["slices"] == want[0]
    capsys.readouterr()


# -- second review: failures while writing, other inputs, locks, closed streams ------------


def _failing_save_fields(monkeypatch):
    import napari_ssemnet.core.io as core_io

    real = core_io.save_fields

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(core_io, "save_fields", full_disk)
    return real


def test_a_failed_fields_write_replaces_neither_output(tiny_tif, tmp_path, monkeypatch,
                                                       capsys):
    out, fields = tmp_path / "al.tif", tmp_path / "f.npz"
    out.write_bytes(b"OLD")
    fields.write_bytes(b"OLDF")
    _failing_save_fields(monkeypatch)
    code = cli.main(["align", str(tiny_tif), "-o", str(out), "--fields", str(fields), *TINY])
    assert code == cli.EXIT_RESOURCE and "No space left" in capsys.readouterr().err
    # the two outputs still belong together: neither was replaced
    assert out.read_bytes() == b"OLD" and fields.read_bytes() == b"OLDF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["al.tif", "f.npz"]


def test_a_failed_fields_write_after_the_last_block_keeps_the_work(tiny_tif, tmp_path,
                                                                  monkeypatch, capsys):
    opts, full = _uninterrupted_blockwise(tiny_tif, tmp_path)
    out, fields = tmp_path / "o" / "al.tif", tmp_path / "o" / "f.npz"
    argv = ["align", str(tiny_tif), "-o", str(out), "--fields", str(fields), *opts]
    real = _failing_save_fields(monkeypatch)
    capsys.readouterr()
    assert cli.main(argv) == cli.EXIT_RESOURCE
    err = capsys.readouterr().err
    assert "every block is done" in err and "--resume" in err
    assert not out.exists() and not fields.exists()
    import napari_ssemnet.core.io as core_io

    monkeypatch.setattr(core_io, "save_fields", real)
    assert cli.main([*argv, "--resume"]) == 0  # no block runs again; the outputs are written
    np.testing.assert_array_equal(read_stack(out), read_stack(full))
    np.testing.assert_array_equal(load_fields(fields)[0], load_fields(tmp_path / "full.npz")[0])
    assert sorted(p.name for p in out.parent.iterdir()) == ["al.tif", "f.npz"]


def test_weights_and_params_files_are_inputs_too(tiny_tif, tmp_path, capsys):
    weights = tmp_path / "w.pt"
    assert cli.main(["train-features", str(tiny_tif), "-o", str(weights), "--steps", "2",
                     "--device", "cpu", "-q"]) == 0
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"window": 1}))
    before = weights.read_bytes(), params.read_text()
    for argv in (["-o", str(weights), "--features", "custom", "--weights", str(weights)],
                 ["-o", str(params), "--params", str(params)]):
        assert cli.main(["align", str(tiny_tif), *argv, *TINY[:4]]) == 2
        assert "would replace the input" in capsys.readouterr().err
    assert (weights.read_bytes(), params.read_text()) == before


def test_a_bad_weights_file_is_refused_before_the_stack_is_read(tiny_tif, tmp_path,
                                                               monkeypatch, capsys):
    import napari_ssemnet.core.io as core_io

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not weights")
    read = []
    monkeypatch.setattr(core_io, "open_stack", lambda *a, **k: read.append(a) or 1 / 0)
    code = cli.main(["align", str(tiny_tif), "-o", str(tmp_path / "o.tif"), "--features",
                     "custom", "--weights", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "bad.pt" in err and err.startswith("error:") and read == []


def test_train_features_replaces_a_link_at_its_output(tiny_tif, tmp_path, capsys):
    keep = tmp_path / "keep.txt"
    keep.write_text("old")
    os.link(keep, tmp_path / "out.pt")
    assert cli.main(["train-features", str(tiny_tif), "-o", str(tmp_path / "out.pt"),
                     "--steps", "2", "--device", "cpu", "-q"]) == 0
    assert keep.read_text() == "old"  # the other name of the file kept its content
    assert isinstance(load_weights(tmp_path / "out.pt"), CAE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "out.pt"]
    # bad options are refused before the stacks are read
    for opt, words in ((["--seed", "-1"], "--seed"), (["--steps", "0"], "--steps"),
                       (["--init", str(tmp_path / "none.pt")], "does not exist")):
        assert cli.main(["train-features", str(tmp_path / "missing.tif"), "-o",
                         str(tmp_path / "x.pt"), *opt]) == 2
        assert words in capsys.readouterr().err


def test_apply_fields_is_locked_and_leaves_a_stopped_align_alone(tiny_tif, tmp_path, capsys):
    fields = tmp_path / "f.npz"
    assert cli.main(["align", str(tiny_tif), "-o", str(tmp_path / "a.tif"), "--fields",
                     str(fields), *TINY]) == 0
    out = tmp_path / "o.tif"
    # a stopped block-wise align onto the same -o keeps its working TIFF
    align_work = tmp_path / ".o.tif.partial.tif"
    align_work.write_bytes(b"block-wise work")
    assert cli.main(["apply-fields", str(fields), str(tiny_tif), "-o", str(out), "-q"]) == 0
    assert align_work.read_bytes() == b"block-wise work"
    # a running process holds the output
    with _held_lock(tmp_path / ".o.tif.lock", os.getppid()):
        assert cli.main(["apply-fields", str(fields), str(tiny_tif), "-o", str(out),
                         "-q"]) == cli.EXIT_BUSY
    assert "Another napari-ssemnet run" in capsys.readouterr().err


def test_a_closed_stderr_keeps_the_exit_code(tiny_tif, tmp_path, monkeypatch):
    class Gone:
        def write(self, text):
            raise BrokenPipeError

        def flush(self):
            raise BrokenPipeError

    monkeypatch.setattr(sys, "stderr", Gone())
    assert cli.main(["align", str(tmp_path / "missing.tif"), "-o",
                     str(tmp_path / "o.tif")]) == 2  # was 1: the error line itself raised
    monkeypatch.setattr(sys, "stdout", None)  # started with >&-
    assert cli.main(["align", str(tiny_tif), "-o", str(tmp_path / "o.tif"), *TINY]) == 0
    assert (tmp_path / "o.tif").is_file()


def test_replaced_outputs_keep_their_permissions(tiny_tif, tmp_path, capsys):
    out, fields, applied = tmp_path / "al.tif", tmp_path / "f.npz", tmp_path / "ap.tif"
    for f in (out, fields, applied):
        f.write_bytes(b"old")
        f.chmod(0o664)  # a group-writable file in a shared folder
    old = os.umask(0o022)
    try:
        assert cli.main(["align", str(tiny_tif), "-o", str(out), "--fields", str(fields),
                         "-q", *TINY]) == 0
        assert cli.main(["apply-fields", str(fields), str(tiny_tif), "-o", str(applied),
                         "-q"]) == 0
        new = tmp_path / "new.tif"  # a new file: the umask decides
        assert cli.main(["apply-fields", str(fields), str(tiny_tif), "-o", str(new),
                         "-q"]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    assert [f.stat().st_mode & 0o777 for f in (out, fields, applied)] == [0o664] * 3
    assert new.stat().st_mode & 0o777 == 0o644
    assert read_stack(out).shape == read_stack(tiny_tif).shape


def _hold_lock_briefly(out_path, barrier, results):
    barrier.wait()
    try:
        with cli._output_lock(out_path):
            results.put("won")
            time.sleep(0.2)  # still held while the other one tries
    except cli.SsemnetError:
        results.put("refused")


def test_a_stale_lock_is_taken_by_one_of_two_runs_starting_together(tmp_path):
    import multiprocessing

    out = tmp_path / "al.tif"
    ctx = multiprocessing.get_context("fork")
    for attempt in range(15):  # the link scheme lost about 1 race in 10
        (tmp_path / ".al.tif.lock").write_text("999999999")  # left by a crashed run
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_hold_lock_briefly, args=(out, barrier, results))
                 for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(20)
        assert sorted(results.get(timeout=5) for _ in procs) == ["refused", "won"], attempt
        assert not (tmp_path / ".al.tif.lock").exists()


def test_a_lock_file_without_a_kernel_lock_is_taken_whatever_id_it_holds(tmp_path):
    # a crashed run's id may belong to another live process by now (ids are reused)
    out, lock = tmp_path / "al.tif", tmp_path / ".al.tif.lock"
    lock.write_text(str(os.getppid()))  # alive, but holds no lock
    with cli._output_lock(out):
        assert lock.read_text() == cli._owner().decode()
    assert not lock.exists()


def test_a_kernel_lock_refuses_whatever_the_lock_file_says(tmp_path):
    import fcntl

    out, lock = tmp_path / "al.tif", tmp_path / ".al.tif.lock"
    lock.write_text("999999999")  # a dead process id, but the file is locked
    with open(lock, "rb+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(cli.SsemnetError, match="Another napari-ssemnet run"):
            with cli._output_lock(out):
                pass
    with cli._output_lock(out):  # the holder is gone: taken without a fuss
        assert lock.read_text() == cli._owner().decode()
    assert not lock.exists()


def test_without_kernel_locks_the_lock_file_alone_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_flock", lambda out_path, lock: None)
    out, lock = tmp_path / "al.tif", tmp_path / ".al.tif.lock"
    lock.write_text(str(os.getppid()))  # a running process
    with pytest.raises(cli.SsemnetError, match=f"process {os.getppid()}"):
        with cli._output_lock(out):
            pass
    lock.write_text("999999999")  # a process that no longer runs
    with cli._output_lock(out):
        assert lock.read_text() == cli._owner().decode() and lock.stat().st_mode & 0o777 == 0o644
    assert not lock.exists()
    # a run on another node of a cluster cannot be checked from here: it counts as running
    lock.write_text("999999999 node-17")
    with pytest.raises(cli.SsemnetError, match="process 999999999 on node-17"):
        with cli._output_lock(out):
            pass



def test_a_disk_too_full_for_the_result_is_refused_before_the_alignment(tiny_tif, tmp_path,
                                                                       capsys, monkeypatch):
    import napari_ssemnet.core.align as core_align

    ran = []
    monkeypatch.setattr(core_align, "align_stack", lambda *a, **k: ran.append(1))
    real = shutil.disk_usage
    fields_disk = tmp_path / "other"
    fields_disk.mkdir()

    def usage(path):
        u = real(path)  # this folder pretends to have 10 kB free
        return u._replace(free=10_000) if Path(path) == tmp_path else u

    monkeypatch.setattr(shutil, "disk_usage", usage)
    out = tmp_path / "al.tif"
    assert cli.main(["align", str(tiny_tif), "-o", str(out), *TINY]) == cli.EXIT_RESOURCE
    err = capsys.readouterr().err
    assert f"disk in {tmp_path}" in err and "only 9.8 kB" not in err and not ran
    fields = _zero_fields(fields_disk / "f.npz")
    code = cli.main(["apply-fields", str(fields), str(tiny_tif), "-o", str(out), "-q"])
    assert code == cli.EXIT_RESOURCE
    assert "needs about" in capsys.readouterr().err and not out.exists()


def test_free_space_is_counted_per_file_system(tmp_path, monkeypatch):
    import types

    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir()
    big.mkdir()
    free = {str(small): 1_000_000, str(big): 100_000_000}
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=free[str(p)]))
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: types.SimpleNamespace(
        st_dev=1 if str(p) == str(small) else 2))
    # the TIFF on the small disk, the fields on the big one: each disk takes its own share
    cli._check_space([(small / "al.tif", 600_000), (big / "f.npz", 60_000_000)])
    with pytest.raises(cli.SsemnetError, match=f"1.1 MB of disk in {small}, but only"):
        cli._check_space([(small / "al.tif", 600_000), (small / "f.npz", 600_000)])


def test_a_full_disk_while_writing_is_one_line_and_keeps_the_old_output(tiny_tif, tmp_path,
                                                                       capsys, monkeypatch):
    import errno as errno_

    out = tmp_path / "al.tif"
    out.write_bytes(b"old result")

    def full(*args, **kwargs):
        raise OSError(errno_.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli, "_install", full)  # the disk fills at the very end
    assert cli.main(["align", str(tiny_tif), "-o", str(out), "-q", *TINY]) == cli.EXIT_RESOURCE
    assert capsys.readouterr().err.count("\n") == 1
    monkeypatch.undo()
    import napari_ssemnet.core.io as core_io

    def partial_write(path, *args, **kwargs):
        Path(path).write_bytes(b"x")
        raise OSError("442368 requested and 188160 written")  # tifffile's words

    monkeypatch.setattr(core_io, "write_stack", partial_write)
    assert cli.main(["align", str(tiny_tif), "-o", str(out), "-q", *TINY]) == cli.EXIT_RESOURCE
    err = capsys.readouterr().err
    assert "the disk is full" in err and err.count("\n") == 1, err
    assert out.read_bytes() == b"old result"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["al.tif"]


def test_a_full_disk_at_the_lock_is_one_line_and_leaves_no_lock(tiny_tif, tmp_path, capsys,
                                                               monkeypatch):
    import errno as errno_

    def no_space(*args):
        raise OSError(errno_.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", no_space)
    out = tmp_path / "al.tif"
    assert cli.main(["align", str(tiny_tif), "-o", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Could not write the lock file") and "No space" in err
    assert list(tmp_path.iterdir()) == []



def test_an_output_given_as_a_symlink_is_written_where_it_points(tiny_tif, tmp_path, capsys):
    far = tmp_path / "big_disk"
    far.mkdir()
    (far / "al.tif").write_bytes(b"old")
    link = tmp_path / "al.tif"
    link.symlink_to(far / "al.tif")
    fields_link = tmp_path / "f.npz"
    fields_link.symlink_to(far / "f.npz")  # dangling until written
    assert cli.main(["align", str(tiny_tif), "-o", str(link), "--fields", str(fields_link),
                     "-q", *TINY]) == 0
    assert link.is_symlink() and fields_link.is_symlink()
    assert read_stack(far / "al.tif").shape == read_stack(tiny_tif).shape
    assert load_fields(far / "f.npz")[0].shape[1] == 2
    assert sorted(f.name for f in far.iterdir()) == ["al.tif", "f.npz"]
    capsys.readouterr()


def test_apply_fields_notes_that_wide_integers_are_usually_labels(tiny_tif, tmp_path, capsys):
    fields = _zero_fields(tmp_path / "f.npz")
    ids = tmp_path / "ids.tif"
    tifffile.imwrite(ids, read_stack(tiny_tif).astype(np.uint32) * 1000,
                     photometric="minisblack")
    assert cli.main(["apply-fields", str(fields), str(ids), "-o", str(tmp_path / "o.tif"),
                     "-q"]) == 0
    assert "--interpolation nearest or --labels" in capsys.readouterr().err
    for flag in (["--labels"], ["--interpolation", "nearest"]):
        assert cli.main(["apply-fields", str(fields), str(ids), "-o", str(tmp_path / "o.tif"),
                         "-q", *flag]) == 0
        assert "--labels" not in capsys.readouterr().err
        assert read_stack(tmp_path / "o.tif").dtype == np.uint32  # ids kept, not blended
    # the widget's name, in the CLI and the API too; contradictions are refused
    assert cli.main(["apply-fields", str(fields), str(ids), "-o", str(tmp_path / "o.tif"),
                     "-q", "--labels", "--interpolation", "linear"]) == 2
    assert "give one of them" in capsys.readouterr().err
    labels = read_stack(ids)
    np.testing.assert_array_equal(apply_displacement(labels, np.zeros((*labels.shape[:1], 2,
                                                                       *labels.shape[1:])),
                                                     interpolation="nearest"), labels)


def _as_other_users_lock(monkeypatch, lock: Path):
    """Opening ``lock`` for writing is refused, as for a lock file of another user."""
    real_open = os.open

    def guarded(path, flags, *args, **kwargs):
        if Path(path) == lock and lock.exists() and flags & (os.O_RDWR | os.O_WRONLY):
            if flags & os.O_EXCL:  # the kernel says "exists" before it checks permissions
                raise FileExistsError(17, "File exists")
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded)


def test_another_users_lock_is_tested_with_the_kernel_lock_too(tmp_path, monkeypatch):
    # such a lock sent the run to the link scheme, which ignores kernel locks: a run on the
    # link scheme and one holding the kernel lock could then both write the output
    out, lock = tmp_path / "al.tif", tmp_path / ".al.tif.lock"
    with _held_lock(lock, 4242):  # still held by its run
        _as_other_users_lock(monkeypatch, lock)
        with pytest.raises(cli.SsemnetError, match="process 4242"):
            with cli._output_lock(out):
                pass
    # its run has ended: the file is removed and our own kernel lock taken
    with cli._output_lock(out):
        assert lock.read_text() == cli._owner().decode()
    assert not lock.exists()



def test_a_foreign_lock_removed_and_replaced_meanwhile_is_not_deleted(tmp_path, monkeypatch):
    # the stale file another user's run left is removed by that run, and a new run makes
    # and locks its own before our test of the old one ends: the new one must survive
    import fcntl

    out, lock = tmp_path / "al.tif", tmp_path / ".al.tif.lock"
    lock.write_text("4242")
    real_flock, swapped = fcntl.flock, []

    def flock(fd, op):
        real_flock(fd, op)
        if not swapped and op & fcntl.LOCK_NB:
            swapped.append(1)  # between our open and our lock: the file is replaced
            lock.unlink()
            lock.write_text("5151")

    monkeypatch.setattr(fcntl, "flock", flock)
    assert cli._take_foreign_lock(out, lock, fcntl) is True
    assert lock.read_text() == "5151"  # the new run's file is left alone


def test_without_kernel_locks_no_empty_lock_file_is_left_for_the_link_scheme(tmp_path,
                                                                          monkeypatch):
    import errno as errno_
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno_.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out, lock = tmp_path / "al.tif", tmp_path / ".al.tif.lock"
    assert cli._flock(out, lock) is None and not lock.exists()
    with cli._output_lock(out):  # the link scheme then does the locking
        assert lock.read_text() == cli._owner().decode()
    assert not lock.exists()


def test_a_state_file_that_cannot_be_saved_is_named_as_such(tiny_tif, tmp_path, capsys,
                                                          monkeypatch):
    import errno as errno_

    import napari_ssemnet.core.blocks as blocks

    def full(self, path, **extra):
        raise OSError(errno_.ENOSPC, "No space left on device")

    monkeypatch.setattr(blocks.BlockState, "save", full)
    out = tmp_path / "o.tif"
    assert cli.main(["align", str(tiny_tif), "-o", str(out), "--block-size", "3", "--window",
                     "1", "-q", *TINY]) == cli.EXIT_RESOURCE
    err = capsys.readouterr().err
    assert "the state of the run after block 1" in err and "the disk is full" in err, err
    assert not out.exists()


def test_on_nfs_a_foreign_lock_is_tested_with_a_shared_lock(tmp_path, monkeypatch):
    # NFS answers EBADF to an exclusive lock on a read-only descriptor
    import errno as errno_
    import fcntl

    out, lock = tmp_path / "al.tif", tmp_path / ".al.tif.lock"
    real_flock = fcntl.flock

    def nfs_flock(fd, op):
        fd = fd if isinstance(fd, int) else fd.fileno()
        read_only = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        if op & fcntl.LOCK_EX and read_only:
            raise OSError(errno_.EBADF, "Bad file descriptor")
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", nfs_flock)
    with _held_lock(lock, 4242):
        with pytest.raises(cli.SsemnetError, match="process 4242"):
            cli._take_foreign_lock(out, lock, fcntl)
    assert cli._take_foreign_lock(out, lock, fcntl) is True and not lock.exists()


def test_a_stopped_runs_differences_read_as_a_list():
    import json

    a = {"params": {"smoothness": 1.0}, "input": "x", "dtype": "uint8", "shape": [4, 64, 64]}
    b = {"params": {"smoothness": 2.0}, "input": "y", "dtype": "uint8", "shape": [6, 64, 64]}
    assert cli._what_changed(json.dumps(a), json.dumps(b)) == (
        "other parameters (smoothness), another input (or the input's content changed "
        "since), and another output type or shape")
    assert cli._what_changed(json.dumps(a), json.dumps({**a, "input": "y"})) == (
        "another input (or the input's content changed since)")


def test_weights_are_stored_as_absolute_paths_and_need_custom_features(tiny_tif, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args(["align", str(tiny_tif), "-o", "o.tif",
                                          "--features", "custom", "--weights", "w.pt"])
    assert cli.params_from_args(args).weights == str(tmp_path / "w.pt")
    # ignored before, yet stored with the fields as if it had been used
    code = cli.main(["align", str(tiny_tif), "-o", "o.tif", "--weights", "w.pt", *TINY])
    assert code == cli.EXIT_ERROR and not (tmp_path / "o.tif").exists()
    assert "--weights is used only with --features custom" in capsys.readouterr().err


def test_the_output_must_be_named_as_a_tiff(tiny_tif, tmp_path, capsys):
    # a TIFF was written under the .png name
    code = cli.main(["align", str(tiny_tif), "-o", str(tmp_path / "a.png"), *TINY])
    assert code == cli.EXIT_ERROR and not (tmp_path / "a.png").exists()
    assert ".tif or .tiff name" in capsys.readouterr().err


def test_python_m_runs_the_command_line():
    from napari_ssemnet import __version__

    res = subprocess.run([sys.executable, "-m", "napari_ssemnet", "--version"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == f"napari-ssemnet {__version__}"
