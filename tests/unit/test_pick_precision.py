"""train.precision on each device: a CPU trains in fp32 unless bf16 is asked for and the CPU has it natively
(the CPU's answer is replaced here to walk both branches on one machine: it is a property of the hardware).
The bf16 step itself is checked against fp32 in test_gpu_check.py (train_precision on this CPU)."""

from __future__ import annotations

import logging

import pytest
import torch
from rvc_pipeline.steps.train import trainer

CPU = torch.device("cpu")


@pytest.mark.parametrize(("requested", "native", "expected"), [
    ("auto", True, "fp32"), ("fp32", True, "fp32"), ("fp16", True, "fp32"),
    ("bf16", True, "bf16"), ("bf16", False, "fp32"),
])
def test_cpu_precision(requested: str, native: bool, expected: str, monkeypatch: pytest.MonkeyPatch,
                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(trainer, "cpu_bf16_supported", lambda: native)
    with caplog.at_level(logging.WARNING, logger="rvc_pipeline"):
        assert trainer.pick_precision(requested, CPU) == expected
    if requested in ("fp16", "bf16") and expected == "fp32":
        assert "training in fp32" in caplog.text

