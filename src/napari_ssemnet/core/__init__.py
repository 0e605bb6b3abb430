"""GUI-free alignment engine (numpy + torch). Never imports Qt or napari."""

from .align import AlignmentResult, Progress, SectionResult, align_stack, iter_align_stack
from .errors import AlignmentCancelled, InputError, MemoryLimitError, SsemnetError, WeightsError
from .params import AlignParams, ParameterError

__all__ = [
    "AlignParams", "AlignmentCancelled", "AlignmentResult", "InputError", "MemoryLimitError",
    "ParameterError",
    "Progress", "SectionResult", "SsemnetError", "WeightsError", "align_stack",
    "iter_align_stack",
]
