"""The language-model backend interface every scorer/generator uses.

Scorers need two primitives, both a single prefill pass (no generation):
``next_token_logprobs`` (Ask-LLM: log P(candidate token | prompt) at the position
after the prompt) and ``sequence_nll`` (perplexity: summed negative log-likelihood
of a text's tokens). Generating stages (distillation, rewriting, synthesis) need a
third, ``generate``: batched decoding of many prompts with the limits of
``GenerationParams``, optionally returning the top-k token logprobs of every generated
position (a teacher's distribution for knowledge distillation). Backends batch
internally (length bucketing, token budget; continuous batching on vLLM).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

import numpy as np
from pydantic import Field, ValidationError, field_validator

from services.runtime.errors import InvalidArgument
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
    prompt_margin_tokens: int = Field(
        768,
        ge=0,
        description="Tokens a scoring prompt may hold on top of max_tokens of sample text: the "
        "Ask-LLM fences, question and chat template (~110 with SmolLM2's), and any few-shot "
        "examples ('builtin': ~570 in all). A longer prompt is refused, never cut (its end "
        "holds the question).",
    )
    batch_tokens: int = Field(
        0,
        ge=0,
        description="Tokens per scoring forward pass (padding included). 0 = auto: 8192 on "
        "CPU; on CUDA, sized from the device's free memory at load (torch backend).",
    )
    packing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch backend scoring: 'on' packs prompts back to back into rows of "
        "pack_tokens (each attends only to itself: restarted position ids), so no FLOPs go "
        "to padding; 'off' = length buckets with padding; 'auto' = packing where it pays "
        "(CUDA), checked once against the unpacked forward for the loaded model (a model "
        "whose attention ignores packed position ids falls back to buckets, logged).",
    )
    pack_tokens: int = Field(
        1024,
        ge=64,
        description="Width of a packed row (grown to the longest prompt). Attention inside a "
        "row is masked, not skipped, by SDPA: its cost grows with this width.",
    )
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default.")
    cache_dir: str = Field(
        "", description="Where converted packaged models are cached; '' = ~/.cache/sluice/models."
    )
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="vLLM only: fraction of GPU memory for weights + KV cache."
    )
    generation_tokens: int = Field(
        1,
        ge=1,
        le=32768,
        description="vLLM only: tokens per sequence the engine reserves for generation on top "
        "of the prompt budget (max_model_len = max_tokens + prompt margin + this). Scoring "
        "needs 1; a generating service sets it to its largest max_new_tokens. The torch "
        "backend allocates per call and ignores it.",
    )
    decode_loop: Literal["early_exit", "transformers"] = Field(
        "early_exit",
        description="torch backend generation: 'early_exit' = the backend's own decode loop, "
        "which drops a prompt from the batch and its KV cache at the step it ends; "
        "'transformers' = transformers' generate, which keeps computing ended prompts until "
        "the whole batch ends (kept as the benchmark's baseline). Same results either way.",
    )
    compile_decode: bool = Field(
        False,
        description="torch backend: decode over a static KV cache with the step compiled by "
        "torch.compile (CUDA graphs on a GPU). Pays on CUDA, where a small model's step is "
        "launch-bound; on CPU compiling costs more than it saves. Ended prompts are dropped "
        "only when the live batch halves (each batch size is one compiled graph).",
    )


class GenerationParams(StrictModel):
    """Limits and sampling of one ``generate`` call: service settings hold the defaults,
    requests override them field by field (validated again after the merge)."""

    max_new_tokens: int = Field(128, ge=1, le=4096, description="Most tokens generated per prompt.")
    temperature: float = Field(
        0.0, ge=0.0, le=5.0, description="Sampling temperature; 0 = greedy (deterministic)."
    )
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (only with temperature > 0)."
    )
    stop: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Stop strings: generation of a prompt ends where one appears; the stop "
        "string and everything after it are not returned.",
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,
        description="Sampling seed: the same seed and prompt give the same output (per prompt, "
        "whatever else is in the batch). None = fresh randomness per prompt.",
    )
    top_logprobs: int = Field(
        0,
        ge=0,
        le=128,
        description="k > 0: also return the k most likely tokens and their logprobs at every "
        "generated position, from the model's raw distribution (distillation).",
    )

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        return stop


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class Generation:
    """One prompt's generated continuation."""

    text: str
    """Decoded text, special tokens skipped, cut before the first stop string."""
    token_ids: list[int]
    """Generated ids after stop-trimming (EOS excluded; a token that straddles a stop
    string is excluded with it, so ``text`` may hold a few characters more)."""
    finish_reason: FinishReason
    """'stop': EOS or a stop string; 'length': ``max_new_tokens`` reached."""
    prompt_tokens: int
    """Tokens of the prompt as the model saw it (BOS included)."""
    top_ids: np.ndarray | None = None
    """(len(token_ids), k) int32: the k most likely ids at each generated position."""
    top_logprobs: np.ndarray | None = None
    """(len(token_ids), k) float32: their natural-log probabilities, best first."""


@dataclass(frozen=True, slots=True)
class NLL:
    """Summed negative log-likelihood (nats) over ``tokens`` predicted tokens."""

    total: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.total / self.tokens)) if self.tokens else float("nan")


class LMBackend(Protocol):
    """A causal LM that scores prompts (one prefill pass each) and generates, in batches."""

    @property
    def model_version(self) -> str:
        """Identifier recorded in lineage (model name + revision/dtype)."""
        ...

    @property
    def has_chat_template(self) -> bool: ...

    @property
    def max_prompt_tokens(self) -> int:
        """Longest prompt ``next_token_logprobs`` accepts (max_tokens + prompt margin)."""
        ...

    def render_chat(self, user_message: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """The prompt string for one user turn after ``history`` ((user, assistant) turns,
        e.g. few-shot examples), with the generation prompt appended. Models without a
        chat template get the turns as plain text, each answer on the line after its
        message, and the message last."""
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

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Generation]:
        """One ``Generation`` per prompt, in order. Prompts are already rendered (use
        ``render_chat`` for chat models) and encoded like ``encode_prompt``; a prompt
        over the backend's prompt budget is refused (InvalidArgument), never cut."""
        ...


def merge_generation(
    base: GenerationParams, overrides: Mapping[str, Any] | None, cap: int | None = None
) -> GenerationParams:
    """``base`` with a request's fields replaced, validated again as ``base``'s own class (a
    stage's subclass keeps its constraints). ``max_new_tokens`` may not exceed ``cap``:
    by default ``base.max_new_tokens`` (a vLLM engine reserved that much per sequence); a
    stage whose engine reserves more (distill's ``max_new_tokens_limit``) passes it."""
    if not overrides:
        return base
    try:
        merged = type(base).model_validate({**base.model_dump(), **overrides})
    except ValidationError as exc:
        raise InvalidArgument(f"invalid generation limits: {exc}") from exc
    limit = base.max_new_tokens if cap is None else cap
    if merged.max_new_tokens > limit:
        raise InvalidArgument(
            f"max_new_tokens {merged.max_new_tokens} exceeds the server's cap {limit}"
        )
    return merged


def build_lazily(src: Any, method: str, default: Callable[[], Any]) -> Any:
    """A model/embedder as given: an instance (it has ``method``), an instance from a
    factory, or the settings' default when nothing was given."""
    if src is None:
        return default()
    if callable(src) and not hasattr(src, method):
        return src()
    return src


T = TypeVar("T")


class Lazy(Generic[T]):
    """A model or embedder a core builds on first use, once, under a lock: a configuration
    that never needs it (heuristics only, precomputed embeddings) never loads it, and
    concurrent gRPC handlers share one. ``src`` is what the caller passed (``build_lazily``):
    an instance with ``method``, a factory, or None for ``default`` (the settings' model)."""

    def __init__(self, src: Any, method: str, default: Callable[[], T]) -> None:
        self._src = src
        self._method = method
        self._default = default
        self._value: T | None = None
        self._lock = threading.Lock()

    def get(self) -> T:
        with self._lock:
            if self._value is None:
                self._value = build_lazily(self._src, self._method, self._default)
            return self._value

    @property
    def loaded(self) -> bool:
        """Built already (without building it)."""
        return self._value is not None
