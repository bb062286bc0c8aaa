"""The distillation core: teacher responses with compact top-k logprobs for KD.

For each sample the prompt is its ``prompt`` (an SFT pair) or else its ``text`` (which
then becomes the prompt, turning the document into a pair). The teacher generates a
response in one batched ``generate`` call with ``top_logprobs = k``; the response
replaces ``sample.response`` and the compact payload (response token ids plus the top-k
ids and float16 logprobs of every position, see ``services.distill.codec``) rides in the
sample's metadata or in S3. Lineage records CHANGED with the teacher's model version.
Pure logic: the gRPC servicer, the Kafka stage and local runs all call ``distill``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from services.distill import codec
from services.distill.codec import ObjectStore, TopK
from services.distill.settings import DistillSettings
from services.runtime.backends.base import (
    Generation,
    GenerationParams,
    LMBackend,
    merge_generation,
)
from services.runtime.domain import Action, LineageEvent, Outcome, Sample
from services.runtime.errors import InvalidArgument, SluiceError
from services.runtime.stage import GenerativeCore, StageObserver

STAGE = "distill"
REASON_CHANGED = "teacher_response"
REASON_EMPTY = f"{STAGE}:empty_response"
ORIGINAL_RESPONSE_KEY = "distill.original_response"
FINISH_REASON_KEY = "distill.finish_reason"
RESPONSE_TOKENS_KEY = "distill.response_tokens"
PROMPT_TRUNCATED_KEY = "distill.prompt_truncated"

BackendSource = LMBackend | Callable[[], LMBackend] | None


class DistillCore(GenerativeCore[DistillSettings]):
    """Distils samples with one teacher model; the model loads on first use."""

    def __init__(
        self,
        settings: DistillSettings,
        backend: BackendSource = None,
        store: ObjectStore | None = None,
        metrics: StageObserver | None = None,
    ) -> None:
        self.store = store
        super().__init__(settings, backend, metrics=metrics)

    @property
    def generation_cap(self) -> int:
        """Requests may ask for up to ``max_new_tokens_limit``: the engine reserves that."""
        return self.settings.max_new_tokens_limit

    @property
    def signals(self) -> Sequence[str]:
        return ()  # no scores: the output is a response and its payload

    @property
    def steps(self) -> Sequence[str]:
        return (STAGE,)  # one step; its drop reasons start with 'distill:'

    # -- the work ----------------------------------------------------------------------

    def process(self, samples: list[Sample]) -> list[Outcome]:
        """The Kafka/local entry point: the configured generation settings."""
        return self.distill(samples)

    def params(self, overrides: Mapping[str, Any] | None = None) -> GenerationParams:
        """The configured generation settings with a request's overrides, validated; a
        request may ask for up to ``max_new_tokens_limit`` (the engine reserves that)."""
        s = self.settings
        params = merge_generation(s.generation, overrides, cap=self.generation_cap)
        if params.top_logprobs < 1:
            raise InvalidArgument("top_k must be >= 1: distillation stores the top-k logprobs")
        return params

    def distill(
        self, samples: list[Sample], overrides: Mapping[str, Any] | None = None
    ) -> list[Outcome]:
        """One outcome per sample, in order: CHANGED with the teacher's response, or
        dropped when the teacher answered nothing. Samples change only after the whole
        batch was generated, so a failed call can be retried with the same objects."""
        params = self.params(overrides)
        prompts = [_prompt_of(s) for s in samples]
        if not samples:
            return []
        backend = self.backend
        budget = self.settings.model.max_tokens
        cut = [backend.truncate(p, budget) for p in prompts]
        started = time.perf_counter()
        generations = backend.generate([self.teacher_prompt(c) for c in cut], params)
        if self.metrics is not None:
            tokens = sum(len(g.token_ids) for g in generations)
            self.metrics.observe_generation(tokens, time.perf_counter() - started)
        version = backend.model_version
        return [
            self._apply(s, c, c != p, g, version)
            for s, c, p, g in zip(samples, cut, prompts, generations, strict=True)
        ]

    def teacher_prompt(self, prompt: str) -> str:
        """The rendered prompt the teacher answers for a sample's ``prompt`` (a student
        trained on the pair should see the same text)."""
        message = self.settings.instruction_template.replace("{prompt}", prompt)
        return self.backend.render_chat(message) if self.settings.chat_template else message

    def _apply(
        self, sample: Sample, prompt: str, truncated: bool, generation: Generation, version: str
    ) -> Outcome:
        """The sample as a (prompt, teacher response) pair. The prompt is the one the
        teacher saw: a document used as the prompt moves from ``text`` to ``prompt``, and
        a prompt over the token budget is kept cut (head), flagged in metadata."""
        reason = "" if generation.token_ids else REASON_EMPTY
        if not reason:
            sample.text, sample.prompt = "", prompt
            if truncated:
                sample.metadata[PROMPT_TRUNCATED_KEY] = "true"
            self._attach(sample, generation)
        sample.lineage.append(
            LineageEvent(
                stage=STAGE,
                action=Action.DROPPED if reason else Action.CHANGED,
                reason=reason or REASON_CHANGED,
                model_version=version,
            )
        )
        return Outcome(sample=sample, kept=not reason, reason=reason)

    def _attach(self, sample: Sample, generation: Generation) -> None:
        if self.settings.keep_original_response and sample.response:
            sample.metadata[ORIGINAL_RESPONSE_KEY] = sample.response
        sample.response = generation.text
        sample.metadata[FINISH_REASON_KEY] = generation.finish_reason
        sample.metadata[RESPONSE_TOKENS_KEY] = str(len(generation.token_ids))
        if generation.top_ids is None or generation.top_logprobs is None:
            raise SluiceError("the backend returned no top-k logprobs")
        topk = TopK.build(generation.token_ids, generation.top_ids, generation.top_logprobs)
        payload = codec.encode(topk)
        codec.attach(sample, payload, self.settings.topk_store.inline_max_bytes, self.store)


def _prompt_of(sample: Sample) -> str:
    prompt = sample.prompt or sample.text
    if not prompt.strip():
        raise InvalidArgument(
            f"sample {sample.id!r} has no prompt: set 'prompt' (or 'text', used as the prompt)"
        )
    return prompt
