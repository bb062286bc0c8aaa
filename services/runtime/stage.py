"""The stage core interface: what every service core is, whichever adapter drives it.

The Kafka stage loop, the gRPC servicers, the local runner and ``run_service`` all see a
core through this Protocol, so a new stage is a new implementation of it and nothing
else changes (MLServer's ``MLModel`` plays the same part). It lives here, not in the
Kafka adapter, because the Kafka loop is only one of its callers.

One way to do each thing a core needs:

- construction: ``Core(settings, metrics=...)``, the registry's core factory; metrics are
  bound there, once, in every mode (a worker-only process records generation too);
- models: loaded on first use through ``services.runtime.backends.base.Lazy``; the cores
  that generate share that wiring by deriving from ``GenerativeCore``;
- ``model_version``: a property (lineage identifier of what decided);
- per-request generation limits: ``services.runtime.backends.base.merge_generation``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import model_validator

from services.runtime.backends.base import GenerationParams, Lazy, LMBackend, ModelSettings
from services.runtime.backends.embeddings import Embedder, EmbeddingSettings
from services.runtime.domain import Outcome, Sample
from services.runtime.errors import ConfigError
from services.runtime.registry import stage
from services.runtime.settings import ServiceSettings


class StageObserver(Protocol):
    """Where a core reports work its outcomes do not show (services.runtime.metrics.
    StageMetrics): generation tokens and latency, per-step counts of a stage whose
    decisions mostly keep the sample. Bound at construction (``metrics=``), once."""

    def observe_generation(self, tokens: int, seconds: float) -> None: ...

    def observe_step(self, step: str, n_in: int, n_kept: int) -> None: ...


class StageCore(Protocol):
    """A service core as every adapter sees it."""

    @property
    def signals(self) -> Sequence[str]:
        """Score names to record in histograms."""
        ...

    @property
    def steps(self) -> Sequence[str]:
        """The steps a sample passes, in order; a drop reason starts with '<step>:'.
        Per-step retention (sluice_step_samples) is derived from them."""
        ...

    @property
    def model_version(self) -> str:
        """What decided: recorded in each sample's lineage and the run report."""
        ...

    def process(self, samples: list[Sample]) -> list[Outcome]:
        """One outcome per input sample (plus any samples the stage creates)."""
        ...


class StageSettings(ServiceSettings):
    """Base of a stage's settings: ``kind`` names its registry entry, whose topics and group
    are the ``kafka`` defaults. A Kafka topic or group nobody set takes the registry's
    value, so overriding one Kafka field (``SLUICE_REWRITE_KAFKA__BOOTSTRAP_SERVERS``) keeps
    the stage's topics; they stay "unset" (``load_settings`` layers the environment over a
    file by what is set). A subclass sets ``kind`` only: its env prefix is the registry's
    (``SLUICE_<KIND>_``)."""

    kind: ClassVar[str]

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "kind" in cls.__dict__:  # pydantic-settings reads env_prefix when it builds one
            cls.model_config = {**cls.model_config, "env_prefix": stage(cls.kind).env_prefix}

    @model_validator(mode="after")
    def _stage_kafka_defaults(self) -> StageSettings:
        t = stage(self.kind).topics
        kafka = self.kafka
        defaults = {"input_topic": t.input, "output_topic": t.output, "group_id": t.group}
        unset = {k: v for k, v in defaults.items() if k not in kafka.model_fields_set}
        if unset:
            # A copy keeps nested blocks (kafka.security) models; a dump would leave dicts.
            filled = kafka.model_copy(update=unset)
            object.__setattr__(filled, "__pydantic_fields_set__", set(kafka.model_fields_set))
            object.__setattr__(self, "kafka", filled)  # not marked as set, like a default
        return self


class GenerativeSettings(Protocol):
    """What a generating stage's settings carry: the model and its generation defaults."""

    @property
    def model(self) -> ModelSettings: ...

    @property
    def generation(self) -> GenerationParams: ...


S = TypeVar("S", bound=GenerativeSettings)


class GenerativeCore(Generic[S]):
    """Base of the cores that generate with a language model (rewrite, synth, distill): one
    constructor ``Core(settings, backend=None, embedder=None, metrics=None)``, the backend
    and embedder built on first use (an instance or factory given for tests, else the
    settings' model), ``model_version`` the backend's. A stage adds its own state in
    ``setup`` and names its embedding model in ``embedding_settings``."""

    def __init__(
        self,
        settings: S,
        backend: LMBackend | Callable[[], LMBackend] | None = None,
        embedder: Embedder | Callable[[], Embedder] | None = None,
        metrics: StageObserver | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        """Generation tokens/latency and per-step counts go here (bound once, every mode)."""
        self._backend: Lazy[LMBackend] = Lazy(backend, "generate", self._create_backend)
        self._embedder: Lazy[Embedder] = Lazy(embedder, "embed", self._create_embedder)
        self.setup()

    def setup(self) -> None:
        """The stage's own state, built from ``self.settings`` (models not loaded yet)."""

    @property
    def generation_cap(self) -> int:
        """The most tokens one request may generate: a vLLM engine reserves that much room
        per sequence, so the backend is created for it."""
        return self.settings.generation.max_new_tokens

    def embedding_settings(self) -> EmbeddingSettings | None:
        """The embedding model of a stage that embeds; None = it embeds nothing."""
        return None

    @property
    def backend(self) -> LMBackend:
        return self._backend.get()

    @property
    def embedder(self) -> Embedder:
        return self._embedder.get()

    @property
    def model_version(self) -> str:
        return self.backend.model_version

    def _create_backend(self) -> LMBackend:
        from services.runtime.backends.factory import create_generation_backend

        return create_generation_backend(self.settings.model, self.generation_cap)

    def _create_embedder(self) -> Embedder:
        embedding = self.embedding_settings()
        if embedding is None:
            raise ConfigError(f"{type(self).__name__} has no embedding model")
        from services.runtime.backends.embeddings import create_embedder

        return create_embedder(embedding)
