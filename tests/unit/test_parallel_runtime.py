"""Proves the runtime validates before starting and tears down cleanly, picks the GPU a process
may use (one visible per task under srun), and the CPU layer redirects."""

import pytest
import torch
import torch.distributed as dist

from salm_megatron import parallel
from salm_megatron.config import ConfigError, ParallelConfig
from salm_megatron.parallel import cpu_compat
from salm_megatron.parallel.runtime import cuda_device
from tests.conftest import free_port

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compatibility layer only")


def test_bad_world_size_fails_before_any_process_group(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(ConfigError, match="world size 3 is not divisible .* = 2 x 1 x 1 = 2"):
        parallel.initialize(ParallelConfig(tensor_model_parallel_size=2), rank=0, world_size=3)
    assert not dist.is_initialized()


def test_each_process_takes_its_own_visible_gpu(monkeypatch):
    assert [cuda_device(rank, 8) for rank in range(8)] == list(range(8))  # torchrun, 8 GPUs
    assert [cuda_device(rank, 1) for rank in range(8)] == [0] * 8  # srun --gpus-per-task=1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=3, but this process sees 2 GPUs \(CUDA_"):
        cuda_device(3, 2)


def test_initialize_teardown_initialize(monkeypatch):
    from megatron.core import parallel_state

    for _ in range(2):
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        parallel.initialize(ParallelConfig(), seed=3, rank=0, world_size=1)
        assert parallel.is_initialized()
        assert parallel_state.get_tensor_model_parallel_world_size() == 1
        assert dist.get_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
        parallel.teardown()
        assert not parallel.is_initialized()
    parallel.teardown()  # twice is fine


def test_seeds_are_reproducible(single_rank):
    parallel.set_seed(11)
    a = torch.rand(3)
    parallel.set_seed(11)
    assert torch.equal(a, torch.rand(3))


@cpu_only
def test_rng_tracker_forks_named_cpu_states():
    tracker = cpu_compat.CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 5)
    outside = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside), "fork must restore the default generator"
    with tracker.fork():
        second = torch.rand(4)
    assert not torch.equal(first, second), "the named state must advance"
    fresh = cpu_compat.CpuRNGStatesTracker()
    fresh.add("model-parallel-rng", 5)
    with fresh.fork():
        assert torch.equal(torch.rand(4), first)
    with pytest.raises(ValueError, match="seed 5 is already tracked"):
        tracker.add("other", 5)
    with pytest.raises(KeyError, match="not tracked"), tracker.fork("missing"):
        pass


@cpu_only
def test_cuda_literals_and_type_names_are_redirected_only_where_needed():
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules

    assert cpu_compat.apply()
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert schedules.torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.zeros(1).cuda().device.type == "cpu"
    # Tensor.type() says "cuda" only inside the wrapped optimizer functions.
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with cpu_compat._tensor_types_named_cuda(), cpu_compat._tensor_types_named_cuda():
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1).type() == "torch.FloatTensor"
    grad = torch.ones(3)
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = grad
    clip_grads.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=2.0)
    torch.testing.assert_close(param.grad, torch.full((3,), 0.5))
