"""npe2 sample data: a small real EM stack with a known misalignment."""

from __future__ import annotations

from typing import Any


def em_misaligned() -> list[tuple[Any, dict[str, Any], str]]:
    """ISBI 2012 EM crop with a known synthetic misalignment (see ``data/README.md``)."""
    from .core.sample import SAMPLE_VOXEL_NM, load_sample

    stack = load_sample(misaligned=True)
    return [(stack, {"name": "EM stack (misaligned)", "colormap": "gray",
                     "scale": SAMPLE_VOXEL_NM, "units": ("nm", "nm", "nm"),
                     "metadata": {"source": "ISBI 2012 EM segmentation challenge, with a "
                                            "known misalignment added by napari-ssemnet"}},
             "image")]
