"""Proves a training micro-batch's forward (SALM, BESTOW; CTC on; with and without audio; the
validation path's accuracy) reads no value the device holds: on a GPU each such read is a
host-device sync. Device tensors are stood in for by a tensor subclass that records every read."""

import sys
import traceback

import pytest
import torch

from salm_megatron.audio import masks
from salm_megatron.data import collate
from salm_megatron.models import build_speech_llm
from salm_megatron.models.host import HOST, on_host, to_device
from tests.speech_fixtures import speech_samples, tiny_config

# Reads of a tensor's values by the host, and ops whose output shape depends on values.
READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
    torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy,
    torch.Tensor.nonzero, torch.nonzero, torch.Tensor.masked_select, torch.masked_select,
    torch.unique, torch.Tensor.unique, torch.bincount, torch.Tensor.bincount,
}  # fmt: skip
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}  # with a boolean mask


class OnDevice(torch.Tensor):
    """A tensor that stands for one on a GPU: what reads its values is recorded."""

    reads: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        masked = func in INDEXING and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool
            for a in (args[1] if isinstance(args[1], tuple) else (args[1],))
        )
        value = args[2] if func is torch.Tensor.__setitem__ else None
        if value is not None and not (isinstance(value, torch.Tensor) and value.numel() > 1):
            masked = False  # a mask filled with one value is masked_fill: no sync
        if func in READS or masked:
            caller = traceback.extract_stack(limit=3)[0]
            cls.reads.append(f"{func.__name__} at {caller.filename}:{caller.lineno}")
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.fixture
def device_checks(monkeypatch):
    """``masks.require`` as on a GPU (the check stays on the device) everywhere it is used."""

    def on_device(holds, message):  # as a plain tensor: the device reads it, not the host
        torch._assert_async(holds.all().as_subclass(torch.Tensor), masks.DEVICE_CHECK_FAILED)

    original = masks.require
    for module in list(sys.modules.values()):
        if getattr(module, "require", None) is original:
            monkeypatch.setattr(module, "require", on_device)


def on_device(batch: dict) -> dict:
    """``batch`` as :func:`to_device` leaves it, its device tensors recording their reads."""
    moved = {k: v.as_subclass(OnDevice) for k, v in batch.items()}
    moved[HOST] = batch
    return moved


@pytest.mark.parametrize("arch", ["salm", "bestow"])
@pytest.mark.parametrize("audio", [True, False], ids=["audio", "no-audio"])
@pytest.mark.parametrize("with_accuracy", [False, True], ids=["train", "valid"])
def test_forward_reads_nothing_from_the_device(single_rank, device_checks, arch, audio,
                                               with_accuracy):  # fmt: skip
    torch.manual_seed(0)
    (model,) = build_speech_llm(tiny_config(arch, ctc_weight=0.5))
    model.train(not with_accuracy)
    samples = speech_samples(arch)
    if not audio:
        samples = [s for s in samples if not s.audio]
    batch = collate(samples)
    assert bool("audio" in batch and len(batch["audio"])) == audio
    OnDevice.reads = []
    output = model(on_device(batch), with_accuracy=with_accuracy)
    assert OnDevice.reads == []
    # The same values as the batch without a host copy (all planned from the device tensors).
    torch.manual_seed(1)
    again = model(batch, with_accuracy=with_accuracy)
    torch.manual_seed(1)
    assert torch.equal(model(on_device(batch), with_accuracy=with_accuracy), again)
    output.sum().backward()


def test_a_moved_batch_keeps_its_host_copy():
    batch = collate(speech_samples("salm"))
    moved = to_device(batch, "cpu")
    assert on_host(moved) is batch and on_host(batch) is batch
    assert set(moved) == set(batch) | {HOST}
    assert on_host(to_device(moved, "cpu")) is batch  # moving again keeps the first copy
