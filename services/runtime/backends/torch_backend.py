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

Generation runs its own decode loop over length buckets (``DecodeBatch``): one prefill
of the left-padded bucket, then one token per step through the KV cache. A prompt that
ends (EOS, a stop string) leaves the batch and every cache layer at that step, so it
costs nothing afterwards; transformers' ``generate`` computes it until the last prompt of
its bucket ends (``decode_loop='transformers'`` keeps that path, with the same results,
as the benchmark's baseline). ``compile_decode`` decodes over a static cache with a
``torch.compile``d step, for CUDA. Three helpers make it exact for this interface:

- ``TopKRecorder`` runs first on the raw logits and keeps the top-k logprobs of every
  step (a few KB, instead of ``output_logits``' full ``steps x batch x vocab`` float32).
- ``SeededSampler`` (temperature > 0) draws each row's token with that row's own
  ``torch.Generator`` (an ended row draws no more), so a seeded prompt samples the same
  tokens whatever else shares its batch.
- ``StopOnStrings`` ends a row when a stop string appears in its generated text.
The model's own ``generation_config`` sampling defaults (repetition penalty, top-k ...)
are dropped at load: ``GenerationParams`` alone decides, as on vLLM.
"""

from __future__ import annotations

import bisect
import inspect
import logging
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StaticCache,
    StoppingCriteria,
    StoppingCriteriaList,
)

from services.runtime.backends.base import (
    NLL,
    FinishReason,
    Generation,
    GenerationParams,
    ModelSettings,
)
from services.runtime.backends.models import ResolvedModel, resolve_model
from services.runtime.backends.text import TokenizerText, first_stop
from services.runtime.errors import ConfigError, InvalidArgument

log = logging.getLogger(__name__)


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


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Indices packed into rows of at most ``row_tokens`` tokens, best-fit decreasing.

    Longest first, each into the row with the least room that still fits it (a sorted list
    of free room, so O(n log n)); an item longer than a row gets a row of its own. Rows come
    out fullest first, so consecutive rows have similar widths when batched.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    used: list[int] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), ascending
    for i in order:
        need = max(lengths[i], 1)
        at = bisect.bisect_left(room, (need, -1))
        if at < len(room):
            free, r = room.pop(at)
            rows[r].append(i)
            used[r] += need
            bisect.insort(room, (free - need, r))
        else:
            rows.append([i])
            used.append(need)
            if row_tokens > need:
                bisect.insort(room, (row_tokens - need, len(rows) - 1))
    return [rows[r] for r in sorted(range(len(rows)), key=lambda r: -used[r])]


def packed_passes(
    lengths: Sequence[int], pack_tokens: int, batch_tokens: int
) -> list[list[list[int]]]:
    """Forward passes of packed rows: rows of ``pack_tokens`` (widened to the longest item),
    as many per pass as ``batch_tokens`` holds (at least one)."""
    if not lengths:
        return []
    width = max(pack_tokens, max(lengths))
    rows = pack_rows(lengths, width)
    per_pass = max(1, batch_tokens // width)
    return [rows[first : first + per_pass] for first in range(0, len(rows), per_pass)]


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """Rows of prompts packed back to back: ``ids``/``positions`` are ``rows x width``;
    position ids restart at 0 for every prompt (and for the filler that ends a row), which
    is how transformers recognises packed sequences and masks attention between them."""

    ids: torch.Tensor
    positions: torch.Tensor
    row: torch.Tensor
    """Per prompt: its row."""
    start: torch.Tensor
    """Per prompt: its first column."""
    length: torch.Tensor
    """Per prompt: its token count."""

    @property
    def last(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of every prompt's last token."""
        return self.row, self.start + self.length - 1


def build_packed(seqs: list[list[int]], rows: list[list[int]], pad: int) -> PackedBatch:
    """The tensors (on the CPU) of ``rows``, each a list of indices into ``seqs``."""
    fills = [sum(len(seqs[i]) for i in r) for r in rows]
    width = max(fills)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    where = [(0, 0, 0)] * len(seqs)  # (row, start, length) per sequence
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            n = len(seqs[i])
            ids[r, col : col + n] = torch.tensor(seqs[i], dtype=torch.long)
            positions[r, col : col + n] = torch.arange(n)
            where[i] = (r, col, n)
            col += n
        positions[r, col:] = torch.arange(width - col)  # filler: a sequence of its own
    row, start, length = torch.tensor(where, dtype=torch.long).reshape(-1, 3).unbind(1)
    return PackedBatch(ids, positions, row, start, length)


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
        self._eos: list[int] = _eos_ids(self._model.generation_config, self._tokenizer)
        # Where a generated row ends: EOS, or the padding generate() appends after a row
        # stopped early (when padding is a special token, never text).
        special = set(self._tokenizer.all_special_ids)
        self._ends = frozenset(self._eos) | (frozenset({self._pad}) & special)
        # transformers renamed forward's past_key_values to cache (5.2x); either works.
        forward_args = inspect.signature(self._model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_args else "past_key_values"
        self._compiled: Any = None
        # Only the special ids survive from the checkpoint's generation defaults.
        self._model.generation_config = GenerationConfig(
            bos_token_id=self._bos, eos_token_id=self._eos, pad_token_id=self._pad
        )
        if settings.batch_tokens == 0:
            self._settings = settings.model_copy(
                update={"batch_tokens": self._auto_batch_tokens(config)}
            )
        self._packing_ok: bool | None = None  # checked on first use (see _packs)

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
        """Longest prompt ``next_token_logprobs`` accepts: ``max_tokens`` of sample text plus
        ``prompt_margin_tokens`` for the question, template and examples. A longer prompt is
        refused, never cut: its end holds the question, and a prompt cut at the end would be
        scored for the wrong question."""
        limit = self._settings.max_tokens + self._settings.prompt_margin_tokens
        return min(limit, self._max_positions) if self._max_positions else limit

    # -- scoring ----------------------------------------------------------------------------

    @property
    def settings(self) -> ModelSettings:
        """The settings in force (``batch_tokens`` resolved when it was auto)."""
        return self._settings

    @property
    def batch_tokens(self) -> int:
        """Tokens per scoring forward pass (resolved from free device memory when auto)."""
        return self._settings.batch_tokens

    def next_token_logprobs(self, prompts: list[str], candidates: list[int]) -> np.ndarray:
        out = np.zeros((len(prompts), len(candidates)), dtype=np.float64)
        if not prompts or not candidates:
            return out
        bad = [c for c in candidates if not 0 <= c < self._vocab]
        if bad:
            raise InvalidArgument(f"candidate token ids {bad} outside vocabulary {self._vocab}")
        encoded = self.encode_prompts_within(prompts, self.max_prompt_tokens)
        cand = torch.tensor(candidates, dtype=torch.long, device=self._device)
        # Results stay on the device until every batch ran: one transfer, no sync per batch.
        parts: list[tuple[list[int], torch.Tensor]] = []
        with torch.inference_mode():
            if self._packs():
                for members, packed in self._packed_batches(encoded):
                    row, col = packed.last
                    hidden = self._packed_hidden(packed)[row.to(self._device), col.to(self._device)]
                    logprobs = torch.log_softmax(self._logits(hidden).float(), dim=-1)
                    parts.append((members, logprobs[:, cand]))
            else:
                for batch in length_buckets([len(ids) for ids in encoded], self.batch_tokens):
                    ids, mask = self._pad_batch([encoded[i] for i in batch], left=True)
                    hidden = self._hidden(ids, mask)[:, -1, :]
                    logprobs = torch.log_softmax(self._logits(hidden).float(), dim=-1)
                    parts.append((batch, logprobs[:, cand]))
        for members, values in parts:
            out[members] = values.double().cpu().numpy()
        return out

    def sequence_nll(self, texts: list[str]) -> list[NLL]:
        budget = self._settings.max_tokens
        encoded = self.encode_for_nll(texts, budget)
        results: list[NLL] = [NLL(0.0, 0)] * len(texts)
        scored = [i for i, seq in enumerate(encoded) if len(seq) >= 2]  # else nothing to predict
        with torch.inference_mode():
            if self._packs():
                for members, packed in self._packed_batches([encoded[i] for i in scored]):
                    counts = (packed.length - 1).tolist()
                    nll = self._packed_nll(packed)
                    for k, part, n in zip(members, torch.split(nll, counts), counts, strict=True):
                        results[scored[k]] = NLL(float(part.sum().item()), int(n))
                return results
            lengths = [len(encoded[i]) for i in scored]
            for local in length_buckets(lengths, self.batch_tokens):
                batch = [scored[k] for k in local]
                ids, mask = self._pad_batch([encoded[i] for i in batch], left=False)
                hidden = self._hidden(ids, mask)
                # Position t predicts token t+1; keep only real (unpadded) targets.
                valid = mask[:, 1:].bool()
                rows = hidden[:, :-1, :][valid]
                targets = ids[:, 1:][valid]
                nll = self._chunked_nll(rows, targets)
                counts = valid.sum(dim=1).tolist()
                for i, part, n in zip(batch, torch.split(nll, counts), counts, strict=True):
                    results[i] = NLL(float(part.sum().item()), int(n))
        return results

    # -- packing ----------------------------------------------------------------------------

    def _packs(self) -> bool:
        """Whether scoring packs prompts into rows (``settings.packing``), checked once.

        The check runs two short sequences alone and packed into one row: a model whose
        attention does not honour restarted position ids (so the second sequence would
        attend to the first) disagrees, and then 'auto' falls back to length buckets
        (logged) while 'on' refuses to run."""
        mode = self._settings.packing
        if mode == "off" or (mode == "auto" and self._device.type != "cuda"):
            return False
        if self._packing_ok is None:
            self._packing_ok, detail = self._check_packing()
            if not self._packing_ok:
                if mode == "on":
                    raise ConfigError(f"packing is on but {self._resolved.name} {detail}")
                log.warning("%s %s: scoring in padded buckets", self._resolved.name, detail)
        return self._packing_ok

    def _check_packing(self) -> tuple[bool, str]:
        ids = self._tokenizer.encode(
            "Sequence packing check: the second text must not see the first one at all.",
            add_special_tokens=False,
        )
        first, second = ids[:12], ids[12:] or ids[:6]
        with torch.inference_mode():
            alone = self._hidden(*self._pad_batch([second], left=False))[0, len(second) - 1]
            packed = build_packed([first, second], [[0, 1]], self._pad)
            row, col = packed.last
            together = self._packed_hidden(packed)[row[1], col[1]]
        scale = float(alone.float().abs().max().clamp(min=1e-6))
        diff = float((together.float() - alone.float()).abs().max()) / scale
        tolerance = 1e-3 if self._dtype == torch.float32 else 5e-2
        ok = diff <= tolerance
        log.info("packing check for %s: relative difference %.2e", self._resolved.name, diff)
        return ok, (
            f"attends across packed sequences (relative difference {diff:.2e} > {tolerance})"
        )

    def _packed_batches(self, encoded: list[list[int]]) -> Iterator[tuple[list[int], PackedBatch]]:
        """(indices into ``encoded``, their packed tensors) per forward pass."""
        lengths = [len(seq) for seq in encoded]
        for group in packed_passes(lengths, self._settings.pack_tokens, self.batch_tokens):
            members = [i for row in group for i in row]
            local = {i: k for k, i in enumerate(members)}
            seqs = [encoded[i] for i in members]
            yield members, build_packed(seqs, [[local[i] for i in r] for r in group], self._pad)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._device.type == "cuda":
            return tensor.pin_memory().to(self._device, non_blocking=True)
        return tensor

    def _packed_hidden(self, packed: PackedBatch) -> torch.Tensor:
        """Final hidden states of packed rows: no attention mask, position ids restarting
        per sequence, from which transformers builds the block-diagonal causal mask (or
        the varlen boundaries of flash attention)."""
        out = self._decoder(
            input_ids=self._to_device(packed.ids),
            position_ids=self._to_device(packed.positions),
            use_cache=False,
        )
        return cast(torch.Tensor, out.last_hidden_state)

    def _packed_nll(self, packed: PackedBatch) -> torch.Tensor:
        """Per-token NLL of every packed sequence, concatenated in sequence order."""
        counts = (packed.length - 1).clamp(min=0)
        total = int(counts.sum())
        first = torch.cumsum(counts, 0) - counts
        offsets = torch.arange(total) - torch.repeat_interleave(first, counts)
        rows = torch.repeat_interleave(packed.row, counts)
        cols = torch.repeat_interleave(packed.start, counts) + offsets
        targets = packed.ids[rows, cols + 1]
        hidden = self._packed_hidden(packed)
        picked = hidden[rows.to(self._device), cols.to(self._device)]
        return self._chunked_nll(picked, targets.to(self._device))

    def _auto_batch_tokens(self, config: Any) -> int:
        """Tokens per scoring pass: 8192 on CPU; on CUDA, half the free memory after the
        weights over a per-token activation estimate (hidden states, the MLP's
        intermediate, a packed row's attention mask), within [8192, 65536]."""
        if self._device.type != "cuda":
            return 8192
        free, _ = torch.cuda.mem_get_info(self._device)
        width = self._settings.pack_tokens
        hidden = int(getattr(config, "hidden_size", 4096))
        inter = int(getattr(config, "intermediate_size", 4 * hidden))
        item = torch.tensor([], dtype=self._dtype).element_size()
        per_token = item * (8 * hidden + 4 * inter) + 2 * width
        tokens = int(0.5 * free / per_token)
        chosen = max(8192, min(65536, tokens // width * width))
        log.info("batch_tokens auto: %d (%.1f GiB free)", chosen, free / 2**30)
        return chosen

    # -- generation -------------------------------------------------------------------------

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Generation]:
        encoded = [self.encode_prompt(p) for p in prompts]
        self._check_generation_prompts(encoded, params.max_new_tokens)
        seeds = [params.seed if params.seed is not None else secrets.randbits(63) for _ in prompts]
        results: list[Generation | None] = [None] * len(prompts)
        # The bucket budget counts the KV cache each row grows to, not just its prompt.
        lengths = [len(ids) + params.max_new_tokens for ids in encoded]
        with torch.inference_mode():
            for batch in length_buckets(lengths, self._settings.batch_tokens):
                done = self._generate_batch(
                    [encoded[i] for i in batch], [seeds[i] for i in batch], params
                )
                for i, generation in zip(batch, done, strict=True):
                    results[i] = generation
        return cast(list[Generation], results)  # every index is in exactly one bucket

    def _check_generation_prompts(self, encoded: list[list[int]], max_new_tokens: int) -> None:
        if any(not ids for ids in encoded):
            raise InvalidArgument("empty prompt: the model has no BOS to start from")
        limit = self.max_prompt_tokens
        if self._max_positions:
            limit = min(limit, self._max_positions - max_new_tokens)
        longest = max((len(ids) for ids in encoded), default=0)
        if longest > limit:
            raise InvalidArgument(
                f"a prompt has {longest} tokens; at most {limit} fit with max_new_tokens="
                f"{max_new_tokens}: truncate the input (backend.truncate) before rendering"
            )

    def _generate_batch(
        self, seqs: list[list[int]], seeds: list[int], params: GenerationParams
    ) -> list[Generation]:
        if self._settings.decode_loop == "transformers":
            return self._generate_batch_transformers(seqs, seeds, params)
        ids, mask = self._pad_batch(seqs, left=True)
        recorder = TopKRecorder(params.top_logprobs) if params.top_logprobs else None
        sampler = (
            SeededSampler(params.temperature, params.top_p, seeds)
            if params.temperature > 0
            else None
        )
        stopper = StopOnStrings(self.decode, params.stop) if params.stop else None
        batch = DecodeBatch(self._model, self._cache_kwarg, ids, mask, params.max_new_tokens)
        if self._settings.compile_decode:
            batch.use_static_cache(self._compiled_step())
        rows: list[list[int]] = [[] for _ in seqs]
        logits = batch.prefill()
        for step in range(params.max_new_tokens):
            if recorder:
                recorder.record(logits, batch.rows)
            picks = sampler.pick(logits, batch.rows) if sampler else logits.argmax(dim=-1)
            ended: list[bool] = []
            for r, token in zip(batch.rows, picks.tolist(), strict=True):
                rows[r].append(token)
                ended.append(token in self._ends or bool(stopper and stopper.hit(rows[r])))
            if step + 1 == params.max_new_tokens or all(ended):
                break
            logits = batch.step(picks, ended)
        return [
            self._finish(row, len(seqs[r]), params, recorder.row(r) if recorder else None)
            for r, row in enumerate(rows)
        ]

    def _compiled_step(self) -> Any:
        """The model's forward compiled once for fixed decode shapes (one graph per batch
        size and cache length; CUDA graphs on a GPU)."""
        if self._compiled is None:
            mode = "reduce-overhead" if self._device.type == "cuda" else None
            self._compiled = torch.compile(self._model, mode=mode, dynamic=False)
        return self._compiled

    def _generate_batch_transformers(
        self, seqs: list[list[int]], seeds: list[int], params: GenerationParams
    ) -> list[Generation]:
        """The same contract through transformers' ``generate`` (``decode_loop='transformers'``):
        every row is computed until the last one ends."""
        ids, mask = self._pad_batch(seqs, left=True)
        width = ids.shape[1]
        recorder = TopKRecorder(params.top_logprobs) if params.top_logprobs else None
        processors: list[LogitsProcessor] = [recorder] if recorder else []
        if params.temperature > 0:
            processors.append(SeededSampler(params.temperature, params.top_p, seeds))
        criteria = [StopOnStrings(self.decode, params.stop, width)] if params.stop else []
        out = self._model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=GenerationConfig(
                max_new_tokens=params.max_new_tokens,
                do_sample=False,
                num_beams=1,
                bos_token_id=self._bos,
                eos_token_id=self._eos,
                pad_token_id=self._pad,
            ),
            logits_processor=LogitsProcessorList(processors),
            stopping_criteria=StoppingCriteriaList(criteria),
        )
        generated = out[:, width:].cpu().tolist()
        return [
            self._finish(row, len(seqs[r]), params, recorder.row(r) if recorder else None)
            for r, row in enumerate(generated)
        ]

    def _finish(
        self,
        row: list[int],
        prompt_tokens: int,
        params: GenerationParams,
        top: tuple[np.ndarray, np.ndarray] | None,
    ) -> Generation:
        """One row's ids cut at its first terminator (EOS, or padding after a stop), then
        its text cut before the first stop string."""
        end = next((j for j, t in enumerate(row) if t in self._ends), None)
        reason: FinishReason = "length" if end is None else "stop"
        ids = row if end is None else row[:end]
        text = self.decode(ids)
        cut = first_stop(text, params.stop)
        if cut is not None:
            reason, text = "stop", text[:cut]
            ids = self.ids_within(ids, cut)
        return Generation(
            text=text,
            token_ids=ids,
            finish_reason=reason,
            prompt_tokens=prompt_tokens,
            top_ids=None if top is None else top[0][: len(ids)],
            top_logprobs=None if top is None else top[1][: len(ids)],
        )

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


def _eos_ids(generation_config: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a generation: the checkpoint's (some list several, e.g. Llama 3's
    end-of-turn and end-of-text), else the tokenizer's EOS."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]


class TopKRecorder(LogitsProcessor):
    """Records the k most likely tokens and their logprobs of every row at every step, from
    the raw logits (it runs first, and the generation config adds no processor before it).

    Rows are the batch's original prompts: the decode loop passes which ones the live
    batch holds each step, since ended prompts leave it."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._ids: dict[int, list[np.ndarray]] = {}
        self._logprobs: dict[int, list[np.ndarray]] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.record(scores, range(scores.shape[0]))
        return scores

    def record(self, scores: torch.Tensor, rows: Sequence[int]) -> None:
        """One step: batch row b of ``scores`` is prompt ``rows[b]``."""
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        values, ids = logprobs.topk(min(self.k, logprobs.shape[-1]), dim=-1)
        ids_np, values_np = ids.to(torch.int32).cpu().numpy(), values.cpu().numpy()
        for b, r in enumerate(rows):
            self._ids.setdefault(r, []).append(ids_np[b])
            self._logprobs.setdefault(r, []).append(values_np[b])

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Prompt r's (steps, k) int32 ids and float32 logprobs."""
        if r not in self._ids:
            return np.zeros((0, self.k), np.int32), np.zeros((0, self.k), np.float32)
        return np.stack(self._ids[r]), np.stack(self._logprobs[r]).astype(np.float32)


class SeededSampler(LogitsProcessor):
    """Temperature + nucleus sampling with one random stream per row.

    Each row draws one uniform per step from its own generator and picks the token by
    inverse CDF; the returned scores are 0 at that token and -inf elsewhere, so the
    greedy step of ``generate`` takes it. A row's draws depend only on its seed and its
    own distribution, never on its batch neighbours.
    """

    def __init__(self, temperature: float, top_p: float, seeds: list[int]) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self._generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        pick = self.pick(scores, range(scores.shape[0])).unsqueeze(1)
        out = torch.full_like(scores, -torch.inf)
        return cast(torch.FloatTensor, out.scatter_(1, pick, 0.0))

    def pick(self, scores: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """One token per batch row; row b of ``scores`` is prompt ``rows[b]``, which draws
        from that prompt's own generator (ended prompts, absent from ``rows``, draw none)."""
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            probs = _nucleus(probs, self.top_p)
        cdf = probs.cumsum(dim=-1)
        u = torch.stack([torch.rand((), generator=self._generators[r]) for r in rows])
        target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(1)
        pick = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1)
        return pick.squeeze(1)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` with everything outside the smallest set of mass >= top_p zeroed (the
    most likely token always stays); not renormalized."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


class StopOnStrings(StoppingCriteria):
    """Ends a row once a stop string appears in its generated text (prompt excluded).

    Only the last tokens are decoded each step: a stop string that just completed lies
    within them (a token decodes to at least one character, or a few bytes of one).
    """

    def __init__(self, decode: Any, stops: list[str], prompt_width: int = 0) -> None:
        self._decode = decode
        self._stops = stops
        self._width = prompt_width
        self._window = 4 * max(len(s) for s in stops) + 4

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        hits = [self.hit(row) for row in input_ids[:, self._width :].tolist()]
        return cast(torch.BoolTensor, torch.tensor(hits, dtype=torch.bool, device=input_ids.device))

    def hit(self, generated: list[int]) -> bool:
        """Whether a stop string has appeared in these generated ids (checked each step)."""
        return first_stop(self._decode(generated[-self._window :]), self._stops) is not None


class DecodeBatch:
    """The prompts of one bucket while they decode: inputs, positions, mask and KV cache.

    Batch row b holds prompt ``slots[b]``. After every token ``step`` drops the prompts
    that just ended from the inputs and from every cache layer (``DynamicCache`` layers
    are index-selected), so an ended prompt costs nothing from the next forward pass on;
    transformers' ``generate`` computes it until the whole batch ends.

    With a static cache (``use_static_cache``, for a compiled step) shapes must stay
    fixed: ended prompts stay in the batch as dead rows, and the batch is compacted only
    when the live rows fit in half of it, so each bucket compiles a few batch sizes.
    """

    def __init__(
        self, model: Any, cache_kwarg: str, ids: torch.Tensor, mask: torch.Tensor, max_new: int
    ) -> None:
        self._model = model
        self._forward: Any = model
        self._cache_kwarg = cache_kwarg
        self._ids = ids
        self._mask = mask
        self._positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        self._cache: Any = DynamicCache(config=model.config)
        self._static = False
        self._width = ids.shape[1]  # mask columns in use
        self._capacity = ids.shape[1] + max_new
        self.slots = list(range(ids.shape[0]))
        self._live = [True] * len(self.slots)

    @property
    def rows(self) -> list[int]:
        """The prompts still generating, in the order of the logits ``prefill``/``step`` return."""
        return [r for r, live in zip(self.slots, self._live, strict=True) if live]

    def use_static_cache(self, compiled_forward: Any) -> None:
        """Decode with a preallocated cache of fixed shape through ``compiled_forward``."""
        self._cache = StaticCache(config=self._model.config, max_cache_len=self._capacity)
        self._forward = compiled_forward
        self._static = True
        rest = self._capacity - self._width
        self._mask = torch.cat([self._mask, self._mask.new_zeros((self._mask.shape[0], rest))], 1)

    def prefill(self) -> torch.Tensor:
        """Runs the prompts; the last position's logits, one row per prompt."""
        # A static cache's mask spans its whole capacity (unwritten columns are 0).
        logits = self._run(self._model, self._ids, self._mask, self._positions)
        self._positions = self._positions[:, -1:] + 1
        return logits

    def step(self, tokens: torch.Tensor, ended: list[bool]) -> torch.Tensor:
        """Feeds each live prompt its token (``ended`` flags the ones that just ended, in
        ``rows`` order); the next logits of the prompts still live."""
        live_at = [b for b, live in enumerate(self._live) if live]
        feed = torch.full((len(self.slots),), 0, dtype=torch.long, device=tokens.device)
        feed[live_at] = tokens
        for b, done in zip(live_at, ended, strict=True):
            self._live[b] = not done
        keep = self._keep()
        if keep is not None:
            index = torch.tensor(keep, device=tokens.device)
            self._select(index)
            feed = feed[index]
            self.slots = [self.slots[b] for b in keep]
            self._live = [self._live[b] for b in keep]
        if self._static:
            self._mask[:, self._width] = 1
            mask = self._mask
        else:
            self._mask = torch.cat([self._mask, self._mask.new_ones((len(self.slots), 1))], 1)
            mask = self._mask
        self._width += 1
        logits = self._run(self._forward, feed.unsqueeze(1), mask, self._positions)
        self._positions = self._positions + 1
        if all(self._live):
            return logits
        return logits[[b for b, live in enumerate(self._live) if live]]

    def _keep(self) -> list[int] | None:
        """Batch rows to keep, or None to keep the batch as it is."""
        live = [b for b, alive in enumerate(self._live) if alive]
        if len(live) == len(self.slots):
            return None
        if not self._static:
            return live
        size = len(self.slots)
        if len(live) > size // 2:
            return None
        while size // 2 >= len(live) and size > 1:
            size //= 2
        dead = [b for b, alive in enumerate(self._live) if not alive]
        return sorted(live + dead[: size - len(live)])

    def _select(self, index: torch.Tensor) -> None:
        self._mask = self._mask[index]
        self._positions = self._positions[index]
        if not self._static:
            self._cache.batch_select_indices(index)
            return
        for layer in self._cache.layers:  # static layers have no batch_select_indices
            if getattr(layer, "is_initialized", False):
                layer.keys = layer.keys[index].contiguous()
                layer.values = layer.values[index].contiguous()
                layer.batch_size = int(index.shape[0])
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)

    def _run(
        self, forward: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        out = forward(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: self._cache},
        )
        return cast(torch.Tensor, out.logits[:, -1, :])
