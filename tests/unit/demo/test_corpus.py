"""The demo corpus is reproducible, labelled, and has the mix of real text and junk it promises."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from services.demo.corpus import JUNK_TYPES, DemoRecord, build_demo_corpus, write_jsonl


@pytest.fixture(scope="module")
def corpus() -> list[DemoRecord]:
    return build_demo_corpus(seed=0)


def test_same_seed_gives_identical_corpus(corpus: list[DemoRecord]) -> None:
    assert build_demo_corpus(seed=0) == corpus


def test_other_seed_gives_different_junk_and_order(corpus: list[DemoRecord]) -> None:
    other = build_demo_corpus(seed=1)
    assert [r.id for r in other] != [r.id for r in corpus]
    junk = {r.id: r.text for r in corpus if r.kind != "real"}
    other_junk = {r.id: r.text for r in other if r.kind != "real"}
    assert junk.keys() == other_junk.keys()
    assert junk != other_junk
    # The real documents are the same 300 whatever the seed.
    assert {r.id: r.text for r in corpus if r.kind == "real"} == {
        r.id: r.text for r in other if r.kind == "real"
    }


def test_has_all_300_real_documents(corpus: list[DemoRecord]) -> None:
    real = [r for r in corpus if r.kind == "real"]
    assert len(real) == 300
    assert {r.id for r in real} == {f"lee-{i:04d}" for i in range(300)}
    assert all(r.text.strip() and r.source == "gensim:lee_background" for r in real)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_junk_fraction_is_as_asked(fraction: float) -> None:
    records = build_demo_corpus(seed=3, junk_fraction=fraction)
    junk = sum(r.kind != "real" for r in records)
    assert junk / len(records) == pytest.approx(fraction, abs=0.01)


def test_zero_junk_fraction_gives_only_real_text() -> None:
    assert {r.kind for r in build_demo_corpus(junk_fraction=0.0)} == {"real"}


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_rejects_impossible_junk_fraction(fraction: float) -> None:
    with pytest.raises(ValueError):
        build_demo_corpus(junk_fraction=fraction)


def test_every_junk_type_present_in_roughly_equal_numbers(corpus: list[DemoRecord]) -> None:
    counts = Counter(r.kind for r in corpus if r.kind != "real")
    assert set(counts) == {f"junk:{t}" for t in JUNK_TYPES}
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sum(counts.values()) == 100


def test_ids_unique_and_stable_format(corpus: list[DemoRecord]) -> None:
    ids = [r.id for r in corpus]
    assert len(ids) == len(set(ids))
    for r in corpus:
        if r.kind != "real":
            junk_type = r.kind.removeprefix("junk:")
            assert r.id.startswith(f"junk-{junk_type}-")
            assert len(r.id.rsplit("-", 1)[1]) == 3


def test_junk_looks_like_its_type(corpus: list[DemoRecord]) -> None:
    real_texts = {r.text for r in corpus if r.kind == "real"}
    real_word_bags = {tuple(sorted(t.split())) for t in real_texts}
    for r in corpus:
        assert r.text.strip(), r.id
        if r.kind == "junk:shuffled":
            assert r.text not in real_texts
            assert tuple(sorted(r.text.split())) in real_word_bags
        elif r.kind == "junk:spam":
            assert "CLICK HERE" in r.text and "$" in r.text
        elif r.kind == "junk:navigation":
            assert "All rights reserved" in r.text
            assert len(r.text.splitlines()) >= 6
        elif r.kind == "junk:repeated":
            words = r.text.split()
            assert len(set(words)) * 5 < len(words)
        elif r.kind == "junk:gibberish":
            assert not any(r.text in t for t in real_texts)


def test_write_jsonl_round_trips(corpus: list[DemoRecord], tmp_path: Path) -> None:
    path = tmp_path / "nested" / "demo.jsonl"
    assert write_jsonl(corpus, path) == len(corpus)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(corpus)
    back = []
    for line in lines:
        row = json.loads(line)
        assert set(row) == {"id", "text", "source", "metadata"}
        back.append(
            DemoRecord(
                id=row["id"], text=row["text"], source=row["source"], kind=row["metadata"]["kind"]
            )
        )
    assert back == corpus
