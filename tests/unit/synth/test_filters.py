"""Output filters: length rules, the near-duplicate memory (vectors and real embeddings)."""

from __future__ import annotations

import numpy as np
import pytest

from services.synth.filters import NearDupMemory, length_failure


def test_length_failure_checks_prompt_then_response() -> None:
    lo, hi = (2, 1), (5, 4)
    assert length_failure("one two", "x", lo, hi) == ""
    assert length_failure("one", "x", lo, hi) == "filter:too_short"
    assert length_failure("a b c d e f", "x", lo, hi) == "filter:too_long"
    assert length_failure("one two", "", lo, hi) == "filter:too_short"
    assert length_failure("one two", "a b c d e", lo, hi) == "filter:too_long"


def test_memory_flags_duplicates_of_the_past_and_of_the_same_batch() -> None:
    mem = NearDupMemory(capacity=10, threshold=0.9)
    e = np.eye(4, dtype=np.float32)
    first = mem.admit(np.stack([e[0], e[1], e[0] * 3]))  # the third repeats the first
    assert [k for k, _ in first] == [True, True, False]
    assert first[0][1] == -1.0 and first[2][1] == pytest.approx(1.0)
    later = mem.admit(np.stack([e[1] + 0.1 * e[2], e[2]]))
    assert [k for k, _ in later] == [False, True]
    assert len(mem) == 3


def test_memory_forgets_the_oldest_when_full() -> None:
    mem = NearDupMemory(capacity=2, threshold=0.9)
    e = np.eye(3, dtype=np.float32)
    mem.admit(np.stack([e[0], e[1], e[2]]))  # e[0] is evicted by e[2]
    assert [k for k, _ in mem.admit(e[:1])] == [True]
    assert mem.max_similarity(e[1:2])[0] < 0.5  # ... and e[0] evicted e[1] in turn


def test_memory_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="vectors"):
        NearDupMemory(4, 0.9).admit(np.zeros(3, dtype=np.float32))


def test_real_embeddings_catch_a_rephrased_question(minilm) -> None:  # type: ignore[no-untyped-def]
    mem = NearDupMemory(capacity=100, threshold=0.9)
    texts = [
        "How does the central bank raise interest rates?",
        "How does the central bank raise the interest rates?",
        "What did officials say about the vote?",
    ]
    assert [k for k, _ in mem.admit(minilm.embed(texts))] == [True, False, True]
