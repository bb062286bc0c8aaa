"""The compact top-k payload: exact round trip, dtypes, size, and refusal of damage."""

from __future__ import annotations

import base64
import zlib

import numpy as np
import pytest

from services.distill.codec import (
    HEADER,
    TOPK_KEY,
    TOPK_URI_KEY,
    TopK,
    attach,
    decode,
    encode,
    load_topk,
)
from services.runtime.domain import Sample
from services.runtime.errors import InvalidArgument


def random_topk(t: int, k: int, seed: int = 0) -> TopK:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(t, 49152)).astype(np.float32) * 3
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    ids = np.argsort(-lp, axis=1)[:, :k]
    return TopK.build(list(rng.integers(0, 49152, t)), ids, np.take_along_axis(lp, ids, axis=1))


@pytest.mark.parametrize(("t", "k"), [(0, 8), (1, 1), (37, 8), (128, 20)])
def test_round_trip_is_exact(t: int, k: int) -> None:
    topk = random_topk(t, k, seed=t)
    back = decode(encode(topk))
    assert back.tokens.dtype == back.top_ids.dtype == np.int32
    assert back.top_logprobs.dtype == np.float16
    np.testing.assert_array_equal(back.tokens, topk.tokens)
    np.testing.assert_array_equal(back.top_ids, topk.top_ids)
    np.testing.assert_array_equal(back.top_logprobs, topk.top_logprobs)
    assert back.top_ids.shape == (t, k) and back.k == k


def test_build_keeps_logprobs_within_float16() -> None:
    topk = TopK.build([5], np.array([[5, 6]]), np.array([[-0.25, -1e6]], dtype=np.float32))
    assert topk.top_logprobs.dtype == np.float16
    assert np.isfinite(topk.top_logprobs).all()
    assert topk.top_logprobs[0, 0] == np.float16(-0.25)


def test_payload_is_compact() -> None:
    t, k = 128, 8
    payload = encode(random_topk(t, k))
    raw = t * 4 + t * k * (4 + 2)
    assert len(payload) < HEADER.size + raw  # compression never costs more than the header


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p[:5],
        lambda p: b"XXXX" + p[4:],
        lambda p: p[: HEADER.size] + b"not zlib",
        lambda p: p[:-3],
        lambda p: HEADER.pack(b"STK1", 10**6, 64, 1, 0) + p[HEADER.size :],
        lambda p: p[: HEADER.size] + zlib.compress(b"\0" * 10**6),
    ],
    ids=["short", "magic", "not-zlib", "truncated", "header-lies", "too-much"],
)
def test_damaged_payloads_are_refused(damage) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument):
        decode(damage(encode(random_topk(6, 4))))


def test_attach_inline_without_a_store_and_load_back() -> None:
    topk = random_topk(9, 3)
    sample = Sample(id="a", prompt="q", metadata={TOPK_URI_KEY: "s3://old/ref"})
    attach(sample, encode(topk), inline_max_bytes=0, store=None)  # no store: always inline
    assert TOPK_URI_KEY not in sample.metadata
    base64.b64decode(sample.metadata[TOPK_KEY], validate=True)
    np.testing.assert_array_equal(load_topk(sample).top_ids, topk.top_ids)


def test_load_topk_says_what_is_missing() -> None:
    with pytest.raises(InvalidArgument, match="no top-k"):
        load_topk(Sample(id="a"))
    with pytest.raises(InvalidArgument, match="no object store"):
        load_topk(Sample(id="a", metadata={TOPK_URI_KEY: "s3://b/k"}))
    with pytest.raises(InvalidArgument, match="base64"):
        load_topk(Sample(id="a", metadata={TOPK_KEY: "%%%"}))
