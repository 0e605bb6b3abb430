"""The shipped sample: a small crop of real ssTEM with a known, deterministic misalignment.

The crop is sections 0-7, central 320 x 320 px, of the ISBI 2012 EM segmentation challenge
training volume (Cardona et al. 2010; Arganda-Carreras et al. 2015), for non-commercial
research and software testing; see ``napari_ssemnet/data/README.md``.

The misaligned version keeps the full 320 x 320 frame: pixels that the misalignment pulls
in from outside a section are filled with that section's median grey (as a microscope's
empty background would look flat). Keeping the frame means the truth fields apply directly:
``load_sample(True)[z](p) == load_sample(False)[z](p + e[z](p))`` (before rounding) with
``e = load_sample_truth()``.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

SAMPLE_FILE = "isbi2012_crop_8x320x320.tif"
SAMPLE_SHAPE = (8, 320, 320)

# The known misalignment (reference section 0 stays put).
MISALIGNMENT = {"rotation_deg": 3.0, "shift_frac": 0.05, "scale": 0.01, "shear": 0.01,
                "elastic_px": 1.5, "reference": 0}
INTENSITY_JITTER = {"gain_jitter": 0.08, "offset_jitter": 0.02}
# (Z, Y, X) in nm: the ISBI 2012 volume's section thickness and pixel size, as its
# publishers give them ("about 4 x 4 x 50 nm"); the TIFF itself carries no pixel size
SAMPLE_VOXEL_NM = (50.0, 4.0, 4.0)


def sample_resolution() -> dict:
    """The sample's pixel size and section spacing in :func:`core.io.read_resolution`'s
    form, so that an aligned sample is written with them."""
    spacing, y, x = SAMPLE_VOXEL_NM
    return {"resolution": (1.0 / x, 1.0 / y), "resolutionunit": 1, "spacing": spacing,
            "unit": "nm"}


def sample_path() -> Path:
    """Path of the shipped sample TIFF inside the installed package."""
    return Path(str(resources.files("napari_ssemnet") / "data" / SAMPLE_FILE))


@lru_cache(maxsize=1)
def _clean() -> np.ndarray:
    import tifffile

    arr = tifffile.imread(sample_path())
    arr.setflags(write=False)  # the cached copy is shared; callers get copies
    return arr


def load_sample_truth(seed: int = 0) -> np.ndarray:
    """The known misalignment applied by ``load_sample(misaligned=True, seed=seed)``.

    Returns
    -------
    e : ndarray, shape (Z, 2, H, W), float32
        Backward fields (dy, dx) in pixels: ``misaligned[z](p) = clean[z](p + e[z](p))``.
        ``e[0]`` is zero. The alignment that undoes it maps the misaligned stack back onto
        the clean one (up to the real apparent motion between neighbouring sections).
    """
    from .synth import random_misalignment

    return random_misalignment(SAMPLE_SHAPE, seed=seed, **MISALIGNMENT)


def load_sample(misaligned: bool = True, *, seed: int = 0) -> np.ndarray:
    """A small real EM stack, optionally with a known misalignment.

    Parameters
    ----------
    misaligned : bool
        False: the untouched (already aligned) crop. True: each section except 0 rotated
        (up to 3 deg), shifted (up to 5 % = 16 px), scaled and sheared (up to 1 %), bent
        elastically (1.5 px) and with its gain changed by up to 8 %, deterministically for
        a given ``seed`` (see :func:`load_sample_truth`).
    seed : int

    Returns
    -------
    ndarray, shape (8, 320, 320), uint8
        A new array each call.
    """
    clean = _clean()
    if not misaligned:
        return clean.copy()
    from .synth import apply_misalignment

    fields = load_sample_truth(seed)
    out = apply_misalignment(clean, fields, seed=seed, **INTENSITY_JITTER)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
