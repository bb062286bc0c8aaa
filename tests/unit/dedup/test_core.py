"""The dedup core on the embedded SQLite store: first occurrences kept, exact and near
duplicates dropped naming the sample they duplicate, replays idempotent, check writes
nothing, TTL forgets, semantic dedup on given embeddings."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest

from services.dedup.core import META_DUPLICATE_OF, DedupCore
from services.dedup.settings import DedupSettings
from services.dedup.store import SqliteStore, create_store
from services.runtime.domain import Action, Sample
from services.runtime.errors import InvalidArgument
from services.runtime.metrics import StageMetrics
from tests.unit.dedup.test_minhash import edit, jaccard, real_texts


def core(path: str = "", **config: object) -> DedupCore:
    settings = DedupSettings.model_validate(
        {**config, "state": {"backend": "sqlite", "sqlite_path": path, **config.get("state", {})}}  # type: ignore[dict-item]
    )
    return DedupCore(settings, store=create_store(settings.state), metrics=StageMetrics("dedup"))


def samples(texts: list[str], prefix: str = "s") -> list[Sample]:
    return [Sample(id=f"{prefix}{i}", text=t) for i, t in enumerate(texts)]


def test_exact_and_near_duplicates_name_the_first_occurrence() -> None:
    a, b = real_texts(2)
    words = a.split()
    near_a = " ".join([*words[:10], "xyzzy", *words[11:]])
    assert 0.9 <= jaccard(a, near_a) < 1
    c = core()
    out = c.process(samples([a, b, a.upper() + "!!", near_a]))
    assert [o.kept for o in out] == [True, True, False, False]
    assert [o.reason for o in out] == ["", "", "dedup:exact", "dedup:near"]
    assert out[2].sample.metadata[META_DUPLICATE_OF] == "s0"
    assert out[3].sample.metadata[META_DUPLICATE_OF] == "s0"
    assert out[3].sample.scores["dedup_similarity"] >= 0.8
    ev = out[3].sample.lineage[-1]
    assert (ev.stage, ev.action, ev.parent_id) == ("dedup", Action.DROPPED, "s0")
    assert out[0].sample.lineage[-1].action == Action.KEPT
    # a later batch sees the first one's state
    later = c.process([Sample(id="t0", text=b), Sample(id="t1", text="Something new entirely.")])
    assert [(o.kept, o.sample.metadata.get(META_DUPLICATE_OF)) for o in later] == [
        (False, "s1"),
        (True, None),
    ]


def test_replayed_samples_are_not_their_own_duplicates(tmp_path: Path) -> None:
    texts = real_texts(6)
    batch = samples([*texts, texts[0], texts[3]])
    path = str(tmp_path / "state.sqlite3")
    first = [(o.kept, o.reason) for o in core(path).process(batch)]
    assert first == [(True, "")] * 6 + [(False, "dedup:exact")] * 2
    # the same samples again (a redelivery), through a fresh core on the same file (a restart)
    again = core(path).process(samples([*texts, texts[0], texts[3]]))
    assert [(o.kept, o.reason) for o in again] == first
    assert [o.sample.metadata.get(META_DUPLICATE_OF) for o in again][-2:] == ["s0", "s3"]


def test_below_threshold_is_kept_with_verify_and_banded_without() -> None:
    rng = random.Random(4)
    texts = real_texts(80)
    # find edits that land in the band-hit-but-below-threshold zone
    pairs = []
    for t in texts:
        v = edit(rng, t, 0.06)
        if 0.55 <= jaccard(t, v) <= 0.7:
            pairs.append((t, v))
    assert len(pairs) >= 10
    verify, loose = core(), core(near={"verify": False})
    dropped = {"verify": 0, "loose": 0}
    for i, (t, v) in enumerate(pairs):
        batch = [Sample(id=f"a{i}", text=t), Sample(id=f"b{i}", text=v)]
        dropped["verify"] += not verify.process([Sample(s.id, s.text) for s in batch])[1].kept
        dropped["loose"] += not loose.process(batch)[1].kept
    assert dropped["verify"] <= 1  # estimated J >= 0.8 needed
    assert dropped["loose"] >= 3  # P(band hit) at J 0.6-0.7 is 20-56%


def test_check_writes_nothing_and_sees_its_own_request() -> None:
    a, b = real_texts(2)
    c = core()
    verdicts = c.check(samples([a, b, a]))
    assert [(v.level, v.duplicate_of) for v in verdicts] == [("", ""), ("", ""), ("exact", "s0")]
    assert c.state_stats().keys == 0
    c.process(samples([a], prefix="k"))
    assert [(v.level, v.duplicate_of) for v in c.check(samples([b, a]))] == [
        ("", ""),
        ("exact", "k0"),
    ]


def test_ttl_forgets() -> None:
    c = core(state={"ttl_seconds": 1})
    (a,) = real_texts(1)
    assert c.process(samples([a]))[0].kept
    assert not c.process(samples([a], prefix="x"))[0].kept
    assert isinstance(c.store, SqliteStore)
    time.sleep(1.1)
    assert c.process(samples([a], prefix="y"))[0].kept  # forgotten, first again


def test_levels_and_metrics() -> None:
    (a,) = real_texts(1)
    c = core(exact={"enabled": False})
    assert c.levels == ["near", "semantic"][:1]
    out = c.process(samples([a, a]))
    assert out[1].reason == "dedup:near"  # exact copies are near duplicates at J = 1
    reg = c.metrics.registry  # type: ignore[union-attr]
    assert (
        reg.get_sample_value(
            "sluice_dedup_duplicates_total", {"level": "near", "transport": "kafka"}
        )
        == 1
    )
    assert reg.get_sample_value("sluice_dedup_state_keys") >= 14
    assert core().model_version != c.model_version
    with pytest.raises(ValueError, match="at least one"):
        DedupSettings.model_validate({"exact": {"enabled": False}, "near": {"enabled": False}})


def test_semantic_level_on_given_embeddings() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((20, 32)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    close = base + 0.05 * rng.standard_normal(base.shape).astype(np.float32) / np.sqrt(32)
    c = core(exact={"enabled": False}, near={"enabled": False}, semantic={"enabled": True})
    firsts = [
        Sample(id=f"a{i}", text=f"text {i}", embedding=v.tolist()) for i, v in enumerate(base)
    ]
    seconds = [
        Sample(id=f"b{i}", text=f"other {i}", embedding=v.tolist()) for i, v in enumerate(close)
    ]
    assert all(o.kept for o in c.process(firsts))
    out = c.process(seconds)
    assert sum(not o.kept for o in out) >= 18
    assert all(o.reason == "dedup:semantic" for o in out if not o.kept)
    assert all(
        o.sample.metadata[META_DUPLICATE_OF] == f"a{i}" for i, o in enumerate(out) if not o.kept
    )
    with pytest.raises(InvalidArgument):
        c.process(
            [
                Sample(id="z", text="x", embedding=[1.0, 0.0]),
                Sample(id="y", text="y", embedding=[1.0] * 32),
            ]
        )
