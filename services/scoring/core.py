"""The scoring core: heuristic rules, then the learned classifier, then perplexity, then
Ask-LLM, each with a keep policy. Pure logic on domain objects; the gRPC servicer, the Kafka stage
and the local runner all call ``ScoringCore.score``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from services.runtime.backends.base import Lazy, LMBackend
from services.runtime.domain import Action, LineageEvent, Outcome, Sample
from services.runtime.errors import ConfigError, InvalidArgument
from services.runtime.stage import StageObserver
from services.scoring.heuristics import HeuristicFilter
from services.scoring.prompts import (
    answer_token_ids,
    build_ask_llm_prompt,
    few_shot_history,
    normalized_yes_probability,
)
from services.scoring.quantile import TopFractionFilter
from services.scoring.settings import STEP_ORDER, ScoringSettings, SignalPolicy, Step

if TYPE_CHECKING:
    from services.scoring.classifier import QualityClassifier

STAGE = "scoring"

Filters = dict[str, TopFractionFilter]
"""Top-fraction filters by step: the state behind 'keep the best X% so far'."""
LLM_STEPS: frozenset[str] = frozenset({"perplexity", "ask_llm"})
SCORED_STEPS: tuple[str, ...] = ("classifier", "perplexity", "ask_llm")
"""Steps that give a score (and have a keep policy)."""
HIGHER_IS_BETTER = {"ask_llm": True, "perplexity": False, "classifier": True}


class ScoringCore:
    """Scores samples and applies the keep policies.

    The LM backend is created on first use so that a heuristics-only
    configuration never loads a model.
    """

    def __init__(
        self,
        settings: ScoringSettings,
        backend: LMBackend | Callable[[], LMBackend] | None = None,
        metrics: StageObserver | None = None,
        classifier: QualityClassifier | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        """Unused by scoring: every decision shows in its outcomes, which the adapters count."""
        self.heuristics = HeuristicFilter(settings.heuristics)
        self._backend = Lazy(backend, "next_token_logprobs", self._default_backend)
        self._answer_ids: tuple[list[int], list[int]] | None = None
        self._history: list[tuple[str, str]] | None = None
        self._classifier: QualityClassifier | None = classifier
        self._filters = self.new_filters()
        # Cumulative seconds per step, for run reports (not for decisions).
        self.step_seconds: dict[str, float] = dict.fromkeys(STEP_ORDER, 0.0)

    def new_filters(self) -> Filters:
        """Fresh top-fraction filters for the configured steps (none if no step keeps a top
        fraction). The core's own set serves gRPC and local runs; the Kafka worker keeps a
        set per input partition (services.scoring.worker)."""
        filters: Filters = {}
        for step in SCORED_STEPS:
            pol = self._policy(step)
            if pol.mode == "top_fraction":
                filters[step] = TopFractionFilter(pol.top_fraction, HIGHER_IS_BETTER[step])
        return filters

    # -- configuration ---------------------------------------------------
    @property
    def steps(self) -> list[Step]:
        return [s for s in STEP_ORDER if s in self.settings.steps]

    @property
    def signals(self) -> list[str]:
        return [s for s in self.steps if s in SCORED_STEPS]

    def _policy(self, step: str) -> SignalPolicy:
        if step == "classifier":
            return self.settings.classifier.policy
        return (
            self.settings.ask_llm.policy if step == "ask_llm" else self.settings.perplexity.policy
        )

    @property
    def classifier(self) -> QualityClassifier:
        """The trained classifier, loaded on first use from ``classifier.artifact``."""
        if self._classifier is None:
            from services.scoring.classifier import QualityClassifier

            c = self.settings.classifier
            self._classifier = QualityClassifier(
                c.artifact, device=c.device, batch_size=c.batch_size, store=c.store
            )
        return self._classifier

    @property
    def backend(self) -> LMBackend:
        return self._backend.get()

    def _default_backend(self) -> LMBackend:
        from services.runtime.backends.factory import create_backend

        return create_backend(self.settings.model)

    @property
    def model_version(self) -> str:
        return self._version(self.steps)

    def _version(self, steps: Sequence[str]) -> str:
        """What decided: the LM's version and/or ``classifier:<version>``, else 'heuristics'."""
        parts = []
        if "classifier" in steps:
            parts.append(f"classifier:{self.classifier.version}")
        if any(s in LLM_STEPS for s in steps):
            parts.append(self.backend.model_version)
        if "ask_llm" in steps:
            # The prompt is checked against the backend's limit where its version is first
            # read: at worker start, before any batch (a batch would only dead-letter).
            self._few_shot_history()
            prompt = self.settings.ask_llm.prompt_version()
            if prompt:  # another question or examples: other decisions
                parts.append(prompt)
        return "+".join(parts) or "heuristics"

    def resolve_steps(self, requested: Sequence[str]) -> list[Step]:
        """The steps a request asks for, validated, in canonical order.

        Only configured steps: a request cannot make a heuristics-only server load a
        language model. Asking for another is INVALID_ARGUMENT (not FAILED_PRECONDITION):
        the server's steps are fixed for its life, so the request, not the server's state,
        has to change (ask without ``signals`` for the configured pipeline)."""
        if not requested:
            return self.steps
        unknown = sorted(set(requested) - set(STEP_ORDER))
        if unknown:
            raise InvalidArgument(f"unknown signals {unknown}; known: {list(STEP_ORDER)}")
        configured = self.steps
        missing = [s for s in STEP_ORDER if s in requested and s not in configured]
        if missing:
            raise InvalidArgument(
                f"signals {missing} are not computed by this server; it is configured "
                f"for {configured}"
            )
        return [s for s in configured if s in requested]

    # -- the work --------------------------------------------------------
    def process(self, samples: list[Sample], filters: Filters | None = None) -> list[Outcome]:
        """The Kafka/local entry point: configured steps, policies applied (top fractions
        by ``filters``, default the core's own)."""
        return self.score(samples, filters=filters)

    def score(
        self,
        samples: list[Sample],
        steps: Sequence[str] = (),
        apply_policy: bool = True,
        filters: Filters | None = None,
    ) -> list[Outcome]:
        """Run ``steps`` (default: configured) over ``samples``; one outcome each, in order.

        A sample dropped by one step is not shown to later (more expensive) steps.
        """
        run = self.resolve_steps(steps)
        filters = self._filters if filters is None else filters
        reasons: list[str] = [""] * len(samples)
        for step in run:
            alive = [i for i, r in enumerate(reasons) if not r]
            if not alive:
                break
            batch = [samples[i] for i in alive]
            t0 = time.perf_counter()
            if step == "heuristics":
                verdicts = self._heuristics(batch)
            elif step == "classifier":
                verdicts = self._apply("classifier", self._classify(batch), filters)
            elif step == "perplexity":
                verdicts = self._apply("perplexity", self._perplexity(batch), filters)
            else:
                verdicts = self._apply("ask_llm", self._ask_llm(batch), filters)
            self.step_seconds[step] += time.perf_counter() - t0
            if not apply_policy:
                continue
            for i, why in zip(alive, verdicts, strict=True):
                if why:
                    reasons[i] = f"{step}:{why}"
        version = self._version(run)
        outcomes = []
        for s, why in zip(samples, reasons, strict=True):
            s.lineage.append(
                LineageEvent(
                    stage=STAGE,
                    action=Action.DROPPED if why else Action.KEPT,
                    reason=why,
                    model_version=version,
                )
            )
            outcomes.append(Outcome(sample=s, kept=not why, reason=why))
        return outcomes

    def _heuristics(self, batch: list[Sample]) -> list[str]:
        out = []
        for s in batch:
            res = self.heuristics.evaluate(s.content)
            out.append(res.failed[0] if res.failed else "")
        return out

    def _classify(self, batch: list[Sample]) -> list[float]:
        probs = self.classifier.score([s.content for s in batch])
        for s, v in zip(batch, probs, strict=True):
            s.scores["classifier"] = float(v)
        return [float(v) for v in probs]

    def _perplexity(self, batch: list[Sample]) -> list[float]:
        nlls = self.backend.sequence_nll([s.content for s in batch])
        scores = [n.perplexity for n in nlls]
        for s, v in zip(batch, scores, strict=True):
            s.scores["perplexity"] = v
        return scores

    def _ask_llm(self, batch: list[Sample]) -> list[float]:
        be = self.backend
        if self._answer_ids is None:
            self._answer_ids = answer_token_ids(be)
        yes, no = self._answer_ids
        budget = self.settings.model.max_tokens
        question = self.settings.ask_llm.question
        history = self._few_shot_history()
        prompts = [
            be.render_chat(build_ask_llm_prompt(be.truncate(s.content, budget), question), history)
            for s in batch
        ]
        lp = be.next_token_logprobs(prompts, yes + no)
        probs = normalized_yes_probability(lp, len(yes))
        for s, v in zip(batch, probs, strict=True):
            s.scores["ask_llm"] = float(v)
        return [float(v) for v in probs]

    def _few_shot_history(self) -> list[tuple[str, str]]:
        """The Ask-LLM examples as chat turns, built and checked once: a sample of
        ``max_tokens`` after them must fit the backend's prompt limit, else every batch would
        be refused, so too long examples are a configuration error, said up front."""
        if self._history is None:
            be, a = self.backend, self.settings.ask_llm
            budget = self.settings.model.max_tokens
            history = few_shot_history(
                [(be.truncate(text, budget), answer) for text, answer in a.example_pairs()],
                a.question,
            )
            placeholder = build_ask_llm_prompt("x" * 8, a.question)  # ~2 tokens of sample
            need = be.count_tokens([be.render_chat(placeholder, history)])[0] + budget
            limit = be.max_prompt_tokens
            if need > limit:
                raise ConfigError(
                    f"ask_llm.examples and question take {need - budget} tokens around a "
                    f"{budget}-token sample, over the prompt limit of {limit}: raise "
                    f"model.prompt_margin_tokens to at least "
                    f"{need - budget}, or use fewer or shorter examples"
                )
            self._history = history
        return self._history

    def _apply(self, step: str, scores: list[float], filters: Filters) -> list[str]:
        pol = self._policy(step)
        if pol.mode == "annotate":
            return [""] * len(scores)
        if pol.mode == "top_fraction":
            keep = filters[step].decide(scores)
            return ["" if k else "below_top_fraction" for k in keep]
        if HIGHER_IS_BETTER[step]:
            return ["" if v >= pol.threshold else "below_threshold" for v in scores]
        return ["" if v <= pol.threshold else "above_threshold" for v in scores]
