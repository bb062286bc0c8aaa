"""The language-model backend interface every scorer/generator uses.

Scorers need two primitives, both a single prefill pass (no generation):
``next_token_logprobs`` (Ask-LLM: log P(candidate token | prompt) at the position
after the prompt) and ``sequence_nll`` (perplexity: summed negative log-likelihood
of a text's tokens). Backends batch internally (length bucketing, token budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from pydantic import Field

from services.runtime.settings import StrictModel

BackendName = Literal["torch", "vllm"]


class ModelSettings(StrictModel):
    """Which model, on which engine, with which numeric and batching limits."""

    model: str = Field(
        "packaged:smollm2-135m-instruct",
        description="Model to load: 'packaged:<name>' for a model shipped in a Python package "
        "(see services.runtime.backends.models.PACKAGED), a local directory, or a Hugging Face "
        "hub id (e.g. 'google/gemma-2-9b-it' with the vllm backend).",
    )
    backend: BackendName = Field("torch", description="'torch' (CPU/GPU, default) or 'vllm' (GPU).")
    device: str = Field("cpu", description="torch device for the torch backend ('cpu', 'cuda').")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute dtype. 'auto' = bfloat16 where the CPU has native bf16 (AVX512-BF16/"
        "AMX) or on CUDA, else float32. bf16 gives the same perplexity ranking at ~3x the speed.",
    )
    max_tokens: int = Field(
        512, ge=8, description="Token budget per sample: longer texts are truncated (head kept)."
    )
    batch_tokens: int = Field(
        8192, ge=64, description="Padded tokens per forward pass (length-bucketed batches)."
    )
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default.")
    cache_dir: str = Field(
        "", description="Where converted packaged models are cached; '' = ~/.cache/sluice/models."
    )
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="vLLM only: fraction of GPU memory for weights + KV cache."
    )


@dataclass(frozen=True, slots=True)
class NLL:
    """Summed negative log-likelihood (nats) over ``tokens`` predicted tokens."""

    total: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.total / self.tokens)) if self.tokens else float("nan")


class LMBackend(Protocol):
    """A causal LM that can score prompts in batches with one prefill pass each."""

    @property
    def model_version(self) -> str:
        """Identifier recorded in lineage (model name + revision/dtype)."""
        ...

    @property
    def has_chat_template(self) -> bool: ...

    def render_chat(self, user_message: str) -> str:
        """The prompt string for one user turn, with the generation prompt appended.
        Models without a chat template get the message unchanged."""
        ...

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        ...

    def count_tokens(self, texts: list[str]) -> list[int]: ...

    def truncate(self, text: str, max_tokens: int) -> str:
        """``text`` cut to at most ``max_tokens`` tokens (the head is kept)."""
        ...

    def next_token_logprobs(self, prompts: list[str], candidates: list[int]) -> np.ndarray:
        """log P(token | prompt) for each candidate token id at the position right after
        each prompt: shape (len(prompts), len(candidates)), natural log, float64."""
        ...

    def sequence_nll(self, texts: list[str]) -> list[NLL]:
        """Negative log-likelihood of each text's tokens (the first token is conditioned
        on BOS when the model has one), truncated to the token budget."""
        ...
