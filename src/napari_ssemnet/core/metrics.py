"""Normalisation, NCC (global, masked, local) and field statistics (numpy)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from .errors import InputError

# Ratio of the 4x4-block-mean std to the pixel std: about 0.25 for white noise, 0.5-0.9 for
# EM images. Below this a section is treated as blank (no usable structure).
STRUCTURE_THRESHOLD = 0.35


def structure_ratio(section: np.ndarray) -> float:
    """How much of a section's variance survives 4x4 block averaging (0 for flat images)."""
    s = np.asarray(section, np.float64)
    sd = s.std()
    if not np.isfinite(sd) or sd < 1e-12 * max(1.0, float(np.abs(s).max())):
        return 0.0
    h, w = (s.shape[0] // 4) * 4, (s.shape[1] // 4) * 4
    blocks = s[:h, :w].reshape(h // 4, 4, w // 4, 4).mean(axis=(1, 3))
    return float(blocks.std() / sd)


# Fill (no tissue): padding around montaged or rotated sections, a missing piece. It is a
# flat area at a section's darkest or brightest value, which real EM never is over a
# FILL_CORE x FILL_CORE block; its straight edge was the strongest structure a matcher saw
# (a review measured 10.7 px consistency with 20-40 % black padding against 2.9 px without).
FILL_MIN_FRACTION = 0.01  # of the section at one extreme value before fill is looked for
FILL_CORE = 7  # px
FILL_MARGIN = 3  # px around fill that are left out too: the blended edge of a pad
FILL_HOLE_FRACTION = 0.05  # an inner flat area this large (of the section) is a hole
MIN_TISSUE = 0.05  # sections with less tissue than this are blank


def fill_mask(section: np.ndarray) -> np.ndarray | None:
    """Where a section has no tissue, or None when it has no fill.

    Fill is an area where every pixel of a ``FILL_CORE`` x ``FILL_CORE`` block has the
    section's lowest or highest value, or 0, that touches the image border or covers at least
    ``FILL_HOLE_FRACTION`` of the section (a small saturated spot inside the tissue is kept),
    widened by ``FILL_MARGIN`` px.

    Parameters
    ----------
    section : ndarray, shape (H, W), any real dtype

    Returns
    -------
    ndarray, shape (H, W), bool, or None
    """
    from scipy import ndimage

    s = np.asarray(section)
    out = None
    # 0 too: padding of signed or zero-centred data is not the section's lowest value
    for v in np.unique([s.min(), s.max(), 0]):
        eq = s == v
        if eq.mean() < FILL_MIN_FRACTION:
            continue
        core = ndimage.minimum_filter(eq, size=FILL_CORE, mode="nearest")
        labels, n = ndimage.label(core)
        if n == 0:
            continue
        edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        keep = np.bincount(labels.ravel(), minlength=n + 1) >= FILL_HOLE_FRACTION * s.size
        keep[np.unique(edge)] = True
        keep[0] = False
        region = keep[labels]
        if region.any():
            region = ndimage.maximum_filter(region, size=FILL_CORE + 2 * FILL_MARGIN,
                                            mode="nearest")
            out = region if out is None else out | region
    return out


def tissue_fill(section: np.ndarray, ignore: Any = None) -> np.ndarray | None:
    """:func:`fill_mask` of ``section``, plus the pixels a user's ``ignore`` mask (H, W)
    marks (nonzero): both count as no tissue."""
    fm = fill_mask(section)
    if ignore is None:
        return fm
    ig = np.asarray(ignore) != 0
    if not ig.any():
        return fm
    return ig if fm is None else fm | ig


def normalise_stack(stack: np.ndarray, *, fill: bool = False,
                    should_stop: Callable[[], None] | None = None, ignore: Any = None):
    """Per-section robust intensity normalisation and blank detection.

    Each section is centred on its median and scaled by its 1-99 percentile range, then
    clipped to [-3, 3], so dark, bright or saturated sections become comparable. Fill
    (:func:`fill_mask`: padding, a missing piece) does not count in these statistics and is
    set to 0, the tissue's mean; a section with under ``MIN_TISSUE`` of tissue is blank.

    Parameters
    ----------
    stack : ndarray, shape (Z, H, W), any real dtype (not modified)
    fill : bool
        Also return the fill masks.
    should_stop : callable, optional
        Called between sections (it raises to stop): a big padded section takes seconds.
    ignore : array_like, shape (Z, H, W), optional
        A user's mask of what to leave out (nonzero: dust, a fold, a film edge); it counts
        as fill (:func:`tissue_fill`).

    Returns
    -------
    norm : ndarray, shape (Z, H, W), float32
        Blank sections are all zero.
    blank : ndarray, shape (Z,), bool
    fill : ndarray, shape (Z, H, W), bool, or None
        Only with ``fill=True``: True where a section has no tissue; None when no section
        has fill.
    """
    z = stack.shape[0]
    norm = np.zeros(stack.shape, np.float32)
    blank = np.zeros(z, bool)
    masks: np.ndarray | None = None
    for i in range(z):
        if should_stop is not None:
            should_stop()
        raw = np.asarray(stack[i])
        # centred before the cast: in float32, 1e9 + (0..255) kept 5 grey levels
        wide = raw.dtype.itemsize > 4 or (raw.dtype.kind in "iu" and raw.dtype.itemsize == 4)
        s = np.asarray(raw, np.float64 if wide else np.float32)
        fm = tissue_fill(stack[i], None if ignore is None else ignore[i])
        if fm is not None:
            if masks is None:
                masks = np.zeros(stack.shape, bool)
            masks[i] = fm
            if (~fm).mean() < MIN_TISSUE:
                blank[i] = True
                continue
        tissue = s if fm is None else s[~fm]
        lo, med, hi = np.percentile(tissue, [1, 50, 99])
        spread = hi - lo
        if spread <= 0:
            spread = float(tissue.std()) * 4
        if spread <= 0:
            blank[i] = True
            continue
        n = (s - med) / (spread / 4.0)  # float64: med is a float64 scalar
        np.clip(n, -3.0, 3.0, out=n)
        if fm is not None:
            n[fm] = 0.0  # the median: flat, so it adds no structure below
        # judged after clipping: a few hot pixels dominated the raw variance and made real
        # sections look structureless
        if structure_ratio(n if fm is None else n[_bounding_box(~fm)]) < STRUCTURE_THRESHOLD:
            blank[i] = True
            continue
        t = n if fm is None else n[~fm]
        mean, sd = float(t.mean()), max(float(t.std()), 1e-6)
        n -= mean
        n /= sd
        if fm is not None:
            n[fm] = 0.0
        norm[i] = n
    return (norm, blank, masks) if fill else (norm, blank)


DUPLICATE_NCC = 0.9
"""Adjacent sections whose high-passed normalised images correlate at least this much are
the same image saved twice (a near-exact copy; a second acquisition of a section, with its
own noise, scores lower: 0.82 with noise of 0.2 x the image std). High-passed, real
neighbours reached at most 0.23 at full resolution and 0.70 on 64 px crops that were mostly
noisy resin, where the plain NCC reached 0.97 (a review's measurements)."""
DUPLICATE_PREFILTER = 0.5
"""Only pairs whose plain NCC reaches this are high-passed (for a copy the plain NCC is the
higher of the two; real neighbours are near 0.3): the filter is most of the cost."""


def duplicate_sections(norm: np.ndarray, blank: np.ndarray, reference: int,
                       should_stop: Callable[[], None] | None = None) -> np.ndarray:
    """For each section, the section it repeats, else -1.

    Of two adjacent sections with the same image, the one farther from the reference counts
    as the repeat (a block-wise run renders it after the nearer one, so both modes flag the
    same section); a run of repeats points at the nearest original.

    Parameters
    ----------
    norm : ndarray, shape (Z, H, W), float32, normalised (:func:`normalise_stack`)
    blank : ndarray, shape (Z,), bool
    reference : int
    should_stop : callable, optional
        Called between pairs (it raises to stop).

    Returns
    -------
    ndarray, shape (Z,), int
    """
    from scipy import ndimage

    def ncc(a: np.ndarray, b: np.ndarray) -> float:
        den = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
        return float(np.dot(a, b)) / den if den > 0 else 0.0

    def high_pass(x: np.ndarray) -> np.ndarray:
        # a shared flat or shaded background must not make two sections alike
        return (x - ndimage.gaussian_filter(x, 2.0)).ravel()

    z = norm.shape[0]
    same = np.zeros(z, bool)  # same[i]: sections i - 1 and i are one image
    passed: dict[int, np.ndarray] = {}  # the last high-passed section, for the next pair
    for i in range(1, z):
        if should_stop is not None:
            should_stop()
        if blank[i] or blank[i - 1]:
            continue
        if ncc(norm[i].ravel(), norm[i - 1].ravel()) >= DUPLICATE_PREFILTER:
            prev = passed.pop(i - 1, None)
            passed = {i: high_pass(norm[i])}
            prev = high_pass(norm[i - 1]) if prev is None else prev
            same[i] = ncc(passed[i], prev) >= DUPLICATE_NCC
    twin = np.full(z, -1)
    for i in range(reference + 1, z):  # beyond the reference: i repeats i - 1
        if same[i]:
            twin[i] = twin[i - 1] if twin[i - 1] >= 0 else i - 1
    for j in range(reference - 1, -1, -1):  # before it: j repeats j + 1
        if same[j + 1]:
            twin[j] = twin[j + 1] if twin[j + 1] >= 0 else j + 1
    return twin


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice]:
    """The smallest box around a section's tissue: its structure is judged there."""
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1)


def _clipped(v: np.ndarray) -> np.ndarray:
    """Pixel values clipped as :func:`normalise_stack` clips a section (median +- 3
    quarters of the 1-99 percentile range), so that a few extreme pixels do not rule."""
    lo, med, hi = np.percentile(v, [1, 50, 99])
    half = 0.75 * (hi - lo)
    return np.clip(v, med - half, med + half) if half > 0 else v


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, *,
        robust: bool = False) -> float:
    """Normalised cross-correlation of two images on an optional boolean mask.

    ``robust`` clips each image's values (on the mask) as the alignment's normalisation
    does, so that the NCC of aligned sections compares with that of the normalised input.
    Returns NaN when fewer than 16 pixels are usable or either image is flat there.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or (mask is not None and np.shape(mask) != a.shape):
        raise InputError(f"ncc needs two images of one shape and a mask of that shape; got "
                         f"{a.shape}, {b.shape}"
                         + ("" if mask is None else f" and {np.shape(mask)}") + ".")
    if mask is not None:
        mask = np.asarray(mask, bool)  # a 0/1 uint8 mask was used as row indices
        a = a[mask]
        b = b[mask]
    else:
        a = a.ravel()
        b = b.ravel()
    if a.size < 16:
        return float("nan")
    if robust:
        a, b = _clipped(a), _clipped(b)
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    if den <= 0:
        return float("nan")
    return float((a * b).sum() / den)


def adjacent_ncc(stack: np.ndarray, valid: np.ndarray | None,
                 usable: np.ndarray | None = None, *, robust: bool = False,
                 should_stop: Callable[[], None] | None = None) -> np.ndarray:
    """Mean NCC of each section with its nearest usable neighbours on each side.

    Parameters
    ----------
    stack : ndarray, shape (Z, H, W)
    valid : ndarray, shape (Z, H, W), bool, or None (all valid)
    usable : ndarray, shape (Z,), bool, or None
        Sections to include; others (e.g. blank) get NaN and are skipped as neighbours.
    robust : bool
        As :func:`ncc` (for aligned sections: values as the input's normalisation sees them).
    should_stop : callable, optional
        Called between pairs (it raises to stop): 0.1 s a pair at 1024^2.

    Returns
    -------
    ndarray, shape (Z,), float64
    """
    usable = np.ones(stack.shape[0], bool) if usable is None else np.asarray(usable, bool)
    return mean_of_pairs(adjacent_pairs(stack, valid, usable, robust=robust,
                                        should_stop=should_stop), usable)


def adjacent_pairs(stack: np.ndarray, valid: np.ndarray | None, usable: np.ndarray, *,
                   robust: bool = False, should_stop: Callable[[], None] | None = None
                   ) -> dict[tuple[int, int], float]:
    """:func:`ncc` of each pair of consecutive ``usable`` sections, by (a, b); ``should_stop``
    is called between pairs."""
    idx = np.nonzero(usable)[0]
    out = {}
    for a, b in zip(idx[:-1], idx[1:], strict=False):
        if should_stop is not None:
            should_stop()
        out[(int(a), int(b))] = ncc(stack[a], stack[b],
                                    None if valid is None else valid[a] & valid[b],
                                    robust=robust)
    return out


def raw_pair_ncc(a: np.ndarray, b: np.ndarray) -> float:
    """:func:`ncc` of two raw sections as normalised by :func:`normalise_stack`, on the
    tissue of both."""
    norm, _, fill = normalise_stack(np.stack([a, b]), fill=True)
    return ncc(norm[0], norm[1], None if fill is None else ~fill[0] & ~fill[1])


def mean_of_pairs(pair: dict[tuple[int, int], float], usable: np.ndarray) -> np.ndarray:
    """Per-section mean of the NCCs ``pair[(a, b)]`` of consecutive usable sections a < b.

    Sections that are not usable, or whose pairs are all NaN or missing, get NaN.

    Returns
    -------
    ndarray, shape (Z,), float64
    """
    usable = np.asarray(usable, bool)
    idx = [int(i) for i in np.nonzero(usable)[0]]
    out = np.full(usable.shape[0], np.nan)
    for j, zz in enumerate(idx):
        vals = []
        if j > 0:
            vals.append(pair.get((idx[j - 1], zz), np.nan))
        if j < len(idx) - 1:
            vals.append(pair.get((zz, idx[j + 1]), np.nan))
        vals = [v for v in vals if np.isfinite(v)]
        if vals:
            out[zz] = float(np.mean(vals))
    return out


def pair_ncc(stack: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """NCC of each section with the next one, shape (Z-1,)."""
    return np.array([ncc(stack[i], stack[i + 1],
                         None if valid is None else valid[i] & valid[i + 1])
                     for i in range(stack.shape[0] - 1)])


def _gauss_kernel(sigma: float) -> np.ndarray:
    """The normalised 1-D Gaussian of ``sigma`` px, cut at 3 sigma: length ``2 r + 1``."""
    r = max(1, int(3 * sigma + 0.5))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _gauss_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflect padding (numpy FFT-free, small sigma)."""
    k = _gauss_kernel(sigma)
    r = len(k) // 2
    out = np.asarray(img, np.float64)
    for axis in (-2, -1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect")
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for i, kv in enumerate(k):
            sl = [slice(None)] * out.ndim
            sl[axis] = slice(i, i + n)
            acc += kv * p[tuple(sl)]
        out = acc
    return out


def _local_moments(a: np.ndarray, b: np.ndarray, sigma: float
                   ) -> tuple[np.ndarray, ...]:
    """Gaussian-windowed means, variances and covariance of two (H, W) images, as
    :func:`_gauss_blur` gives them, with torch in float32 (the numpy loop took 0.86 s per
    1024^2 pair, 8 s after an 8-section run in the widget). Each image is standardised
    first, which leaves the local NCC as it is and keeps float32's cancellation in
    ``E[a^2] - E[a]^2`` small; the returned moments are of the standardised images."""
    import torch
    import torch.nn.functional as F

    def standard(x: np.ndarray) -> np.ndarray:
        sd = float(x.std())
        return (x - float(x.mean())) / (sd if sd > 0 else 1.0)

    sa, sb = standard(a), standard(b)
    h, w = a.shape
    k = _gauss_kernel(sigma)
    r = len(k) // 2
    t = torch.from_numpy(np.stack([sa, sb, sa * sa, sb * sb, sa * sb]).astype(np.float32))
    with torch.no_grad():
        # an FFT product on the reflect-padded images: 2.4x faster here than two 1-D
        # convolutions; the crop keeps only outputs whose window lies inside the padding
        t = F.pad(t[:, None], (r, r, r, r), mode="reflect")[:, 0]
        kernel = torch.zeros(t.shape[-2:], dtype=torch.float32)
        kernel[:2 * r + 1, :2 * r + 1] = torch.from_numpy(np.outer(k, k).astype(np.float32))
        t = torch.fft.irfft2(torch.fft.rfft2(t) * torch.fft.rfft2(kernel), s=t.shape[-2:])
        t = t[:, 2 * r:2 * r + h, 2 * r:2 * r + w].double().numpy()
    ma, mb = t[0], t[1]
    return ma, mb, t[2] - ma * ma, t[3] - mb * mb, t[4] - ma * mb


def local_ncc(a: np.ndarray, b: np.ndarray, sigma: float = 8.0) -> np.ndarray:
    """Local NCC map of two images with a Gaussian window of ``sigma`` px.

    Parameters
    ----------
    a, b : ndarray, shape (H, W)

    Returns
    -------
    ndarray, shape (H, W), float32, in [-1, 1]
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise InputError(f"local_ncc needs two 2D images of one shape; got {a.shape} and "
                         f"{b.shape}.")
    if not sigma > 0:  # sigma 0 gave an all-NaN map
        raise InputError(f"local_ncc needs a window sigma above 0 px; got {sigma!r}.")
    if min(a.shape) > len(_gauss_kernel(sigma)) // 2:
        ma, mb, va, vb, cov = _local_moments(a, b, sigma)
    else:  # torch's reflect padding needs the image wider than the window's reach
        ma, mb = _gauss_blur(a, sigma), _gauss_blur(b, sigma)
        va = _gauss_blur(a * a, sigma) - ma * ma
        vb = _gauss_blur(b * b, sigma) - mb * mb
        cov = _gauss_blur(a * b, sigma) - ma * mb
    floor = 1e-4 * max(float(np.mean(np.maximum(va, 0))), float(np.mean(np.maximum(vb, 0))),
                       1e-12)
    r = cov / np.sqrt(np.maximum(va, floor) * np.maximum(vb, floor))
    return np.clip(r, -1.0, 1.0).astype(np.float32)


def local_ncc_error(aligned: np.ndarray, valid: np.ndarray | None = None, *,
                    sigma: float = 8.0, blank: np.ndarray | None = None,
                    sections: Collection[int] | None = None) -> np.ndarray:
    """Where the alignment is still wrong: ``1 - local NCC`` with the previous usable section.

    Section 0 (or the first usable one) is compared with the next usable section.

    Parameters
    ----------
    aligned : ndarray, shape (Z, H, W)
    valid : ndarray, shape (Z, H, W), bool, optional
    sigma : float
        Gaussian window in pixels.
    blank : ndarray, shape (Z,), bool, optional
        Sections to skip (their map is 0).
    sections : collection of int, optional
        Only these sections' maps (the others are 0): after one section moved, only its own
        map and those compared with it change (:func:`local_ncc_partners`).

    Returns
    -------
    ndarray, shape (Z, H, W), float32 in [0, 2]; 0 where invalid or blank.
    """
    out = np.zeros(aligned.shape, np.float32)
    for zz, other in local_ncc_partners(aligned.shape[0], blank).items():
        if sections is not None and zz not in sections:
            continue
        err = 1.0 - local_ncc(aligned[zz], aligned[other], sigma)
        if valid is not None:
            err[~(valid[zz] & valid[other])] = 0.0
        out[zz] = err
    return out


def local_ncc_partners(z: int, blank: np.ndarray | None = None) -> dict[int, int]:
    """The section :func:`local_ncc_error` compares each usable section with: the previous
    usable one (the first: the next); empty with fewer than two usable sections."""
    usable = np.ones(z, bool) if blank is None else ~np.asarray(blank, bool)
    idx = [int(i) for i in np.nonzero(usable)[0]]
    if len(idx) < 2:
        return {}
    return {zz: idx[j - 1] if j > 0 else idx[1] for j, zz in enumerate(idx)}


def field_stats(displacement: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float]:
    """Magnitude statistics of a (Z, 2, H, W) displacement (pixels), on ``valid`` (Z, H, W)
    when given."""
    displacement = np.asarray(displacement)
    if displacement.ndim != 4 or displacement.shape[1] != 2:  # a (2, H, W) field passed
        raise InputError(f"field_stats needs a (Z, 2, H, W) displacement; got shape "
                         f"{displacement.shape}.")
    mag = np.hypot(displacement[:, 0], displacement[:, 1])
    if valid is not None and np.shape(valid) != mag.shape:
        raise InputError(f"field_stats: valid has shape {np.shape(valid)}; the displacement "
                         f"needs {mag.shape}.")
    vals = mag[np.asarray(valid, bool)] if valid is not None else mag.ravel()
    if vals.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "p95": float("nan"),
                "max": float("nan")}
    return {"mean": float(vals.mean()), "median": float(np.median(vals)),
            "p95": float(np.percentile(vals, 95)), "max": float(vals.max())}
