"""Global pre-alignment: a translation, rigid or affine map per section, chained outwards from
the reference. :mod:`fit` then refines only the control grid on top of these maps (with
``prealign='none'`` it fits one translation per section instead).

Pairs are matched at <= 256 px by phase correlation of band-passed, windowed sections, with
an exhaustive rotation search. Each section is matched to both of its two nearest usable
sections towards the reference, and the more confident match wins, so a single bad pair
does not throw off every section after it. Pairs across a gap (a blank section, or the
fallback two sections away) get a coarser band and several rough maps to choose from.

Matrices are homogeneous ``(y, x, 1)`` maps from reference-frame pixels to section pixels
(backward maps): ``prealigned[z](q) = stack[z](P[z] @ q)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import warp

WORK_SIZE = 256
MIN_CONFIDENCE = 5.0
"""Peak-to-sidelobe ratio of the phase correlation below which a match is doubtful."""
MIN_INLIER_SHARE = 0.4
"""Share of the structured patches that must agree with a map before its confidence counts
in full; below it the confidence falls in proportion."""
MIN_OVERLAP = 0.25
"""Smallest overlap (fraction of the section) the coarse search considers."""
CHECK_MIN_SIZE = 64  # work px; smaller images are checked at full work resolution
PLAUSIBLE = 0.65
"""A phase-correlation match is kept while its masked-NCC score is at least this fraction
of the best one."""
# Many small patches rather than a few large ones: the fitted map then rests on more,
# more local matches, and moved 0.51 px instead of 2.49 px between runs on the same tissue
# shifted by +-10 px (ISBI, benchmarks/diag_consistency.py harness).
BLOCK_GRID = 8
BLOCK_PATCH = 48  # work px
MEMBRANE_BAND = (1.0, 8.0)  # band-pass sigmas, work px
# Pairs across a gap (a blank or skipped section, >= 100 nm of tissue) share few membranes:
# the rotation search's strongest peak was often wrong there. They are matched on a coarser
# band, and several rough maps are refined, the one with the most patch support winning.
# Consistency on 8 seeds of the hard ISBI case (benchmarks/sweep_consistency.py): membrane
# band 4.13 / 13.48 px, coarse band 4.08 / 9.95 px (3 levels); coarse band 3.58 / 10.08 px,
# and with 4 hypotheses 2.87 / 7.35 px (4 levels). The (4, 32) and (3, 24) bands were worse
# than (2, 16); 4 hypotheses on every pair did not help the clean case.
GAP_BAND = (2.0, 16.0)
GAP_HYPOTHESES = 4
CHECK_BELOW = 6.5
"""A confident match to the previous section with a confidence below this is checked
against a match to the section two back: a torn neighbour gave a wrong match at 5.7-6.0
(clean ISBI neighbours: 6.6-9.0), which moved every later section by 80-150 px."""
DISAGREE_FRAC = 0.1
"""Two confident maps of a section (through its neighbour and two back) that put a corner
further apart than this fraction of the section's side: one of them is wrong (clean ISBI
crops: at most 4.4 %, 6.3 % in a review's forced checks; through a torn neighbour: 24-44 %),
and the one two back is taken if the section two back is confident."""
SPLIT_MIN_PATCHES = 24
SPLIT_MIN_SHARE = 0.2
SPLIT_MIN_WORK_PX = 6.0
SPLIT_SEPARATION = 4.2
SPLIT_COHERENCE = 0.8
"""Bars of :func:`split_match`. On the inliers of 166 intact ISBI and VNC pairs (384^2 and
512^2 crops) the two groups lay at most 3.8 times their spread apart; the pair at a fold
(half of a 320^2 section moved by 30 px) 4.7-5.1 times, 21-23 px, with 84-94 % of
neighbouring patches in the same group (intact pairs: 54-88 %)."""
SPLIT_CONFIDENCE = 4.0
"""The confidence a split match is given: doubtful (below :data:`MIN_CONFIDENCE`), so that
the section is matched two back as well and flagged if that does not confirm it."""
AGREE_WORK_PX = 3.0
"""Two doubtful matches of a section (to its two anchors) whose maps put every corner of
the section within this many work pixels of each other confirm each other."""
AFFINE_ROUNDS = 4
AFFINE_SETTLED_WORK_PX = 1.0
"""Block-matching rounds of an affine refinement: after the two that every kind gets, more
(up to :data:`AFFINE_ROUNDS`) while the last round still moved a corner by more than
:data:`AFFINE_SETTLED_WORK_PX`. Patches matched around a rough rigid map see only part of a
large scale difference, and later rounds recovered more of it on ISBI (a 10 % magnification
step, fit frozen: the section after the step 7.2 px with two rounds and 3.5 px with up to
four; scales of +-2-10 %: 0.1-0.3 px lower medians over 8 seeds; docs/benchmarks.md).
Rigid maps cannot take up a scale, and their extra rounds changed the blank-section bridges
(8 seeds, hard case 2.57 -> 2.74 px), so they keep two."""


def pair_settings(kind: str, distance: int) -> tuple[tuple[float, float], str, int]:
    """How to match two sections ``distance`` apart: (band, map kind, rough maps to refine).

    Across a gap the coarser band and several rough maps apply (see :data:`GAP_BAND`), and an
    affine pre-alignment falls back to rigid: scale and shear across a gap follow the tissue's
    change more than the section's placement.
    """
    if abs(distance) <= 1:
        return MEMBRANE_BAND, kind, 1
    return GAP_BAND, "rigid" if kind == "affine" else kind, GAP_HYPOTHESES


def _gauss_kernel(sigma: float, device) -> torch.Tensor:
    r = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-r, r + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding."""
    if sigma <= 0:
        return x
    k = _gauss_kernel(sigma, x.device)
    r = k.numel() // 2
    c = x.shape[1]
    r = min(r, x.shape[-1] - 1, x.shape[-2] - 1)
    k = k[k.numel() // 2 - r: k.numel() // 2 + r + 1]
    k = k / k.sum()
    x = F.pad(x, (r, r, 0, 0), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, r, r), mode="reflect")
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _work_factor(h: int, w: int) -> int:
    return max(1, math.ceil(max(h, w) / WORK_SIZE))


def _bandpass(x: torch.Tensor, band: tuple[float, float] = MEMBRANE_BAND) -> torch.Tensor:
    """Keep membrane-scale structure: remove illumination gradients and pixel noise."""
    return gaussian_blur(x, band[0]) - gaussian_blur(x, band[1])


def work_images(norm: torch.Tensor, band: tuple[float, float] = MEMBRANE_BAND
                ) -> tuple[torch.Tensor, int]:
    """Band-passed, average-pooled copies of (N, H, W) normalised sections at <= 256 px.

    ``band`` is the pair of Gaussian sigmas (work px) of the band-pass.
    Returns the (N, h, w) images and the pooling factor ``k``.
    """
    k = _work_factor(norm.shape[-2], norm.shape[-1])
    with torch.no_grad():
        t = norm[:, None]
        low = F.avg_pool2d(t, k) if k > 1 else t
        return _bandpass(low, band)[:, 0], k


def _hann(h: int, w: int, device) -> torch.Tensor:
    return torch.outer(torch.hann_window(h, periodic=False, device=device),
                       torch.hann_window(w, periodic=False, device=device))


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    """(N,) radians -> (N, 2, 2) rotation acting on (y, x)."""
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _rotate_batch(img: torch.Tensor, thetas: torch.Tensor, k: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate one low-res image (h, w) about its centre by each angle.

    Returns the (N, h, w) rotated images (0 outside) and their (N, h, w) float validity.
    """
    h, w = img.shape
    full_h, full_w = h * k, w * k
    centre = torch.tensor([(full_h - 1) / 2.0, (full_w - 1) / 2.0], device=img.device)
    pts = warp.level_points(h, w, k, device=img.device) - centre
    rot = _rotation(thetas)
    p = torch.einsum("nij,hwj->nhwi", rot, pts) + centre
    out, ok = warp.sample(img[None, None].expand(len(thetas), 1, h, w), p, k)
    return out[:, 0], ok.float()


def _parabola_peak(c_m: torch.Tensor, c_0: torch.Tensor, c_p: torch.Tensor) -> torch.Tensor:
    """Sub-pixel offset of a peak ``c_0`` from its two neighbours along one axis (a parabola
    through the three; 0 where they are collinear)."""
    den = c_m - 2 * c_0 + c_p
    return torch.where(den.abs() > 1e-12, 0.5 * (c_m - c_p) / den, torch.zeros_like(den))


def _masked_ncc(fixed: torch.Tensor, fixed_mask: torch.Tensor, moving: torch.Tensor,
                moving_mask: torch.Tensor, min_overlap: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised cross-correlation over the overlap, for every shift (FFT, zero-padded).

    Unlike windowed phase correlation it does not down-weight the image borders, which
    is where two sections that are shifted by a large fraction of their width overlap.

    Parameters
    ----------
    fixed, fixed_mask : Tensor, shape (h, w)
    moving, moving_mask : Tensor, shape (N, h, w)
    min_overlap : float
        Shifts whose overlap is below this fraction of the image score 0.

    Returns
    -------
    shift : Tensor, shape (N, 2)
        (dy, dx) in work pixels with ``moving(q + shift) ~ fixed(q)``, sub-pixel.
    peak : Tensor, shape (N,)
        Score at the best shift: NCC times the root of the overlap fraction.
    scores : Tensor, shape (N, 2h, 2w)
        That score for every shift, indexed by the shift modulo ``(2h, 2w)``.
    """
    n, h, w = moving.shape
    size = (2 * h, 2 * w)
    f, fm = fixed * fixed_mask, fixed_mask
    g, gm = moving * moving_mask, moving_mask

    def spec(x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft2(x.float(), s=size)

    def corr(a_spec: torch.Tensor, b_spec: torch.Tensor) -> torch.Tensor:
        # sum_q a(q) b(q + s), indexed by s (mod the padded size)
        return torch.fft.irfft2(a_spec.conj() * b_spec, s=size)

    sf, sfm, sf2 = spec(f), spec(fm), spec(f * f)
    sg, sgm, sg2 = spec(g), spec(gm), spec(g * g)
    cnt = corr(sfm, sgm).round()
    sum_f = corr(sf, sgm)
    sum_g = corr(sfm, sg)
    num = corr(sf, sg) - sum_f * sum_g / cnt.clamp(min=1)
    var_f = (corr(sf2, sgm) - sum_f ** 2 / cnt.clamp(min=1)).clamp(min=0)
    var_g = (corr(sfm, sg2) - sum_g ** 2 / cnt.clamp(min=1)).clamp(min=0)
    ncc = num / (var_f * var_g).sqrt().clamp(min=1e-9)
    enough = cnt >= min_overlap * h * w
    ncc = torch.where(enough & (var_f > 1e-9) & (var_g > 1e-9), ncc, torch.zeros_like(ncc))
    # small overlaps give noisy, inflated NCC values: rank shifts by NCC times the square
    # root of the overlap fraction (an NCC's noise falls with the root of its pixel count)
    ncc = ncc * (cnt / (h * w)).clamp(max=1.0).sqrt()
    hh, ww = size
    peak, idx = ncc.reshape(n, -1).max(dim=1)
    py, px = idx // ww, idx % ww
    ar = torch.arange(n, device=ncc.device)

    dy = _parabola_peak(ncc[ar, (py - 1) % hh, px], peak, ncc[ar, (py + 1) % hh, px]).clamp(
        -0.5, 0.5)
    dx = _parabola_peak(ncc[ar, py, (px - 1) % ww], peak, ncc[ar, py, (px + 1) % ww]).clamp(
        -0.5, 0.5)
    sy = torch.where(py > hh // 2, py - hh, py).float() + dy
    sx = torch.where(px > ww // 2, px - ww, px).float() + dx
    return torch.stack([sy, sx], dim=-1), peak, ncc


def _phase_correlation(fixed: torch.Tensor, moving: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched phase correlation.

    Returns, per batch item, the shift ``s`` (dy, dx) in work pixels with
    ``moving(q + s) ~ fixed(q)``, the peak-to-sidelobe ratio, and the peak height.
    """
    n, h, w = moving.shape
    fa = torch.fft.rfft2(fixed)
    fb = torch.fft.rfft2(moving)
    cross = fa * fb.conj()
    # partial whitening: sharper peaks than plain correlation, less noise-driven than full
    mag = cross.abs().sqrt()
    cross = cross / (mag + 1e-6 * mag.mean())
    corr = torch.fft.irfft2(cross, s=(h, w))
    flat = corr.reshape(n, -1)
    peak, idx = flat.max(dim=1)
    py, px = idx // w, idx % w

    ar = torch.arange(n, device=corr.device)
    dy = _parabola_peak(corr[ar, (py - 1) % h, px], peak, corr[ar, (py + 1) % h, px])
    dx = _parabola_peak(corr[ar, py, (px - 1) % w], peak, corr[ar, py, (px + 1) % w])
    sy = py.float() + dy
    sx = px.float() + dx
    sy = torch.where(sy > h / 2, sy - h, sy)
    sx = torch.where(sx > w / 2, sx - w, sx)
    # peak-to-sidelobe ratio, excluding a small neighbourhood of the peak
    mask = torch.ones_like(corr, dtype=torch.bool)
    for oy in range(-2, 3):
        for ox in range(-2, 3):
            mask[ar, (py + oy) % h, (px + ox) % w] = False
    side = corr.masked_fill(~mask, float("nan")).reshape(n, -1)
    mean = torch.nanmean(side, dim=1)
    std = torch.sqrt(torch.nanmean((side - mean[:, None]) ** 2, dim=1))
    psr = (peak - mean) / (std + 1e-12)
    return torch.stack([-sy, -sx], dim=-1), psr, peak


def _coarse_rigid(fixed: torch.Tensor, moving: torch.Tensor, *, kind: str, k: float,
                  max_rotation: float, extra: int = 0) -> list[tuple[float, np.ndarray]]:
    """Exhaustive rotation search: a list of (theta, shift in full px), best first.

    Windowed phase correlation over every rotation (1 degree steps) gives a sharp, repeatable
    peak, but its Hann window hides the overlap of sections placed far apart. Masked NCC
    over every shift that leaves at least :data:`MIN_OVERLAP` of the section overlapping
    checks it: where the phase-correlation estimate scores clearly below the best masked-NCC
    match, the search is repeated on the pair re-centred on that match.

    ``extra`` more hypotheses follow the best one: the strongest phase-correlation peaks at
    rotations at least 2 degrees from those already listed.
    """
    h, w = fixed.shape
    if kind == "translation" or max_rotation <= 0:
        thetas = torch.zeros(1, device=fixed.device)
    else:
        thetas = torch.deg2rad(torch.arange(-max_rotation, max_rotation + 1e-6, 1.0,
                                            device=fixed.device))
    win = _hann(h, w, fixed.device)
    rot, rot_ok = _rotate_batch(moving, thetas, k)
    shifts, _, peak = _phase_correlation((fixed * win).expand(len(thetas), h, w), rot * win)
    best = int(torch.argmax(peak))
    # the check only has to find the basin: half the work resolution is enough (4x cheaper)
    f2, r2, ok2 = fixed[None, None], rot[:, None] * rot_ok[:, None], rot_ok[:, None]
    if min(h, w) >= 2 * CHECK_MIN_SIZE:
        f2, r2, ok2 = F.avg_pool2d(f2, 2), F.avg_pool2d(r2, 2), F.avg_pool2d(ok2, 2)
    step = h / f2.shape[-2]
    ok2 = (ok2 > 0.999).float()
    ncc = _masked_ncc(f2[0, 0], torch.ones_like(f2[0, 0]), r2[:, 0] * ok2[:, 0], ok2[:, 0],
                      MIN_OVERLAP)
    nbest = int(torch.argmax(ncc[1]))
    others = []
    for i in torch.argsort(peak, descending=True).tolist():
        if len(others) >= extra:
            break
        if all(abs(float(thetas[i] - thetas[j])) > math.radians(1.99) for j in [best, *others]):
            others.append(i)
    alternatives = [(float(thetas[i]), shifts[i].double().cpu().numpy() * k) for i in others]
    if float(_ncc_at(ncc, best, shifts[best] / step)) >= PLAUSIBLE * float(ncc[1][nbest]):
        return [(float(thetas[best]), shifts[best].double().cpu().numpy() * k), *alternatives]
    # re-centre on the masked-NCC match, moving'(q) = moving(q + base), so that only a small
    # shift is left for the windowed phase correlation
    base = (ncc[0][nbest] * step).round()
    pts = warp.level_points(h, w, k, device=fixed.device) + base * k
    centred, _ = warp.sample(moving[None, None], pts[None], k)
    near = thetas[(thetas - thetas[nbest]).abs() <= math.radians(2.01)]
    rot2, _ = _rotate_batch(centred[0, 0], near, k)
    fine, _, fpeak = _phase_correlation((fixed * win).expand(len(near), h, w), rot2 * win)
    j = int(torch.argmax(fpeak))
    # rot2(q + f) = moving(R (q + f - c) + c + base) = moving(R (q + f + R^-1 base - c) + c)
    back = _rotation(-near[j:j + 1])[0] @ base
    return [(float(near[j]), (fine[j] + back).double().cpu().numpy() * k), *alternatives]


def _ncc_at(ncc: tuple[torch.Tensor, torch.Tensor, torch.Tensor], i: int,
            shift: torch.Tensor) -> torch.Tensor:
    """Masked-NCC score of rotation ``i`` at the (rounded) ``shift`` in work px."""
    scores = ncc[2][i]
    hh, ww = scores.shape
    sy, sx = (int(v) for v in shift.round())
    return scores[sy % hh, sx % ww]


def _rigid_matrix(theta: float, shift: np.ndarray, full_size: tuple[int, int]) -> np.ndarray:
    """Matrix of q -> R (q + shift - c) + c, rotation about the image centre."""
    c = np.array([(full_size[0] - 1) / 2.0, (full_size[1] - 1) / 2.0])
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    m = np.eye(3)
    m[:2, :2] = rot
    m[:2, 2] = rot @ (shift - c) + c
    return m


def fit_points(src: np.ndarray, dst: np.ndarray, weights: np.ndarray, kind: str) -> np.ndarray:
    """Weighted least-squares map ``dst ~ M @ src`` of the given kind.

    Parameters
    ----------
    src, dst : ndarray, shape (N, 2), (y, x)
    weights : ndarray, shape (N,)
    kind : {"translation", "rigid", "affine"}

    Returns
    -------
    ndarray, shape (3, 3)
    """
    wsum = weights.sum()
    cs = (weights[:, None] * src).sum(0) / wsum
    cd = (weights[:, None] * dst).sum(0) / wsum
    a, b = src - cs, dst - cd
    m = np.eye(3)
    if kind == "translation":
        lin = np.eye(2)
    elif kind == "rigid":
        # angle maximising sum w * <R a, b> (2D Procrustes)
        num = (weights * (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])).sum()
        den = (weights * (a * b).sum(1)).sum()
        th = math.atan2(num, den)
        lin = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    else:
        wa = a * weights[:, None]
        lin = np.linalg.lstsq(wa.T @ a, wa.T @ b, rcond=None)[0].T
    m[:2, :2] = lin
    m[:2, 2] = cd - lin @ cs
    return m


def _block_match(fixed: torch.Tensor, moving: torch.Tensor, m0: np.ndarray, k: float,
                 full_size: tuple[int, int], patch: int = BLOCK_PATCH, n: int = BLOCK_GRID
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local shifts of ``moving`` (warped by ``m0``) against ``fixed`` on an n x n patch grid.

    Returns fixed-frame points, matching moving points (full px) and peak-to-sidelobe ratios.
    """
    h, w = fixed.shape
    patch = min(patch, (min(h, w) // 2) // 2 * 2)
    pts = warp.level_points(h, w, k, device=fixed.device)
    mt = torch.tensor(m0, dtype=torch.float32, device=fixed.device)
    mp = warp.apply_matrix(mt[None], pts)[0]
    warped, _ = warp.sample(moving[None, None], mp[None], k)
    warped = warped[0, 0]
    ys = np.linspace(0, h - patch, n).round().astype(int)
    xs = np.linspace(0, w - patch, n).round().astype(int)
    win = _hann(patch, patch, fixed.device)
    fa = torch.stack([fixed[y:y + patch, x:x + patch] for y in ys for x in xs]) * win
    fb = torch.stack([warped[y:y + patch, x:x + patch] for y in ys for x in xs]) * win
    shifts, psr, _ = _phase_correlation(fa, fb)
    shifts = shifts.double().cpu().numpy()
    off = (k - 1) / 2.0
    centre = np.array([[(y + (patch - 1) / 2.0) * k + off, (x + (patch - 1) / 2.0) * k + off]
                       for y in ys for x in xs])
    # the fixed point q matches warped(q + s) = moving(m0 (q + s))
    moved = centre + shifts * k
    dst = (m0[:2, :2] @ moved.T).T + m0[:2, 2]
    ok = (fa.std(dim=(1, 2)) > 1e-6) & (fb.std(dim=(1, 2)) > 1e-6)
    return centre, dst, np.where(ok.cpu().numpy(), psr.cpu().numpy(), 0.0)


def estimate_pair(fixed: torch.Tensor, moving: torch.Tensor, *, kind: str, k: float,
                  max_rotation: float, full_size: tuple[int, int], hypotheses: int = 1,
                  should_stop: Callable[[], None] | None = None,
                  report: dict[str, Any] | None = None
                  ) -> tuple[np.ndarray, float]:
    """Estimate the map of ``moving`` onto ``fixed``.

    A rotation search (phase correlation checked by masked NCC) gives a rough rigid map;
    phase correlation of a ``BLOCK_GRID`` x ``BLOCK_GRID`` grid of patches then gives local
    shifts, to which a map of ``kind`` is fitted with outlier rejection (folds, dust, tissue
    that differs between sections).

    Parameters
    ----------
    fixed, moving : Tensor, shape (h, w)
        Band-passed work-resolution sections (factor ``k``).
    hypotheses : int
        How many rough maps of the rotation search are refined; the one whose patches agree
        best (largest summed peak-to-sidelobe ratio of the inlier patches) wins.
    should_stop : callable, optional
        Called between the refinements (it raises to stop): a pair across a gap takes
        several seconds on large sections.
    report : dict, optional
        Filled with ``split``: whether the winning map's inlier patches fall into two
        groups that moved differently (:func:`split_match`; the confidence is then at most
        :data:`SPLIT_CONFIDENCE`), and ``scale``: how far from 1 an affine map fitted to
        the same inlier patches scales any direction (nan without a fit).

    Returns
    -------
    M : ndarray, shape (3, 3)
        Maps fixed-frame pixels to moving pixels (full resolution).
    confidence : float
        Median peak-to-sidelobe ratio of the inlier patches, scaled down when fewer than
        ``MIN_INLIER_SHARE`` of the structured patches are inliers (0 if the fit failed).
    """
    best: tuple[float, np.ndarray, float, bool, float] | None = None
    for theta, shift in _coarse_rigid(fixed, moving, kind=kind, k=k,
                                      max_rotation=max_rotation, extra=hypotheses - 1):
        if should_stop is not None:
            should_stop()
        m, conf, support, split, scale = _refine_on_patches(
            fixed, moving, _rigid_matrix(theta, shift, full_size), kind=kind, k=k,
            full_size=full_size)
        if best is None or support > best[0]:
            best = (support, m, conf, split, scale)
    assert best is not None
    if report is not None:
        report["split"], report["scale"] = best[3], best[4]
    return best[1], best[2]


def _refine_on_patches(fixed: torch.Tensor, moving: torch.Tensor, m: np.ndarray, *,
                       kind: str, k: float, full_size: tuple[int, int]
                       ) -> tuple[np.ndarray, float, float, bool, float]:
    """Block-matching refinement of a rough map: (map, confidence, summed inlier PSR,
    whether the inliers split in two (:func:`split_match`), and the scale deviation of an
    affine map fitted to the same inliers (:func:`scale_deviation`; nan without a fit))."""
    conf, support, split, scale = 0.0, 0.0, False, float("nan")
    before = m
    for rnd in range(AFFINE_ROUNDS if kind == "affine" else 2):
        if rnd >= 2 and _corner_gap(m, before, full_size) <= AFFINE_SETTLED_WORK_PX * k:
            break
        before = m
        src, dst, psr = _block_match(fixed, moving, m, k, full_size)
        good = psr >= MIN_CONFIDENCE
        if good.sum() < 4:
            break
        for _ in range(3):
            cand = fit_points(src[good], dst[good], psr[good], kind)
            pred = (cand[:2, :2] @ src.T).T + cand[:2, 2]
            res = np.linalg.norm(pred - dst, axis=1)
            thr = max(3.0 * float(np.median(res[good])), 1.5 * k)
            new_good = (psr >= MIN_CONFIDENCE) & (res <= thr)
            if new_good.sum() < 4:
                break
            good = new_good
        m = fit_points(src[good], dst[good], psr[good], kind)
        # a confident map needs sharp matches and enough of them: a match that only 14 of
        # 64 patches supported (a section with a missing piece) was taken at confidence 6
        # and moved every later section by 170-215 px; clean pairs have 41-64 of 64
        share = good.sum() / max(int((psr > 0).sum()), 1)
        conf = float(np.median(psr[good])) * min(1.0, share / MIN_INLIER_SHARE)
        support = float(psr[good].sum())
    if conf > 0:
        pred = (m[:2, :2] @ src[good].T).T + m[:2, 2]
        split = split_match(src[good], dst[good] - pred, k)
        if split:
            conf = min(conf, SPLIT_CONFIDENCE)
        scale = scale_deviation(m if kind == "affine"
                                else fit_points(src[good], dst[good], psr[good], "affine"))
    return m, conf, support, split, scale


def scale_deviation(m: np.ndarray) -> float:
    """How far from 1 the linear part of a (3, 3) map scales any direction (its singular
    values): 0.05 for a section 5 % larger or smaller along some axis."""
    sv = np.linalg.svd(np.asarray(m, float)[:2, :2], compute_uv=False)
    return float(np.abs(sv - 1.0).max())


def split_match(points: np.ndarray, residual: np.ndarray, k: float) -> bool:
    """Whether the inlier patches of a match fall into two groups that moved differently:
    the two parts of a folded section, each matching at its own place.

    One map fitted to both parts lies between them, with every patch inside its generous
    inlier bar, so the match looks confident and misplaces the section (and the ones placed
    from it) by half the step. The residuals are split in two along their main axis
    (2-means); it is a split when the two groups lie :data:`SPLIT_SEPARATION` times their
    spread apart, at least :data:`SPLIT_MIN_WORK_PX` work pixels, each holds a fifth of the
    patches, and neighbouring patches mostly share a group (:data:`SPLIT_COHERENCE`).

    Parameters
    ----------
    points : ndarray, shape (n, 2)
        Patch centres (full px) of the inliers.
    residual : ndarray, shape (n, 2)
        Their matched position minus the map's (full px).
    k : float
        Work binning (full px per work px).
    """
    n = len(points)
    if n < SPLIT_MIN_PATCHES:  # a few patches split apart by chance
        return False
    centred = residual - residual.mean(axis=0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    group = centred @ axis > 0
    for _ in range(10):
        if group.all() or not group.any():
            return False
        a, b = residual[group].mean(axis=0), residual[~group].mean(axis=0)
        new = np.linalg.norm(residual - a, axis=1) < np.linalg.norm(residual - b, axis=1)
        if (new == group).all():
            break
        group = new
    if min(group.mean(), 1 - group.mean()) < SPLIT_MIN_SHARE:
        return False
    a, b = residual[group].mean(axis=0), residual[~group].mean(axis=0)
    gap = float(np.linalg.norm(a - b))
    along = (a - b) / max(gap, 1e-9)
    spread = float(np.concatenate([(residual[group] - a) @ along,
                                   (residual[~group] - b) @ along]).std())
    if gap < SPLIT_MIN_WORK_PX * k or gap < SPLIT_SEPARATION * spread:
        return False
    dist = np.linalg.norm(points[:, None] - points[None], axis=2)
    step = float(dist[dist > 0].min())
    near = (dist > 0) & (dist < 1.5 * step)
    same = near & (group[:, None] == group[None])
    return bool(same.sum() >= SPLIT_COHERENCE * max(int(near.sum()), 1))


def _corner_gap(a: np.ndarray, b: np.ndarray, size: tuple[int, int]) -> float:
    """How far apart (px, largest coordinate) two maps put the corners of a ``size`` (h, w)
    section."""
    h, w = size
    corners = np.array([[0, 0, h - 1, h - 1], [0, w - 1, 0, w - 1], [1, 1, 1, 1]], float)
    return float(np.abs((a - b) @ corners)[:2].max())


def _agree(a: np.ndarray, b: np.ndarray, size: tuple[int, int], tol: float) -> bool:
    """Whether two maps put the corners of an ``size`` (h, w) section within ``tol`` px."""
    return _corner_gap(a, b, size) <= tol


def prealign_stack(
    norm: np.ndarray,
    blank: np.ndarray,
    *,
    reference: int,
    kind: str,
    max_rotation: float,
    device,
    should_stop: Callable[[], None] | None = None,
    fixed: dict[int, np.ndarray] | None = None,
    fixed_confidence: dict[int, float] | None = None,
    scales: dict[int, float] | None = None,
) -> Generator[object, None, tuple[np.ndarray, np.ndarray]]:
    """Chain pairwise estimates outwards from the reference.

    Parameters
    ----------
    norm : ndarray, shape (Z, H, W), float32, normalised
    blank : ndarray, shape (Z,), bool
    fixed : dict of int to ndarray (3, 3), optional
        Sections already placed (e.g. by an earlier block) with their matrices: they are
        kept and serve as anchors for the sections beyond them.
    fixed_confidence : dict of int to float, optional
        The confidence of fixed sections (default inf), passed on to those placed from them.
    scales : dict of int to float, optional
        Filled, for each section confidently matched to its nearest placed neighbour, with
        the scale deviation of an affine map fitted to that match's patches
        (:func:`scale_deviation`), whatever ``kind`` is: evidence of sections that differ in
        scale, which a rigid pre-alignment cannot follow.

    Returns
    -------
    matrices : ndarray, shape (Z, 3, 3)
        Reference-frame pixel -> section pixel; identity for the reference.
    confidence : ndarray, shape (Z,)
        The weakest link of the chain of matches that places each section relative to the
        reference (or to a fixed section): the peak-to-sidelobe ratio of each match, where a
        doubtful match confirmed by the section's other anchor (:data:`AGREE_WORK_PX`)
        counts as :data:`MIN_CONFIDENCE`. inf for the reference and for ``kind='none'``; 0
        for blank sections.
    """
    from .align import Progress

    z_count, h, w = norm.shape
    mats = np.tile(np.eye(3), (z_count, 1, 1))
    conf = np.full(z_count, np.inf)
    conf[blank] = 0.0
    for zz, m in (fixed or {}).items():
        mats[zz] = m
        conf[zz] = (fixed_confidence or {}).get(zz, np.inf)
    if kind == "none":
        return mats, conf
    norm_t = torch.from_numpy(norm).to(device)
    low, k = work_images(norm_t)
    low_gap: torch.Tensor | None = None  # made on the first pair across a gap
    order = [list(range(reference + 1, z_count)), list(range(reference - 1, -1, -1))]
    done = 0
    total = z_count - 1 - sum(1 for zz in (fixed or {}) if zz != reference)
    for n, seq in enumerate(order):
        # usable sections already placed on this side, nearest last; fixed sections beyond
        # the reference come first, as they would if the chain had run through them
        behind = order[1 - n] if fixed else []
        placed = [z for z in reversed(behind) if z in fixed and not blank[z]] + [reference]
        for zz in seq:
            if should_stop is not None:
                should_stop()
            if fixed and zz in fixed:
                if not blank[zz]:
                    placed.append(zz)
                continue
            # the step counts sections finished, so a bar does not run one section ahead
            yield Progress("prealign", done, total, f"pre-aligning section {zz}", section=zz)
            done += 1
            if blank[zz]:
                mats[zz] = mats[placed[-1]]
                continue
            best, tried, confident, passed_over = None, [], {}, None
            split = False
            for cand in placed[-1:-3:-1]:
                if should_stop is not None:
                    should_stop()
                band, pair_kind, hypotheses = pair_settings(kind, zz - cand)
                with torch.no_grad():
                    if band != MEMBRANE_BAND and low_gap is None:
                        low_gap, _ = work_images(norm_t, GAP_BAND)
                    src = low if band == MEMBRANE_BAND else low_gap
                    report: dict[str, Any] = {}
                    m, c = estimate_pair(src[cand], src[zz], kind=pair_kind, k=k,
                                         max_rotation=max_rotation, full_size=(h, w),
                                         hypotheses=hypotheses, should_stop=should_stop,
                                         report=report)
                if cand == placed[-1] and report.get("split"):
                    split = True
                if (scales is not None and cand == placed[-1] and c >= MIN_CONFIDENCE
                        and np.isfinite(report.get("scale", np.nan))):
                    scales[zz] = float(report["scale"])
                # sections two apart share little structure: only a fallback, and only when
                # clearly better than a doubtful nearest match, or confident where it is not
                # (a torn section's wrong match, 4.85, beat the right one across it, 5.89)
                score = (c >= MIN_CONFIDENCE, c if cand == placed[-1] else 0.8 * c)
                tried.append((cand, m @ mats[cand]))
                if best is None or score > best[0]:
                    best = (score, tried[-1][1], c, cand)
                if c >= MIN_CONFIDENCE:
                    confident[cand] = (tried[-1][1], c)
                    checked = (cand == placed[-1] and zz - cand in (1, -1) and c < CHECK_BELOW
                               and len(placed) > 1 and abs(zz - placed[-2]) == 2)
                    if not checked:
                        break
            if len(confident) == 2:
                (near, c_near), (far, c_far) = confident[placed[-1]], confident[placed[-2]]
                if (_corner_gap(near, far, (h, w)) > DISAGREE_FRAC * max(h, w)
                        and conf[placed[-2]] >= MIN_CONFIDENCE):
                    best = (None, far, c_far, placed[-2])
                    passed_over = placed[-1]
                else:  # only a check: the neighbour's map stays (it lost on score to an
                    # agreeing map two back, or the section two back is itself in doubt)
                    best = (None, near, c_near, placed[-1])
            _, mats[zz], own, anchor = best
            if own < MIN_CONFIDENCE and any(
                    _agree(mats[zz], other, (h, w), AGREE_WORK_PX * k)
                    for cand, other in tried if cand != anchor):
                own = MIN_CONFIDENCE
            # a section is only as well placed as the chain that links it to the reference:
            # after a wrong match (a section from elsewhere, a swap, a run of lost sections)
            # every later section is misplaced with it, though each of their own matches is
            # sound
            conf[zz] = min(own, conf[anchor])
            if passed_over is not None:
                # placed past its neighbour, which may be the one in the wrong place (two
                # swapped sections): no more certain than that neighbour
                conf[zz] = min(conf[zz], conf[passed_over])
            if split:
                # two parts of the section match its neighbour at places far apart
                # (a fold): any one map of it is a compromise, so it is doubtful and
                # the sections beyond are matched past it, as past a blank one (a fold
                # placed through misplaced the four sections after it by 23-32 px)
                conf[zz] = min(conf[zz], SPLIT_CONFIDENCE)
                continue
            placed.append(zz)
    yield Progress("prealign", total, total, "pre-alignment done")
    return mats, conf
