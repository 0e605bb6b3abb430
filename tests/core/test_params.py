"""core.params: AlignParams validation and JSON round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_ssemnet.core import SsemnetError
from napari_ssemnet.core.params import AlignParams, ParameterError, knobs


def test_defaults_validate_and_round_trip_json():
    p = AlignParams()
    p.validate()
    assert AlignParams.from_json(p.to_json()) == p
    q = p.replace(grid_spacing=32, prealign="affine", smoothness=2.5, weights="w.pt",
                  features="custom")
    back = AlignParams.from_json(q.to_json())
    assert back == q and back.grid_spacing == 32 and back.features == "custom"
    assert AlignParams.from_dict(q.to_dict()) == q


def test_knobs_cover_every_field_with_help():
    names = [f.name for f in knobs()]
    assert names == [f.name for f in dataclasses.fields(AlignParams)]
    for f in knobs():
        assert f.metadata["help"], f.name
        if f.metadata.get("choices"):
            assert f.default in f.metadata["choices"]


def test_int_for_float_is_accepted():
    p = AlignParams(smoothness=2)
    assert p.smoothness == 2.0 and isinstance(p.smoothness, float)
    # and a whole float for an int (JSON written by other tools)
    p = AlignParams.from_json('{"grid_spacing": 32.0}')
    assert p.grid_spacing == 32 and isinstance(p.grid_spacing, int)


FLOAT_KNOBS = [f.name for f in dataclasses.fields(AlignParams) if isinstance(f.default, float)]


@pytest.mark.parametrize("name", FLOAT_KNOBS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_floats_are_refused(name, value):
    # NaN passed the range checks and then crashed the fit (segfault)
    with pytest.raises(ParameterError, match=name):
        AlignParams().replace(**{name: value})


def test_nan_in_json_is_refused():
    with pytest.raises(ParameterError, match="smoothness.*finite"):
        AlignParams.from_json('{"smoothness": NaN}')


@pytest.mark.parametrize("changes, name", [
    ({"grid_spacing": -8}, "grid_spacing"),
    ({"grid_spacing": 1}, "grid_spacing"),
    ({"prealign": "similarity"}, "prealign"),
    ({"features": "custom"}, "weights"),
    ({"iterations": 1.5}, "iterations"),
    ({"levels": True}, "levels"),
    ({"loss_drop": 0.95}, "loss_drop"),
    ({"device": "tpu"}, "device"),
    ({"window": "2"}, "window"),
])
def test_bad_values_name_the_field(changes, name):
    with pytest.raises(ParameterError, match=name):
        AlignParams().replace(**changes)
    with pytest.raises(ParameterError, match=name):
        AlignParams(**changes)


def test_unknown_key_in_replace_and_from_json():
    with pytest.raises(ParameterError, match=r"gridspacing \(did you mean grid_spacing\?\)"):
        AlignParams().replace(gridspacing=32)
    with pytest.raises(ParameterError, match="bogus"):
        AlignParams.from_json('{"bogus": 1}')


def test_parameter_error_is_a_value_error_and_one_of_ours():
    assert issubclass(ParameterError, ValueError) and issubclass(ParameterError, SsemnetError)


def test_numpy_scalars_are_taken_as_plain_numbers():
    # e.g. reference=np.argmax(result.ncc_after)
    p = AlignParams(reference=np.int64(2), smoothness=np.float32(0.5), iterations=np.uint16(40),
                    grid_spacing=np.float64(32.0))
    assert (p.reference, p.smoothness, p.iterations, p.grid_spacing) == (2, 0.5, 40, 32)
    assert all(type(getattr(p, n)) in (int, float) for n in ("reference", "smoothness",
                                                              "iterations", "grid_spacing"))
    assert AlignParams.from_json(p.to_json()) == p  # plain types serialise
    for bad in ({"grid_spacing": np.float64(32.5)}, {"reference": np.bool_(True)},
                {"smoothness": 10**400}):
        with pytest.raises(ParameterError, match=next(iter(bad))):
            AlignParams(**bad)


@pytest.mark.parametrize("text", ["[1]", "null", "{bad", "3"])
def test_json_that_is_not_an_object_of_parameters_is_refused(text):
    with pytest.raises(ParameterError, match="JSON|mapping"):
        AlignParams.from_json(text)


def test_params_with_a_numpy_scalar_set_later_still_serialise():
    p = AlignParams()
    p.reference = np.int64(1)  # to_json raised "int64 is not JSON serializable"
    assert AlignParams.from_json(p.to_json()).reference == 1
