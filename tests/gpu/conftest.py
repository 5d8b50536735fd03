"""GPU tests: models they train without Megatron's DDP are built without fused weight-gradient
accumulation, which adds into DDP's ``main_grad`` (tests/gpu/test_gpu_settings.py covers it under
DDP, and test_host_device.py trains under DDP as the loop does)."""

import pytest

from salm_megatron.llm import model as llm_model

UNDER_DDP = {"test_gpu_settings", "test_host_device"}


@pytest.fixture(autouse=True)
def no_fused_weight_gradients_without_ddp(request, monkeypatch):
    if request.module.__name__.rsplit(".", 1)[-1] not in UNDER_DDP:
        monkeypatch.setattr(llm_model, "_grad_accum_fusion_available", False)
