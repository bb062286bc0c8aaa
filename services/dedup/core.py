"""The dedup core: keep the first occurrence of every text, drop later exact, near and
(optionally) semantic duplicates, recording which sample each one duplicates.

Pure logic on domain objects (no grpc or kafka imports); the gRPC servicer, the Kafka stage
worker and the local runner all call it. State lives in a ``DedupStore`` (Redis or
SQLite, services.dedup.store) shared by every replica. Per batch, in stream order:

1. **exact**: the 128-bit digest of the normalised text (services.dedup.minhash) is claimed;
   a key another sample owns makes this one ``dedup:exact`` of that sample.
2. **near**: the MinHash signature's LSH band keys are claimed in the same round trip; a band
   another sample owns makes it a candidate, confirmed (``verify``) when the signatures agree
   on at least ``threshold`` of their entries (estimated Jaccard), else any shared band
   counts (FineWeb). ``dedup:near`` names the most similar owner.
3. **semantic** (off by default), for the samples still kept: embeddings (the sample's own,
   or the configured model's) hashed by the density stage's p-stable LSH, one key per
   table; candidates confirmed by cosine >= ``threshold`` against the stored vector.

Every sample claims its keys, kept or not, so near-duplicates form clusters as FineWeb's
union-find does: a sample that matches a dropped one is dropped too, naming it. Decisions
are idempotent per sample id: a replayed sample finds its own id on the keys it claimed
before and is decided exactly as before (a different sample with the same id is taken for
the same sample). ``check`` answers the same question without writing anything.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.dedup.minhash import MinHasher, NormaliseOptions, exact_key, normalise
from services.dedup.settings import DedupSettings
from services.dedup.store import DedupStore, StoreStats
from services.runtime.backends.base import Lazy
from services.runtime.backends.embeddings import Embedder
from services.runtime.domain import Action, LineageEvent, Outcome, Sample
from services.runtime.errors import InvalidArgument
from services.runtime.stage import StageObserver

STAGE = "dedup"
LEVELS = ("exact", "near", "semantic")
SCORE_SIMILARITY = "dedup_similarity"
META_DUPLICATE_OF = "dedup_of"

# Key kinds (first byte after the prefix): see services.dedup.store.
_EXACT, _BAND, _SIG, _SEM, _VEC = b"x", b"b", b"g", b"s", b"v"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the stage found for one sample: ``level`` '' when it is a first occurrence."""

    sample_id: str
    level: str = ""
    duplicate_of: str = ""
    similarity: float = 0.0

    @property
    def duplicate(self) -> bool:
        return bool(self.level)

    @property
    def reason(self) -> str:
        return f"{STAGE}:{self.level}" if self.level else ""


class _Claims:
    """``check``'s read-only stand-in for ``store.claim``: owners from the store, and from
    earlier samples of the same request for keys the store does not hold."""

    def __init__(self, store: DedupStore) -> None:
        self.store = store

    def claim(
        self, keys: Sequence[bytes], owners: Sequence[str], blobs: Sequence[tuple[bytes, bytes]]
    ) -> list[str]:
        self.pending = dict(blobs)
        found = self.store.lookup(keys)
        local: dict[bytes, str] = {}
        out = []
        for k, o, f in zip(keys, owners, found, strict=True):
            out.append(f if f is not None else local.setdefault(k, o))
        return out

    def blobs(self, keys: Sequence[bytes]) -> list[bytes | None]:
        stored = self.store.blobs(keys)
        return [
            s if s is not None else self.pending.get(k) for k, s in zip(keys, stored, strict=True)
        ]


class DedupCore:
    """Exact, near and semantic dedup of a stream against shared state."""

    def __init__(
        self,
        settings: DedupSettings,
        *,
        store: DedupStore,
        metrics: StageObserver | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        n = settings.normalise
        self.norm = NormaliseOptions(n.lowercase, n.nfkc, n.digits, n.punctuation, n.whitespace)
        near = settings.near
        self.hasher = MinHasher(
            ngram=near.ngram,
            num_perm=near.num_perm,
            bands=near.bands,
            rows=near.rows,
            seed=near.seed,
            tokens=near.tokens,
        )
        self._embedder: Lazy[Embedder] = Lazy(embedder, "embed", self._create_embedder)
        self._semantic_sketch: Any = None
        self._stats_at = 0.0
        registry = getattr(metrics, "registry", None)
        if registry is not None:
            from services.dedup.metrics import DedupMetrics

            self._dedup_metrics: Any = DedupMetrics(registry)
        else:
            self._dedup_metrics = None

    # -- StageCore ------------------------------------------------------------------
    @property
    def signals(self) -> list[str]:
        return [SCORE_SIMILARITY]

    @property
    def steps(self) -> list[str]:
        return [STAGE]

    @property
    def levels(self) -> list[str]:
        s = self.settings
        return [
            lv
            for lv, on in zip(
                LEVELS, (s.exact.enabled, s.near.enabled, s.semantic.enabled), strict=True
            )
            if on
        ]

    @property
    def model_version(self) -> str:
        """The levels and every parameter that decides what a duplicate is."""
        s = self.settings
        doc: dict[str, Any] = {"normalise": s.normalise.model_dump(), "levels": self.levels}
        if s.near.enabled:
            doc["near"] = [self.hasher.fingerprint, s.near.verify, s.near.threshold]
        if s.semantic.enabled:
            doc["semantic"] = s.semantic.model_dump()
        digest = hashlib.blake2b(json.dumps(doc, sort_keys=True).encode(), digest_size=6)
        return f"dedup-{'+'.join(self.levels)}-{digest.hexdigest()}"

    def process(self, samples: list[Sample]) -> list[Outcome]:
        """Claim every sample's keys and drop the duplicates (one outcome per sample)."""
        if not samples:
            return []
        verdicts = self._decide(samples, self.store)
        version = self.model_version
        outcomes = []
        for s, v in zip(samples, verdicts, strict=True):
            if v.duplicate:
                s.metadata[META_DUPLICATE_OF] = v.duplicate_of
                s.scores[SCORE_SIMILARITY] = v.similarity
            s.lineage.append(
                LineageEvent(
                    stage=STAGE,
                    action=Action.DROPPED if v.duplicate else Action.KEPT,
                    reason=v.reason,
                    model_version=version,
                    parent_id=v.duplicate_of,
                )
            )
            outcomes.append(Outcome(s, kept=not v.duplicate, reason=v.reason))
        self._observe(verdicts)
        return outcomes

    def check(self, samples: Sequence[Sample]) -> list[Verdict]:
        """``process``'s verdicts without recording anything: against the store and the
        earlier samples of the same call ("have you seen this?")."""
        if not samples:
            return []
        return self._decide(samples, _Claims(self.store))

    def state_stats(self) -> StoreStats:
        return self.store.stats()

    # -- decisions ------------------------------------------------------------------
    def _decide(self, samples: Sequence[Sample], store: Any) -> list[Verdict]:
        s = self.settings
        ids = [x.id for x in samples]
        texts = [normalise(x.content, self.norm) for x in samples]
        if s.near.tokens == "word" and not s.normalise.whitespace:
            texts_for_near = [" ".join(t.split()) for t in texts]
        else:
            texts_for_near = texts
        keys: list[bytes] = []
        owners: list[str] = []
        blobs: list[tuple[bytes, bytes]] = []
        per_sample = 0
        if s.exact.enabled:
            per_sample += 1
        sigs = None
        if s.near.enabled:
            sigs = self.hasher.signatures(texts_for_near)
            bands = self.hasher.band_keys(sigs)
            per_sample += s.near.bands
            if s.near.verify:
                blobs = [
                    (_SIG + i.encode(), sig.tobytes()) for i, sig in zip(ids, sigs, strict=True)
                ]
        for i, sid in enumerate(ids):
            if s.exact.enabled:
                keys.append(_EXACT + exact_key(texts[i]))
                owners.append(sid)
            if sigs is not None:
                keys.extend(_BAND + b.tobytes() for b in bands[i])
                owners.extend([sid] * s.near.bands)
        got = store.claim(keys, owners, blobs) if keys else []
        verdicts = [Verdict(sid) for sid in ids]
        candidates: dict[int, list[str]] = {}
        for i, sid in enumerate(ids):
            row = got[i * per_sample : (i + 1) * per_sample]
            if s.exact.enabled:
                if row[0] != sid:
                    verdicts[i] = Verdict(sid, "exact", row[0], 1.0)
                    continue
                row = row[1:]
            others = [o for o in row if o != sid]
            if others:
                candidates[i] = others
        if candidates and sigs is not None:
            self._confirm_near(ids, sigs, candidates, verdicts, store)
        if s.semantic.enabled:
            alive = [i for i, v in enumerate(verdicts) if not v.duplicate]
            if alive:
                self._semantic([samples[i] for i in alive], alive, verdicts, store)
        return verdicts

    def _confirm_near(
        self,
        ids: list[str],
        sigs: np.ndarray,
        candidates: dict[int, list[str]],
        verdicts: list[Verdict],
        store: Any,
    ) -> None:
        near = self.settings.near
        if not near.verify:
            for i, others in candidates.items():
                owner, hits = Counter(others).most_common(1)[0]
                verdicts[i] = Verdict(ids[i], "near", owner, hits / near.bands)
            return
        wanted = sorted({o for others in candidates.values() for o in others})
        stored = store.blobs([_SIG + o.encode() for o in wanted])
        by_owner = {
            o: np.frombuffer(b, dtype=np.uint32)
            for o, b in zip(wanted, stored, strict=True)
            if b is not None and len(b) == sigs.shape[1] * 4
        }
        for i, others in candidates.items():
            best, best_j = "", -1.0
            for o in dict.fromkeys(others):
                theirs = by_owner.get(o)
                if theirs is None:
                    continue
                j = float(np.mean(sigs[i] == theirs))
                if j > best_j:
                    best, best_j = o, j
            if best and best_j >= near.threshold:
                verdicts[i] = Verdict(ids[i], "near", best, best_j)

    # -- semantic level -----------------------------------------------------------------
    def _create_embedder(self) -> Embedder:
        from services.runtime.backends.embeddings import create_embedder

        return create_embedder(self.settings.semantic.embedding)

    def _vectors(self, samples: Sequence[Sample]) -> np.ndarray:
        need = [i for i, x in enumerate(samples) if not x.embedding]
        given = [i for i, x in enumerate(samples) if x.embedding]
        dim = len(samples[given[0]].embedding or ()) if given else self._embedder.get().dim
        out = np.zeros((len(samples), dim), dtype=np.float32)
        for i in given:
            emb = samples[i].embedding or []
            if len(emb) != dim:
                raise InvalidArgument(
                    f"sample {samples[i].id!r}: embedding has {len(emb)} dims, not {dim}"
                )
            out[i] = emb
        if need:
            out[need] = self._embedder.get().embed([samples[i].content for i in need])
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out

    def _sketch(self, dim: int) -> Any:
        sem = self.settings.semantic
        sk = self._semantic_sketch
        if sk is None or sk.params.dim != dim:
            # The density stage's LSH (p-stable hashes of unit vectors, rehashed to buckets),
            # imported only when the semantic level is on: it brings torch.
            from services.density.sketch import RaceSketch, SketchParams

            params = SketchParams(
                dim=dim,
                rows=sem.rows,
                hashes_per_row=sem.hashes_per_row,
                buckets=1 << 18,
                width=sem.width,
                seed=sem.seed,
            )
            sk = self._semantic_sketch = RaceSketch(params)
        return sk

    def _semantic(
        self, samples: Sequence[Sample], index: list[int], verdicts: list[Verdict], store: Any
    ) -> None:
        sem = self.settings.semantic
        vecs = self._vectors(samples)
        buckets = self._sketch(vecs.shape[1]).bucket_ids(vecs)  # (n, rows)
        tag = np.uint8(vecs.shape[1] % 251).tobytes()
        keys, owners = [], []
        for x, row in zip(samples, buckets, strict=True):
            for r, bucket in enumerate(row):
                keys.append(_SEM + tag + int(r).to_bytes(2, "big") + int(bucket).to_bytes(4, "big"))
                owners.append(x.id)
        blobs = [
            (_VEC + x.id.encode(), v.astype(np.float16).tobytes())
            for x, v in zip(samples, vecs, strict=True)
        ]
        got = store.claim(keys, owners, blobs)
        rows = sem.rows
        wanted: dict[int, list[str]] = {}
        for j, x in enumerate(samples):
            others = [o for o in got[j * rows : (j + 1) * rows] if o != x.id]
            if others:
                wanted[j] = list(dict.fromkeys(others))
        if not wanted:
            return
        names = sorted({o for os_ in wanted.values() for o in os_})
        stored = dict(zip(names, store.blobs([_VEC + o.encode() for o in names]), strict=True))
        for j, others in wanted.items():
            best, best_c = "", -2.0
            for o in others:
                b = stored.get(o)
                if b is None or len(b) != vecs.shape[1] * 2:
                    continue
                c = float(np.dot(vecs[j], np.frombuffer(b, dtype=np.float16).astype(np.float32)))
                if c > best_c:
                    best, best_c = o, c
            if best and best_c >= sem.threshold:
                i = index[j]
                verdicts[i] = Verdict(samples[j].id, "semantic", best, best_c)

    # -- metrics --------------------------------------------------------------------------
    def _observe(self, verdicts: Sequence[Verdict]) -> None:
        m = self._dedup_metrics
        if m is None:
            return
        m.observe(verdicts)
        interval = self.settings.state.stats_interval_s
        now = time.monotonic()
        if now - self._stats_at >= interval:
            self._stats_at = now
            m.observe_state(self.store.stats())
