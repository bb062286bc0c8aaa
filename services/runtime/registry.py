"""The stage registry: the one place a stage kind is declared.

Everything that lists stage kinds derives from ``STAGES``: the service entry points
(``python -m services.<kind>``, ``sluice serve``), the local runner and pipeline files,
the operator (its CRD kind enum and the consumer group it reads lag of), and, checked
equal by tests/unit/runtime/test_registry.py, the chart's schema enum, ``_helpers.tpl``
and the Tiltfile.

Why import strings instead of classes: the operator imports this module to name consumer
groups, and a declaration that imported a stage's core would load torch or
sentence-transformers into it. A declaration is resolved only when a process asks for
that piece (``spec.settings_class()``, ``spec.build_core(...)``); settings modules are
light (pydantic only), cores and servicers are not.

Adding a stage: one ``StageSpec`` below plus the stage's own folder (see README,
"Add a stage").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from services.runtime.errors import ConfigError

if TYPE_CHECKING:
    import grpc

    from services.runtime.domain import Outcome, Sample
    from services.runtime.metrics import StageMetrics
    from services.runtime.settings import ServiceSettings
    from services.runtime.stage import StageCore


Register = Callable[["grpc.Server"], list[str]]
"""Adds a stage's servicer to a gRPC server; returns the full service names it added (for
health and reflection): what ``services.runtime.grpc_server.serve`` calls."""


def registration(
    add_to_server: Callable[[Any, grpc.Server], None], servicer: object, name: str
) -> Register:
    """A stage's ``Register``: its servicer added with the generated ``add_*_to_server``,
    named ``name`` (e.g. ``sluice.scoring.v1.ScoringService``)."""

    def _register(server: grpc.Server) -> list[str]:
        add_to_server(servicer, server)
        return [name]

    return _register


class Worker(Protocol):
    """What ``run_service`` runs in worker mode: a loop that returns when stopped (or, for a
    stage's finite pass, when its input is drained)."""

    def run(self) -> object: ...

    def request_stop(self) -> None: ...


def _resolve(ref: str) -> Any:
    """The object an import string ``'package.module:attribute'`` names."""
    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load {ref!r}: {exc}") from exc


@dataclass(frozen=True)
class Topics:
    """A stage's default Kafka wiring (what its settings default to)."""

    input: str
    output: str
    group: str


@dataclass(frozen=True)
class StageSpec:
    """One stage kind. Import strings name ``module:attribute``.

    settings   the pydantic-settings class (env prefix ``SLUICE_<KIND>_``)
    core       ``(settings, *, metrics) -> StageCore``: the core (class or factory) wired to
               what it needs (a store); metrics are bound at construction, in every mode
    register   ``(core, metrics) -> Register``: the gRPC servicer (``registration``)
    worker     ``(core, settings, metrics) -> Worker`` when the stage runs more than the
               plain StageWorker (density's passes); '' = the runtime's StageWorker
    group      ``(settings) -> str``: the consumer group the worker commits, when it is not
               ``settings.kafka.group_id``; '' = that group
    commands   one-shot modes beyond serve/worker/all: mode -> ``(core, settings) -> int``
    bounded    ``(core, batches) -> outcomes per batch``: how the stage runs over a finished
               input (a local run) when it must see all of it before deciding (density's
               two passes); '' = ``process`` batch by batch
    object_store  dotted path of the settings' S3 block (``ObjectStoreSettings``), '' = none;
               the chart wires its endpoint and credentials there (``sluice.s3ConfigPath``)
    """

    name: str
    settings: str
    core: str
    register: str
    topics: Topics
    description: str
    worker: str = ""
    group: str = ""
    commands: Mapping[str, str] = field(default_factory=dict)
    bounded: str = ""
    object_store: str = ""

    @property
    def env_prefix(self) -> str:
        return f"SLUICE_{self.name.upper()}_"

    @property
    def modes(self) -> tuple[str, ...]:
        """What ``python -m services.<kind> MODE`` accepts."""
        return ("serve", "worker", "all", *self.commands)

    def settings_class(self) -> type[ServiceSettings]:
        cls: type[ServiceSettings] = _resolve(self.settings)
        return cls

    def build_core(
        self, settings: ServiceSettings, metrics: StageMetrics | None = None
    ) -> StageCore:
        core: StageCore = _resolve(self.core)(settings, metrics=metrics)
        return core

    def make_worker(
        self, core: StageCore, settings: ServiceSettings, metrics: StageMetrics
    ) -> Worker:
        worker: Worker = _resolve(self.worker)(core, settings, metrics)
        return worker

    def make_register(self, core: StageCore, metrics: StageMetrics) -> Register:
        register: Register = _resolve(self.register)(core, metrics)
        return register

    def run_bounded(self, core: StageCore, batches: list[list[Sample]]) -> list[list[Outcome]]:
        outcomes: list[list[Outcome]] = _resolve(self.bounded)(core, batches)
        return outcomes

    def command(self, mode: str) -> Callable[[StageCore, ServiceSettings], int]:
        fn: Callable[[StageCore, ServiceSettings], int] = _resolve(self.commands[mode])
        return fn


STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        name="scoring",
        description="heuristic, perplexity and Ask-LLM quality filters",
        settings="services.scoring.settings:ScoringSettings",
        core="services.scoring.core:ScoringCore",
        register="services.scoring.grpc_service:register",
        topics=Topics("sluice.ingest", "sluice.scored", "sluice-scoring"),
        worker="services.scoring.worker:make_worker",
        object_store="classifier.store",  # an s3:// classifier artifact is read through it
    ),
    StageSpec(
        name="density",
        description="inverse-density subsampling on a mergeable sketch (two passes or online)",
        settings="services.density.settings:DensitySettings",
        core="services.density.worker:build_core",
        register="services.density.grpc_service:register",
        topics=Topics("sluice.scored", "sluice.sampled", "sluice-density"),
        worker="services.density.worker:make_worker",
        group="services.density.settings:consumer_group",
        commands={"merge": "services.density.worker:merge_command"},
        bounded="services.density.core:run_bounded",
        object_store="store",
    ),
    StageSpec(
        name="rewrite",
        description="LLM paraphrasing with drift and toxicity guards",
        settings="services.rewrite.settings:RewriteSettings",
        core="services.rewrite.core:RewriteCore",
        register="services.rewrite.grpc_service:register",
        topics=Topics("sluice.scored", "sluice.rewritten", "sluice-rewrite"),
    ),
    StageSpec(
        name="synth",
        description="Self-Instruct, Evol-Instruct and grounded QA generation with filters",
        settings="services.synth.settings:SynthSettings",
        core="services.synth.core:SynthCore",
        register="services.synth.grpc_service:register",
        topics=Topics("sluice.scored", "sluice.synth", "sluice-synth"),
    ),
    StageSpec(
        name="distill",
        description="teacher responses with top-k logprobs for knowledge distillation",
        settings="services.distill.settings:DistillSettings",
        core="services.distill.store:build_core",
        register="services.distill.grpc_service:register",
        topics=Topics("sluice.scored", "sluice.distilled", "sluice-distill"),
        object_store="topk_store.s3",
    ),
    StageSpec(
        name="dedup",
        description="exact, MinHash-LSH near-duplicate and semantic dedup on shared state",
        settings="services.dedup.settings:DedupSettings",
        core="services.dedup.store:build_core",
        register="services.dedup.grpc_service:register",
        topics=Topics("sluice.ingest", "sluice.deduped", "sluice-dedup"),
    ),
    StageSpec(
        name="sink",
        description="Parquet shards committed exactly once by manifest (S3/MinIO or a folder)",
        settings="services.sink.settings:SinkSettings",
        core="services.sink.core:SinkCore",
        register="services.sink.grpc_service:register",
        topics=Topics("sluice.sampled", "", "sluice-sink"),
        worker="services.sink.worker:make_worker",
        object_store="store",
    ),
)

KINDS: tuple[str, ...] = tuple(s.name for s in STAGES)
"""Every stage kind, in declaration order (the order lists and enums are written in)."""

_BY_NAME = {s.name: s for s in STAGES}


def stage(kind: str) -> StageSpec:
    """The declaration of ``kind``; ConfigError naming the known kinds otherwise."""
    try:
        return _BY_NAME[kind]
    except KeyError:
        raise ConfigError(f"unknown stage kind {kind!r}; known: {', '.join(KINDS)}") from None


def load_stage_settings(kind: str, config: Mapping[str, Any] | None = None) -> ServiceSettings:
    """A stage's settings from a plain mapping: the ``--config`` YAML, the chart's rendered
    ``config``, a pipeline file's stage block. Validated exactly as the service does it
    (the environment of *this* process is not read: a caller such as the operator must see
    what the mapping says, not its own env)."""
    cls = stage(kind).settings_class()
    try:
        return cls.model_validate(dict(config or {}))
    except Exception as exc:  # pydantic.ValidationError: a configuration problem
        raise ConfigError(f"invalid {kind} settings: {exc}") from exc


def consumer_group(kind: str, settings: ServiceSettings) -> str:
    """The consumer group a ``kind`` worker with ``settings`` commits offsets under.

    The worker joins exactly this group, and the operator reads lag of exactly this group:
    both call this function. Most stages commit ``kafka.group_id``; a stage that derives its
    group (density's per-pass, per-sketch-version groups) declares the rule in ``group``.
    ConfigError when the group cannot be known from settings alone."""
    spec = stage(kind)
    if spec.group:
        rule: Callable[[ServiceSettings], str] = _resolve(spec.group)
        return rule(settings)
    return settings.kafka.group_id
