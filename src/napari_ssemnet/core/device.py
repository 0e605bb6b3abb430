"""Device selection."""

from __future__ import annotations

import functools

from .errors import InputError


def pick_device(name: str = "auto"):
    """Return a ``torch.device`` for ``"auto"``, ``"cpu"`` or ``"cuda"``.

    ``auto`` prefers CUDA when it is available. Asking for ``cuda`` on a machine without a
    usable GPU raises :class:`InputError` rather than failing deep inside torch.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and not _cuda_problem()
                            else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device='cuda' was requested but no CUDA GPU is available to "
                             "PyTorch; use device='auto' or 'cpu', or install a CUDA build of "
                             "PyTorch.")
        problem = _cuda_problem()
        if problem:
            raise InputError(f"The CUDA GPU cannot run PyTorch's code ({problem}); the "
                             "installed PyTorch build may not support this GPU, or the GPU is "
                             "busy. Use device='cpu', or install the PyTorch build for your "
                             "GPU and driver.")
        return torch.device("cuda")
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"Unknown device {name!r}; use auto, cpu or cuda.")


@functools.cache
def _cuda_problem() -> str:
    """Why a tiny CUDA operation fails ('' when it works): a GPU that PyTorch sees but
    cannot use (no kernel image for its architecture, a busy exclusive-mode GPU) would
    otherwise fail minutes into a run."""
    import torch

    try:
        (torch.ones(4, device="cuda") * 2).sum().item()
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use it
        text = str(exc).strip().splitlines()
        return text[0] if text else type(exc).__name__
    return ""


def run_environment(device: object | None = None) -> dict[str, object]:
    """What a methods section (or a rerun) needs besides the parameters: versions, the CPU
    thread count (CPU results differ in the last bits between thread counts) and the
    device, with the date (UTC).

    Returns
    -------
    dict
        JSON-serialisable: ``napari_ssemnet``, ``python``, ``torch``, ``numpy``,
        ``torch_threads``, ``platform``, ``device`` (if given) and ``date``.
    """
    import datetime
    import platform

    import numpy as np
    import torch

    from .. import __version__

    env: dict[str, object] = {
        "napari_ssemnet": __version__, "python": platform.python_version(),
        "torch": torch.__version__, "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": f"{platform.system()} {platform.machine()}",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device is not None:
        env["device"] = str(device)
        if str(device).startswith("cuda") and torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(torch.device(str(device)))
    return env
