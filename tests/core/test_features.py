"""core.features: the CAE, secure weight loading and training."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from emtools import em

from napari_ssemnet.core.align import Progress
from napari_ssemnet.core.errors import WeightsError
from napari_ssemnet.core.features import (
    CAE,
    PixelFeatures,
    encode_tiled,
    load_weights,
    save_weights,
    shipped_weights_path,
    train_encoder,
)


class _Evil:
    """Unpickling this would create ``marker`` (if the loader executed pickled code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_encode_shape():
    model = CAE().eval()
    with torch.no_grad():
        f = model.encode(torch.zeros(2, 1, 32, 48))
        y = model(torch.zeros(2, 1, 32, 48))
    assert f.shape == (2, 16, 16, 24)
    assert y.shape == (2, 1, 32, 48)
    with pytest.raises(ValueError, match="B, 1, H, W"):
        model.encode(torch.zeros(2, 3, 32, 48))


@pytest.mark.parametrize("shape", [(2, 1, 150, 233), (1, 1, 301, 257)])
def test_tiled_encoding_equals_whole_section_encoding(shape):
    # odd sizes and tiles far smaller than a section: seams, borders and the stride-2 grid
    model = load_weights(shipped_weights_path())
    x = torch.from_numpy(em(slice(0, shape[0]), 320)[:, None, :shape[2], :shape[3]].astype(
        np.float32))
    x = (x - x.mean()) / x.std()
    with torch.no_grad():
        whole = model.encode(x)
    tiled = encode_tiled(model, x, budget_px=96 * 96)
    assert tiled.shape == whole.shape
    assert float((tiled - whole).abs().max()) < 1e-4 * float(whole.abs().max())
    pix = PixelFeatures()
    assert torch.equal(encode_tiled(pix, x, budget_px=96 * 96), pix.encode(x))


def test_encoding_without_a_declared_reach_is_never_tiled():
    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def encode(self, x):
            self.seen.append(tuple(x.shape))
            return x[..., ::2, ::2]

    probe = Probe()
    x = torch.randn(3, 1, 64, 80)
    out = encode_tiled(probe, x, budget_px=1000)
    assert torch.equal(out, x[..., ::2, ::2])
    assert probe.seen == [(1, 1, 64, 80)] * 3


def test_encoding_polls_should_stop_between_chunks_and_tiles():
    from napari_ssemnet.core.errors import AlignmentCancelled

    class Probe(torch.nn.Module):
        reach = 4

        def __init__(self):
            super().__init__()
            self.calls = 0

        def encode(self, x):
            self.calls += 1
            return x[..., ::2, ::2]

    def stop_after(n):
        seen = {"n": 0}

        def should_stop():
            seen["n"] += 1
            if seen["n"] > n:
                raise AlignmentCancelled("stop")
        return should_stop

    x = torch.randn(3, 1, 64, 80)
    for budget in (64 * 80, 1000):  # one section per chunk; tiles of one section
        probe = Probe()
        with pytest.raises(AlignmentCancelled):
            encode_tiled(probe, x, budget_px=budget, should_stop=stop_after(1))
        assert probe.calls == 1  # the second chunk or tile was never encoded


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = CAE().eval()
    path = save_weights(model, tmp_path / "sub" / "w.pt", info={"note": "test"})
    back = load_weights(path)
    x = torch.randn(1, 1, 40, 40)
    with torch.no_grad():
        assert torch.equal(model.encode(x), back.encode(x))
    assert back.info == {"note": "test"}
    assert not back.training


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(tmp_path / "nope.pt")
    with pytest.raises(WeightsError, match="is a folder"):
        load_weights(tmp_path)


def test_random_bytes(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match="not a readable napari-ssemnet weights file") as e:
        load_weights(path)
    assert "damaged, cut short" in str(e.value)  # it named the exception type: "(error)"


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_not_executed(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format": "napari-ssemnet-cae", "arch_version": 1, "width": 16,
               "state_dict": {}, "info": _Evil(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    assert not marker.exists()
    with pytest.raises(WeightsError, match="not a readable"):
        load_weights(path)
    assert not marker.exists()  # the pickled callable never ran


def test_wrong_format_dict(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match="not a napari-ssemnet encoder weights file"):
        load_weights(path)
    torch.save(CAE().state_dict(), path)  # a bare state dict is not our format either
    with pytest.raises(WeightsError, match="not a napari-ssemnet"):
        load_weights(path)


def test_wrong_architecture(tmp_path):
    path = tmp_path / "w.pt"
    save_weights(CAE(8), path)
    payload = torch.load(path, weights_only=True)
    payload["width"] = 16  # claims 16 channels, holds 8
    torch.save(payload, path)
    with pytest.raises(WeightsError, match="does not match the encoder architecture") as e:
        load_weights(path)
    assert "size mismatch" in str(e.value)  # it ended at torch's "...state_dict for CAE:"
    payload["arch_version"] = 99
    torch.save(payload, path)
    with pytest.raises(WeightsError, match="version"):
        load_weights(path)


def test_shipped_weights_load():
    path = shipped_weights_path()
    assert path.is_file(), path
    model = load_weights(path)
    assert isinstance(model, CAE)
    with torch.no_grad():
        f = model.encode(torch.randn(1, 1, 64, 64))
    assert f.shape == (1, model.width, 32, 32) and torch.isfinite(f).all()


def _train(seed: int, steps: int = 5):
    stack = em(slice(0, 2), 96)
    gen = train_encoder([stack], steps=steps, batch=4, patch=32, seed=seed, device="cpu")
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value


def test_train_encoder_runs_and_is_deterministic():
    events, model = _train(0)
    assert isinstance(model, CAE) and not model.training
    assert events and all(isinstance(e, Progress) for e in events)
    assert events[-1].step == events[-1].total == 5
    assert events[0].step == 0  # something to show before the first steps are done
    assert "train_loss" in model.info
    _, again = _train(0)
    _, other = _train(1)
    a, b, c = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_leaves_the_callers_model_and_random_stream_alone(monkeypatch):
    from napari_ssemnet.core.params import ParameterError

    _, model = _train(0, steps=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    stack = em(slice(0, 2), 96)
    gen = train_encoder([stack], steps=3, batch=4, patch=32, device="cpu", init=model)
    tuned = None
    while tuned is None:
        try:
            next(gen)
        except StopIteration as stop:
            tuned = stop.value
    assert torch.equal(torch.rand(3), expected)
    assert tuned is not model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not all(torch.equal(v, tuned.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ParameterError, match="steps must be"):
        next(train_encoder([stack], steps=0))
    # torch.manual_seed also reseeds every GPU's generator
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: seeded.append(s))
    gen = train_encoder([stack], steps=np.int64(2), batch=4, patch=32, device="cpu", seed=7)
    for _ in gen:
        pass
    assert not seeded


def test_weights_with_nan_or_inf_are_refused(tmp_path):
    # a diverged training ended the alignment in torch's linalg.eigh
    payload = torch.load(shipped_weights_path(), map_location="cpu", weights_only=True)
    for bad in (float("nan"), float("inf")):
        state = {k: v.clone() for k, v in payload["state_dict"].items()}
        first = next(k for k, v in state.items() if v.is_floating_point())
        state[first].view(-1)[0] = bad
        torch.save({**payload, "state_dict": state}, tmp_path / "bad.pt")
        with pytest.raises(WeightsError, match="NaN or infinite weights"):
            load_weights(tmp_path / "bad.pt")


@pytest.mark.parametrize("case", ["nan features", "huge features", "2d output", "no encode",
                                  "not a module"])
def test_a_custom_encoder_that_cannot_serve_is_a_clear_error(case):
    from napari_ssemnet.core.align import align_stack
    from napari_ssemnet.core.errors import SsemnetError

    class Enc(torch.nn.Module):
        def __init__(self, post):
            super().__init__()
            self.conv, self.post = torch.nn.Conv2d(1, 4, 3, padding=1), post

        def forward(self, x):
            return self.encode(x)

        def encode(self, x):
            return self.post(self.conv(x))

    class ForwardOnly(torch.nn.Module):
        def forward(self, x):
            return x

    encoder = {"nan features": Enc(lambda y: y * float("nan")),
               "huge features": Enc(lambda y: y * 1e30 * 1e30),
               "2d output": Enc(lambda y: y.flatten(1)),
               "no encode": ForwardOnly(),
               "not a module": "cae.pt"}[case]
    stack = em(slice(0, 3), 64)
    # the NaN features segfaulted the process in the fit's backward pass
    with pytest.raises(SsemnetError, match="encoder"):
        align_stack(stack, iterations=3, levels=1, prealign="none", encoder=encoder,
                    device="cpu")


def test_weights_load_whatever_the_file_is_called(tmp_path):
    # torch.load given a name picks its loader by the suffix: a .safetensors name failed
    import shutil

    shutil.copyfile(shipped_weights_path(), tmp_path / "w.safetensors")
    assert isinstance(load_weights(tmp_path / "w.safetensors"), CAE)


def test_training_and_saving_refuse_what_torch_would_fail_on(tmp_path):
    from napari_ssemnet.core.align import run_generator
    from napari_ssemnet.core.params import ParameterError

    stack = em(slice(0, 2), 96)
    for kwargs in ({"patch": 2}, {"width": 0}, {"learning_rate": float("nan")},
                   {"init": "cae.pt"}):  # raw RuntimeError / ValueError / AttributeError
        with pytest.raises(ParameterError):
            run_generator(train_encoder([stack], steps=2, **kwargs), None)
    with pytest.raises(WeightsError, match="Only a CAE"):
        save_weights(torch.nn.Linear(2, 2), tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="is a folder"):
        save_weights(CAE(8), tmp_path)
