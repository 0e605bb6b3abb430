"""core.fit: per-level feature preparation (the fit itself is tested through align_stack)."""

from __future__ import annotations

import numpy as np
import torch
from emtools import em, interior

from napari_ssemnet.core.features import load_weights, shipped_weights_path
from napari_ssemnet.core.fit import FEATURE_BLUR, level_features
from napari_ssemnet.core.prealign import gaussian_blur


def _batched_reference(model, images, valid, usable, keep):
    """The same preparation written on whole batches, as the fit did before it went section
    by section."""
    with torch.no_grad():
        feats = model.encode(images)
    hf, wf = feats.shape[-2:]
    val_f = (torch.nn.functional.adaptive_avg_pool2d(valid, (hf, wf)) > 0.999).float()
    sel = torch.from_numpy(usable)
    wsum = val_f[sel].sum()
    mean = (feats[sel] * val_f[sel]).sum(dim=(0, 2, 3)) / wsum
    var = (((feats[sel] - mean[None, :, None, None]) ** 2) * val_f[sel]).sum(dim=(0, 2, 3)) / wsum
    feats = (feats - mean[None, :, None, None]) / var.sqrt()[None, :, None, None]
    feats = gaussian_blur(feats, FEATURE_BLUR)
    c = feats.shape[1]
    x = feats[sel].permute(1, 0, 2, 3).reshape(c, -1)
    m = val_f[sel].reshape(-1) > 0.5
    x = x[:, m][:, :: max(1, int(m.sum()) // 200_000)]
    _, vecs = torch.linalg.eigh(x @ x.T / x.shape[1])
    basis = vecs[:, -keep:].T
    return torch.cat([torch.einsum("kc,zchw->zkhw", basis, feats), val_f], dim=1)


def test_level_features_match_the_batched_computation():
    model = load_weights(shipped_weights_path())
    raw = em(slice(0, 4), 96)
    raw = raw.astype(np.float32)
    images = torch.from_numpy((raw - raw.mean()) / raw.std())[:, None]
    valid = torch.ones_like(images)
    valid[1, :, :30, :] = 0  # a section partly outside, as after a pre-alignment
    usable = np.array([True, True, False, True])  # a blank section stays out of the statistics
    feats, n_orig, kf = level_features(model, images, valid, usable, keep=5)
    ref = _batched_reference(model, images, valid, usable, keep=5)
    assert feats.shape == (4, 6, 48, 48) and n_orig == 16 and kf == 2.0
    assert torch.equal(feats[:, 5], ref[:, 5])
    # principal components are defined up to sign
    for k in range(5):
        a, b = feats[:, k], ref[:, k]
        sign = float(torch.sign((a * b).sum()))
        assert float((a - sign * b).abs().max()) < 1e-3 * float(b.abs().max())


def test_an_encoder_is_copied_to_the_device_of_the_sections_not_moved():
    # the shipped weights load on the CPU; on a GPU the first convolution failed
    from napari_ssemnet.core.features import CAE
    from napari_ssemnet.core.fit import on_device

    model = CAE()
    assert on_device(model, "cpu") is model
    moved = on_device(model, "meta")
    assert moved is not model and next(moved.parameters()).device.type == "meta"
    assert next(model.parameters()).device.type == "cpu"


def test_the_first_optimiser_is_built_once_in_the_background():
    # building the first Adam of a process imports torch._dynamo (1.2 s here), which no
    # stop request can interrupt; a run starts it in a thread as it begins
    from napari_ssemnet.core import fit

    fit.warm_up_optimiser()
    fit.warm_up_optimiser()
    assert len(fit._WARMING) == 1
    fit._WARMING[0].join(timeout=60)
    assert not fit._WARMING[0].is_alive()


def test_the_feature_stride_is_the_encoders_also_for_odd_sides():
    # 65 / 33 = 1.97 scaled the fit's coordinates and it found 5.90 px of a 6 px shift
    from napari_ssemnet.core.features import PixelFeatures

    images = torch.zeros(2, 1, 97, 65)
    valid = torch.ones_like(images)
    usable = np.array([True, True])
    for model in (load_weights(shipped_weights_path()), PixelFeatures()):
        feats, _, kf = level_features(model, images, valid, usable)
        assert feats.shape[-2:] == (49, 33) and kf == 2.0


def test_an_odd_width_finds_the_shift_that_the_even_width_finds():
    from napari_ssemnet import align_stack

    big = em(0, 200).astype(np.float32)

    def shift_found(w: int) -> np.ndarray:
        pair = np.stack([big[60:124, 60:60 + w], big[66:130, 66:66 + w]])  # moved (6, 6)
        r = align_stack(pair, prealign="none", iterations=150, levels=2, device="cpu",
                        features="pixels")
        return np.median(r.displacement[1][:, 8:-8, 8:-8], axis=(1, 2))

    # measured: within 0.015 px of each other (also 96 / 97); 0.05-0.06 px before the fix
    # (65 / 33 as the stride), all of it towards a smaller shift
    even = shift_found(64)
    assert np.abs(shift_found(65) - even).max() < 0.03
    # and it is the shift: section 1 shows the content 6 px further on, so aligning it
    # samples it 6 px back (measured -5.96 / -5.89 px)
    assert np.abs(even + 6.0).max() < 0.3, even


def test_sampling_the_held_sections_once_gives_the_plain_loops_result(monkeypatch):
    from emtools import FAST

    from napari_ssemnet.core import fit
    from napari_ssemnet.core.align import align_section, align_stack

    stack = em(slice(0, 8), 128)
    fast = {**FAST, "features": "shipped", "prealign": "rigid", "levels": 2, "iterations": 30}

    def runs():
        full = align_stack(stack[:5], reference=2, **fast)  # the reference is held
        # one free section of five (its pairs built row by row), long enough for the loss
        # drop to end (about 85 steps), and without a loss drop at all
        one = align_section(stack[:5], 3, previous_displacement=full.displacement,
                            reference=2, **{**fast, "iterations": 120})
        no_drop = align_section(stack[:5], 1, previous_displacement=full.displacement,
                                reference=2, **{**fast, "loss_drop": 0.0})
        # later blocks hold the sections of earlier ones with their grids
        blocks = align_stack(stack, block_size=4, **fast)
        return (full.displacement, one.displacement, no_drop.displacement,
                blocks.displacement)

    once = runs()
    monkeypatch.setattr(fit, "SAMPLE_HELD_ONCE", False)
    plain = runs()
    for a, b in zip(once, plain, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-3)
        assert np.abs(b).max() > 0.5  # the fit moved something: the comparison means something


def test_the_mean_and_the_linear_part_of_a_grid_are_scaled_apart():
    from napari_ssemnet.core.fit import _scale_parts

    gh, gw = 5, 7
    y = torch.linspace(-1, 1, gh)[:, None].expand(gh, gw)
    x = torch.linspace(-1, 1, gw)[None, :].expand(gh, gw)
    const = torch.tensor([1.5, -2.0])[:, None, None]
    linear = torch.stack([0.8 * y - 0.3 * x, 0.2 * y + 1.1 * x])
    bump = torch.stack([y ** 2, x ** 2 * y ** 2])  # even in y and x, and without a mean:
    bump = bump - bump.mean((-2, -1), keepdim=True)
    v = (const + linear + bump)[None]
    torch.testing.assert_close(_scale_parts(v, 1.0, 1.0), v)
    torch.testing.assert_close(_scale_parts(v, 1.0, 0.0), (const + bump)[None])
    torch.testing.assert_close(_scale_parts(v, 1.0, 0.5), (const + 0.5 * linear + bump)[None])
    torch.testing.assert_close(_scale_parts(v, 0.2, 0.5),
                               (0.2 * const + 0.5 * linear + bump)[None])


def test_a_scale_the_rigid_prealignment_leaves_is_taken_up():
    from napari_ssemnet import align_stack
    from napari_ssemnet.core import warp
    from napari_ssemnet.core.synth import apply_misalignment

    h = w = 256
    sec = em([0, 0], h).astype(np.float32)  # one section twice: no tissue change
    pts = warp.level_points(h, w)
    c = torch.tensor([(h - 1) / 2.0, (w - 1) / 2.0])
    scale = torch.tensor([1.05, 0.96])  # a section compressed by the knife, 5 % / 4 %
    e = np.zeros((2, 2, h, w), np.float32)
    e[1] = ((pts - c) * scale + c - pts).permute(2, 0, 1).numpy()
    stack = apply_misalignment(sec, e)

    def error(**params) -> np.ndarray:
        r = align_stack(stack, device="cpu", **params)
        d = r.displacement[1]
        q = pts.permute(2, 0, 1).numpy() + d
        # undone where d(q) + e(q + d(q)) = 0, e being linear
        left = d + (scale.numpy() - 1)[:, None, None] * (q - c.numpy()[:, None, None])
        return np.hypot(*left)[interior(r.valid[1], 24)]

    # measured: 0.14 / 0.25 px (median / p95) by default, 0.94 / 3.10 px with the linear
    # part held like the rest of the correction (as the fit did before linear_penalty)
    now, before = error(), error(linear_penalty=1.0)
    assert np.median(now) < 0.4 and np.percentile(now, 95) < 1.0, np.median(now)
    assert np.median(before) > 0.6, np.median(before)
