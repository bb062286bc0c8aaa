"""The dedup state on a real Redis server: first writer wins across replicas racing on the
same keys, owners read back (a replay is not its own duplicate), TTL set in bounded mode,
the same decisions as the embedded SQLite store, Unavailable when Redis is down."""

from __future__ import annotations

import threading
import uuid

import pytest
import redis

from services.dedup.core import DedupCore
from services.dedup.settings import DedupSettings, StateSettings
from services.dedup.store import RedisStore, SqliteStore, create_store
from services.runtime.domain import Sample
from services.runtime.errors import Unavailable
from tests.support.servers import Server, free_port
from tests.unit.dedup.test_minhash import edit, real_texts

pytestmark = pytest.mark.integration


def state(server: Server, **kw: object) -> StateSettings:
    prefix = f"t{uuid.uuid4().hex[:8]}:"  # a fresh namespace per test on the shared server
    return StateSettings.model_validate(
        {"backend": "redis", "redis_url": f"redis://{server.address}/0", "key_prefix": prefix, **kw}
    )


def test_first_writer_wins_across_racing_replicas(redis_server: Server) -> None:
    settings = state(redis_server)
    keys = [f"k{i}".encode() for i in range(2000)]
    results: dict[str, list[str]] = {}

    def replica(name: str) -> None:
        results[name] = RedisStore(settings).claim(keys, [name] * len(keys))

    threads = [threading.Thread(target=replica, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # every replica saw the same owner for every key, and that owner is one of them
    owners = list(results.values())
    assert all(o == owners[0] for o in owners)
    assert set(owners[0]) <= set(results)
    # a replay by the owner reads itself back; lookups write nothing
    store = RedisStore(settings)
    assert store.claim(keys[:3], owners[0][:3]) == owners[0][:3]
    assert store.lookup([b"never-written", keys[0]]) == [None, owners[0][0]]
    store.close()


def test_blobs_and_ttl(redis_server: Server) -> None:
    settings = state(redis_server, ttl_seconds=100)
    store = RedisStore(settings)
    assert store.claim([b"a", b"a"], ["x", "y"], blobs=[(b"sig:x", b"\x01\x02")]) == ["x", "x"]
    assert store.blobs([b"sig:x", b"sig:y"]) == [b"\x01\x02", None]
    raw = redis.Redis.from_url(settings.redis_url)
    assert 0 < raw.ttl(settings.key_prefix.encode() + b"a") <= 100
    assert 0 < raw.ttl(settings.key_prefix.encode() + b"sig:x") <= 100
    stats = store.stats()
    assert stats.keys >= 2 and stats.bytes > 0


def test_redis_and_sqlite_decide_alike(redis_server: Server) -> None:
    import random

    rng = random.Random(5)
    texts = real_texts(40)
    stream = [*texts, *[edit(rng, t, 0.01) for t in texts[:20]], *texts[30:]]
    batches = [stream[i : i + 16] for i in range(0, len(stream), 16)]

    def run(core: DedupCore) -> list[tuple[bool, str, str]]:
        out = []
        for b, texts_ in enumerate(batches):
            batch = [Sample(id=f"{b}-{i}", text=t) for i, t in enumerate(texts_)]
            out += [
                (o.kept, o.reason, o.sample.metadata.get("dedup_of", ""))
                for o in core.process(batch)
            ]
        return out

    settings = DedupSettings.model_validate({"state": state(redis_server).model_dump()})
    on_redis = DedupCore(settings, store=create_store(settings.state))
    lite = DedupSettings()
    on_sqlite = DedupCore(lite, store=SqliteStore(lite.state))
    got = run(on_redis)
    assert got == run(on_sqlite)
    assert sum(not k for k, _, _ in got) >= 30  # the 20 edits and 10 repeats, at least
    # a restarted replica replays the whole stream: every decision the same, none its own
    again = run(DedupCore(settings, store=create_store(settings.state)))
    assert again == got


def test_redis_down_is_unavailable() -> None:
    settings = StateSettings(
        backend="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0", timeout_s=1
    )
    with pytest.raises(Unavailable, match="redis"):
        RedisStore(settings).claim([b"k"], ["a"])
