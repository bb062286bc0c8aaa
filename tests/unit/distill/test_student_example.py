"""examples/distill_student.py, shortened: a real KD training loop on the distillation
core's output (real teacher, real payloads) whose loss falls, on seen and unseen prompts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from services.runtime.backends.torch_backend import TorchBackend

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "distill_student.py"


def load_example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("distill_student", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_kd_loss_falls(torch_backend: TorchBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    example = load_example(monkeypatch)
    result = example.run(
        torch_backend,
        samples=6,
        heldout=2,
        steps=12,
        max_new_tokens=8,
        layers=1,
        width=32,
        batch_size=6,
        lr=1e-2,
        log=False,
    )
    losses = result.train_losses
    assert len(losses) == 12 and all(loss > 0 for loss in losses)
    assert losses[-1] < 0.8 * losses[0]
    assert result.heldout_after < result.heldout_before
