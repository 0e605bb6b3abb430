"""Regenerate the shipped sample crop ``src/napari_ssemnet/data/isbi2012_crop_8x320x320.tif``.

Sections 0-7 of the ISBI 2012 training volume (real, already aligned ssTEM of Drosophila
first-instar larva VNC), the central 320 x 320 pixels, uint8, zlib-compressed TIFF.
See ``src/napari_ssemnet/data/README.md`` for the attribution and licence.

Usage (from the repository root)::

    python benchmarks/make_sample_crop.py \
        [--source ../shared/data/isbi2012_train_volume_30x512x512.tif]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "isbi2012_train_volume_30x512x512.tif"
TARGET = ROOT / "src" / "napari_ssemnet" / "data" / "isbi2012_crop_8x320x320.tif"
SECTIONS = slice(0, 8)  # neighbouring pairs here correlate at 0.19-0.35 (no big jumps)
SIZE = 320


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=SOURCE)
    ap.add_argument("-o", "--output", type=Path, default=TARGET)
    args = ap.parse_args()
    vol = tifffile.imread(args.source)
    assert vol.shape == (30, 512, 512) and vol.dtype == np.uint8, vol.shape
    y0 = (vol.shape[1] - SIZE) // 2
    x0 = (vol.shape[2] - SIZE) // 2
    crop = np.ascontiguousarray(vol[SECTIONS, y0:y0 + SIZE, x0:x0 + SIZE])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # zlib level 9 with the horizontal-differencing predictor (650 KB instead of 757 KB;
    # tifffile decodes both without imagecodecs); no metadata or timestamp so the file and
    # its sha256 are reproducible
    tifffile.imwrite(args.output, crop, photometric="minisblack", compression="zlib",
                     compressionargs={"level": 9}, predictor=True, metadata=None,
                     software=False, datetime=False)
    digest = hashlib.sha256(args.output.read_bytes()).hexdigest()
    print(f"{args.output}: shape {crop.shape} {crop.dtype}, {args.output.stat().st_size} bytes")
    print(f"sha256 {digest}")


if __name__ == "__main__":
    main()
