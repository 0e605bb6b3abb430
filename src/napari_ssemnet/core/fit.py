"""Joint deformable fit of all sections on frozen encoder features (ssEMnet Eqs. 4-5).

Every free section z gets a coarse control grid ``v_z`` (penalised by
``alpha ||u||^2 + beta ||grad u||^2``, where ``u`` is ``v`` with its mean scaled by
``sqrt(shift_penalty)`` and its least-squares linear part by ``sqrt(linear_penalty)``) on top
of its pre-alignment. Only without a
pre-alignment (``prealign="none"``) does it also get a residual global translation ``A_z``
(not penalised), parameterised relative to its neighbour towards the reference
(``A_z = G_z @ A_parent``) so that the slow "drift along the stack" modes of a chain are single
parameters rather than sums over many sections (plain gradient descent on absolute maps needed
hundreds of iterations to move them); otherwise ``A_z`` is the identity.
The residual maps reference-frame points ``q`` to pre-aligned points
``r_z(q) = A_z(q) + v_z(q)``; the whole backward map is ``P_z @ r_z(q)``.

Features are computed once per pyramid level on the pre-aligned sections and then warped,
which keeps the encoder out of the optimisation loop (the residual motions are small, so
warping features and featurising warped images agree closely). All sections are optimised in
one batch against their neighbours within ``window`` on both sides; blank sections are left
out of the data term and bridged over, and the reference section stays fixed.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import warp
from .features import encode_tiled
from .params import AlignParams
from .prealign import gaussian_blur

FEATURE_BLUR = 1.0  # feature pixels
MAX_CHANNELS = 8  # principal components of the features that are matched
# Regulariser units: the user-facing weights are multiples of these, so that the defaults
# (1.0) read naturally. Measured on ISBI pairs: 10x weaker over-warps real tissue (adjacent NCC
# +0.11 over rigid), 100x stronger cannot follow a 2 px elastic distortion.
SMOOTHNESS_UNIT = 1e-2
MAGNITUDE_UNIT = 1e-3
DROP_HALF_LIFE = 15.0  # iterations
LR_HALF_LIFE = 40.0  # iterations

SAMPLE_HELD_ONCE = True
"""When at most half the sections are free (a Re-align), sample the held sections' features
once per level and build the pairs from the free sections' rows, instead of the batched loop
over all sections at every step (the same result up to float rounding; on VNC 1024^2 the
same field, 1.7x faster, ``benchmarks/bench_realign.py``). False keeps the batched loop (for
tests)."""


@dataclass
class Residual:
    """Fitted residual maps (full-resolution pixel units).

    Attributes
    ----------
    mats : Tensor, shape (Z, 3, 3)
        Absolute residual global maps ``A_z``.
    grid : Tensor, shape (Z, 2, gh, gw)
        Control-grid displacements (dy, dx) in pixels.
    size : (H, W)
    """

    mats: torch.Tensor
    grid: torch.Tensor
    size: tuple[int, int]

    def points(self, z: slice | int, q: torch.Tensor) -> torch.Tensor:
        """Residual map at points ``q`` (Hq, Wq, 2) for sections ``z`` -> (B, Hq, Wq, 2)."""
        zs = slice(z, z + 1) if isinstance(z, int) else z
        mats, grid = self.mats[zs], self.grid[zs]
        interp = warp.grid_interpolators(q[:, 0, 0], q[0, :, 1], grid.shape[-2:], self.size)
        return residual_points(mats, grid, q, interp)


def translation_matrices(shift: torch.Tensor) -> torch.Tensor:
    """(Z, 2) shifts (dy, dx) -> (Z, 3, 3) translation maps."""
    m = torch.eye(3, dtype=shift.dtype, device=shift.device).repeat(shift.shape[0], 1, 1)
    m[:, :2, 2] = shift
    return m


def parents_of(usable: np.ndarray, reference: int) -> list[tuple[int, int]]:
    """(section, parent) pairs ordered outwards from the reference; a parent is the nearest
    usable section towards the reference (blank sections are bridged)."""
    out = []
    for seq in (range(reference + 1, len(usable)), range(reference - 1, -1, -1)):
        last = reference
        for z in seq:
            out.append((z, last))
            if usable[z]:
                last = z
    return out


def chain_matrices(rel: torch.Tensor, chain: list[tuple[int, int]]) -> torch.Tensor:
    """Absolute maps from relative ones: ``A_z = rel_z @ A_parent``, reference = identity."""
    eye = torch.eye(3, dtype=rel.dtype, device=rel.device)
    absolute: list[torch.Tensor | None] = [None] * rel.shape[0]
    for z in range(rel.shape[0]):
        if all(z != c for c, _ in chain):
            absolute[z] = eye
    for z, parent in chain:
        absolute[z] = rel[z] @ absolute[parent]
    return torch.stack(absolute)


def residual_points(mats: torch.Tensor, grid: torch.Tensor, q: torch.Tensor,
                    interp: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``A(q) + v(q)`` for a batch of sections.

    ``mats`` (B, 3, 3) are the global maps, ``q`` a rectilinear point set (Hq, Wq, 2) and
    ``interp`` its :func:`warp.grid_interpolators`; returns (B, Hq, Wq, 2).
    """
    p = warp.apply_matrix(mats, q)
    return p + warp.grid_to_dense(grid, *interp)


def linear_basis(gshape: tuple[int, int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Node positions (gh, gw) in y and in x, from -1 to 1 about the grid's centre: the
    linear part of a grid in :func:`_scale_parts` (made once per pyramid level)."""
    gh, gw = gshape
    yy = torch.linspace(-1.0, 1.0, gh, device=device)[:, None].expand(gh, gw)
    xx = torch.linspace(-1.0, 1.0, gw, device=device)[None, :].expand(gh, gw)
    return yy, xx


def _scale_parts(v: torch.Tensor, mean_f: float, linear_f: float,
                 basis: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``v`` (B, 2, gh, gw) with its mean scaled by ``mean_f`` and its least-squares linear
    part (in node position, about the grid's centre; ``basis``: :func:`linear_basis`) by
    ``linear_f``; the rest is kept (the three parts are orthogonal on the nodes)."""
    yy, xx = basis if basis is not None else linear_basis(v.shape[-2:], v.device)
    mean = v.mean((-2, -1), keepdim=True)
    by = (v * yy).sum((-2, -1), keepdim=True) / (yy ** 2).sum()
    bx = (v * xx).sum((-2, -1), keepdim=True) / (xx ** 2).sum()
    return v - (1.0 - mean_f) * mean - (1.0 - linear_f) * (by * yy + bx * xx)


def _drop_worst(err: torch.Tensor, m: torch.Tensor, drop: float, thresholds: list,
                pi: int, refresh: bool) -> torch.Tensor:
    """``m`` (rows, H, W) without each row's worst ``drop`` share of ``err`` (the loss drop);
    ``thresholds[pi]`` is recomputed when ``refresh`` or unset, else reused."""
    if drop <= 0.01:
        return m
    if refresh or thresholds[pi] is None:
        e = err.detach().masked_fill(~m, float("nan")).flatten(1)[:, ::3]
        thr = torch.nanquantile(e, 1.0 - drop, dim=1)
        thresholds[pi] = torch.nan_to_num(thr, nan=float("inf"))
    return m & (err.detach() <= thresholds[pi][:, None, None])


def _row_means(err: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of ``err`` over each row's pixels in ``m`` (rows, H, W) -> (rows,)."""
    return (err * m).sum(dim=(1, 2)) / m.sum(dim=(1, 2)).clamp(min=1)


class _FewFree:
    """The data term of a fit in which only the sections in ``slot`` are free.

    The held sections' features are sampled once per level (``held_fw``/``held_ok``), and
    the pairs are built row by row: those that touch a free section from the free
    sections' samples at each step, those of two held sections once (constant; their
    masked means are recomputed only when the loss drop's thresholds are, or once it has
    ended). The same sums as the batched loop, in another order.
    """

    def __init__(self, held_fw: torch.Tensor, held_ok: torch.Tensor, slot: dict[int, int],
                 rows: list, n_orig: int) -> None:
        self.held_fw, self.held_ok, self.slot, self.rows = held_fw, held_ok, slot, rows
        self.n_orig = n_orig
        with torch.no_grad():
            self.const = [None if not ks else self._err(*self._rows(ks, None, None))
                          for _, ks in rows]
        self.const_thr: list[torch.Tensor | None] = [None] * len(rows)
        self.const_sum: list[torch.Tensor | None] = [None] * len(rows)
        self.const_dropping: list[bool | None] = [None] * len(rows)

    def _rows(self, links: list[tuple[int, int]], fw_m: torch.Tensor | None,
              ok_m: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        def pick(zz: int) -> tuple[torch.Tensor, torch.Tensor]:
            k = self.slot.get(zz)
            return (fw_m[k], ok_m[k]) if k is not None else (self.held_fw[zz],
                                                             self.held_ok[zz])

        a = [pick(x) for x, _ in links]
        b = [pick(y) for _, y in links]
        return (torch.stack([f for f, _ in a]), torch.stack([f for f, _ in b]),
                torch.stack([o for _, o in a]) & torch.stack([o for _, o in b]))

    def _err(self, fa: torch.Tensor, fb: torch.Tensor, m: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        return ((fa - fb) ** 2).sum(dim=1) / self.n_orig, m

    def data(self, fw_m: torch.Tensor, ok_m: torch.Tensor, pairs: list, drop: float,
             refresh: bool, thresholds: list) -> tuple[torch.Tensor | float, float]:
        """The data term before its normalisation, and its weight (rows times pair weight).
        ``fw_m``/``ok_m``: the free sections' sampled features and validity, in ``slot``
        order."""
        data: torch.Tensor | float = 0.0
        norm_w = 0.0
        for pi, ((_, wgt), (live, _)) in enumerate(zip(pairs, self.rows, strict=True)):
            if live:
                err, m = self._err(*self._rows(live, fw_m, ok_m))
                m = _drop_worst(err, m, drop, thresholds, pi, refresh)
                data = data + wgt * _row_means(err, m).sum()
            if self.const[pi] is not None:
                err_c, m_c = self.const[pi]
                dropping = drop > 0.01
                if self.const_dropping[pi] != dropping or (dropping and refresh):
                    m_c = _drop_worst(err_c, m_c, drop, self.const_thr, pi, True)
                    self.const_sum[pi] = _row_means(err_c, m_c).sum()
                    self.const_dropping[pi] = dropping
                data = data + wgt * self.const_sum[pi]
            norm_w += wgt * (len(live) + (0 if self.const[pi] is None else
                                          len(self.const[pi][0])))
        return data, norm_w


def _pair_weights(n_usable: int, window: int, decay: float) -> list[tuple[int, float]]:
    """(distance, weight) for neighbour pairs among the usable sections (blanks bridged)."""
    return [(d, decay ** (d - 1)) for d in range(1, window + 1) if d < n_usable]


def level_features(extractor, images: torch.Tensor, valid: torch.Tensor, usable: np.ndarray,
                   keep: int = MAX_CHANNELS, should_stop: Callable[[], None] | None = None
                   ) -> tuple[torch.Tensor, int, float]:
    """Features of one pyramid level, ready to be sampled by the fit.

    The encoder's channels are standardised over the valid pixels of the usable sections,
    blurred slightly and projected onto their ``keep`` leading principal components (warping
    the feature maps dominates the run time, and the CAE's 16 channels are strongly
    correlated; components are not whitened, so squared differences keep their scale). The
    validity is appended as a last channel, so that it goes through the same sampler.

    Works one section at a time after encoding, so that only the encoder output and the
    result are held at once.

    Parameters
    ----------
    images, valid : Tensor, shape (Z, 1, H, W)
        Pre-aligned sections of this level and their validity (float, 1 inside).
    usable : ndarray, shape (Z,), bool
    should_stop : callable, optional
        Called between sections (it raises to stop): a fine level of a large stack takes
        seconds to encode.

    Returns
    -------
    feats : Tensor, shape (Z, C' + 1, h, w)
        ``C' = min(C, keep)`` feature channels, then the validity (0 or 1).
    n_orig : int
        Channels of the encoder (the data term is normalised by it).
    kf : float
        Input pixels of this level per feature pixel: the encoder's stride (a power of
        two), also when an odd side gives a last feature pixel that is partly padding.
    """
    feats = encode_tiled(extractor, images, should_stop=should_stop)
    z_count, c, hf, wf = feats.shape
    # W / wf is 65 / 33 for an odd width: scaling both axes by that made the fit find
    # 1.5 % less than the leftover shift (a review measured 5.90 px of 6)
    kf = float(2 ** round(math.log2(max(images.shape[-2] / hf, images.shape[-1] / wf))))
    val_f = (F.adaptive_avg_pool2d(valid, (hf, wf)) > 0.999).float()
    use = [int(i) for i in np.nonzero(usable)[0]]
    wsum = max(float(sum(float(val_f[i].sum()) for i in use)), 1.0)
    mean = sum((feats[i] * val_f[i]).sum(dim=(1, 2)) for i in use) / wsum
    var = sum((((feats[i] - mean[:, None, None]) ** 2) * val_f[i]).sum(dim=(1, 2))
              for i in use) / wsum
    std = var.sqrt().clamp(min=1e-6)
    for i in range(z_count):
        if should_stop is not None:
            should_stop()
        # a slight blur removes the bilinear sampler's pull towards whole-pixel shifts
        # (measured: 0.1 px bias without it, 0.01 px with sigma = 1 feature pixel)
        feats[i:i + 1] = gaussian_blur(
            (feats[i:i + 1] - mean[None, :, None, None]) / std[None, :, None, None],
            FEATURE_BLUR)
    if c <= keep:
        return torch.cat([feats, val_f], dim=1), c, kf
    # covariance on a regular subsample of the valid pixels of all usable sections, taken as
    # if they were one sequence (section by section, row-major)
    inside = [val_f[i].reshape(-1) > 0.5 for i in use]
    step = max(1, int(sum(int(m.sum()) for m in inside)) // 200_000)
    cov = feats.new_zeros(c, c)
    count, offset = 0, 0
    for i, m in zip(use, inside, strict=True):
        x = feats[i].reshape(c, -1)[:, m]
        x = x[:, (-offset) % step::step]
        offset += int(m.sum())
        cov += x @ x.T
        count += x.shape[1]
    _, vecs = torch.linalg.eigh(cov / max(count, 1))
    basis = vecs[:, -keep:].T.contiguous()  # (keep, C), leading components
    out = feats.new_empty(z_count, keep + 1, hf, wf)
    for i in range(z_count):
        out[i, :keep] = torch.einsum("kc,chw->khw", basis, feats[i])
    out[:, keep:] = val_f
    return out, c, kf


def prewarp(norm: np.ndarray, matrices: np.ndarray, device, binning: int = 1,
            fill: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample normalised sections through their pre-alignment, then bin them.

    ``fill`` ((Z, H, W) bool, optional) marks pixels without tissue: they count as outside
    the section, so the fit never matches padding or a missing piece.

    Returns
    -------
    images : Tensor, shape (Z, 1, H // binning, W // binning)
    valid : Tensor, same shape, float (fraction of the bin inside the section, on tissue)
    """
    z, h, w = norm.shape
    q = warp.level_points(h, w, device=device)
    imgs = torch.empty(z, 1, h // binning, w // binning, device=device)
    valid = torch.empty_like(imgs)
    src = torch.from_numpy(norm).to(device)
    mats = torch.from_numpy(matrices).float().to(device)
    with torch.no_grad():
        for i in range(z):
            p = warp.apply_matrix(mats[i:i + 1], q)
            out, ok = warp.sample(src[i][None, None], p)
            ok = ok.float()
            if fill is not None and fill[i].any():
                tissue = torch.from_numpy(~fill[i]).to(device).float()[None, None]
                ok = ok * (warp.sample(tissue, p)[0][:, 0] > 0.999).float()
            imgs[i], valid[i] = _bin(out, binning)[0], _bin(ok, binning)[0]
    return imgs, valid


def _bin(x: torch.Tensor, binning: int) -> torch.Tensor:
    return F.avg_pool2d(x, binning) if binning > 1 else x


_WARMING: list[threading.Thread] = []
_WARMING_LOCK = threading.Lock()


def warm_up_optimiser() -> None:
    """Build a first Adam optimiser in a background thread, once per process.

    The first one imports ``torch._dynamo`` (1.2 s here), which cannot be interrupted: a
    run that met it at the start of its fit could not be cancelled for that long. Started
    while the sections are normalised and pre-aligned, it is done before the fit needs it,
    and the run keeps polling meanwhile.
    """
    with _WARMING_LOCK:  # runs may start in several threads at once
        if _WARMING:
            return
        thread = threading.Thread(
            target=lambda: torch.optim.Adam([torch.zeros(1, requires_grad=True)]),
            name="napari-ssemnet-warm-up", daemon=True)
        _WARMING.append(thread)
        thread.start()


def on_device(model: torch.nn.Module, device) -> torch.nn.Module:
    """``model`` with its weights on ``device``: a copy when they are elsewhere, so that a
    caller's encoder is not moved (the weights load on the CPU; the sections may be on a
    GPU, where a CPU weight makes the first convolution fail)."""
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:  # "cuda" is the current GPU
        target = torch.device("cuda", torch.cuda.current_device())
    if all(t.device == target for t in [*model.parameters(), *model.buffers()]):
        return model
    import copy

    return copy.deepcopy(model).to(target)


def fit_stack(
    norm: np.ndarray,
    matrices: np.ndarray,
    *,
    blank: np.ndarray,
    free: np.ndarray,
    params: AlignParams,
    extractor,
    device,
    should_stop: Callable[[], None] | None = None,
    prewarped: tuple[torch.Tensor, torch.Tensor] | None = None,
    init_grid: torch.Tensor | None = None,
    fill: np.ndarray | None = None,
) -> Generator[object, None, Residual]:
    """Fit residual maps for the ``free`` sections; see the module docstring.

    Parameters
    ----------
    norm : ndarray, shape (Z, H, W), float32, normalised
    matrices : ndarray, shape (Z, 3, 3)
        Pre-alignment (reference frame -> section pixels).
    blank, free : ndarray, shape (Z,), bool
    prewarped : (images, valid), optional
        Pre-aligned sections at full resolution if the caller has them, see :func:`prewarp`.
    init_grid : Tensor, shape (Z, 2, gh, gw), optional
        Starting control grid (pixels), resampled to each level's node count. Sections that
        are not ``free`` keep theirs throughout (e.g. sections aligned by an earlier block).
    fill : ndarray, shape (Z, H, W), bool, optional
        Pixels without tissue (see :func:`prewarp`); not used with ``prewarped``.

    Yields
    ------
    Progress, once per iteration.
    """
    from .align import Progress

    z_count, h, w = norm.shape
    size = (h, w)
    extractor = on_device(extractor, device)
    usable = ~np.asarray(blank, bool)
    use_idx = torch.from_numpy(np.nonzero(usable)[0]).to(device)
    all_usable = bool(usable.all())
    pairs = _pair_weights(len(use_idx), params.window, params.neighbour_decay)
    free_t = torch.from_numpy(np.asarray(free, np.float32)).to(device)

    def held_grids(gshape: tuple[int, int]) -> torch.Tensor:
        """The grids of the sections that are not free: their ``init_grid``, else zero."""
        if init_grid is None:
            return torch.zeros(z_count, 2, *gshape, device=device)
        return (warp.resize_grid(init_grid.to(device).float(), gshape)
                * (1 - free_t)[:, None, None, None])

    if not pairs:  # one usable section (a block whose new sections are all blank): no data
        return Residual(mats=torch.eye(3, device=device).repeat(z_count, 1, 1),
                        grid=held_grids(warp.control_grid_shape(size, params.grid_spacing)),
                        size=size)
    b = params.fit_binning
    if prewarped is not None:
        images, valid = _bin(prewarped[0], b), _bin(prewarped[1], b)
    else:
        images, valid = prewarp(norm, matrices, device, b, fill=fill)
    if should_stop is not None:
        should_stop()
    chain = parents_of(usable, params.reference)

    # The pre-alignment owns the global map and the fit only the control grid: refitting the
    # global parameters on features let them drift to one of the several near-equal optima of
    # real neighbours (ISBI, +-10 px shifts: 0.55 px between runs with the grid alone,
    # 2.26 px with the global parameters free). Without a pre-alignment the fit still needs a
    # translation.
    refine_global = params.prealign == "none"
    glob = torch.zeros(z_count, 2, device=device)  # relative translations, see parents_of
    fixed_mats = torch.eye(3, device=device).repeat(z_count, 1, 1)

    def global_maps(g: torch.Tensor) -> torch.Tensor:
        if not refine_global:
            return fixed_mats
        return chain_matrices(translation_matrices(g * free_t[:, None]), chain)

    # With few free sections (a re-align: 1 of up to 5) and nothing moving the held ones (a
    # global map refined along the chain could), only the free ones are sampled at each step
    # and the pairs are built section by section: slicing the whole batch made autograd
    # zero-fill and copy the gradients of every held section at each step. With many free (a
    # full run holds its reference) merging the held samples back in cost more than it
    # saved (VNC 8 x 1024^2: fit 12.1 -> 16.2 s), so those keep the batched loop.
    n_free = int(np.count_nonzero(free))
    moving = (torch.from_numpy(np.nonzero(free)[0]).to(device)
              if SAMPLE_HELD_ONCE and not refine_global and 0 < 2 * n_free <= z_count
              else None)
    rows = slot = None
    if moving is not None:
        slot = {int(zz): k for k, zz in enumerate(np.nonzero(free)[0])}
        use = [int(zz) for zz in np.nonzero(usable)[0]]
        rows = []
        for d, _ in pairs:
            links = [(use[u], use[u + d]) for u in range(len(use) - d)]
            rows.append(([ab for ab in links if ab[0] in slot or ab[1] in slot],
                         [ab for ab in links if ab[0] not in slot and ab[1] not in slot]))

    # level ``lev`` works on sections binned by k = b * 2**lev (input pixels per level pixel);
    # the finest fitted level is the binning b itself
    levels = params.levels
    while levels > 1 and min(h, w) // (b * 2 ** (levels - 1)) < 32:
        levels -= 1
    grid = None
    for li, lev in enumerate(range(levels - 1, -1, -1)):
        k = b * 2 ** lev
        imgs_l, val_l = _bin(images, 2 ** lev), _bin(valid, 2 ** lev)
        feats, n_orig, kf_l = level_features(extractor, imgs_l, val_l, usable,
                                             should_stop=should_stop)
        kf = k * kf_l
        hf, wf = feats.shape[-2:]
        nfeat = feats.shape[1] - 1

        gshape = warp.control_grid_shape(size, params.grid_spacing * 2 ** lev)
        if grid is None and init_grid is not None:
            grid = warp.resize_grid(init_grid.to(device).float(), gshape)
        elif grid is None:
            grid = torch.zeros(z_count, 2, *gshape, device=device)
        else:
            grid = warp.resize_grid(grid.detach(), gshape)
        glob = glob.detach().requires_grad_(refine_global)
        grid = grid.detach().requires_grad_(True)
        held = held_grids(gshape)
        basis = linear_basis(gshape, device)
        lr = params.learning_rate * k
        opt = torch.optim.Adam([glob, grid] if refine_global else [grid], lr=lr)
        q = warp.level_points(hf, wf, kf, device=device)
        interp = warp.grid_interpolators(q[:, 0, 0], q[0, :, 1], gshape, size)
        thresholds: list[torch.Tensor | None] = [None] * len(pairs)
        snapshot = (glob.detach().clone(), grid.detach().clone())
        if moving is not None:
            # held sections sit still with a fixed global map: sample their features once
            # per level, not at every step (a re-align has 1 free section of up to 5)
            with torch.no_grad():
                held_sampled, held_inside = warp.sample(
                    feats, residual_points(fixed_mats, held, q, interp), kf,
                    padding_mode="border")
            few = _FewFree(held_sampled[:, :nfeat],
                           held_inside & (held_sampled[:, nfeat] > 0.99), slot, rows, n_orig)
        # coarse levels make the large moves; each finer level (4x the pixels) only refines,
        # so it gets half the iterations of the one above
        total = max(10, params.iterations >> li)
        for it in range(total):
            if should_stop is not None:
                should_stop()
            # loss drop halves every DROP_HALF_LIFE steps; the step size decays so that Adam
            # settles instead of hovering about the minimum at one learning rate's distance
            drop = params.loss_drop * 0.5 ** (li + it / DROP_HALF_LIFE)
            for group in opt.param_groups:
                group["lr"] = lr * max(0.1, 0.5 ** (it / LR_HALF_LIFE))
            v_eff = grid * free_t[:, None, None, None] + held
            # global-only warm-up at the coarsest level: the grid must not absorb large moves
            if refine_global and li == 0 and it < total // 3:
                v_eff = held
            if moving is None:
                p = residual_points(global_maps(glob), v_eff, q, interp)
                sampled, inside = warp.sample(feats, p, kf, padding_mode="border")
            else:
                p = residual_points(fixed_mats[moving], v_eff[moving], q, interp)
                s_m, in_m = warp.sample(feats[moving], p, kf, padding_mode="border")
            data = 0.0
            norm_w = 0.0
            if moving is not None:
                data, norm_w = few.data(s_m[:, :nfeat], in_m & (s_m[:, nfeat] > 0.99), pairs,
                                        drop, it % 5 == 0, thresholds)
                pairs_here = []
            else:
                ok = inside & (sampled[:, nfeat] > 0.99)
                fw = sampled[:, :nfeat]
                if not all_usable:  # one gather, then neighbour pairs are plain slices
                    fw, ok = fw[use_idx], ok[use_idx]
                pairs_here = pairs
            for pi, (d, wgt) in enumerate(pairs_here):
                err = ((fw[:-d] - fw[d:]) ** 2).sum(dim=1) / n_orig
                # loss drop: ignore the worst pixels (quantile refreshed every 5 steps)
                m = _drop_worst(err, ok[:-d] & ok[d:], drop, thresholds, pi, it % 5 == 0)
                data = data + wgt * _row_means(err, m).sum()
                norm_w += wgt * err.shape[0]
            data = data / max(norm_w, 1e-9)
            nfree = free_t.sum().clamp(min=1.0)
            # the mean and the linear part are weighted apart: a scale the rigid
            # pre-alignment leaves is about 10 px at the border of a 512 px section, which
            # the full magnitude penalty held to about 1 %, and the pre-alignment's shift
            # errors were held as firmly as tissue distortion (docs/benchmarks.md)
            v_pen = (v_eff if params.linear_penalty == params.shift_penalty == 1.0
                     else _scale_parts(v_eff, math.sqrt(params.shift_penalty),
                                       math.sqrt(params.linear_penalty), basis))
            reg_mag = (v_pen ** 2).sum() / (nfree * v_eff[0].numel())
            dy = v_pen[:, :, 1:, :] - v_pen[:, :, :-1, :]
            dx = v_pen[:, :, :, 1:] - v_pen[:, :, :, :-1]
            reg_grad = ((dy ** 2).sum() + (dx ** 2).sum()) / (nfree * v_eff[0].numel())
            loss = (data + MAGNITUDE_UNIT * params.magnitude_penalty * reg_mag
                    + SMOOTHNESS_UNIT * params.smoothness * reg_grad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if should_stop is not None:  # an iteration at full size can take a second or more
                should_stop()
            opt.step()
            if it % 10 in (0, 9):  # reading the loss waits for a GPU: not every iteration
                shown_loss, loss_it = float(data.detach()), it + 1
            # the iteration the loss is of: a level that ended at "iteration 10" showed the
            # first iteration's loss, as if the fit had done nothing
            yield Progress(f"fit level {li + 1}/{levels}", it + 1, total,
                           f"iteration {it + 1}, loss {shown_loss:.4f}"
                           + ("" if loss_it == it + 1 else f" (at {loss_it})"))
            if it % 10 == 9:
                # mean movement: nodes over featureless areas drift slowly and barely matter
                moved = float(torch.stack([(glob.detach() - snapshot[0]).abs().mean(),
                                           (grid.detach() - snapshot[1]).abs().mean()]).max())
                snapshot = (glob.detach().clone(), grid.detach().clone())
                if drop <= 0.01 and moved < params.tolerance * k:
                    # a bar following the steps ends full, not at it / total
                    yield Progress(f"fit level {li + 1}/{levels}", total, total,
                                   f"settled after {it + 1} iterations")
                    break
    return Residual(mats=global_maps(glob.detach()),
                    grid=(grid * free_t[:, None, None, None] + held).detach(), size=size)


def full_displacement(residual: Residual, matrices: np.ndarray, z: int,
                      size: tuple[int, int], *, device) -> torch.Tensor:
    """Whole backward displacement of section z at full resolution.

    Returns
    -------
    Tensor, shape (2, H, W), (dy, dx)
    """
    h, w = size
    q = warp.level_points(h, w, device=device)
    with torch.no_grad():
        r = residual.points(z, q)
        m = torch.from_numpy(matrices[z:z + 1]).float().to(device)
        p = warp.apply_matrix(m, r)[0]
    return (p - q).permute(2, 0, 1).contiguous()
