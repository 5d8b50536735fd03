"""Run Megatron-Core on machines without CUDA (laptops, CI) over the gloo backend.

Megatron-Core assumes a GPU in a handful of places: it calls ``torch.cuda.current_device()`` and
``torch.cuda.synchronize()``, makes tensors with ``device="cuda"`` (or in pinned memory) in the
schedules, DDP buffers, optimizers, grad clipping, context-parallel RoPE and the MoE auxiliary-loss
tracker, copies the MoE all-to-all dispatcher's split sizes to the host (as NumPy arrays) on a
side CUDA stream (here they are there already, and every op is synchronous, so streams and their
events become no-ops; the NumPy conversion stays), all-gathers tokens in pieces of unequal size
over expert tensor-parallel ranks (gloo's all_gather takes equal pieces only: each is padded to
the longest for the exchange, and cut back after), asserts
``Tensor.type()`` strings such as ``'torch.cuda.FloatTensor'`` in the optimizers, and forks (and,
for activation recompute, saves and restores) the CUDA RNG.
:func:`apply` routes each of those to the CPU. :func:`salm_megatron.parallel.initialize` calls
it; it does nothing when CUDA is available, so GPU runs see an untouched Megatron-Core.

Everything here is a redirection, never a change of arithmetic: the same Megatron code paths run,
only their tensors live in host memory.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types

import torch

log = logging.getLogger(__name__)

# Megatron modules that create tensors with a literal device="cuda" (or call .cuda()).
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.utils",
    "megatron.core.models.common.embeddings.rope_utils",  # CP's RoPE chunks, in pinned memory
    "megatron.core.transformer.moe.moe_utils",  # the auxiliary-loss tracker
)
# Megatron modules that run work on side CUDA streams (the MoE dispatcher's host copies).
_MODULES_WITH_CUDA_STREAMS = ("megatron.core.transformer.moe.token_dispatcher",)

# Megatron modules that all-gather pieces of unequal size (the MoE dispatcher's tokens, gathered
# over the expert tensor-parallel ranks), which gloo refuses.
_MODULES_WITH_UNEVEN_GATHERS = ("megatron.core.tensor_parallel.mappings",)

# (module, attribute) of Megatron functions that assert CUDA tensor type strings.
_CUDA_TYPE_CHECKERS = (
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer._build_model_and_main_param_groups",
    ),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),  # imported by name
)

# fmt: off
_TENSOR_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand",
                     "randn", "randint", "zeros_like", "ones_like", "empty_like", "full_like")
# fmt: on

_applied = False


def _host(device):
    """Map any CUDA device spec to the CPU; leave the rest alone."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


def _on_host(factory):
    @functools.wraps(factory)
    def make(*args, device=None, pin_memory=False, **kwargs):
        # Pinned memory (staging for an asynchronous copy to the GPU) needs an accelerator.
        return factory(*args, device=_host(device), **kwargs)

    return make


class _HostStream:
    """A CUDA stream (and its events) where all work is synchronous: nothing to wait for."""

    def wait_stream(self, other) -> None:
        pass

    def record_event(self) -> _HostStream:
        return self

    def synchronize(self) -> None:
        pass


class _CudaStreamsOnHost(types.ModuleType):
    """Stands in for ``torch.cuda`` where a module only orders its work with streams."""

    def __init__(self):
        super().__init__("torch.cuda")
        self.Stream = _HostStream
        self._stream = _HostStream()
        self.current_stream = lambda device=None: self._stream
        self.stream = lambda stream: contextlib.nullcontext()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _to_numpy_on_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """Megatron's ``maybe_move_tensor_to_cpu`` for tensors already on the host: the copy is
    nothing, the NumPy view it would make stays (``all_to_all_single`` takes those as sizes)."""
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


def _all_gather_uneven(tensor_list, tensor, group=None, async_op=False):
    """``torch.distributed.all_gather`` where the pieces may differ in their first dimension:
    every rank sends its piece padded to the longest, and each received piece is cut back to
    its own length. The same values land in ``tensor_list``; only the exchange is wider."""
    shapes = {tuple(t.shape) for t in tensor_list}
    if len(shapes) == 1 and tuple(tensor.shape) in shapes:
        return torch.distributed.all_gather(tensor_list, tensor, group=group, async_op=async_op)
    longest = max(t.shape[0] for t in tensor_list)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    received = [torch.empty_like(padded) for _ in tensor_list]
    torch.distributed.all_gather(received, padded, group=group)
    for out, piece in zip(tensor_list, received, strict=True):
        out.copy_(piece[: out.shape[0]])
    return None


class _DistributedOnGloo(types.ModuleType):
    """Stands in for ``torch.distributed`` where a module all-gathers pieces of unequal size."""

    def __init__(self):
        super().__init__("torch.distributed")
        self.all_gather = _all_gather_uneven

    def __getattr__(self, name):
        return getattr(torch.distributed, name)


class _TorchWithUnevenGathers(types.ModuleType):
    """Stands in for ``torch`` inside one Megatron module: all-gathers of unequal pieces work."""

    def __init__(self):
        super().__init__("torch")
        self.distributed = _DistributedOnGloo()

    def __getattr__(self, name):
        return getattr(torch, name)


class _TorchOnHost(types.ModuleType):
    """Stands in for ``torch`` inside one Megatron module: same names, CUDA devices become CPU
    (and, with ``streams``, CUDA streams no-ops)."""

    def __init__(self, streams: bool = False):
        super().__init__("torch")
        for name in _TENSOR_FACTORIES:
            setattr(self, name, _on_host(getattr(torch, name)))
        if streams:
            self.cuda = _CudaStreamsOnHost()

    def __getattr__(self, name):
        return getattr(torch, name)


class CpuRNGStatesTracker:
    """Megatron's model-parallel RNG tracker, keeping named states of the CPU generator.

    ``fork(name)`` swaps the named state into the default CPU generator for the block, as
    Megatron's ``CudaRNGStatesTracker`` does for the CUDA generator (dropout in TP regions).
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} is already tracked")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} is already tracked")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} is not tracked")
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)


_cpu_tensor_type = torch.Tensor.type


def _cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs and self.device.type == "cpu":
        return _cpu_tensor_type(self).replace("torch.", "torch.cuda.", 1)
    return _cpu_tensor_type(self, dtype, non_blocking, **kwargs)


@contextlib.contextmanager
def _tensor_types_named_cuda():
    """Let ``Tensor.type()`` report CPU tensors under their CUDA names for one call (re-entrant)."""
    if torch.Tensor.type is _cuda_named_type:
        yield
        return
    torch.Tensor.type = _cuda_named_type
    try:
        yield
    finally:
        torch.Tensor.type = _cpu_tensor_type


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with _tensor_types_named_cuda():
            return fn(*args, **kwargs)

    return call


def _patch_attribute_path(module, path, wrap):
    owner = module
    *parents, leaf = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = owner.__dict__[leaf]
    if isinstance(original, staticmethod):
        setattr(owner, leaf, staticmethod(wrap(original.__func__)))
    elif isinstance(original, classmethod):
        setattr(owner, leaf, classmethod(wrap(original.__func__)))
    else:
        setattr(owner, leaf, wrap(original))


def apply() -> bool:
    """Route Megatron-Core's CUDA assumptions to the CPU. Returns True when it patched anything.

    Idempotent; a no-op when CUDA is available.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    torch.Tensor.cuda = lambda self, device=None, non_blocking=False, **kw: self

    host_torch = _TorchOnHost()
    for name in _MODULES_WITH_CUDA_LITERALS:
        importlib.import_module(name).torch = host_torch
    for name in _MODULES_WITH_CUDA_STREAMS:
        module = importlib.import_module(name)
        module.torch = _TorchOnHost(streams=True)
        module.maybe_move_tensor_to_cpu = _to_numpy_on_host

    for name in _MODULES_WITH_UNEVEN_GATHERS:
        importlib.import_module(name).torch = _TorchWithUnevenGathers()

    for module_name, path in _CUDA_TYPE_CHECKERS:
        _patch_attribute_path(importlib.import_module(module_name), path, _with_cuda_type_names)

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recompute saves and restores "the CUDA generator": here, the CPU's.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    _applied = True
    log.debug("Megatron-Core CPU compatibility layer applied")
    return True
