"""Where the dedup stage records first occurrences: Redis for a deployment (every replica
shares it, it survives restarts), SQLite embedded in the process for ``sluice run``.

**Claims.** A key (an exact digest, an LSH band, a semantic bucket) is *claimed* by the
first sample that writes its id there; every later writer reads that id back instead. On
Redis one pipelined ``SET key id NX GET [EX ttl]`` per key (Redis >= 7.0) does both in
one round trip per batch, atomically per key, so replicas racing on a key agree on the
winner. Because the value is the owner's id, a replayed or redelivered sample finds its own
id and is not its own duplicate: decisions are idempotent, which is what makes the stage
exactly-once together with the Kafka transaction that carries its outputs.

**Blobs** (a MinHash signature, an embedding) are written set-if-absent in the same round
trip, *before* the claims, so whoever reads an owner from a claim can read its blob.

**Bounded mode.** With ``ttl_seconds`` every key expires that long after it was first
written (Redis ``EX``; SQLite rows carry an expiry, ignored once past and purged as
writes go on): state is bounded by the stream's rate x ttl, and duplicates further apart
than the ttl are not found.

Keys are bytes: ``<prefix><kind byte><payload>``; no Lua, no multi-key commands, so the
same commands work on Redis Cluster (keys spread over slots).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from services.dedup.settings import DedupSettings, StateSettings
from services.runtime.errors import ConfigError, Unavailable

_PIPELINE_CHUNK = 10_000
_SQL_IN_CHUNK = 500


@dataclass(frozen=True, slots=True)
class StoreStats:
    """How big the state is: keys held and bytes used (the engine's own figure)."""

    keys: int
    bytes: int


class DedupStore(Protocol):
    """What the core needs from a store (see the module docstring)."""

    def claim(
        self,
        keys: Sequence[bytes],
        owners: Sequence[str],
        blobs: Sequence[tuple[bytes, bytes]] = (),
    ) -> list[str]:
        """Write ``blobs`` (if absent), then claim each key in order for its owner; return
        each key's owner after the call (the owner given, or whoever claimed it first)."""
        ...

    def lookup(self, keys: Sequence[bytes]) -> list[str | None]:
        """Each key's owner, None where unclaimed (nothing is written)."""
        ...

    def blobs(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Each blob, None where absent."""
        ...

    def stats(self) -> StoreStats: ...

    def close(self) -> None: ...


class RedisStore:
    """Claims and blobs in Redis (or Valkey, or a Redis Cluster through ``client``)."""

    def __init__(self, settings: StateSettings, client: Any = None) -> None:
        import redis

        self.prefix = settings.key_prefix.encode()
        self.ttl = settings.ttl_seconds or None
        if client is None:
            password = settings.redis_password.get_secret_value() or None
            if settings.redis_password_file:
                try:
                    password = Path(settings.redis_password_file).read_text().rstrip("\r\n")
                except OSError as exc:
                    raise ConfigError(
                        f"state.redis_password_file: cannot read {settings.redis_password_file}"
                    ) from exc
            client = redis.Redis.from_url(
                settings.redis_url,
                password=password,
                socket_timeout=settings.timeout_s,
                socket_connect_timeout=settings.timeout_s,
                health_check_interval=30,
            )
        self.client = client
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

    def _run(self, fill: Any) -> list[Any]:
        try:
            pipe = self.client.pipeline(transaction=False)
            fill(pipe)
            return list(pipe.execute())
        except self._errors as exc:
            raise Unavailable(f"dedup state (redis): {exc}") from exc

    def claim(
        self,
        keys: Sequence[bytes],
        owners: Sequence[str],
        blobs: Sequence[tuple[bytes, bytes]] = (),
    ) -> list[str]:
        p, ttl = self.prefix, self.ttl
        for i in range(0, len(blobs), _PIPELINE_CHUNK):
            chunk = blobs[i : i + _PIPELINE_CHUNK]
            self._run(lambda pipe, c=chunk: [pipe.set(p + k, v, nx=True, ex=ttl) for k, v in c])
        out: list[str] = []
        for i in range(0, len(keys), _PIPELINE_CHUNK):
            ks, os_ = keys[i : i + _PIPELINE_CHUNK], owners[i : i + _PIPELINE_CHUNK]
            got = self._run(
                lambda pipe, ks=ks, os_=os_: [
                    pipe.set(p + k, o, nx=True, get=True, ex=ttl)
                    for k, o in zip(ks, os_, strict=True)
                ]
            )
            out.extend(o if g is None else g.decode() for g, o in zip(got, os_, strict=True))
        return out

    def lookup(self, keys: Sequence[bytes]) -> list[str | None]:
        return [None if v is None else v.decode() for v in self.blobs(keys)]

    def blobs(self, keys: Sequence[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for i in range(0, len(keys), _PIPELINE_CHUNK):
            ks = [self.prefix + k for k in keys[i : i + _PIPELINE_CHUNK]]
            out.extend(self._run(lambda pipe, ks=ks: pipe.mget(ks))[0])
        return out

    def stats(self) -> StoreStats:
        def fill(pipe: Any) -> None:
            pipe.dbsize()
            pipe.info("memory")

        size, memory = self._run(fill)
        return StoreStats(int(size), int(memory.get("used_memory", 0)))

    def close(self) -> None:
        self.client.close()


class SqliteStore:
    """Claims and blobs in an embedded SQLite database (one process; thread-safe)."""

    def __init__(self, settings: StateSettings) -> None:
        path = settings.sqlite_path or ":memory:"
        self.ttl = float(settings.ttl_seconds) or None
        try:
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            for table in ("claims", "blobs"):
                self.db.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} "
                    "(k BLOB PRIMARY KEY, v BLOB NOT NULL, expires REAL) WITHOUT ROWID"
                )
        except sqlite3.Error as exc:
            raise ConfigError(f"state.sqlite_path {path!r}: {exc}") from exc
        self._lock = threading.Lock()
        self._writes = 0

    def _expires(self, now: float) -> float | None:
        return now + self.ttl if self.ttl else None

    def _upsert(self, table: str, rows: list[tuple[bytes, Any, float | None]], now: float) -> None:
        # Insert, or take over a row whose expiry has passed (as if Redis had expired it).
        self.db.executemany(
            f"INSERT INTO {table} (k, v, expires) VALUES (?, ?, ?) ON CONFLICT(k) DO UPDATE "
            "SET v = excluded.v, expires = excluded.expires "
            f"WHERE {table}.expires IS NOT NULL AND {table}.expires < {now!r}",
            rows,
        )

    def _select(self, table: str, keys: Sequence[bytes], now: float) -> dict[bytes, Any]:
        found: dict[bytes, Any] = {}
        uniq = list(dict.fromkeys(keys))
        for i in range(0, len(uniq), _SQL_IN_CHUNK):
            ks = uniq[i : i + _SQL_IN_CHUNK]
            marks = ",".join("?" * len(ks))
            rows = self.db.execute(
                f"SELECT k, v FROM {table} WHERE k IN ({marks}) "
                "AND (expires IS NULL OR expires >= ?)",
                [*ks, now],
            )
            found.update(rows)
        return found

    def claim(
        self,
        keys: Sequence[bytes],
        owners: Sequence[str],
        blobs: Sequence[tuple[bytes, bytes]] = (),
    ) -> list[str]:
        now = time.time()
        exp = self._expires(now)
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if blobs:
                    self._upsert("blobs", [(k, v, exp) for k, v in blobs], now)
                self._upsert(
                    "claims", [(k, o, exp) for k, o in zip(keys, owners, strict=True)], now
                )
                found = self._select("claims", keys, now)
                self._writes += len(keys)
                if self.ttl and self._writes >= 100_000:  # bounded mode: drop expired rows
                    self._writes = 0
                    for table in ("claims", "blobs"):
                        self.db.execute(f"DELETE FROM {table} WHERE expires < ?", (now,))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return [found[k] for k in keys]

    def lookup(self, keys: Sequence[bytes]) -> list[str | None]:
        with self._lock:
            found = self._select("claims", keys, time.time())
        return [found.get(k) for k in keys]

    def blobs(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._lock:
            found = self._select("blobs", keys, time.time())
        return [found.get(k) for k in keys]

    def stats(self) -> StoreStats:
        with self._lock:
            n = sum(
                self.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("claims", "blobs")
            )
            pages = self.db.execute("PRAGMA page_count").fetchone()[0]
            size = self.db.execute("PRAGMA page_size").fetchone()[0]
        return StoreStats(int(n), int(pages * size))

    def close(self) -> None:
        with self._lock:
            self.db.close()


def create_store(settings: StateSettings) -> DedupStore:
    """The store the settings name."""
    if settings.backend == "redis":
        return RedisStore(settings)
    return SqliteStore(settings)


def build_core(settings: DedupSettings, *, metrics: Any = None) -> Any:
    """The registry's core factory: the core wired to the store its settings name."""
    from services.dedup.core import DedupCore

    return DedupCore(settings, store=create_store(settings.state), metrics=metrics)
