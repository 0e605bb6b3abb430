"""Device selection."""

from __future__ import annotations

from .errors import InputError


def pick_device(name: str = "auto"):
    """Return a ``torch.device`` for ``"auto"``, ``"cpu"`` or ``"cuda"``.

    ``auto`` prefers CUDA when it is available. Asking for ``cuda`` on a machine without a
    usable GPU raises :class:`InputError` rather than failing deep inside torch.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device='cuda' was requested but no CUDA GPU is available to "
                             "PyTorch; use device='auto' or 'cpu', or install a CUDA build of "
                             "PyTorch.")
        return torch.device("cuda")
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"Unknown device {name!r}; use auto, cpu or cuda.")
