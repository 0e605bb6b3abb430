"""The npe2 manifest: valid, and every contribution resolves."""

from __future__ import annotations

import importlib
import sys

import numpy as np
from npe2 import PluginManifest


def test_manifest_validates_and_commands_import():
    mf = PluginManifest.from_distribution("napari-ssemnet")
    assert mf.name == "napari-ssemnet"
    widgets = {w.display_name for w in mf.contributions.widgets}
    assert {"Align EM stack", "Apply saved fields"} <= widgets
    for cmd in mf.contributions.commands:
        module, attr = cmd.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), cmd.id
    assert [s.display_name for s in mf.contributions.sample_data] == [
        "EM stack with known misalignment"]
    readers = mf.contributions.readers
    assert [(r.command, r.filename_patterns) for r in readers] == [
        ("napari-ssemnet.get_fields_reader", ["*.npz", "*.NPZ"])]


def test_widget_module_does_not_import_torch():
    code = ("import sys, napari_ssemnet._widget, napari_ssemnet._layers, "
            "napari_ssemnet._writer, napari_ssemnet._reader, napari_ssemnet._sample_data; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)


def test_sample_data(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-ssemnet", "em_misaligned")
    assert len(layers) == 1
    data = np.asarray(layers[0].data)
    assert data.ndim == 3 and data.shape[0] >= 2 and data.dtype == np.uint8
    from napari_ssemnet.core.sample import load_sample

    np.testing.assert_array_equal(data, load_sample(misaligned=True))
    assert not np.array_equal(data, load_sample(misaligned=False))
    # ISBI's voxel size, so that a scale bar and the 3D view are true
    assert tuple(layers[0].scale) == (50.0, 4.0, 4.0)
    assert [str(u) for u in layers[0].units] == ["nanometer"] * 3
