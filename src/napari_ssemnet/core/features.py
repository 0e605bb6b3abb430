"""Convolutional autoencoder (CAE) features: model, training, secure weight loading.

The encoder maps a normalised section ``(B, 1, H, W)`` to features ``(B, C, H/2, W/2)``;
its decoder mirrors it. Training minimises ``||x - g(f(x + noise))||^2`` plus L2 weight decay
(ssEMnet Eqs. 1-3, with input noise so the features ignore pixel noise).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Generator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import AlignmentCancelled, InputError, WeightsError
from .params import TRAIN_STEPS, AlignParams

log = logging.getLogger(__name__)

ARCH_VERSION = 1
DEFAULT_WIDTH = 16
SHIPPED_WEIGHTS = "cae_default.pt"


class CAE(nn.Module):
    """Convolutional autoencoder; ``encode`` gives half-resolution features.

    Parameters
    ----------
    width : int
        Channels of the first stage; the feature map has ``width`` channels.
    """

    # Input pixels on each side that reach one output pixel (three 3x3 convolutions at full
    # resolution, one at half): 5. Tiles get a wider halo, see ``encode_tiled``.
    reach = 5

    def __init__(self, width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        self.width = width
        c1, c2 = width, 2 * width
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, padding_mode="reflect"), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c1, 3, padding=1, padding_mode="reflect"), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, padding_mode="reflect"),
            nn.ReLU(inplace=True),
            nn.Conv2d(c2, c2, 3, padding=1, padding_mode="reflect"), nn.ReLU(inplace=True),
            nn.Conv2d(c2, c1, 1),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(c1, c1, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c1, 3, padding=1, padding_mode="reflect"), nn.ReLU(inplace=True),
            nn.Conv2d(c1, 1, 3, padding=1, padding_mode="reflect"),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"encoder input must be (B, 1, H, W), got {tuple(x.shape)}")
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.decoder(self.encode(x))
        return y[..., : x.shape[-2], : x.shape[-1]]


class PixelFeatures(nn.Module):
    """The 'pixels' ablation: the normalised image itself, average-pooled to half resolution
    so that it is sampled exactly like the CAE features."""

    reach = 1

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(x, 2, ceil_mode=True)


ENCODE_BUDGET_PX = 2**20
"""Input pixels encoded at once: bounds the encoder's activations (about 200 MB for the CAE)
whatever the section size."""


def encode_tiled(extractor: nn.Module, imgs: torch.Tensor,
                 budget_px: int = ENCODE_BUDGET_PX,
                 should_stop: Callable[[], None] | None = None) -> torch.Tensor:
    """Encode (B, 1, H, W) sections a few at a time, or in overlapping tiles when one section
    exceeds ``budget_px``; returns what ``extractor.encode(imgs)`` returns.

    Tiling needs the extractor to declare its ``reach`` (input pixels on each side that
    influence an output pixel) and a half-resolution output; each tile carries a halo wider
    than that reach, so the stitched result equals the untiled one (up to float rounding).
    Extractors without ``reach`` are run one whole section at a time. ``should_stop`` (it
    raises to stop) is called between chunks and tiles.
    """
    def poll() -> None:
        if should_stop is not None:
            should_stop()

    def encode(x: torch.Tensor) -> torch.Tensor:
        f = extractor.encode(x)
        if (not isinstance(f, torch.Tensor) or f.ndim != 4 or f.shape[0] != x.shape[0]
                or 0 in f.shape):
            raise WeightsError(f"The feature encoder returned "
                               f"{tuple(f.shape) if hasattr(f, 'shape') else type(f).__name__}"
                               f" for sections of shape {tuple(x.shape)}; it must return "
                               "features of shape (B, C, h, w).")
        if not bool(torch.isfinite(f).all()):  # the fit's backward pass crashed on them
            raise WeightsError("The feature encoder gave NaN or infinite features: its "
                               "weights are damaged or far too large. Use the shipped model "
                               "(features 'shipped') or train it again.")
        return f

    b, _, h, w = imgs.shape
    with torch.no_grad():
        reach = getattr(extractor, "reach", None)
        if h * w <= budget_px or reach is None:
            chunk = max(1, budget_px // (h * w))
            parts = []
            for i in range(0, b, chunk):
                poll()
                parts.append(encode(imgs[i:i + chunk]))
            return torch.cat(parts)
        halo = 2 * ((int(reach) + 8) // 2)  # even, so tile origins stay on the stride-2 grid
        side = max(64, int(budget_px ** 0.5) - 2 * halo) // 2 * 2
        out = None
        for i in range(b):
            for ys, yk in _tile_spans(h, side, halo):
                for xs, xk in _tile_spans(w, side, halo):
                    poll()
                    f = encode(imgs[i:i + 1, :, ys, xs])
                    if out is None:
                        out = imgs.new_empty(b, f.shape[1], (h + 1) // 2, (w + 1) // 2)
                    out[i, :, yk[0], xk[0]] = f[0, :, yk[1], xk[1]]
        return out


def _tile_spans(n: int, side: int, halo: int):
    """Tiles of one axis of length ``n``: (input slice with halo, (output slice, slice of the
    tile's half-resolution output that goes there))."""
    for a in range(0, n, side):
        b = min(n, a + side)
        lo, hi = max(0, a - halo), min(n, b + halo)
        keep = (b - a + 1) // 2
        first = (a - lo) // 2
        yield slice(lo, hi), (slice(a // 2, a // 2 + keep), slice(first, first + keep))


def shipped_weights_path() -> Path:
    """Path of the encoder weights shipped with the package."""
    return Path(str(resources.files("napari_ssemnet") / "weights" / SHIPPED_WEIGHTS))


def save_weights(model: CAE, path: str | os.PathLike, *, info: dict[str, str] | None = None
                 ) -> Path:
    """Save encoder weights as a plain tensor dictionary (loadable with weights_only=True)."""
    if not isinstance(model, CAE):
        raise WeightsError(f"Only a CAE can be saved as napari-ssemnet weights; got "
                           f"{type(model).__name__}.")
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{str(path)!r} is a folder; give the weights file's name (.pt).")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": "napari-ssemnet-cae",
        "arch_version": ARCH_VERSION,
        "width": int(model.width),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "info": dict(info or {}),
    }
    torch.save(payload, path)
    return path


def load_weights(path: str | os.PathLike) -> CAE:
    """Load a CAE from a weights file without unpickling arbitrary objects.

    Raises
    ------
    WeightsError
        If the file is missing, not a weights file, corrupt or of another architecture.
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{str(path)!r} is a folder; the encoder weights are a file (.pt, "
                           "written by train-features) in it.")
    if not path.is_file():
        raise WeightsError(f"Encoder weights file {str(path)!r} does not exist.")
    try:
        # by name, torch picks a loader from the suffix; its warnings about a file that is
        # refused anyway (pickle protocols) would print beside our one error line
        with open(path, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own text is about its weights_only switch, and the exception's name
        # ("error", "UnpicklingError") says nothing to a user
        log.debug("loading the weights %s failed: %r", path, exc)
        raise WeightsError(f"{str(path)!r} is not a readable napari-ssemnet weights file: it "
                           "is damaged, cut short or not a PyTorch weights file (a file that "
                           "holds other Python objects is refused, since loading it could run "
                           "code). Re-train or re-download it.") from None
    if not isinstance(payload, dict) or payload.get("format") != "napari-ssemnet-cae":
        raise WeightsError(f"{str(path)!r} is not a napari-ssemnet encoder weights file.")
    if payload.get("arch_version") != ARCH_VERSION:
        raise WeightsError(f"{str(path)!r} was written for encoder version "
                           f"{payload.get('arch_version')}; this version needs {ARCH_VERSION}. "
                           "Re-train it with 'napari-ssemnet train-features'.")
    try:
        # the layers' random initial weights, replaced at once, would use up the caller's
        # global random numbers: loading must leave them alone (README)
        with torch.random.fork_rng(devices=[]):
            model = CAE(int(payload["width"]))
        model.load_state_dict(payload["state_dict"])
    except Exception as exc:
        # torch's first line is only "Error(s) in loading state_dict for CAE:"
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else (
            lines[0] if lines else type(exc).__name__)
        raise WeightsError(f"{str(path)!r} does not match the encoder architecture "
                           f"({detail}).") from None
    bad = [n for n, t in model.state_dict().items() if not bool(torch.isfinite(t).all())]
    if bad:  # a training that diverged: the alignment failed deep in a matrix routine
        raise WeightsError(f"{str(path)!r} holds NaN or infinite weights ({bad[0]}); train "
                           "it again, or use the shipped model.")
    model.info = dict(payload.get("info", {}))
    model.eval()
    return model


def check_encoder(encoder: Any) -> None:
    """Raise :class:`~napari_ssemnet.core.errors.InputError` unless ``encoder`` is None or a
    torch module with an ``encode(x)`` method, (B, 1, H, W) -> (B, C, h, w)."""
    if encoder is None:
        return
    if not isinstance(encoder, nn.Module) or not callable(getattr(encoder, "encode", None)):
        raise InputError(f"encoder must be a torch.nn.Module with an encode(x) method that "
                         f"maps sections (B, 1, H, W) to features (B, C, h, w), like "
                         f"features.CAE; got {type(encoder).__name__}.")


def load_feature_extractor(params: AlignParams) -> nn.Module:
    """The feature model named by ``params.features``, in eval mode."""
    if params.features == "pixels":
        return PixelFeatures()
    if params.features == "custom":
        return load_weights(params.weights)
    path = shipped_weights_path()
    if not path.is_file():
        raise WeightsError("The shipped encoder weights are missing from the installation "
                           f"({path}); reinstall napari-ssemnet or use features='pixels'.")
    return load_weights(path)


def _patches(stacks: Sequence[np.ndarray], n: int, size: int, rng: np.random.Generator
             ) -> np.ndarray:
    from .metrics import normalise_stack

    normed = []
    for s in stacks:
        norm, blank = normalise_stack(np.asarray(s))
        normed.extend(norm[i] for i in range(norm.shape[0]) if not blank[i])
    if not normed:
        raise InputError("No section with image structure to train on.")
    out = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        img = normed[rng.integers(len(normed))]
        y = rng.integers(0, img.shape[0] - size + 1)
        x = rng.integers(0, img.shape[1] - size + 1)
        p = img[y:y + size, x:x + size]
        p = np.rot90(p, rng.integers(4))
        if rng.random() < 0.5:
            p = p[:, ::-1]
        out[i, 0] = p
    return out


def train_encoder(
    stacks: Sequence[np.ndarray],
    *,
    steps: int = TRAIN_STEPS,
    batch: int = 16,
    patch: int = 64,
    width: int = DEFAULT_WIDTH,
    learning_rate: float = 2e-3,
    weight_decay: float = 1e-5,
    noise: float = 0.3,
    seed: int = 0,
    device: str = "auto",
    init: CAE | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[Any, None, CAE]:
    """Train (or fine-tune ``init``) a CAE on one or more stacks, self-supervised.

    Parameters
    ----------
    stacks : sequence of ndarray, each shape (Z, H, W)
    steps, batch, patch : int
        Adam steps, patches per step and patch side (px).
    noise : float
        Std of Gaussian noise added to the input (denoising autoencoder).

    Yields
    ------
    Progress
        Every 10 steps, with the running reconstruction loss in the message.

    Returns
    -------
    CAE
        In eval mode, on the CPU; a new model (``init`` is left as it was). Torch's global
        random state is left alone too.
    """
    import copy
    import numbers

    from .align import Progress, check_stack
    from .device import pick_device
    from .params import ParameterError

    # raw torch errors otherwise (padding larger than the patch, a 0-channel weight, ...)
    for name, value, least in (("steps", steps, 1), ("batch", batch, 1), ("patch", patch, 16),
                               ("width", width, 1)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
            raise ParameterError(f"{name} must be a whole number of at least {least}; got "
                                 f"{value!r}.")
    steps, batch, patch, width = int(steps), int(batch), int(patch), int(width)
    if not isinstance(learning_rate, numbers.Real) or not 0 < float(learning_rate) < 1:
        raise ParameterError(f"learning_rate must be a number between 0 and 1; got "
                             f"{learning_rate!r}.")
    if init is not None and not isinstance(init, CAE):
        raise ParameterError(f"init must be a CAE (e.g. from load_weights); got "
                             f"{type(init).__name__}.")
    stacks = [check_stack(s, name=f"training stack {i}", min_sections=1)
              for i, s in enumerate(stacks)]
    if not stacks:
        raise InputError("No training stack given.")
    small = min(min(s.shape[1:]) for s in stacks)
    patch = min(patch, small - small % 4)
    dev = pick_device(device)
    yield Progress("train", 0, steps, f"cutting training patches on {dev}")
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
        torch.default_generator.manual_seed(seed)  # torch.manual_seed also reseeds CUDA
        model = CAE(width) if init is None else copy.deepcopy(init)
        # the noise continues the seeded stream, as it did from the global generator
        if dev.type == "cpu":
            noise_gen = torch.Generator()
            noise_gen.set_state(torch.get_rng_state())
        else:
            noise_gen = torch.Generator(device=dev).manual_seed(seed)
    model = model.to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    pool = _patches(stacks, max(batch * 64, 512), patch, rng)
    running = None
    for step in range(steps):
        if should_stop is not None and should_stop():
            raise AlignmentCancelled("Feature training cancelled.")
        if step % 64 == 63:
            pool = _patches(stacks, pool.shape[0], patch, rng)
        idx = rng.integers(0, pool.shape[0], batch)
        x = torch.from_numpy(pool[idx]).to(dev)
        noisy = x + noise * torch.randn(x.shape, generator=noise_gen, dtype=x.dtype,
                                        device=x.device)
        loss = torch.mean((model(noisy) - x) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # kept on the device (in float64, as a Python float would be): reading it every
        # step would make the CPU wait for a GPU at each step
        lv = loss.detach().double()
        running = lv if running is None else 0.95 * running + 0.05 * lv
        if step % 10 == 9 or step == steps - 1:
            yield Progress("train", step + 1, steps,
                           f"reconstruction loss {float(running):.4f}")
    model = model.cpu().eval()
    model.info = {"train_loss": f"{float(running):.5f}", "steps": str(steps),
                  "seed": str(seed)}
    return model
