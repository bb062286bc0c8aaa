"""The density stage's Kafka side: the runtime StageWorker around the density core, plus
what the two passes need before and after the loop.

- pass 1 (``two_pass_build``): consume until the input is drained (no record for
  ``build_idle_timeout_s``) or SIGTERM, then publish this worker's sketch as a part. The
  worker has no output topic: pass 1 only builds.
- merge (``merge``): combine every published part of a version into the merged sketch.
  Run once after every pass-1 worker has exited (a Job step, or ``sluice density merge``).
- pass 2 (``two_pass_sample``): load the merged sketch (at construction, so a missing one
  fails before anything is consumed), then consume and sample forever.
- ``online``: consume and sample forever; no store needed.

Each pass has its own consumer group (``<group>.<pass>.<name>.v<version>``, named by
``services.runtime.registry.consumer_group``, which the operator calls too): sharing one
would make pass 2 start where pass 1 committed, at the end of the topic.

Delivery: a pass-1 worker publishes its part only after a clean stop, when everything it
committed is in its sketch; a restarted worker resumes from those commits and publishes a
part under a new worker id, so the merge still counts every record once. A worker killed
with SIGKILL loses its unpublished counts (the records were committed): rebuild that
version, or compare the merged ``n`` with the number of samples published.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.density.core import STAGE, DensityCore
from services.density.settings import DensitySettings
from services.density.sketch import SketchParams
from services.density.state import SketchState
from services.density.store import SketchStore
from services.runtime.errors import ConfigError
from services.runtime.kafka_stage import StageWorker, WorkerStats
from services.runtime.metrics import StageMetrics
from services.runtime.registry import consumer_group
from services.runtime.settings import KafkaSettings

log = logging.getLogger(__name__)


def pass_kafka_settings(settings: DensitySettings, version: int | None) -> KafkaSettings:
    """The worker's Kafka settings for its mode: the group the registry names for the
    resolved sketch version (``consumer_group``), no output in pass 1."""
    kafka = settings.kafka
    if settings.mode == "online":
        return kafka
    if version is None:
        raise ConfigError(f"mode {settings.mode!r} needs a resolved sketch version")
    sketch = settings.sketch.model_copy(update={"version": version})
    resolved = settings.model_copy(update={"sketch": sketch})
    update: dict[str, str] = {"group_id": consumer_group(STAGE, resolved)}
    if settings.mode == "two_pass_build":
        update["output_topic"] = ""
    return kafka.model_copy(update=update)


@dataclass(frozen=True)
class StoreLoader:
    """The core's loader when a store is configured: names the API does not hold are
    looked up there (latest merged version). The worker reuses its store."""

    store: SketchStore

    def __call__(self, name: str, params: SketchParams) -> SketchState:
        return self.store.load_merged(name, params.fingerprint())


def build_core(settings: DensitySettings, metrics: StageMetrics | None = None) -> DensityCore:
    """The registry's core factory: the core, wired to the object store when one is
    configured."""
    store = SketchStore(settings.store) if settings.store.enabled else None
    loader = StoreLoader(store) if store is not None else None
    return DensityCore(settings, loader=loader, metrics=metrics)


def store_of(core: DensityCore) -> SketchStore | None:
    """The store ``build_core`` wired into ``core``, if any."""
    loader = core.loader
    return loader.store if isinstance(loader, StoreLoader) else None


def make_worker(
    core: DensityCore, settings: DensitySettings, metrics: StageMetrics
) -> DensityWorker:
    """The registry's worker factory: the configured pass over the core's store."""
    return DensityWorker(core, metrics, store_of(core))


def merge_command(core: DensityCore, settings: DensitySettings) -> int:
    """``python -m services.density merge``: merge the parts of sketch.version, then exit."""
    merged = merge_version(core, require_store(settings, store_of(core)))
    print(f"merged {len(merged.parts)} parts of {merged.name} v{merged.version}: n={merged.n}")
    return 0


def require_store(settings: DensitySettings, store: SketchStore | None) -> SketchStore:
    if store is None:
        raise ConfigError(
            f"mode {settings.mode!r} needs a sketch store: set store.endpoint "
            "(SLUICE_DENSITY_STORE__ENDPOINT)"
        )
    return store


def load_reference(core: DensityCore, store: SketchStore) -> SketchState:
    """Install the merged sketch pass 2 samples against (configured or latest version)."""
    s = core.settings.sketch
    state = store.load_merged(s.name, core.params().fingerprint(), s.version)
    return core.install(state)


def publish_part(core: DensityCore, store: SketchStore) -> str | None:
    """Upload this worker's sketch as a part of the version being built."""
    if core.name not in core.names():
        log.info("pass 1 saw no input: nothing to publish")
        return None
    part = core.state(core.name).copy()
    if part.n == 0:
        log.info("pass 1 sketched no sample: nothing to publish")
        return None
    return store.put_part(part, core.settings.worker_id)


def merge_version(core: DensityCore, store: SketchStore, *, overwrite: bool = False) -> SketchState:
    """Merge every published part of the configured version and store the result."""
    s = core.settings.sketch
    if s.version is None:
        raise ConfigError("merge needs sketch.version (the version pass 1 built)")
    return store.merge_parts(s.name, core.params(), s.version, overwrite=overwrite)


class DensityWorker:
    """One density stage worker in the configured mode."""

    def __init__(
        self,
        core: DensityCore,
        metrics: StageMetrics,
        store: SketchStore | None = None,
    ) -> None:
        self.core = core
        self.settings = core.settings
        mode = self.settings.mode
        self.store = store if mode == "online" else require_store(self.settings, store)
        version = self.settings.sketch.version
        self.reference: SketchState | None = None
        if mode == "two_pass_sample":
            # Loaded now: the version ('latest' resolved) names the consumer group.
            self.reference = load_reference(core, self._store)
            version = self.reference.version
        dropped = self.settings.dropped_topic_name if mode != "two_pass_build" else ""
        kafka = pass_kafka_settings(self.settings, version)
        fingerprint = self.settings.decision_fingerprint()
        decision = f"{core.model_version}+sketch.v{version}+config.{fingerprint}"
        self.stage_worker = StageWorker(
            core, kafka, metrics, stage=STAGE, dropped_topic=dropped, decision_version=decision
        )
        self.published: str | None = None

    def request_stop(self) -> None:
        self.stage_worker.request_stop()

    def run(self) -> WorkerStats:
        """Run the mode to its end: pass 1 returns once drained and published; pass 2 and
        online run until stopped."""
        mode = self.settings.mode
        idle = self.settings.build_idle_timeout_s if mode == "two_pass_build" else None
        stats = self.stage_worker.run(idle_timeout_s=idle)
        if mode == "two_pass_build":
            self.published = publish_part(self.core, self._store)
        return stats

    @property
    def _store(self) -> SketchStore:
        return require_store(self.settings, self.store)
