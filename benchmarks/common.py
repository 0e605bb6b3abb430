"""Shared pieces of the benchmarks: data, known misalignments, truth-based metrics, peers.

Conventions (the package's, see ``napari_ssemnet.core.warp``): a displacement has shape
``(Z, 2, H, W)``, channels ``(dy, dx)``, and is a BACKWARD map,
``aligned[z](q) = stack[z](q + d[z](q))``.

Misalignments are applied to the FULL sections and the centre is cropped afterwards, so the
aligners never see a fill border. With crop offset ``o`` the known field in crop coordinates
is ``e(p) = e_full(p + o)``; every truth-based metric is evaluated in the full frame, by
sampling ``e_full`` at ``o + q + d(q)``.

Metrics (DESIGN.md section 6), per crop pixel ``q`` and section ``z``:

* total map ``t(q) = d(q) + e(q + d(q))`` (where the aligned pixel comes from in the untouched
  source);
* endpoint error against the nominal truth: ``|t(q)|``;
* consistency: ``|t(q) - c(q)|`` with ``c`` the same aligner's field on the untouched crop;
* adjacent-section NCC of the aligned stack, computed on the CLEAN source resampled through
  ``t`` (so that the intensity jitter and noise we add do not lower it) on the pixels valid in
  both sections.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from napari_ssemnet.core import metrics, warp
from napari_ssemnet.core.synth import apply_misalignment, random_misalignment

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
ISBI = "isbi2012_train_volume_30x512x512.tif"
VNC = "vnc_ssTEM_stack1_raw_20x1024x1024.tif"

# The "known misalignment": applied to the full sections, reference section 0.
MISALIGNMENT = {"rotation_deg": 4.0, "shift_frac": 0.06, "scale": 0.02, "shear": 0.02,
                "elastic_px": 2.0, "reference": 0}


def add_data_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder with the shared EM stacks (default: ../shared/data "
                             "relative to the repository root)")


def load_stack(data: Path, name: str) -> np.ndarray:
    """Read one of the shared stacks as float32 (Z, H, W), or exit with a clear message."""
    import tifffile

    path = Path(data) / name
    if not path.is_file():
        sys.exit(f"error: {path} not found. The benchmarks need the shared EM stacks "
                 f"({ISBI}, {VNC}); pass their folder with --data.")
    return tifffile.imread(path).astype(np.float32)


def code_version() -> str:
    """The repository commit the results were measured on (``+dirty`` if src/ has changes)."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout
    dirty = "+dirty" if git("status", "--porcelain", "--", "src").strip() else ""
    return git("rev-parse", "--short", "HEAD").strip() + dirty


def machine_info() -> dict:
    import os

    return {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": code_version(),
            "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "load_avg": list(os.getloadavg()),
            "machine": platform.machine(), "system": platform.system()}


def run_child(cmd: list[str]) -> tuple[dict | None, str]:
    """Run one benchmark point in a fresh process; return its row (the last ``RESULT {json}``
    line of its output) or, if there is none, the first ``error:`` line (else the last line)
    of its stderr."""
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True)
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode == 0 and rows:
        return json.loads(rows[-1][len("RESULT "):]), ""
    err = proc.stderr.strip().splitlines()
    said = [ln for ln in err if ln.startswith("error:")]
    return None, (said[:1] or err[-1:] or ["failed"])[0]


def digest(arr: np.ndarray) -> str:
    """A short fingerprint of an array's bytes: two runs' fields can be seen to be equal."""
    import hashlib

    return hashlib.blake2b(np.ascontiguousarray(arr).tobytes(), digest_size=8).hexdigest()


def timed_align(widget, tick, timeout_ms: int = 600_000) -> tuple[float, np.ndarray]:
    """Press the dock widget's Align and run the Qt event loop until the job ends, with a
    10 ms timer calling ``tick`` on the GUI thread; returns the wall time (s) and the gaps
    between ticks (ms), i.e. how long the GUI could not react."""
    from qtpy.QtCore import QEventLoop, QTimer

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: (ticks.append(time.perf_counter()), tick(len(ticks))))
    loop = QEventLoop()

    def done(_state: str) -> None:
        loop.quit()

    widget.job_finished.connect(done)
    timer.start()
    t0 = time.perf_counter()
    widget.align()
    QTimer.singleShot(timeout_ms, loop.quit)
    loop.exec_()
    wall = time.perf_counter() - t0
    timer.stop()
    widget.job_finished.disconnect(done)
    return wall, np.diff(np.array(ticks)) * 1000.0


def finish(name: str, payload: dict) -> Path:
    """Record the load average after a run, save the JSON and print the load."""
    payload["load_avg_after"] = list(os.getloadavg())
    path = save_json(name, payload)
    print(f"load average after: {os.getloadavg()}")
    return path


def save_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    return path


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if not np.isfinite(o) else round(float(o), 4)
    if isinstance(o, np.ndarray):
        return [_json_default(v) if isinstance(v, np.generic) else v for v in o.tolist()]
    raise TypeError(type(o))


# -- cases ---------------------------------------------------------------------------------


@dataclass
class Case:
    """A misaligned crop with its known truth."""

    name: str
    full: np.ndarray        # (Z, H, W) untouched full sections (float32)
    e_full: np.ndarray      # (Z, 2, H, W) known backward field on the full sections
    offset: tuple[int, int]
    crop: int
    mis: np.ndarray         # (Z, crop, crop) misaligned (and degraded) crop
    clean: np.ndarray       # (Z, crop, crop) untouched crop
    blank: int | None
    fill_fraction: float    # fraction of crop pixels whose source lies outside the section
    reference: int = 0      # the section the misalignment leaves in place

    @property
    def usable(self) -> np.ndarray:
        u = np.ones(self.mis.shape[0], bool)
        if self.blank is not None:
            u[self.blank] = False
        return u


def make_case(name: str, full: np.ndarray, crop: int, *, seed: int, gain_jitter: float = 0.0,
              noise: float = 0.0, blank: int | None = None, reference: int = 0,
              misalignment: dict | None = None, fields: np.ndarray | None = None) -> Case:
    """``misalignment`` overrides keys of :data:`MISALIGNMENT` (``random_misalignment``'s
    bounds); ``fields`` (Z, 2, H, W), the known backward field of the full sections, replaces
    the random one altogether."""
    z, h, w = full.shape
    e_full = (np.ascontiguousarray(fields, np.float32) if fields is not None
              else random_misalignment(full.shape, seed=seed,
                                       **{**MISALIGNMENT, **(misalignment or {}),
                                          "reference": reference}))
    mis_full = apply_misalignment(full, e_full, gain_jitter=gain_jitter, noise=noise,
                                  blank=blank, seed=seed)
    oy, ox = (h - crop) // 2, (w - crop) // 2
    sl = (slice(None), slice(oy, oy + crop), slice(ox, ox + crop))
    # where the misaligned crop's pixels come from: must be inside the section (no fill)
    ey, ex = e_full[:, 0][sl], e_full[:, 1][sl]
    yy, xx = np.meshgrid(np.arange(oy, oy + crop), np.arange(ox, ox + crop), indexing="ij")
    sy, sx = yy + ey, xx + ex
    outside = (sy < 0) | (sy > h - 1) | (sx < 0) | (sx > w - 1)
    return Case(name, full, e_full, (oy, ox), crop, np.ascontiguousarray(mis_full[sl]),
                np.ascontiguousarray(full[sl]), blank, float(outside.mean()), reference)


def untouched_case(case: Case) -> Case:
    """The same crop, not misaligned (e = 0): used for the consistency reference ``c``."""
    zero = np.zeros_like(case.e_full)
    return Case(case.name + "-untouched", case.full, zero, case.offset, case.crop,
                case.clean, case.clean, None, 0.0, case.reference)


# -- truth-based evaluation ---------------------------------------------------------------


def inside_mask(d: np.ndarray) -> np.ndarray:
    """(Z, 2, H, W) backward field -> (Z, H, W) bool: q + d(q) lies inside the section."""
    z, _, h, w = d.shape
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    sy, sx = yy + d[:, 0], xx + d[:, 1]
    tol = 1e-3
    return (sy >= -tol) & (sy <= h - 1 + tol) & (sx >= -tol) & (sx <= w - 1 + tol)


def total_map(case: Case, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``t(q) = d(q) + e(q + d(q))`` in crop pixels, and the clean source resampled at
    ``q + t(q)`` (the aligned stack without the added noise/jitter).

    Returns
    -------
    t : ndarray, shape (Z, 2, crop, crop)
    clean_aligned : ndarray, shape (Z, crop, crop), float32
    """
    c = case.crop
    oy, ox = case.offset
    base = warp.level_points(c, c) + torch.tensor([float(oy), float(ox)])
    pts = base[None] + torch.from_numpy(np.ascontiguousarray(d)).permute(0, 2, 3, 1)
    with torch.no_grad():
        e_at, _ = warp.sample(torch.from_numpy(case.e_full), pts, padding_mode="border")
        src = pts + e_at.permute(0, 2, 3, 1)
        img, _ = warp.sample(torch.from_numpy(case.full)[:, None], src)
    t = (src - base[None]).permute(0, 3, 1, 2).numpy()
    return np.ascontiguousarray(t, np.float32), img[:, 0].numpy()


def pooled(values: list[np.ndarray]) -> dict[str, float]:
    v = np.concatenate([x.ravel() for x in values]) if values else np.zeros(0)
    if v.size == 0:
        return {"median": float("nan"), "p95": float("nan")}
    return {"median": float(np.median(v)), "p95": float(np.percentile(v, 95))}


def mean_adjacent_ncc(aligned: np.ndarray, valid: np.ndarray, usable: np.ndarray
                      ) -> tuple[float, list[float]]:
    """Mean NCC of consecutive usable sections on the pixels valid in both."""
    idx = np.nonzero(usable)[0]
    vals = [metrics.ncc(aligned[a], aligned[b], valid[a] & valid[b])
            for a, b in zip(idx[:-1], idx[1:], strict=False)]
    finite = [v for v in vals if np.isfinite(v)]
    return (float(np.mean(finite)) if finite else float("nan")), vals


def evaluate(case: Case, d: np.ndarray, valid: np.ndarray, *, c: np.ndarray | None = None,
             c_valid: np.ndarray | None = None, exclude: list[int] | None = None) -> dict:
    """Endpoint error, consistency (when ``c`` is given) and adjacent NCC of one result."""
    t, clean_aligned = total_map(case, d)
    usable = case.usable.copy()
    for zz in exclude or []:
        usable[zz] = False
    zs = [zz for zz in range(d.shape[0]) if usable[zz] and zz != case.reference]
    end = np.hypot(t[:, 0], t[:, 1])
    out = {"endpoint": pooled([end[zz][valid[zz]] for zz in zs]),
           "endpoint_per_section": [float(np.median(end[zz][valid[zz]])) for zz in zs]}
    if c is not None:
        both = valid & c_valid
        res = np.hypot(t[:, 0] - c[:, 0], t[:, 1] - c[:, 1])
        out["consistency"] = pooled([res[zz][both[zz]] for zz in zs])
        out["consistency_per_section"] = [float(np.median(res[zz][both[zz]])) for zz in zs]
    out["adjacent_ncc"], out["pair_ncc"] = mean_adjacent_ncc(clean_aligned, valid, usable)
    out["valid_fraction"] = float(valid[zs].mean()) if zs else float("nan")
    return out


# -- our aligner ---------------------------------------------------------------------------


def run_ours(stack: np.ndarray, **params) -> dict:
    from napari_ssemnet import align_stack

    t0 = time.perf_counter()
    r = align_stack(stack, device=params.pop("device", "cpu"), **params)
    return {"d": r.displacement, "valid": r.valid, "seconds": time.perf_counter() - t0,
            "flags": list(r.flags), "notes": list(r.notes)}


# -- pystackreg ----------------------------------------------------------------------------


def stackreg_matrix_to_field(tmat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A pystackreg 3x3 matrix (x, y order; maps output pixel to input pixel) -> (2, H, W)
    backward (dy, dx) field. The direction is checked by :func:`check_stackreg_convention`."""
    h, w = shape
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                         indexing="ij")
    px = tmat[0, 0] * xx + tmat[0, 1] * yy + tmat[0, 2]
    py = tmat[1, 0] * xx + tmat[1, 1] * yy + tmat[1, 2]
    return np.stack([py - yy, px - xx]).astype(np.float32)


def run_stackreg(stack: np.ndarray, kind: str = "rigid") -> dict:
    from pystackreg import StackReg

    mode = {"rigid": StackReg.RIGID_BODY, "affine": StackReg.AFFINE,
            "translation": StackReg.TRANSLATION}[kind]
    t0 = time.perf_counter()
    sr = StackReg(mode)
    tmats = sr.register_stack(np.asarray(stack, np.float64), reference="previous")
    seconds = time.perf_counter() - t0
    d = np.stack([stackreg_matrix_to_field(m, stack.shape[1:]) for m in tmats])
    return {"d": d, "valid": inside_mask(d), "seconds": seconds, "flags": None}


def check_stackreg_convention(section: np.ndarray) -> float:
    """Register a copy shifted by a known amount and check our field conversion against
    pystackreg's own ``transform``; returns the field error (px)."""
    from pystackreg import StackReg

    s = np.asarray(section, np.float64)
    shift = (5.0, -3.0)  # content of the moving image sits at +shift (dy, dx)
    e = np.zeros((2, *s.shape), np.float32)
    e[0], e[1] = -shift[0], -shift[1]
    mov = warp.warp_image(torch.from_numpy(s.astype(np.float32)), torch.from_numpy(e))[0].numpy()
    sr = StackReg(StackReg.TRANSLATION)
    tmats = sr.register_stack(np.stack([s, mov]), reference="previous")
    d = stackreg_matrix_to_field(tmats[1], s.shape)
    # the backward field that undoes the shift is +shift
    err = float(np.hypot(d[0] - shift[0], d[1] - shift[1]).mean())
    ours = warp.warp_image(torch.from_numpy(mov), torch.from_numpy(d))[0].numpy()
    theirs = sr.transform_stack(np.stack([s, mov]), tmats=tmats)[1]
    m = np.zeros(s.shape, bool)
    m[16:-16, 16:-16] = True
    if err > 0.2 or metrics.ncc(ours, theirs, m) < 0.99:
        raise AssertionError(f"pystackreg convention check failed (field error {err:.2f} px)")
    return err


# -- elastix -------------------------------------------------------------------------------

ELASTIX_CONFIGS = {
    "rigid+affine": ["rigid", "affine"],
    "rigid+affine+bspline64": ["rigid", "affine", "bspline"],
}


def _parameter_object(config: str):
    import itk

    po = itk.ParameterObject.New()
    for kind in ELASTIX_CONFIGS[config]:
        m = po.GetDefaultParameterMap(kind)
        if kind == "bspline":
            m["FinalGridSpacingInPhysicalUnits"] = ["64"]
        m["WriteResultImage"] = ["false"]
        po.AddParameterMap(m)
    return po


def elastix_pair(fixed: np.ndarray, moving: np.ndarray, config: str) -> np.ndarray:
    """Register ``moving`` onto ``fixed``; returns the backward (dy, dx) field in the fixed
    frame: ``registered(q) = moving(q + d(q))`` (checked by :func:`check_elastix_convention`).
    """
    import itk

    f = itk.GetImageFromArray(np.ascontiguousarray(fixed, np.float32))
    m = itk.GetImageFromArray(np.ascontiguousarray(moving, np.float32))
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        # transformix writes deformationField.nii into the working directory
        _, tp = itk.elastix_registration_method(
            f, m, parameter_object=_parameter_object(config), log_to_console=False)
        df = np.asarray(itk.GetArrayFromImage(itk.transformix_deformation_field(m, tp)))
    return np.stack([df[..., 1], df[..., 0]]).astype(np.float32)  # (x, y) -> (dy, dx)


def _elastix_chain_worker(stack: np.ndarray, config: str) -> tuple[list[np.ndarray], float]:
    t0 = time.perf_counter()
    pairs = [elastix_pair(stack[z - 1], stack[z], config) for z in range(1, stack.shape[0])]
    return pairs, time.perf_counter() - t0


def run_elastix(stack: np.ndarray, config: str, *, isolate: bool = True) -> dict:
    """Pairwise elastix (raw z onto raw z-1), chained to section 0 with ``warp.compose``.

    Runs in a child process (``isolate``) so that a crash (elastix is known to segfault on
    blank sections) is reported instead of ending the benchmark.
    """
    t0 = time.perf_counter()
    if isolate:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        try:
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
                pairs, reg_seconds = ex.submit(_elastix_chain_worker, stack, config).result()
        except BrokenProcessPool:
            return {"d": None, "valid": None, "seconds": time.perf_counter() - t0,
                    "flags": None, "error": "elastix process crashed"}
    else:
        pairs, reg_seconds = _elastix_chain_worker(stack, config)
    z, h, w = stack.shape
    d = np.zeros((z, 2, h, w), np.float32)
    with torch.no_grad():
        for zz in range(1, z):
            d[zz] = warp.compose(torch.from_numpy(pairs[zz - 1])[None],
                                 torch.from_numpy(d[zz - 1])[None])[0].numpy()
    return {"d": d, "valid": inside_mask(d), "seconds": time.perf_counter() - t0,
            "registration_seconds": reg_seconds, "flags": None}


def check_elastix_convention(section: np.ndarray) -> float:
    """Register a copy shifted by a known amount; the backward field must be +shift."""
    s = np.asarray(section, np.float32)
    shift = (4.0, -6.0)
    e = np.zeros((2, *s.shape), np.float32)
    e[0], e[1] = -shift[0], -shift[1]
    mov = warp.warp_image(torch.from_numpy(s), torch.from_numpy(e))[0].numpy()
    d = elastix_pair(s, mov, "rigid+affine")
    c = s.shape[0] // 4
    err = float(np.hypot(d[0, c:-c, c:-c] - shift[0], d[1, c:-c, c:-c] - shift[1]).mean())
    if err > 0.5:
        raise AssertionError(f"elastix convention check failed (field error {err:.2f} px, "
                             f"mean field {d[0].mean():.2f}, {d[1].mean():.2f})")
    return err
