"""The synthesis core: plan drafts from seeds, generate, parse, filter, build samples.

Pure logic on domain objects; the gRPC servicer, the Kafka stage and local runs all call
``SynthCore.synthesize`` (``process`` adds the seeds' own outcomes). One call:

1. plans drafts: per seed and method, ``per_seed`` of them (grounded QA from a seed's
   text; Self-Instruct and Evol-Instruct from a seed's prompt; Self-Instruct also from the
   configured seed instructions on request);
2. first pass, one batched ``generate`` per parameter group: the question, the new
   instruction, or the evolved instruction, each parsed and checked for format;
3. second pass: the answer to the question from the document, the responses to the new
   and evolved instructions;
4. output filters (services/synth/filters.py): truncation, length, the optional Ask-LLM
   and IFD gates, near-duplicates against the memory of earlier kept samples;
5. every draft becomes a sample with a deterministic id, metadata['method'] and a CREATED
   lineage event whose parent_id is the seed's id (plus DROPPED when a filter rejected it).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from services.runtime.backends.base import (
    Generation,
    GenerationParams,
    merge_generation,
)
from services.runtime.backends.embeddings import EmbeddingSettings
from services.runtime.domain import Action, LineageEvent, Outcome, Sample
from services.runtime.errors import InvalidArgument
from services.runtime.stage import GenerativeCore
from services.synth.evol import (
    EVOL_STOP,
    build_evol_message,
    clean_evolved,
    evol_failure,
    is_refusal,
)
from services.synth.filters import NearDupMemory, ask_llm_scores, ifd_scores, length_failure
from services.synth.grounded import (
    ANSWER_STOP,
    QA_PRIME,
    QUESTION_STOP,
    answer_overlap,
    build_answer_message,
    build_qa_message,
    parse_answer,
    parse_question,
)
from services.synth.self_instruct import (
    TASK_PRIME,
    TASK_STOP,
    InstructionPool,
    build_self_instruct_message,
    parse_instruction,
    seed_id,
    self_instruct_failure,
)
from services.synth.settings import METHODS, Method, SynthSettings

STAGE = "synth"


@dataclass(frozen=True, slots=True)
class SynthOptions:
    """What one call generates: the configured defaults, or a request's overrides."""

    methods: tuple[Method, ...]
    per_seed: int
    params: GenerationParams
    from_settings_seeds: int = 0


@dataclass(slots=True)
class Draft:
    """A sample being generated: where it comes from, what it holds, why it failed."""

    parent_id: str
    source: str
    method: Method
    index: int
    seed_text: str
    """The seed document (grounded QA) or instruction (Self-Instruct primary, Evol input)."""
    origin: Literal["stream", "settings"] = "stream"
    op: str = ""
    prompt: str = ""
    response: str = ""
    raw: str = ""
    """The raw first-pass generation, kept in metadata when it did not parse."""
    demos: tuple[str, ...] = ()
    """Self-Instruct: the demonstrations the prompt showed (a copy of one is no new task)."""
    context: str = ""
    """Grounded QA: the (truncated) document both passes show."""
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return not self.reason


def synth_id(draft: Draft, seed: int | None) -> str:
    """Deterministic: same parent, method, operation, index and sampling seed, same id."""
    key = "\x1f".join(
        (
            draft.parent_id,
            draft.method,
            draft.op,
            str(draft.index),
            "" if seed is None else str(seed),
        )
    )
    return "syn-" + hashlib.sha256(key.encode()).hexdigest()[:24]


class SynthCore(GenerativeCore[SynthSettings]):
    """Generates samples from seeds; backend and embedder are created on first use."""

    def setup(self) -> None:
        s = self.settings
        self.pool = InstructionPool(s.seed_instructions, s.pool_size)
        self.memory = NearDupMemory(s.near_dup.capacity, s.near_dup.threshold)
        self.default_options = self.options()

    def embedding_settings(self) -> EmbeddingSettings:
        return self.settings.near_dup.embedding

    # -- configuration ---------------------------------------------------------------------

    @property
    def steps(self) -> Sequence[str]:
        """None derived from drop reasons: the core reports its own per-method counts
        (generated/kept) through ``metrics``; its outcomes mix seeds and new samples."""
        return ()

    @property
    def signals(self) -> Sequence[str]:
        gates = self.settings.gates
        return [s for s, on in (("ask_llm", gates.ask_llm), ("ifd", gates.ifd)) if on]

    def options(
        self,
        methods: Sequence[str] = (),
        per_seed: int = 0,
        generation: Mapping[str, Any] | None = None,
        from_settings_seeds: int = 0,
    ) -> SynthOptions:
        """Options from the settings with a request's overrides, validated (InvalidArgument)."""
        cfg = self.settings
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise InvalidArgument(f"unknown methods {unknown}; known: {list(METHODS)}")
        chosen = [m for m in METHODS if m in methods] if methods else list(cfg.methods)
        if "evol" in chosen and not cfg.evol_ops:
            raise InvalidArgument("method 'evol' needs evol_ops in the server's settings")
        if per_seed > 64 or from_settings_seeds > 4096:
            raise InvalidArgument("per_seed is at most 64 and from_settings_seeds at most 4096")
        if from_settings_seeds and not self.pool.seeds:
            raise InvalidArgument("from_settings_seeds needs seed_instructions in the settings")
        return SynthOptions(
            methods=tuple(chosen),
            per_seed=per_seed or cfg.per_seed,
            params=merge_generation(cfg.generation, generation),
            from_settings_seeds=from_settings_seeds,
        )

    # -- the work --------------------------------------------------------------------------

    def process(self, samples: list[Sample]) -> list[Outcome]:
        """Kafka/local: the seeds' outcomes (forwarded or consumed), then the generated."""
        generated = self.synthesize(samples, self.default_options)
        forward = self.settings.forward_seeds
        seeds = []
        for s in samples:
            reason = "" if forward else "synth:seed_consumed"
            action = Action.KEPT if forward else Action.DROPPED
            s.lineage.append(LineageEvent(stage=STAGE, action=action, reason=reason))
            seeds.append(Outcome(sample=s, kept=forward, reason=reason))
        return seeds + generated

    def synthesize(self, seeds: Sequence[Sample], options: SynthOptions) -> list[Outcome]:
        """Generated samples (kept and rejected), grouped by seed in order."""
        self.pool.add(s.prompt for s in seeds if "self_instruct" in options.methods)
        drafts = self._plan(seeds, options)
        if not drafts:
            return []
        self._first_pass(drafts, options.params)
        self._second_pass(drafts, options.params)
        self._filter(drafts)
        self.pool.add(d.prompt for d in drafts if d.alive and d.method != "grounded_qa")
        for method in options.methods:
            mine = [d for d in drafts if d.method == method]
            if mine and self.metrics is not None:
                self.metrics.observe_step(method, len(mine), sum(d.alive for d in mine))
        version = self.model_version
        return [self._outcome(d, version, options.params.seed) for d in drafts]

    def _plan(self, seeds: Sequence[Sample], options: SynthOptions) -> list[Draft]:
        drafts: list[Draft] = []
        methods, k_range = options.methods, range(options.per_seed)
        ops = self.settings.evol_ops
        for s in seeds:
            if "grounded_qa" in methods and s.text.strip():
                drafts += [Draft(s.id, s.source, "grounded_qa", k, s.text) for k in k_range]
            if not s.prompt.strip():
                continue
            if "self_instruct" in methods:
                drafts += [Draft(s.id, s.source, "self_instruct", k, s.prompt) for k in k_range]
            if "evol" in methods:
                offset = int(hashlib.sha256(s.id.encode()).hexdigest(), 16) % len(ops)
                drafts += [
                    Draft(s.id, s.source, "evol", k, s.prompt, op=ops[(offset + k) % len(ops)])
                    for k in k_range
                ]
        pool = self.pool.seeds
        for i in range(options.from_settings_seeds):
            text = pool[i % len(pool)]
            drafts.append(
                Draft(seed_id(text), "settings", "self_instruct", i // len(pool), text, "settings")
            )
        return drafts

    # -- generation passes -----------------------------------------------------------------

    def _first_pass(self, drafts: Sequence[Draft], params: GenerationParams) -> None:
        """Questions, new instructions and evolved instructions, parsed."""
        prompts, plist = [], []
        for d in drafts:
            p, gp = self._first_prompt(d, params)
            prompts.append(p)
            plist.append(gp)
        for d, g in zip(drafts, self._generate(prompts, plist), strict=True):
            d.raw = g.text
            if d.method == "grounded_qa":
                question = parse_question(g.text)
                d.prompt = question or ""
                d.reason = "" if question else "filter:format"
            elif d.method == "self_instruct":
                task = parse_instruction(g.text)
                d.prompt = task or ""
                d.reason = self_instruct_failure(task, d.demos)
            else:
                d.prompt = clean_evolved(g.text)
                d.reason = evol_failure(d.seed_text, d.prompt)
            if d.alive and g.finish_reason == "length" and self.settings.reject_truncated:
                d.reason = "filter:truncated"

    def _first_prompt(self, d: Draft, params: GenerationParams) -> tuple[str, GenerationParams]:
        be, budget = self.backend, self.settings.model.max_tokens
        short = min(self.settings.instruction_max_new_tokens, params.max_new_tokens)
        if d.method == "grounded_qa":
            d.context = be.truncate(d.seed_text, budget)
            text = be.render_chat(build_qa_message(d.context)) + QA_PRIME
            return text, _variant(params, d.index, short, QUESTION_STOP)
        if d.method == "self_instruct":
            n = self.settings.demonstrations
            demos = self.pool.demonstrations(d.seed_text, n, key=f"{d.parent_id}:{d.index}")
            d.demos = tuple(be.truncate(x, max(8, budget // n)) for x in demos)
            text = be.render_chat(build_self_instruct_message(d.demos)) + TASK_PRIME
            return text, _variant(params, d.index, short, TASK_STOP)
        text = be.render_chat(build_evol_message(d.op, be.truncate(d.seed_text, budget)))
        return text, _variant(params, d.index, short, EVOL_STOP)

    def _second_pass(self, drafts: Sequence[Draft], params: GenerationParams) -> None:
        """Answers to the questions; responses to the new and evolved instructions."""
        todo = [d for d in drafts if d.alive]
        if not todo:
            return
        prompts = [self._second_prompt(d) for d in todo]
        plist = [
            _variant(params, d.index, params.max_new_tokens, ANSWER_STOP if d.context else ())
            for d in todo
        ]
        for d, g in zip(todo, self._generate(prompts, plist), strict=True):
            answer = parse_answer(g.text)
            d.response = answer or ""
            if answer is None:
                d.reason = "filter:format"
            elif g.finish_reason == "length" and self.settings.reject_truncated:
                d.reason = "filter:truncated"
            elif d.method == "evol" and is_refusal(answer):
                d.reason = "filter:refusal"
            elif d.context:
                d.scores["answer_overlap"] = overlap = answer_overlap(answer, d.context)
                if overlap < self.settings.min_answer_overlap:
                    d.reason = "filter:ungrounded"

    def _second_prompt(self, d: Draft) -> str:
        be = self.backend
        if d.context:  # grounded QA: answer the question from the document
            return be.render_chat(build_answer_message(d.context, d.prompt))
        return be.render_chat(be.truncate(d.prompt, self.settings.model.max_tokens))

    def _generate(self, prompts: list[str], params: list[GenerationParams]) -> list[Generation]:
        """One ``generate`` call per distinct parameter set; results in prompt order."""
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(p.model_dump_json(), []).append(i)
        out: list[Generation | None] = [None] * len(prompts)
        for idx in groups.values():
            t0 = time.perf_counter()
            gens = self.backend.generate([prompts[i] for i in idx], params[idx[0]])
            if self.metrics is not None:
                tokens = sum(len(g.token_ids) for g in gens)
                self.metrics.observe_generation(tokens, time.perf_counter() - t0)
            for i, g in zip(idx, gens, strict=True):
                out[i] = g
        return [g for g in out if g is not None]

    # -- filters ---------------------------------------------------------------------------

    def _filter(self, drafts: Sequence[Draft]) -> None:
        lim = self.settings.length
        for d in drafts:
            if d.alive:
                d.reason = length_failure(
                    d.prompt,
                    d.response,
                    (lim.min_prompt_words, lim.min_response_words),
                    (lim.max_prompt_words, lim.max_response_words),
                )
        self._gates([d for d in drafts if d.alive])
        self._near_dups([d for d in drafts if d.alive])

    def _gates(self, alive: Sequence[Draft]) -> None:
        gates, budget = self.settings.gates, self.settings.model.max_tokens
        if gates.ask_llm and alive:
            contents = [_content(d) for d in alive]
            for d, p in zip(alive, ask_llm_scores(self.backend, contents, budget), strict=True):
                d.scores["ask_llm"] = p
                if p < gates.ask_llm_threshold:
                    d.reason = "filter:ask_llm"
        alive = [d for d in alive if d.alive]
        if gates.ifd and alive:
            ifds = ifd_scores(
                self.backend, [d.prompt for d in alive], [d.response for d in alive], budget
            )
            for d, v in zip(alive, ifds, strict=True):
                if math.isfinite(v):
                    d.scores["ifd"] = v
                    if v >= gates.ifd_max:
                        d.reason = "filter:ifd"

    def _near_dups(self, alive: Sequence[Draft]) -> None:
        cfg = self.settings.near_dup
        if not cfg.enabled or not alive:
            return
        texts = [d.prompt if cfg.field == "prompt" else _content(d) for d in alive]
        verdicts = self.memory.admit(self.embedder.embed(texts))
        for d, (kept, best) in zip(alive, verdicts, strict=True):
            if best > -1.0:  # -1: the memory was empty
                d.scores["max_similarity"] = best
            if not kept:
                d.reason = "filter:near_duplicate"

    # -- output ----------------------------------------------------------------------------

    def _outcome(self, d: Draft, version: str, seed: int | None) -> Outcome:
        meta = {"method": d.method, "parent_id": d.parent_id, "seed_origin": d.origin}
        if d.op:
            meta["evol_op"] = d.op
        if d.reason == "filter:format":
            meta["raw_generation"] = d.raw
        lineage = [
            LineageEvent(
                stage=STAGE,
                action=Action.CREATED,
                reason=f"synth:{d.method}",
                model_version=version,
                parent_id=d.parent_id,
            )
        ]
        if d.reason:
            lineage.append(
                LineageEvent(
                    stage=STAGE,
                    action=Action.DROPPED,
                    reason=d.reason,
                    model_version=version,
                    parent_id=d.parent_id,
                )
            )
        sample = Sample(
            id=synth_id(d, seed),
            prompt=d.prompt,
            response=d.response,
            source=d.source,
            metadata=meta,
            scores=dict(d.scores),
            lineage=lineage,
        )
        return Outcome(sample=sample, kept=d.alive, reason=d.reason)


def _content(d: Draft) -> str:
    return f"{d.prompt}\n\n{d.response}".strip()


def _variant(
    params: GenerationParams, index: int, max_new_tokens: int, stops: Sequence[str]
) -> GenerationParams:
    """``params`` for one pass: its token limit, its stop strings added, the index's seed."""
    stop = list(dict.fromkeys([*params.stop, *stops]))
    seed = None if params.seed is None else params.seed + index
    return params.model_copy(update={"max_new_tokens": max_new_tokens, "stop": stop, "seed": seed})
