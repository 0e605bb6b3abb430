"""napari-ssemnet: serial-section EM alignment with learned features and a spatial transformer."""

__version__ = "0.1.0"

from .core import (  # noqa: E402
    AlignmentCancelled,
    AlignmentResult,
    AlignParams,
    InputError,
    MemoryLimitError,
    ParameterError,
    Progress,
    SectionResult,
    SsemnetError,
    WeightsError,
    align_stack,
    iter_align_stack,
)

__all__ = ["AlignParams", "AlignmentCancelled", "AlignmentResult", "InputError",
           "MemoryLimitError", "ParameterError", "Progress", "SectionResult", "SsemnetError",
           "WeightsError", "__version__", "align_stack", "iter_align_stack"]
