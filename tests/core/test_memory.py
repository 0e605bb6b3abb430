"""core.memory: the up-front memory check and out-of-memory errors a user can act on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from emtools import FAST, em

from napari_ssemnet.core import fit, memory
from napari_ssemnet.core.align import Progress, align_section, align_stack
from napari_ssemnet.core.errors import MemoryLimitError, SsemnetError


@pytest.fixture
def small() -> np.ndarray:
    return em(slice(0, 3), 96).astype(np.float32)


def test_estimate_grows_with_every_axis():
    base = memory.estimate_peak_bytes((8, 512, 512))
    assert memory.estimate_peak_bytes((16, 512, 512)) > base
    assert memory.estimate_peak_bytes((8, 1024, 512)) > base
    # measured: 30 x 512^2 added 0.86 GB at its peak, 16 x 1024^2 1.64 GB (dev box)
    assert 0.86 * 2**30 < memory.estimate_peak_bytes((30, 512, 512)) < 1.3 * 0.86 * 2**30
    assert 1.64 * 2**30 < memory.estimate_peak_bytes((16, 1024, 1024)) < 1.3 * 1.64 * 2**30


def test_fit_binning_lowers_the_estimate_down_to_the_full_resolution_part():
    shape = (16, 1024, 1024)
    b1, b2, b4 = (memory.estimate_peak_bytes(shape, b) for b in (1, 2, 4))
    assert b1 > b2 > b4 > memory.PEAK_BYTES_FIXED
    assert b1 == memory.estimate_peak_bytes(shape)
    # measured on 16 x 1024^2: 1.64 GB at binning 1, 0.71 GB at 2, 0.54 GB at 4 (dev box)
    for est, measured in ((b1, 1684), (b2, 727), (b4, 549)):
        assert measured * 2**20 < est < 1.3 * measured * 2**20


def test_on_a_gpu_the_part_held_in_the_computers_memory_is_checked(monkeypatch):
    # the check returned early for any GPU: a big stack could still exhaust the host
    cuda = torch.device("cuda")
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**30)
    memory.check_memory((8, 1024, 1024), cuda)  # 0.16 GB on the host: fine
    with pytest.raises(MemoryLimitError, match="needs about 2.5 GB"):
        memory.check_memory((128, 1024, 1024), cuda)  # 20 bytes a pixel stay on the host
    with pytest.raises(MemoryLimitError):
        memory.check_memory((8, 1024, 1024), torch.device("cpu"))  # the whole fit on the CPU


def test_a_cgroup_limit_counts_as_the_free_memory(tmp_path):
    # a batch job given --mem on a big node passed the check and was killed by the kernel
    proc = tmp_path / "cgroup"
    proc.write_text("0::/slurm/job_1\n")
    job = tmp_path / "slurm" / "job_1"
    job.mkdir(parents=True)
    (job / "memory.max").write_text(f"{4 * 2**30}\n")
    (job / "memory.current").write_text(f"{2**30}\n")
    assert memory.cgroup_free_bytes(str(tmp_path), str(proc)) == 3 * 2**30
    # page cache the kernel can drop is not used memory
    (job / "memory.stat").write_text(f"anon 1\ninactive_file {2**29}\n")
    assert memory.cgroup_free_bytes(str(tmp_path), str(proc)) == 3.5 * 2**30
    # SLURM puts the job's limit on a parent of the task's cgroup
    task = job / "step_0" / "task_0"
    task.mkdir(parents=True)
    (task / "memory.max").write_text("max\n")
    (task / "memory.current").write_text("5\n")
    proc.write_text("0::/slurm/job_1/step_0/task_0\n")
    assert memory.cgroup_free_bytes(str(tmp_path), str(proc)) == 3.5 * 2**30
    (job / "memory.max").write_text("max\n")  # no limit anywhere
    assert memory.cgroup_free_bytes(str(tmp_path), str(proc)) is None
    v1 = tmp_path / "memory" / "job"
    v1.mkdir(parents=True)
    proc.write_text("4:memory:/job\n0::/\n")
    (v1 / "memory.limit_in_bytes").write_text(f"{2**31}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{2**30}\n")
    assert memory.cgroup_free_bytes(str(tmp_path), str(proc)) == 2**30


def test_available_memory_is_known_here():
    free = memory.available_bytes()
    assert free is not None and free > 2**20


def test_a_stack_too_big_for_the_free_memory_stops_before_any_work(small, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 50 * 2**20)
    seen = []
    with pytest.raises(MemoryLimitError) as info:
        align_stack(small, progress=seen.append, **FAST)
    text = str(info.value)
    assert "3 sections of 96x96 px needs about 0.3 GB" in text and "0.0 GB is free" in text
    assert "Raise fit_binning" in text
    assert not [e for e in seen if isinstance(e, Progress) and e.stage.startswith("fit")]
    with pytest.raises(MemoryLimitError, match="needs about"):
        align_section(small, 1, **FAST)
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    assert align_stack(small, **FAST).aligned.shape == small.shape


def test_plenty_of_memory_passes_the_check(small, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 * 2**30)
    assert align_stack(small, **FAST).aligned.shape == small.shape


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory"),
    MemoryError(),
    RuntimeError("cuFFT error: CUFFT_ALLOC_FAILED"),  # the CUDA libraries' own wording
])
def test_out_of_memory_during_the_run_is_a_clear_error(small, monkeypatch, exc):
    def boom(*args, **kwargs):
        raise exc
        yield  # pragma: no cover - makes this a generator like fit_stack

    monkeypatch.setattr(fit, "fit_stack", boom)
    with pytest.raises(MemoryLimitError) as info:
        align_stack(small, **FAST)
    assert isinstance(info.value, SsemnetError)
    text = str(info.value)
    where = "the GPU" if "CU" in str(exc) else "this machine"
    assert text.startswith(f"Ran out of memory on {where} while aligning")
    assert ("estimated" in text) == (where == "this machine")  # a CPU estimate, for the CPU
    assert info.value.__context__ is None or info.value.__context__.__traceback__ is None
    assert "3 sections of 96x96 px" in text


def test_other_runtime_errors_pass_through(small, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("something else")
        yield  # pragma: no cover

    monkeypatch.setattr(fit, "fit_stack", boom)
    with pytest.raises(RuntimeError, match="something else"):
        align_stack(small, **FAST)


def _faults_of_a_fresh_block(mb: int = 96) -> int:
    """Minor page faults of allocating, filling and freeing a block of ``mb`` MB."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.empty(mb << 18, np.float32)  # bigger than glibc's largest mmap threshold
    block.fill(1.0)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(memory._libc("mallopt") is None, reason="glibc only")
def test_a_run_keeps_freed_memory_for_reuse_and_gives_it_back_at_its_end(monkeypatch):
    # every large block the fit freed went back to the system and was zeroed again on next
    # use: as much time in the kernel as in torch
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 << 30)
    fresh = _faults_of_a_fresh_block()  # one per page (or per 2 MB huge page)
    assert fresh >= 40
    with memory.kept_heap((2, 64, 64)) as kept:
        assert kept
        with memory.kept_heap((2, 64, 64)):  # nested: the outer one keeps the setting
            _faults_of_a_fresh_block()
        _faults_of_a_fresh_block()
        assert _faults_of_a_fresh_block() < fresh / 5  # reused
    assert _faults_of_a_fresh_block() > fresh / 2  # handed back again
    # not with little free memory, nor when switched off
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
    with memory.kept_heap((2, 64, 64)) as kept:
        assert not kept
        _faults_of_a_fresh_block()
        assert _faults_of_a_fresh_block() > fresh / 2
    monkeypatch.setattr(memory, "available_bytes", lambda: None)  # unknown: left alone
    with memory.kept_heap((2, 64, 64)) as kept:
        assert not kept
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 << 30)
    monkeypatch.setenv(memory.KEEP_HEAP_ENV, "0")
    with memory.kept_heap((2, 64, 64)) as kept:
        assert not kept
