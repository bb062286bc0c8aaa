"""The rewriting core: toxicity screen, rewrite, drift guard, re-check, lineage.

Pure logic on domain objects; the gRPC servicer, the Kafka stage and local runs all call
``RewriteCore.rewrite`` (``process`` with the configured options). For each sample:

1. the text to rewrite is ``text`` (or ``response`` for an SFT pair without text);
2. toxicity: the lexicon, then the LLM judge for what it passes; a toxic sample is
   dropped, queued for a detoxifying rewrite, or flagged and treated as clean, by policy;
3. one batched ``generate`` for every queued rewrite (quality and detoxify);
4. the drift guard rejects empty, echoed, too short/long and dissimilar rewrites;
5. accepted rewrites are checked for toxicity again (a rewrite must not add any);
6. an accepted rewrite replaces the text, keeps the id, and appends a CHANGED lineage
   event whose parent_id is the original's id; a rejected one keeps the original (or drops
   the sample, by ``drift.on_reject``) with the reason in lineage.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from services.rewrite.drift import DriftCheck, DriftGuard
from services.rewrite.prompts import (
    DETOXIFY,
    PRESETS,
    build_rewrite_prompt,
    clean_rewrite,
    instruction_for,
)
from services.rewrite.settings import TOXICITY_POLICIES, RewriteSettings, ToxicityPolicy
from services.rewrite.toxicity import Lexicon, Source, ToxicityChecker, ToxicityJudge, Verdict
from services.runtime.backends.base import (
    GenerationParams,
    merge_generation,
)
from services.runtime.backends.embeddings import EmbeddingSettings
from services.runtime.domain import Action, LineageEvent, Outcome, Sample
from services.runtime.errors import InvalidArgument
from services.runtime.stage import GenerativeCore

STAGE = "rewrite"
TargetField = Literal["text", "response"]


@dataclass(frozen=True, slots=True)
class RewriteOptions:
    """What one call does: the configured defaults, or a request's overrides."""

    instruction: str
    """The quality-rewrite instruction; '' = no quality rewrite (toxicity control only)."""
    label: str
    """Its name in lineage and metadata: the preset name, or 'custom'."""
    params: GenerationParams
    toxicity_policy: ToxicityPolicy


@dataclass(frozen=True, slots=True)
class _Job:
    """One sample queued for generation."""

    index: int
    field: TargetField
    original: str
    instruction: str
    label: str
    toxic: Source
    """The toxicity source for a detoxifying rewrite; '' for a quality rewrite."""


@dataclass(frozen=True, slots=True)
class _Decision:
    action: Action
    reason: str = ""


def target(sample: Sample) -> tuple[TargetField, str]:
    """The field a rewrite replaces: the document text, else an SFT pair's response."""
    if sample.text.strip() or not sample.response.strip():
        return "text", sample.text
    return "response", sample.response


class RewriteCore(GenerativeCore[RewriteSettings]):
    """Rewrites samples; the LM backend and the embedder are created on first use."""

    def setup(self) -> None:
        tox = self.settings.toxicity
        self.lexicon = Lexicon.from_sources(tox.terms, tox.terms_file)
        self.guard = DriftGuard(self.settings.drift, lambda: self.embedder)
        self._checker: ToxicityChecker | None = None
        self.default_options = self.options()

    def embedding_settings(self) -> EmbeddingSettings:
        return self.settings.drift.embedding

    # -- configuration ---------------------------------------------------------------------

    @property
    def steps(self) -> Sequence[str]:
        """None derived from drop reasons: the core reports its own per-step counts
        (toxicity: screened/non-toxic; rewrite: attempted/accepted) through
        ``metrics``, since most of its decisions keep the sample."""
        return ()

    @property
    def signals(self) -> Sequence[str]:
        return ["toxicity"] if self.settings.toxicity.enabled else []

    @property
    def checker(self) -> ToxicityChecker:
        if self._checker is None:
            tox = self.settings.toxicity
            judge = (
                ToxicityJudge(self.backend, tox.question, self.settings.model.max_tokens)
                if tox.judge
                else None
            )
            self._checker = ToxicityChecker(self.lexicon, judge, tox.threshold)
        return self._checker

    def options(
        self,
        preset: str = "",
        instruction: str = "",
        generation: Mapping[str, Any] | None = None,
        toxicity_policy: str = "",
    ) -> RewriteOptions:
        """Options from the settings with a request's overrides, validated (InvalidArgument)."""
        cfg = self.settings
        if preset and preset not in PRESETS:
            raise InvalidArgument(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        if toxicity_policy and toxicity_policy not in TOXICITY_POLICIES:
            raise InvalidArgument(
                f"unknown toxicity policy {toxicity_policy!r}; known: {list(TOXICITY_POLICIES)}"
            )
        if instruction.strip():
            text, label = instruction.strip(), "custom"
        elif preset:
            text, label = instruction_for(preset), preset
        else:
            custom = cfg.instruction.custom
            text = instruction_for(cfg.instruction.preset, custom)
            label = "custom" if custom.strip() else cfg.instruction.preset
        policy: ToxicityPolicy = toxicity_policy or cfg.toxicity.policy  # type: ignore[assignment]
        return RewriteOptions(text, label, merge_generation(cfg.generation, generation), policy)

    # -- the work --------------------------------------------------------------------------

    def process(self, samples: list[Sample]) -> list[Outcome]:
        """The Kafka/local entry point: the configured options."""
        return self.rewrite(samples, self.default_options)

    def rewrite(self, samples: list[Sample], options: RewriteOptions) -> list[Outcome]:
        """One outcome per sample, in order; rewritten samples keep their ids."""
        decisions: list[_Decision | None] = [None] * len(samples)
        jobs: list[_Job] = []
        verdicts = self._screen(samples)
        for i, (s, verdict) in enumerate(zip(samples, verdicts, strict=True)):
            field, original = target(s)
            if not original.strip():
                decisions[i] = _Decision(Action.KEPT, "rewrite:no_text")
            elif verdict.toxic and options.toxicity_policy == "drop":
                decisions[i] = _Decision(Action.DROPPED, f"toxicity:{verdict.source}")
            elif verdict.toxic and options.toxicity_policy == "rewrite":
                jobs.append(_Job(i, field, original, DETOXIFY, "detoxify", verdict.source))
            elif options.instruction:
                jobs.append(_Job(i, field, original, options.instruction, options.label, ""))
            else:
                decisions[i] = _Decision(Action.KEPT)
        self._run(samples, jobs, options.params, decisions)
        return self._finish(samples, decisions)

    def _screen(self, samples: Sequence[Sample]) -> list[Verdict]:
        """Toxicity verdicts (scores and metadata recorded on the samples)."""
        clean = Verdict(False, "", None)
        if not self.settings.toxicity.enabled:
            return [clean] * len(samples)
        texts = [target(s)[1] for s in samples]
        todo = [i for i, t in enumerate(texts) if t.strip()]
        verdicts = [clean] * len(samples)
        for i, v in zip(todo, self.checker.check([texts[i] for i in todo]), strict=True):
            verdicts[i] = v
            if v.score is not None:
                samples[i].scores["toxicity"] = v.score
            if v.toxic:
                samples[i].metadata["toxicity"] = v.source
        self._step("toxicity", len(todo), sum(not verdicts[i].toxic for i in todo))
        return verdicts

    def _run(
        self,
        samples: Sequence[Sample],
        jobs: list[_Job],
        params: GenerationParams,
        decisions: list[_Decision | None],
    ) -> None:
        if not jobs:
            return
        be = self.backend
        lengths = be.count_tokens([j.original for j in jobs])
        fits = []
        for job, n in zip(jobs, lengths, strict=True):
            if n > self.settings.model.max_tokens:
                decisions[job.index] = self._rejected(job, "rewrite:input_too_long")
            else:
                fits.append(job)
        rewrites, truncated = self._generate(fits, params)
        checks = self.guard.check(
            [j.original for j in fits], rewrites, [j.instruction for j in fits], truncated
        )
        accepted = []
        for job, text, check in zip(fits, rewrites, checks, strict=True):
            _record(samples[job.index], check)
            if check.reason:
                decisions[job.index] = self._rejected(job, check.reason)
            else:
                accepted.append((job, text))
        accepted = self._recheck(accepted, decisions)
        for job, text in accepted:
            decisions[job.index] = self._apply(samples[job.index], job, text)
        self._step("rewrite", len(jobs), len(accepted))

    def _generate(
        self, jobs: Sequence[_Job], params: GenerationParams
    ) -> tuple[list[str], list[bool]]:
        """Cleaned rewrites, and whether each stopped at max_new_tokens."""
        if not jobs:
            return [], []
        be = self.backend
        prompts = [be.render_chat(build_rewrite_prompt(j.instruction, j.original)) for j in jobs]
        t0 = time.perf_counter()
        out = be.generate(prompts, params)
        if self.metrics is not None:
            tokens = sum(len(g.token_ids) for g in out)
            self.metrics.observe_generation(tokens, time.perf_counter() - t0)
        return [clean_rewrite(g.text) for g in out], [g.finish_reason == "length" for g in out]

    def _recheck(
        self, accepted: list[tuple[_Job, str]], decisions: list[_Decision | None]
    ) -> list[tuple[_Job, str]]:
        """Accepted rewrites that are not toxic themselves."""
        if not self.settings.toxicity.enabled or not accepted:
            return accepted
        verdicts = self.checker.check([text for _, text in accepted])
        kept = []
        for (job, text), v in zip(accepted, verdicts, strict=True):
            if v.toxic:
                decisions[job.index] = self._rejected(job, "rewrite:toxic")
            else:
                kept.append((job, text))
        return kept

    def _rejected(self, job: _Job, why: str) -> _Decision:
        """A rewrite that cannot be used: a toxic original is dropped; otherwise the
        original stays (or goes, under drift.on_reject='drop') with the reason."""
        if job.toxic:
            return _Decision(
                Action.DROPPED,
                "toxicity:persistent" if why == "rewrite:toxic" else "toxicity:rewrite_failed",
            )
        if self.settings.drift.on_reject == "drop":
            return _Decision(Action.DROPPED, why)
        return _Decision(Action.KEPT, why)

    def _apply(self, sample: Sample, job: _Job, text: str) -> _Decision:
        if self.settings.keep_original:
            sample.metadata["original_text"] = job.original
        sample.metadata["rewrite"] = job.label
        if job.field == "text":
            sample.text = text
        else:
            sample.response = text
        if job.toxic:
            sample.metadata["toxicity"] = f"{job.toxic}:detoxified"
            return _Decision(Action.CHANGED, "toxicity:detoxified")
        return _Decision(Action.CHANGED, f"rewrite:{job.label}")

    def _finish(
        self, samples: Sequence[Sample], decisions: Sequence[_Decision | None]
    ) -> list[Outcome]:
        version = self._backend.get().model_version if self._backend.loaded else "lexical"
        outcomes = []
        for s, d in zip(samples, decisions, strict=True):
            d = d or _Decision(Action.KEPT)
            changed = d.action == Action.CHANGED
            s.lineage.append(
                LineageEvent(
                    stage=STAGE,
                    action=d.action,
                    reason=d.reason,
                    model_version=version,
                    parent_id=s.id if changed else "",
                )
            )
            dropped = d.action == Action.DROPPED
            outcomes.append(Outcome(sample=s, kept=not dropped, reason=d.reason if dropped else ""))
        return outcomes

    def _step(self, step: str, n_in: int, n_kept: int) -> None:
        if self.metrics is not None and n_in:
            self.metrics.observe_step(step, n_in, n_kept)


def _record(sample: Sample, check: DriftCheck) -> None:
    sample.scores["rewrite_length_ratio"] = check.length_ratio
    sample.scores["rewrite_copy_ratio"] = check.copy_ratio
    if check.similarity is not None:
        sample.scores["rewrite_similarity"] = check.similarity
