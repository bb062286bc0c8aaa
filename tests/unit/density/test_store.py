"""The sketch store against a real S3 server (moto): layout, partition checkpoints -> merge ->
latest, the latest checkpoint winning, immutability, and errors mapped onto the error
hierarchy."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from kafka.structs import TopicPartition
from pydantic import SecretStr

from services.density.bandwidth import BandwidthChoice
from services.density.core import DensityCore
from services.density.settings import DensitySettings, SketchSettings, StoreSettings
from services.density.state import SketchState
from services.density.store import Checkpoint, SketchStore
from services.density.worker import PartitionSketches, load_reference, merge_version
from services.runtime.domain import Sample
from services.runtime.errors import (
    ConfigError,
    DecodeError,
    FailedPrecondition,
    NotFound,
    Unavailable,
)
from tests.support.servers import Server, free_port
from tests.unit.density.mixture import mixture

pytestmark = pytest.mark.integration

DIM = 384


def _store_settings(address: str, create_bucket: bool = True) -> StoreSettings:
    return StoreSettings(
        endpoint=address,
        bucket=f"sk-{uuid.uuid4().hex[:8]}",
        prefix="density/test",
        secure=False,
        access_key=SecretStr("test"),
        secret_key=SecretStr("test"),
        create_bucket=create_bucket,
    )


def _part(name: str, version: int, seed: int, n: int) -> SketchState:
    core = DensityCore(
        DensitySettings(
            sketch=SketchSettings(
                name=name, version=version, hash="pstable", dim=DIM, rows=50, width=1.4
            )
        )
    )
    samples = mixture(seed=seed, big=n, small=(n // 4,)).samples(prefix=f"p{seed}-")
    core.build_batch(samples, core.vectors(samples))
    return core.state()


def _ckpt(part: SketchState, partition: int, offset: int, topic: str = "t") -> Checkpoint:
    return Checkpoint(topic, partition, offset, part, worker_id=f"w{partition}")


def test_checkpoints_merge_into_a_versioned_sketch(s3_server: Server) -> None:
    store = SketchStore(_store_settings(s3_server.address))
    a, b = _part("news", 1, seed=1, n=200), _part("news", 1, seed=2, n=120)
    fp = a.fingerprint
    key = store.put_checkpoint(_ckpt(a, 0, 50))
    assert key == f"density/test/news/{fp}/v1/partitions/t/0/{50:020d}.ckpt"
    store.put_checkpoint(_ckpt(b, 1, 30))
    assert [(c.label, c.offset, c.state.n) for c in store.checkpoints("news", fp, 1)] == [
        ("t-0", 50, a.n),
        ("t-1", 30, b.n),
    ]
    with pytest.raises(NotFound):
        store.load_merged("news", fp)  # nothing merged yet
    assert not store.is_merged("news", fp, 1)

    merged = store.merge_checkpoints("news", a.sketch.params, 1)
    assert merged.n == a.n + b.n
    assert [(p.worker_id, p.n, p.partition, p.offset) for p in merged.parts] == [
        ("w0", a.n, "t-0", 50),
        ("w1", b.n, "t-1", 30),
    ]
    assert store.is_merged("news", fp, 1)
    assert store.exists(f"density/test/news/{fp}/v1.sketch")

    loaded = store.load_merged("news", fp)  # latest
    assert loaded.version == 1
    assert loaded.parts == merged.parts
    np.testing.assert_array_equal(loaded.sketch.counts, a.sketch.counts + b.sketch.counts)
    np.testing.assert_array_equal(loaded.calibration.keys, merged.calibration.keys)
    assert loaded.embedding_model == "packaged:all-minilm-l6-v2"

    # A merged version is immutable unless overwritten on purpose.
    with pytest.raises(FailedPrecondition, match="already merged"):
        store.merge_checkpoints("news", a.sketch.params, 1)
    assert store.merge_checkpoints("news", a.sketch.params, 1, overwrite=True).n == merged.n

    # Versions: the latest is loaded by default, any one by number.
    v2 = _part("news", 2, seed=3, n=40)
    store.put_checkpoint(_ckpt(v2, 0, 7))
    store.merge_checkpoints("news", v2.sketch.params, 2)
    assert store.versions("news", fp) == [1, 2]
    assert store.load_merged("news", fp).n == v2.n
    assert store.load_merged("news", fp, 1).n == merged.n


def test_the_latest_checkpoint_of_a_partition_wins_and_older_ones_go(s3_server: Server) -> None:
    store = SketchStore(_store_settings(s3_server.address))
    early, late = _part("p", 1, seed=5, n=40), _part("p", 1, seed=6, n=90)
    fp = early.fingerprint
    assert store.latest_checkpoint("p", fp, 1, "t", 0) is None
    store.put_checkpoint(_ckpt(early, 0, 9))
    store.put_checkpoint(_ckpt(late, 0, 120))  # offsets sort numerically, not as text
    found = store.latest_checkpoint("p", fp, 1, "t", 0)
    assert found is not None and (found.offset, found.state.n) == (120, late.n)
    np.testing.assert_array_equal(found.state.sketch.counts, late.sketch.counts)
    np.testing.assert_array_equal(found.state.calibration.vectors, late.calibration.vectors)
    assert store.objects.keys(store.checkpoint_folder("p", fp, 1, "t", 0)) == [
        f"density/test/p/{fp}/v1/partitions/t/0/{120:020d}.ckpt"
    ]
    # A late write from a fenced worker adds an older checkpoint; it never hides the newer.
    store.put_checkpoint(_ckpt(early, 0, 9))
    found = store.latest_checkpoint("p", fp, 1, "t", 0)
    assert found is not None and found.offset == 120
    assert store.merge_checkpoints("p", early.sketch.params, 1).n == late.n


def test_checkpoint_bytes_round_trip_and_refuse_garbage() -> None:
    part = _part("r", 1, seed=7, n=30)
    back = Checkpoint.from_bytes(_ckpt(part, 2, 11, topic="in.x").to_bytes())
    assert (back.topic, back.partition, back.offset, back.worker_id) == ("in.x", 2, 11, "w2")
    assert (back.state.name, back.state.version, back.state.n) == ("r", 1, part.n)
    np.testing.assert_array_equal(back.state.sketch.counts, part.sketch.counts)
    for bad in (b"", b"garbage", _ckpt(part, 0, 1).to_bytes()[:-10]):
        with pytest.raises(DecodeError):
            Checkpoint.from_bytes(bad)


def test_missing_and_corrupt_objects(s3_server: Server) -> None:
    store = SketchStore(_store_settings(s3_server.address))
    params = _part("x", 1, seed=4, n=20).sketch.params
    with pytest.raises(NotFound, match="no pass-1 checkpoints"):
        store.merge_checkpoints("x", params, 1)
    with pytest.raises(NotFound):
        store.load_merged("x", params.fingerprint(), 5)
    part = _part("x", 1, seed=4, n=20)
    key = store.put_checkpoint(_ckpt(part, 0, 3))
    store.client.put_object(store.bucket, key, io.BytesIO(b"garbage"), 7)
    with pytest.raises(DecodeError):
        store.merge_checkpoints("x", params, 1)


def test_unreachable_store_is_unavailable() -> None:
    settings = _store_settings(f"127.0.0.1:{free_port()}", create_bucket=False)
    store = SketchStore(settings)
    with pytest.raises(Unavailable):
        store.versions("x", "f")


def test_credentials_come_from_settings_or_environment(
    s3_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY", "MINIO_ACCESS_KEY", "MINIO_ROOT_USER"):
        monkeypatch.delenv(var, raising=False)
    bare = StoreSettings(endpoint=s3_server.address, secure=False)
    with pytest.raises(ConfigError, match="credentials"):
        SketchStore(bare)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    store = SketchStore(bare.model_copy(update={"bucket": "from-env", "create_bucket": True}))
    assert store.versions("x", "f") == []
    with pytest.raises(ConfigError, match="no sketch store"):
        SketchStore(StoreSettings())


def test_the_first_pinned_width_wins_and_binds_its_params(s3_server: Server) -> None:
    store = SketchStore(_store_settings(s3_server.address))
    family = {"dim": DIM, "rows": 50, "hashes_per_row": 8, "buckets": 4096, "seed": 0}
    first = BandwidthChoice(0.9, "spread/v1", 100, 0.5, 0.0, 0.8)
    assert store.pinned_bandwidth("news", 4) is None
    assert store.pin_bandwidth("news", 4, first, family) == first
    later = BandwidthChoice(1.3, "spread/v1", 200, 0.5, 0.0, 0.7)
    assert store.pin_bandwidth("news", 4, later, family) == first  # a real conditional PUT
    assert store.pinned_versions("news") == [4]
    with pytest.raises(FailedPrecondition, match=r"pinned with width 0\.9"):
        store.pinned_bandwidth("news", 4, {**family, "hashes_per_row": 4})


def _two_builders(
    core_a: DensityCore, core_b: DensityCore, store: SketchStore, data: list[Sample]
) -> tuple[PartitionSketches, PartitionSketches]:
    """Two pass-1 workers: a owns partition in-0 and has read data[:120] at offset 0,
    b in-1 and the rest; nothing checkpointed yet."""
    t0, t1 = TopicPartition("in", 0), TopicPartition("in", 1)
    a, b = PartitionSketches(core_a, store), PartitionSketches(core_b, store)
    assert a.on_assigned([t0]) == {t0: 0} and b.on_assigned([t1]) == {t1: 0}
    a.on_record(t0, 0)
    a.process(data[:120])
    b.on_record(t1, 0)
    b.process(data[120:])
    return a, b


def test_pass_1_workers_pin_one_auto_width_and_their_parts_merge(s3_server: Server) -> None:
    """Two pass-1 workers with width 'auto' read different partitions: the first to
    checkpoint pins its choice, the other adopts it, and the merge equals one sketch of
    everything with that width; pass 2 and the merge find it through the pin."""
    store = SketchStore(_store_settings(s3_server.address))
    sketch = SketchSettings(name="auto", version=2, hash="pstable", dim=DIM, rows=32)

    def core(mode: str = "two_pass_build") -> DensityCore:
        return DensityCore(DensitySettings(mode=mode, sketch=sketch, calibration_size=64))  # type: ignore[arg-type]

    data = mixture(seed=9, big=160, small=(40,)).samples()
    t0, t1 = TopicPartition("in", 0), TopicPartition("in", 1)
    a, b = _two_builders(core(), core(), store, data)
    b.checkpoint({t1: 1})  # b pins (from its 80 points) and writes the first checkpoint
    a.checkpoint({t0: 1})  # a adopts b's width
    width = b.core.width
    assert width is not None and a.core.width == width
    pin = store.pinned_bandwidth("auto", 2)
    assert pin is not None and pin.width == width and pin.sample == 64  # bottom-k of 80

    merger = core()
    merged = merge_version(merger, store)
    assert merger.width == width and merged.n == len(data)
    whole = DensityCore(
        DensitySettings(sketch=sketch.model_copy(update={"width": width}), calibration_size=64)
    )
    whole.build_batch(data, whole.vectors(data))
    np.testing.assert_array_equal(merged.sketch.counts, whole.state().sketch.counts)

    sampler_core = core("two_pass_sample")
    assert load_reference(sampler_core, store).sketch.params.width == width
    unpinned = sketch.model_copy(update={"version": None})
    latest = DensityCore(DensitySettings(mode="two_pass_sample", sketch=unpinned))
    assert load_reference(latest, store).version == 2  # 'latest' found through the pin
    # a restarted worker adopts the pin at assignment and resumes at its checkpoint
    again = PartitionSketches(core(), store)
    assert again.on_assigned([t0]) == {t0: 1}


def test_an_angular_k_is_pinned_like_a_width_and_binds_its_family(s3_server: Server) -> None:
    """Pass-1 workers of an angular sketch with K 'auto' pin K; the merge and pass 2 find
    the version through the pin; a p-stable worker cannot adopt an angular pin."""
    store = SketchStore(_store_settings(s3_server.address))
    sketch = SketchSettings(
        name="ang", version=1, dim=DIM, rows=32, hash="angular", hashes_per_row="auto"
    )

    def core(mode: str = "two_pass_build") -> DensityCore:
        return DensityCore(DensitySettings(mode=mode, sketch=sketch, calibration_size=64))  # type: ignore[arg-type]

    data = mixture(seed=9, big=160, small=(40,)).samples()
    t0, t1 = TopicPartition("in", 0), TopicPartition("in", 1)
    a, b = _two_builders(core(), core(), store, data)
    a.checkpoint({t0: 1})  # a pins K from its 120 points
    b.checkpoint({t1: 1})  # b adopts it
    k = a.core.params().hashes_per_row
    assert b.core.params() == a.core.params() and a.core.bandwidth is not None
    pin = store.pinned_bandwidth("ang", 1, a.core.params_family())
    assert pin is not None and pin.hashes_per_row == k and pin.rule == "spread/angular/v1"

    merged = merge_version(core(), store)
    assert merged.n == len(data) and merged.sketch.params.hashes_per_row == k
    latest = DensityCore(
        DensitySettings(mode="two_pass_sample", sketch=sketch.model_copy(update={"version": None}))
    )
    state = load_reference(latest, store)
    assert state.version == 1 and latest.params() == merged.sketch.params
    pstable_family = {"dim": DIM, "rows": 32, "hashes_per_row": 8, "buckets": 4096, "seed": 0}
    with pytest.raises(FailedPrecondition, match="build a new version"):
        store.pinned_bandwidth("ang", 1, pstable_family)
