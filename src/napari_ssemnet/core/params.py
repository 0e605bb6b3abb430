"""Alignment parameters: the one place every tuning knob is declared.

The CLI options and the dock widget controls are generated from the field
metadata below, so the three front ends (Python API, CLI, widget) always share
names, defaults, limits and help texts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from .errors import SsemnetError

PREALIGN_KINDS = ("none", "translation", "rigid", "affine")
FEATURE_KINDS = ("shipped", "pixels", "custom")
DEVICES = ("auto", "cpu", "cuda")
TRAIN_STEPS = 1500
"""Default Adam steps of encoder training (here so front ends can read it without torch)."""


def _knob(default: Any, help: str, *, minimum=None, maximum=None, choices=None, step=None,
          label: str | None = None, advanced: bool = False):
    meta = {"help": help, "min": minimum, "max": maximum, "choices": choices, "step": step,
            "label": label, "advanced": advanced}
    return field(default=default, metadata=meta)


class ParameterError(SsemnetError, ValueError):
    """A parameter value is out of range or of the wrong kind."""


@dataclass
class AlignParams:
    """Every tuning knob of :func:`napari_ssemnet.core.align.align_stack`.

    Serialises to JSON with :meth:`to_json` / :meth:`from_json`. Field metadata
    (``help``, ``min``, ``max``, ``choices``) drives the CLI and the widget.
    """

    reference: int = _knob(
        0, "Index of the section that stays fixed; every other section is moved onto it. "
           "Pick a clean, well-centred section.", minimum=0, label="reference section")
    prealign: str = _knob(
        "rigid", "Global pre-alignment before the deformable stage: none, translation, rigid "
                 "(rotation + shift) or affine (adds scale and shear). Use affine when sections "
                 "are stretched or compressed by cutting or were imaged at more than one "
                 "magnification (several sessions): rigid cannot follow a magnification step "
                 "and nothing warns of one; none if the stack is already roughly aligned.",
        choices=PREALIGN_KINDS, label="pre-alignment")
    grid_spacing: int = _knob(
        64, "Spacing in pixels between control points of the deformation grid. Smaller "
            "follows more local distortion (folds, cracks) but risks warping real tissue; "
            "larger is stiffer.", minimum=8, maximum=4096, step=8, label="grid spacing (px)")
    smoothness: float = _knob(
        1.0, "How strongly neighbouring points of the deformation grid are held to move "
             "alike (the penalty on its gradient), relative to the default. Raise it (e.g. "
             "3-10) if the aligned tissue looks bent or squeezed or neighbours look "
             "suspiciously identical; lower it (0.1-0.3) if local distortions remain.",
        minimum=0.0, maximum=1e4, step=0.1)
    magnitude_penalty: float = _knob(
        1.0, "How strongly the deformable correction is held towards zero (the penalty on "
             "its squared size), relative to the default (the global pre-alignment is not "
             "penalised). Raise it to keep the deformable correction small.",
        minimum=0.0, maximum=1e4, step=0.1, label="magnitude penalty")
    linear_penalty: float = _knob(
        0.1, "How strongly both penalties act on the linear part of the deformable "
             "correction (a scale, shear or rotation across the whole section that the "
             "pre-alignment left), as a fraction of their weight on the rest. 0.1 lets the "
             "fit take up the scale differences a rigid pre-alignment leaves (section "
             "compression); 1 weighs it like the rest, as napari-ssemnet did before this "
             "parameter existed.",
        minimum=0.0, maximum=1.0, step=0.05, label="linear part penalty", advanced=True)
    shift_penalty: float = _knob(
        0.3, "How strongly the magnitude penalty holds the mean of the deformable correction "
             "(a shift of the whole section that the pre-alignment left), as a fraction of "
             "its weight on the rest. Lower lets the fit correct the pre-alignment's shift "
             "more freely; near 0 the sections drift along the stack; 1 weighs it like the "
             "rest, as napari-ssemnet did before this parameter existed.",
        minimum=0.0, maximum=1.0, step=0.05, label="shift penalty", advanced=True)
    window: int = _knob(
        2, "How many neighbour sections on each side each section is matched to. 2 averages "
           "out the real differences between adjacent sections; 1 is closest to the paper.",
        minimum=1, maximum=8, label="neighbour window")
    neighbour_decay: float = _knob(
        0.5, "Each neighbour further away counts this fraction of the one before it (a "
             "neighbour d sections away: decay to the power d-1). Lower values trust the "
             "nearest section more.",
        minimum=0.0, maximum=1.0, step=0.05, label="neighbour decay")
    iterations: int = _knob(
        150, "Most Adam iterations at the coarsest pyramid level; each finer level gets half "
             "as many, and every level at least 10. A level can stop earlier once the fit has "
             "settled (see tolerance).",
        minimum=1, maximum=10000, label="iterations")
    levels: int = _knob(
        4, "Pyramid levels (coarse to fine). Each level halves the resolution of the one "
           "above; levels under 32 px are skipped. Fewer levels spend more iterations at "
           "full resolution (2: about 1.5-2x slower than 4); 4 was the best trade of "
           "consistency and speed on real ssTEM.",
        minimum=1, maximum=6, label="pyramid levels")
    fit_binning: int = _knob(
        1, "Fit the deformation on sections binned by this factor, then apply it at full "
           "resolution. For large sections (2048 px and up) 2 or 4 fit on 4x or 16x fewer "
           "pixels (measured at 8 x 2048^2: 4.6x or about 10x less time; a whole "
           "16 x 1024^2 run added 2.3x or about 3x less memory); detail finer than that "
           "many pixels is no longer fitted (the grid spacing stays as set). 1 fits at full "
           "resolution.",
        minimum=1, maximum=8, label="fit binning", advanced=True)
    block_size: int = _knob(
        0, "Align at most this many sections at a time instead of the whole stack in one "
           "joint fit (0). Each block is fitted jointly and held onto the already aligned "
           "sections it overlaps (the last 'window' of them), so the memory of the fit grows "
           "with the block, not the stack; the command line then also streams the result "
           "to disk. For stacks that do not fit in memory; must be at least window + 2.",
        minimum=0, maximum=100000, label="block size (sections)", advanced=True)
    learning_rate: float = _knob(
        0.1, "Adam step size, in pixels of the current pyramid level per iteration, at the "
              "start of each level; it halves every 40 iterations down to a tenth, so that "
              "the fit settles. Lower it if the fit oscillates, raise it if it creeps.",
        minimum=1e-4, maximum=10.0, step=0.01, label="learning rate")
    loss_drop: float = _knob(
        0.5, "Fraction of the highest-error pixels ignored at the start of the fit (the "
             "paper's loss drop); it halves every 15 iterations, and each finer level starts "
             "at half the one before. Keeps dust and folds from pulling the fit.",
        minimum=0.0, maximum=0.9, step=0.05, label="loss drop")
    features: str = _knob(
        "shipped", "What is matched: features of the shipped encoder (a convolutional "
                   "autoencoder trained on ssTEM), 'custom' encoder weights from the weights "
                   "file (e.g. trained on this stack), or raw 'pixels'.",
        choices=FEATURE_KINDS, label="feature model")
    weights: str = _knob(
        "", "Path of an encoder weights file, used when the feature model is 'custom'.",
        label="weights file")
    max_rotation: float = _knob(
        12.0, "Largest rotation in degrees between adjacent sections searched by the "
              "pre-alignment.", minimum=0.0, maximum=45.0, step=1.0, label="max rotation (deg)",
        advanced=True)
    tolerance: float = _knob(
        0.02, "Early stop: a pyramid level ends once the parameters moved on average less than "
              "this many pixels (of that level) over the last 10 iterations. It is checked only "
              "once the loss drop has faded below 1 %: with the default loss drop of 0.5 after "
              "about 90 iterations of the first level, so the finer levels run their full "
              "share (with loss drop 0, from the 10th iteration on).", minimum=0.0,
        maximum=10.0, step=0.01, advanced=True)
    device: str = _knob(
        "auto", "Where to compute: auto picks CUDA when available, else the CPU.",
        choices=DEVICES)
    seed: int = _knob(
        0, "Random seed. No step of the alignment draws random numbers at present, so the "
           "result does not depend on it: the same input and parameters on the same device "
           "with the same number of CPU threads give the same result. Recorded with the "
           "parameters.",
        minimum=0, maximum=2**31 - 1, advanced=True)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ParameterError` with a readable message for bad values."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            expected = type(f.default)
            value = _plain(value, expected)
            if value is not getattr(self, f.name):
                setattr(self, f.name, value)
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ParameterError(
                    f"Parameter '{f.name}' must be {expected.__name__}, got {value!r}.")
            if expected is float and not math.isfinite(value):
                # NaN passes every range check below and then crashed the fit
                raise ParameterError(f"Parameter '{f.name}' must be a finite number; "
                                     f"got {value}.")
            if meta.get("choices") and value not in meta["choices"]:
                raise ParameterError(
                    f"Parameter '{f.name}' must be one of {', '.join(meta['choices'])}; "
                    f"got {value!r}.")
            if meta.get("min") is not None and value < meta["min"]:
                raise ParameterError(
                    f"Parameter '{f.name}' must be at least {meta['min']}; got {value}.")
            if meta.get("max") is not None and value > meta["max"]:
                raise ParameterError(
                    f"Parameter '{f.name}' must be at most {meta['max']}; got {value}.")
        if 0 < self.block_size < self.window + 2:
            raise ParameterError(
                f"Parameter 'block_size' must be 0 (whole stack) or at least window + 2 = "
                f"{self.window + 2}; got {self.block_size}.")
        if self.features == "custom" and not self.weights:
            raise ParameterError("features='custom' needs a weights file (parameter 'weights').")

    def replace(self, **changes: Any) -> AlignParams:
        """Return a copy with some fields changed (unknown names raise ParameterError)."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(
                u, names, n=1)) else u for u in unknown]
            raise ParameterError(f"Unknown parameter(s): {', '.join(hints)}.")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        # a numpy scalar set on a field after construction broke to_json
        return {k: v.item() if hasattr(v, "item") else v
                for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlignParams:
        """Parameters from a mapping of names to values (missing ones keep their default).

        Raises
        ------
        ParameterError
            Not a mapping, an unknown name, or a bad value.
        """
        if not isinstance(data, dict):
            raise ParameterError(f"Parameters must be a mapping of names to values; got "
                                 f"{type(data).__name__}.")
        return cls().replace(**data)

    @classmethod
    def from_json(cls, text: str) -> AlignParams:
        """Parameters from :meth:`to_json`'s text (a JSON object).

        Raises
        ------
        ParameterError
            Not JSON, not a JSON object, an unknown name, or a bad value.
        """
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ParameterError(f"The parameters are not valid JSON ({exc}).") from None
        return cls.from_dict(data)


def _plain(value: Any, expected: type) -> Any:
    """``value`` as the plain Python type of its field where that loses nothing: numpy
    scalars (``np.int64(1)``, ``np.float32(0.5)``), ints for floats and whole floats for ints
    (``32.0`` from a JSON file written elsewhere). Anything else is returned unchanged."""
    if isinstance(value, bool | str) or not isinstance(value, numbers.Real):
        return value
    if expected is float:
        try:
            return float(value)
        except OverflowError:  # 10**400: the range check reports it
            return math.inf if value > 0 else -math.inf
    if expected is int:
        if isinstance(value, numbers.Integral):
            return int(value)
        f = float(value)
        if f.is_integer():
            return int(f)
    return value


ADDED_LATER: dict[str, Any] = {"linear_penalty": 1.0, "shift_penalty": 1.0}
"""Parameters added after the first release, with the value that gives the fit of the
records written before them (which do not name them)."""


def knobs() -> list[dataclasses.Field]:
    """The fields of :class:`AlignParams`, in declaration order (for front ends)."""
    return list(dataclasses.fields(AlignParams))
