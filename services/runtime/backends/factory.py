"""Build the LMBackend that settings name; the one place a backend is chosen.

Both implementations are imported inside the function, so importing this module loads
neither torch/transformers nor vLLM: the CPU path never imports vllm, and a process that
only needs the interface (a gRPC adapter, a settings check) pays for no model runtime.
"""

from __future__ import annotations

from services.runtime.backends.base import LMBackend, ModelSettings
from services.runtime.errors import ConfigError


def create_backend(settings: ModelSettings) -> LMBackend:
    """The backend for ``settings.backend``: 'torch' (CPU default) or 'vllm' (GPU)."""
    if settings.backend == "torch":
        from services.runtime.backends.torch_backend import TorchBackend

        return TorchBackend(settings)
    if settings.backend == "vllm":
        from services.runtime.backends.vllm_backend import VLLMBackend

        return VLLMBackend(settings)
    raise ConfigError(f"unknown model backend {settings.backend!r}; known: 'torch', 'vllm'")


def create_generation_backend(settings: ModelSettings, max_new_tokens: int) -> LMBackend:
    """A backend that will generate up to ``max_new_tokens`` per sequence: vLLM reserves
    that much room per sequence, so ``generation_tokens`` is raised to it where lower."""
    reserve = max(settings.generation_tokens, max_new_tokens)
    return create_backend(settings.model_copy(update={"generation_tokens": reserve}))
