"""MinHash, shingles and normalisation: estimates agree with exact Jaccard, hashing does not
depend on how texts are batched, band collisions follow 1 - (1 - J^r)^b."""

from __future__ import annotations

import random

import numpy as np
import pytest

from services.dedup.minhash import MinHasher, NormaliseOptions, exact_key, normalise
from services.demo.corpus import build_demo_corpus


def real_texts(n: int = 60) -> list[str]:
    docs = [r.text for r in build_demo_corpus(seed=0) if r.kind == "real"]
    return [normalise(t) for t in docs[:n]]


def shingle_set(text: str, n: int = 5) -> set[tuple[str, ...]]:
    w = text.split()
    if len(w) < n:
        return {tuple(w)} if w else set()
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingle_set(a), shingle_set(b)
    return len(sa & sb) / len(sa | sb)


def edit(rng: random.Random, text: str, rate: float) -> str:
    out = []
    for w in text.split():
        r = rng.random()
        if r < rate / 2:
            continue
        out.append(w if r >= rate else f"x{rng.randint(0, 10**6)}")
    return " ".join(out)


def test_normalise_like_datatrove() -> None:
    assert normalise("Hello,   WORLD!\n\tIt's 2024.") == "hello world it s 0000"
    assert normalise("ｆｕｌｌ－ｗｉｄｔｈ") == "full width"  # NFKC, then punctuation
    keep = NormaliseOptions(digits=False, punctuation=False)
    assert normalise("A-1  b", keep) == "a-1 b"
    assert exact_key(normalise("Same text.")) == exact_key(normalise("same   TEXT"))
    assert exact_key("a") != exact_key("b")


def test_estimates_match_exact_jaccard() -> None:
    rng = random.Random(1)
    mh = MinHasher()
    pairs = [(t, edit(rng, t, rate)) for t in real_texts(40) for rate in (0.05, 0.2, 0.5)]
    sigs = mh.signatures([x for p in pairs for x in p])
    est = np.array([np.mean(sigs[2 * i] == sigs[2 * i + 1]) for i in range(len(pairs))])
    exact = np.array([jaccard(a, b) for a, b in pairs])
    err = est - exact
    sd = np.sqrt(exact * (1 - exact) / mh.num_perm).mean()
    assert abs(err.mean()) < 0.02  # unbiased
    assert err.std() < 1.5 * sd  # the binomial spread of 112 hashes, no worse


def test_batching_does_not_change_hashes() -> None:
    texts = [*real_texts(12), "", "too short", "a b c d e"]
    mh = MinHasher()
    together = mh.signatures(texts)
    alone = np.vstack([mh.signatures([t]) for t in texts])
    assert np.array_equal(together, alone)
    assert np.array_equal(mh.band_keys(together), mh.band_keys(alone))
    # an empty text hashes to the all-max signature; short texts hash to one shingle
    assert (together[len(texts) - 3] == np.iinfo(np.uint32).max).all()
    assert not np.array_equal(together[-2], together[-1])
    # seeds and n-gram sizes give other hash functions
    assert not np.array_equal(MinHasher(seed=2).signatures(texts[:1]), together[:1])
    assert MinHasher(seed=2).fingerprint != mh.fingerprint


def test_char_shingles() -> None:
    mh = MinHasher(tokens="char", ngram=5)
    a = "the quick brown fox jumps over the lazy dog"
    sigs = mh.signatures([a, a.replace("lazy", "lazi"), "completely different words here"])
    assert np.mean(sigs[0] == sigs[1]) > 0.6
    assert np.mean(sigs[0] == sigs[2]) < 0.2


def test_band_collision_probability_follows_the_s_curve() -> None:
    rng = random.Random(2)
    mh = MinHasher()
    base = real_texts(60)
    hit = {"high": [], "low": []}
    for t in base:
        for name, rate in (("high", 0.006), ("low", 0.3)):
            v = edit(rng, t, rate)
            keys = mh.band_keys(mh.signatures([t, v]))
            hit[name].append((jaccard(t, v), bool(np.any(keys[0] == keys[1]))))
    high = [h for j, h in hit["high"] if j >= 0.9]
    low = [h for j, h in hit["low"] if j <= 0.4]
    assert len(high) > 30 and all(high)
    assert len(low) > 30 and sum(low) <= 1


@pytest.mark.parametrize("bad", [{"bands": 3, "rows": 5, "num_perm": 16}, {"ngram": 0}])
def test_bad_parameters(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        MinHasher(**bad)
