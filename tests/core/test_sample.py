"""core.sample: the shipped real EM crop and its known misalignment."""

from __future__ import annotations

import numpy as np

from napari_ssemnet.core import warp
from napari_ssemnet.core.sample import load_sample, load_sample_truth, sample_path


def test_sample_file_is_shipped():
    assert sample_path().is_file()
    assert sample_path().stat().st_size < 1_000_000


def test_load_sample_shape_dtype_and_determinism():
    clean = load_sample(misaligned=False)
    mis = load_sample()
    assert clean.shape == mis.shape == (8, 320, 320)
    assert clean.dtype == mis.dtype == np.uint8
    np.testing.assert_array_equal(mis, load_sample())  # deterministic
    # the reference section is not moved (only its gain/offset jitter)
    assert np.corrcoef(mis[0].ravel(), clean[0].ravel())[0, 1] > 0.999
    for z in range(1, 8):
        assert np.abs(mis[z].astype(int) - clean[z]).mean() > 5
    assert not np.array_equal(load_sample(seed=1), mis)
    clean[0] = 0  # callers get their own copy
    assert load_sample(misaligned=False)[0].any()


def test_truth_fields_reproduce_the_misaligned_sample():
    import torch

    clean = load_sample(misaligned=False).astype(np.float32)
    mis = load_sample().astype(np.float32)
    e = load_sample_truth()
    assert e.shape == (8, 2, 320, 320) and e.dtype == np.float32
    assert (e[0] == 0).all()
    mags = np.hypot(e[:, 0], e[:, 1]).reshape(8, -1).max(axis=1)
    assert (mags[1:] > 3).all() and (mags < 40).all()
    for z in (1, 5):
        warped, ok = warp.warp_image(torch.from_numpy(clean[z]), torch.from_numpy(e[z]))
        ok = ok.numpy()
        # equal up to the gain jitter (<= 8 %, offset <= 2 % of range): correlation ~1
        r = np.corrcoef(warped.numpy()[ok], mis[z][ok])[0, 1]
        assert r > 0.99, r
