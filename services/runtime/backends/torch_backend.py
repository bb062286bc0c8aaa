"""The torch/transformers LMBackend: the CPU default, also usable on one CUDA device.

Both scoring primitives are one prefill pass; the work is in batching them well on a
small machine:

- Length bucketing: prompts are sorted by token length and packed into batches whose
  padded size stays under ``settings.batch_tokens``, so little compute goes to padding.
- Only the logits that are needed are computed. The LM head of a 50k-260k vocabulary
  costs as much as a large part of a small model, and a full ``batch x seq x vocab``
  float32 tensor is gigabytes. Ask-LLM reads one position per prompt, so the head is
  applied to that position only; perplexity needs every position, so the head and
  cross-entropy run over row chunks of a bounded size.
- bfloat16 where the hardware has it (AMX/AVX512-BF16 CPUs, CUDA): about 3x float32 on
  CPU with the same perplexity ranking. Softmax and the NLL sums are in float32/float64.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.runtime.backends.base import NLL, ModelSettings
from services.runtime.backends.models import ResolvedModel, resolve_model
from services.runtime.backends.text import TokenizerText
from services.runtime.errors import ConfigError, InvalidArgument

log = logging.getLogger(__name__)

PROMPT_MARGIN_TOKENS = 384
"""Room for the Ask-LLM question and chat template on top of ``max_tokens`` of sample text.
A prompt longer than ``max_tokens + PROMPT_MARGIN_TOKENS`` is refused, never cut: its end
holds the question, and a prompt cut at the end would be scored for the wrong question."""

HEAD_CHUNK_BYTES = 64 * 1024 * 1024
"""Upper bound of one float32 logits chunk in ``sequence_nll`` (rows x vocab x 4 bytes)."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX-BF16 or AVX512-BF16).

    Without it, torch emulates bf16 matmuls and they are slower than float32, so 'auto'
    must not pick bf16 merely because torch supports the type.
    """
    cpu = cast(Any, torch.cpu)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except RuntimeError:  # pragma: no cover - probe unavailable in this build
                pass
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    words = set(flags.split())
    # x86: amx_bf16 / avx512_bf16; aarch64: bf16 in "Features".
    return bool(words & {"amx_bf16", "avx512_bf16", "bf16"})


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The compute dtype for settings.dtype on ``device`` ('auto' resolves per hardware)."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def length_buckets(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, each under ``batch_tokens`` padded.

    Sorted by length (stable), then packed greedily: a batch's padded size is its count
    times its longest member, which is the member just added. A single item longer than
    the budget forms a batch of its own rather than being refused.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * max(lengths[i], 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class TorchBackend(TokenizerText):
    """A causal LM from transformers, scored with one batched prefill per primitive."""

    def __init__(self, settings: ModelSettings) -> None:
        self._settings = settings
        if settings.threads:
            # Process-wide in torch; a worker runs one backend, so that is the intent.
            torch.set_num_threads(settings.threads)
        self._device = torch.device(settings.device)
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but torch sees no CUDA device")
        self._dtype = pick_dtype(settings.dtype, self._device)
        self._resolved: ResolvedModel = resolve_model(settings)
        path = self._resolved.path
        local = self._resolved.local
        log.info(
            "loading %s from %s on %s as %s", self._resolved.name, path, self._device, self._dtype
        )
        self._tokenizer: Any = AutoTokenizer.from_pretrained(path, local_files_only=local)
        model: Any = AutoModelForCausalLM.from_pretrained(
            path, dtype=self._dtype, local_files_only=local
        )
        self._model: Any = model.to(self._device).eval()
        self._decoder: Any = self._model.get_decoder()
        self._head: Any = self._model.get_output_embeddings()
        if self._decoder is None or self._head is None:
            raise ConfigError(f"{path} is not a decoder with an LM head")
        config = self._model.config
        self._softcap: float | None = getattr(config, "final_logit_softcapping", None)
        self._vocab = int(self._head.weight.shape[0])
        self._bos: int | None = self._tokenizer.bos_token_id
        pad = self._tokenizer.pad_token_id
        if pad is None:
            pad = self._tokenizer.eos_token_id
        # Padding is always masked, so any valid id will do.
        self._pad: int = int(pad) if pad is not None else 0
        self._max_positions: int | None = getattr(config, "max_position_embeddings", None)

    # -- identity ---------------------------------------------------------------------------

    @property
    def model_version(self) -> str:
        return f"{self._resolved.name}@{_DTYPE_SHORT.get(self._dtype, str(self._dtype))}"

    @property
    def resolved(self) -> ResolvedModel:
        """Where the weights were loaded from (package version for lineage)."""
        return self._resolved

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def model(self) -> Any:
        """The underlying transformers model (benchmarks and tests compare against it)."""
        return self._model

    @property
    def max_prompt_tokens(self) -> int:
        """Longest prompt ``next_token_logprobs`` accepts (see PROMPT_MARGIN_TOKENS)."""
        limit = self._settings.max_tokens + PROMPT_MARGIN_TOKENS
        return min(limit, self._max_positions) if self._max_positions else limit

    # -- scoring ----------------------------------------------------------------------------

    def next_token_logprobs(self, prompts: list[str], candidates: list[int]) -> np.ndarray:
        out = np.zeros((len(prompts), len(candidates)), dtype=np.float64)
        if not prompts or not candidates:
            return out
        bad = [c for c in candidates if not 0 <= c < self._vocab]
        if bad:
            raise InvalidArgument(f"candidate token ids {bad} outside vocabulary {self._vocab}")
        encoded = [self.encode_prompt(p) for p in prompts]
        if any(not ids for ids in encoded):
            raise InvalidArgument("empty prompt: there is no position to read the answer at")
        limit = self.max_prompt_tokens
        too_long = [i for i, ids in enumerate(encoded) if len(ids) > limit]
        if too_long:
            worst = max(len(encoded[i]) for i in too_long)
            raise InvalidArgument(
                f"{len(too_long)} prompt(s) exceed {limit} tokens (longest {worst}); truncate "
                "the sample text (backend.truncate) before building the prompt: cutting the "
                "prompt's end would drop the question"
            )
        cand = torch.tensor(candidates, dtype=torch.long, device=self._device)
        with torch.inference_mode():
            for batch in length_buckets([len(ids) for ids in encoded], self._settings.batch_tokens):
                ids, mask = self._pad_batch([encoded[i] for i in batch], left=True)
                hidden = self._hidden(ids, mask)[:, -1, :]
                logprobs = torch.log_softmax(self._logits(hidden).float(), dim=-1)
                out[batch] = logprobs[:, cand].double().cpu().numpy()
        return out

    def sequence_nll(self, texts: list[str]) -> list[NLL]:
        budget = self._settings.max_tokens
        encoded = self.encode_for_nll(texts, budget)
        results: list[NLL] = [NLL(0.0, 0)] * len(texts)
        with torch.inference_mode():
            for batch in length_buckets([len(s) for s in encoded], self._settings.batch_tokens):
                seqs = [encoded[i] for i in batch]
                if max(len(s) for s in seqs) < 2:
                    continue  # nothing to predict
                ids, mask = self._pad_batch(seqs, left=False)
                hidden = self._hidden(ids, mask)
                # Position t predicts token t+1; keep only real (unpadded) targets.
                valid = mask[:, 1:].bool()
                rows = hidden[:, :-1, :][valid]
                targets = ids[:, 1:][valid]
                nll = self._chunked_nll(rows, targets)
                counts = valid.sum(dim=1).tolist()
                totals = torch.split(nll, counts)
                for i, part, n in zip(batch, totals, counts, strict=True):
                    results[i] = NLL(float(part.sum().item()), int(n))
        return results

    # -- internals --------------------------------------------------------------------------

    def _pad_batch(self, seqs: list[list[int]], *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            if not s:
                continue
            sl = slice(width - len(s), width) if left else slice(0, len(s))
            ids[row, sl] = torch.tensor(s, dtype=torch.long)
            mask[row, sl] = 1
        return ids.to(self._device), mask.to(self._device)

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states (after the last norm), without the LM head.

        Position ids count real tokens only, so a left-padded prompt sees exactly the
        positions it would see alone (RoPE is relative, but absolute-position models and
        numerics both prefer exact positions).
        """
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self._decoder(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
        )
        return cast(torch.Tensor, out.last_hidden_state)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = cast(torch.Tensor, self._head(hidden))
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _chunked_nll(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-row cross-entropy (float32), applying the head over bounded row chunks."""
        chunk = max(1, HEAD_CHUNK_BYTES // (4 * self._vocab))
        parts = [
            torch.nn.functional.cross_entropy(self._logits(r).float(), t, reduction="none")
            for r, t in _chunks(rows, targets, chunk)
        ]
        if not parts:
            return torch.zeros(0, device=rows.device)
        return torch.cat(parts).double().cpu()


def _chunks(
    rows: torch.Tensor, targets: torch.Tensor, size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, rows.shape[0], size):
        yield rows[start : start + size], targets[start : start + size]
