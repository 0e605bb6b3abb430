"""napari-ssemnet: serial-section EM alignment with learned features and a spatial transformer."""

__version__ = "0.1.0"

from .core.align import AlignmentResult, AlignParams, align_stack  # noqa: E402

__all__ = ["AlignParams", "AlignmentResult", "align_stack", "__version__"]
