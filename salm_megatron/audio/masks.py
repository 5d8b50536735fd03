"""Length masks and input checks shared by the audio modules (padding must never leak)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def require(holds: torch.Tensor, message: Callable[[], str]) -> None:
    """Fail unless every element of the bool tensor ``holds`` is true, without making the host
    wait for a GPU: on the CPU a ValueError with ``message()`` (which may name values); on a GPU
    the check runs on the device, and a failure surfaces as a device-side assert at a later
    call (``CUDA_LAUNCH_BLOCKING=1`` reports it at this one). For invariants of values only the
    device holds; input the host holds is checked there, with a ValueError."""
    if holds.device.type == "cpu":
        if not bool(holds.all()):
            raise ValueError(message())
    else:
        torch._assert_async(holds.all(), DEVICE_CHECK_FAILED)


DEVICE_CHECK_FAILED = (
    "a salm_megatron check on the GPU failed: the same batch on the CPU names the values"
)


def valid_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """``[b, size]`` bool, True at positions before each length (the valid, unpadded ones)."""
    return torch.arange(size, device=lengths.device) < lengths[:, None]


def check_lengths(name: str, lengths: torch.Tensor, batch: int, size: int) -> None:
    """Reject lengths that do not describe a ``[batch, size, ...]`` padded batch, naming them."""
    if lengths.dim() != 1 or lengths.size(0) != batch:
        raise ValueError(
            f"{name} must have shape [{batch}] (one per item); got {list(lengths.shape)}"
        )
    if lengths.is_floating_point() or lengths.is_complex():
        raise ValueError(f"{name} must be integers; got {lengths.dtype}")
    require(
        (lengths >= 0) & (lengths <= size),
        lambda: f"{name}={lengths.tolist()} must lie in [0, {size}] (the padded length)",
    )


def ceil_div(lengths: torch.Tensor, k: int) -> torch.Tensor:
    return (lengths + k - 1) // k


def check_features(features: torch.Tensor, lengths: torch.Tensor, n_mels: int) -> None:
    """An encoder's input: ``features [batch, n_mels, frames]`` with valid ``lengths [batch]``."""
    if features.dim() != 3 or features.size(1) != n_mels:
        raise ValueError(
            f"features must be [batch, {n_mels} mel bins (encoder.features.n_mels), "
            f"frames]; got {list(features.shape)}"
        )
    check_lengths("lengths", lengths, features.size(0), features.size(2))
