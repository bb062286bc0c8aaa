"""The density stage's Kafka side: the runtime StageWorker around the density core, plus
what the two passes need before and after the loop.

- pass 1 (``two_pass_build``): consume until the input is drained (no record for
  ``build_idle_timeout_s``) or SIGTERM, checkpointing each partition's sketch on the way.
  The worker has no output topic: pass 1 only builds.
- merge (``merge``): sum the latest checkpoint of every partition of a version into the
  merged sketch. Run once after every pass-1 worker has exited (a Job step, or ``sluice
  density merge``); a re-run finds the version merged and exits 0.
- pass 2 (``two_pass_sample``): load the merged sketch (at construction, waiting up to
  ``sketch_wait_s`` for it while the build runs, so a missing one fails before anything is
  consumed), then consume and sample forever.
- ``online``: consume and sample forever; no store needed.

Each pass has its own consumer group (``<group>.<pass>.<name>.v<version>``, named by
``services.runtime.registry.consumer_group``, which the operator calls too): sharing one
would make pass 2 start where pass 1 committed, at the end of the topic.

Delivery: pass 1 keeps one sketch per input partition and checkpoints each, with the offset
it covers, to the store (one object, ``SketchStore.put_checkpoint``) before the offsets are
committed to Kafka, under either processing guarantee (``PartitionSketches`` is the loop's
``StageState``). A worker that is assigned a partition loads its latest checkpoint and seeks
to its offset: the checkpoint, not the Kafka commit, says where a partition resumes. So a
worker killed with SIGKILL, restarted or replaced by another, loses nothing that was
checkpointed and re-reads nothing that was (only the records since the last commit point,
which no checkpoint holds). The merge sums the latest checkpoint of every partition: the
merged ``n`` equals the number of samples published, and the counts equal a sketch built in
one go. Pass 2 is exactly-once like every stage, and its decisions are the same on
redelivery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from kafka.structs import TopicPartition

from services.density.core import REASON_BAD_EMBEDDING, STAGE, DensityCore
from services.density.settings import DensitySettings
from services.density.sketch import SketchParams
from services.density.state import SketchState
from services.density.store import Checkpoint, SketchStore
from services.runtime.domain import Outcome, Sample
from services.runtime.errors import ConfigError, FailedPrecondition, NotFound
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

    def __call__(self, name: str, params: SketchParams | None) -> SketchState:
        if params is None:  # width 'auto': the latest version with a pinned width
            return self.store.load_latest_pinned(name)
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
    """``python -m services.density merge``: merge the checkpoints of sketch.version, then
    exit. A version that is already merged is left as it is (exit 0), so a re-run of the
    build Job succeeds."""
    store = require_store(settings, store_of(core))
    s = settings.sketch
    if s.version is not None:
        adopt_pinned_width(core, store, s.version, required=True)
    fp = core.params().fingerprint()
    if s.version is not None and store.is_merged(s.name, fp, s.version):
        done = store.load_merged(s.name, fp, s.version)
        print(f"{done.name} v{done.version} is already merged (n={done.n}): nothing to do")
        return 0
    merged = merge_version(core, store)
    print(f"merged {len(merged.parts)} partitions of {merged.name} v{merged.version}: n={merged.n}")
    return 0


def require_store(settings: DensitySettings, store: SketchStore | None) -> SketchStore:
    if store is None:
        raise ConfigError(
            f"mode {settings.mode!r} needs a sketch store: set store.endpoint "
            "(SLUICE_DENSITY_STORE__ENDPOINT)"
        )
    return store


def adopt_pinned_width(
    core: DensityCore, store: SketchStore, version: int, *, required: bool = False
) -> bool:
    """With width 'auto', take the width pass 1 pinned for ``version`` (if any; NotFound
    when ``required``). True when the core's width is known afterwards."""
    if core.width is not None:
        return True
    pin = store.pinned_bandwidth(core.name, version, core.params_family())
    if pin is None:
        if required:
            raise NotFound(
                f"sketch {core.name} v{version} has no pinned width: pass 1 has not "
                "sketched anything of it yet"
            )
        return False
    core.set_bandwidth(pin)
    return True


def load_reference(core: DensityCore, store: SketchStore) -> SketchState:
    """Install the merged sketch pass 2 samples against (configured or latest version)."""
    s = core.settings.sketch
    if s.auto_bandwidth and s.version is None:
        return core.install(store.load_latest_pinned(s.name))
    if s.version is not None:
        adopt_pinned_width(core, store, s.version, required=True)
    state = store.load_merged(s.name, core.params().fingerprint(), s.version)
    return core.install(state)


REFERENCE_POLL_S = 10.0
"""How often pass 2 looks for the merged sketch while it waits (``sketch_wait_s``)."""


def wait_for_reference(
    core: DensityCore,
    store: SketchStore,
    wait_s: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> SketchState:
    """``load_reference``, polling the store for up to ``wait_s`` while the merged version
    does not exist yet (pass-2 pods start with the build Job: they wait instead of
    crash-looping). Still missing after that: NotFound."""
    deadline = clock() + wait_s
    while True:
        try:
            return load_reference(core, store)
        except NotFound as exc:
            left = deadline - clock()
            if left <= 0:
                raise
            pause = min(REFERENCE_POLL_S, left)
            log.info(
                "waiting for the merged sketch (%s); next look in %.0f s, giving up in %.0f s",
                exc.message,
                pause,
                left,
            )
            sleep(pause)


def merge_version(core: DensityCore, store: SketchStore, *, overwrite: bool = False) -> SketchState:
    """Sum the latest checkpoint of every partition of the configured version and store it."""
    s = core.settings.sketch
    if s.version is None:
        raise ConfigError("merge needs sketch.version (the version pass 1 built)")
    adopt_pinned_width(core, store, s.version, required=True)
    return store.merge_checkpoints(s.name, core.params(), s.version, overwrite=overwrite)


@dataclass
class _Held:
    """One owned partition's sketch: it holds the records [0, position); the store holds
    [0, saved). With width 'auto' not yet chosen there is no sketch: the points wait in
    ``pending`` (only in memory: the first checkpoint chooses and pins the width)."""

    state: SketchState | None
    position: int
    saved: int
    pending: list[tuple[list[str], np.ndarray]] = field(default_factory=list)


@dataclass
class PartitionSketches:
    """Pass 1's state: one sketch per input partition, each checkpointed to the store with
    the offset it covers (the stage loop's ``StageState``), and the processor that adds each
    record to its own partition's sketch (the loop's ``StageCore``)."""

    core: DensityCore
    store: SketchStore
    held: dict[TopicPartition, _Held] = field(default_factory=dict)
    written: dict[TopicPartition, str] = field(default_factory=dict)
    """The last checkpoint key this worker wrote, per partition."""
    _current: _Held | None = None
    _redelivered: bool = False

    # -- StageCore: the loop's processor -----------------------------------------
    @property
    def signals(self) -> list[str]:
        return self.core.signals

    @property
    def steps(self) -> list[str]:
        return self.core.steps

    @property
    def model_version(self) -> str:
        return self.core.model_version

    def process(self, samples: list[Sample]) -> list[Outcome]:
        held = self._current
        if held is None:
            raise RuntimeError("pass 1 got a batch without its partition (on_record)")
        if self._redelivered:  # already in the partition's sketch: never count it twice
            return [Outcome(s, kept=True) for s in samples]
        vecs = self.core.vectors(samples)
        if held.state is not None:
            return self.core.build_batch(samples, vecs, into=held.state)
        ok = vecs.ok
        held.pending.append(
            ([s.id for s, good in zip(samples, ok, strict=True) if good], vecs.matrix[ok])
        )
        return [
            Outcome(s, kept=not err, reason=REASON_BAD_EMBEDDING if err else "")
            for s, err in zip(samples, vecs.errors, strict=True)
        ]

    # -- StageState: checkpoints ----------------------------------------------------
    def on_assigned(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Load each partition's latest checkpoint (an empty sketch at offset 0 if none)."""
        s = self.core.settings.sketch
        if s.version is None:
            raise ConfigError("pass 1 needs sketch.version")
        if not adopt_pinned_width(self.core, self.store, s.version):
            # No width pinned, so no checkpoint of this version exists: start empty; the
            # first checkpoint chooses the width from what was read by then.
            for tp in partitions:
                self.held[tp] = _Held(None, 0, 0)
            return dict.fromkeys(partitions, 0)
        fp = self.core.params().fingerprint()
        resume = {}
        for tp in partitions:
            ckpt = self.store.latest_checkpoint(s.name, fp, s.version, tp.topic, tp.partition)
            if ckpt is None:
                state, offset = self.core.new_state(s.name, s.version), 0
            else:
                state, offset = ckpt.state, ckpt.offset
                if state.embedding_model != self.core.embedding_model:
                    raise FailedPrecondition(
                        f"checkpoint of {ckpt.label} was embedded with "
                        f"{state.embedding_model!r}; this worker embeds with "
                        f"{self.core.embedding_model!r}"
                    )
            log.info(
                "%s-%d: sketch of n=%d up to offset %d", tp.topic, tp.partition, state.n, offset
            )
            self.held[tp] = _Held(state, offset, offset)
            resume[tp] = offset
        return resume

    def on_revoked(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            dropped = self.held.pop(tp, None)
            if dropped is not None and dropped is self._current:
                self._current = None

    def on_record(self, tp: TopicPartition, offset: int) -> None:
        held = self.held.get(tp)
        if held is None:
            raise RuntimeError(f"a record of {tp.topic}-{tp.partition}, which is not assigned")
        self._current = held
        self._redelivered = offset < held.position
        if self._redelivered:
            log.warning(
                "%s-%d offset %d is already sketched: skipped", tp.topic, tp.partition, offset
            )
        else:
            held.position = offset + 1

    def checkpoint(self, done: dict[TopicPartition, int]) -> None:
        """Write every held partition that advanced since its last checkpoint; each covers
        exactly the records in its sketch, whatever ``done`` says."""
        if any(h.state is None for h in self.held.values()):
            self._choose_width()
        for tp, held in self.held.items():
            if held.state is not None and held.position > held.saved:
                ckpt = Checkpoint(
                    tp.topic, tp.partition, held.position, held.state, self.core.settings.worker_id
                )
                self.written[tp] = self.store.put_checkpoint(ckpt)
                held.saved = held.position

    def _choose_width(self) -> None:
        """Width 'auto': adopt the version's pinned width, or pin one chosen from the
        points every held partition has read so far (first writer wins); then give each
        waiting partition its sketch and add its points."""
        version = self.core.settings.sketch.version
        assert version is not None  # checked in on_assigned
        if not adopt_pinned_width(self.core, self.store, version):
            ids = [i for h in self.held.values() for chunk, _ in h.pending for i in chunk]
            if not ids:
                return  # nothing usable read yet: nothing to choose from, nothing to save
            matrix = np.concatenate([m for h in self.held.values() for _, m in h.pending])
            proposal = self.core.propose_bandwidth(ids, matrix)
            family = self.core.params_family()
            self.core.set_bandwidth(
                self.store.pin_bandwidth(self.core.name, version, proposal, family)
            )
        for held in self.held.values():
            if held.state is None:
                held.state = self.core.new_state(self.core.name, version)
                for chunk_ids, matrix in held.pending:
                    self.core.add_points(held.state, chunk_ids, matrix)
                held.pending = []


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
            self.reference = wait_for_reference(core, self._store, self.settings.sketch_wait_s)
            version = self.reference.version
        self.partitions = PartitionSketches(core, self._store) if mode == "two_pass_build" else None
        dropped = self.settings.dropped_topic_name if mode != "two_pass_build" else ""
        kafka = pass_kafka_settings(self.settings, version)
        fingerprint = self.settings.decision_fingerprint()
        decision = f"{core.model_version}+sketch.v{version}+config.{fingerprint}"
        self.stage_worker = StageWorker(
            self.partitions or core,
            kafka,
            metrics,
            stage=STAGE,
            dropped_topic=dropped,
            decision_version=decision,
            state=self.partitions,
        )
        self.published: list[str] = []
        """Pass 1: the last checkpoint this worker wrote of each partition it held."""

    def request_stop(self) -> None:
        self.stage_worker.request_stop()

    def run(self) -> WorkerStats:
        """Run the mode to its end: pass 1 returns once drained (every partition it holds
        checkpointed); pass 2 and online run until stopped."""
        mode = self.settings.mode
        idle = self.settings.build_idle_timeout_s if mode == "two_pass_build" else None
        stats = self.stage_worker.run(idle_timeout_s=idle)
        if self.partitions is not None:
            self.published = sorted(self.partitions.written.values())
            log.info("pass 1 done: %d partition checkpoint(s) written", len(self.published))
        return stats

    @property
    def _store(self) -> SketchStore:
        return require_store(self.settings, self.store)
