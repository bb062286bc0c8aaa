"""The drift guard on constructed (original, rewrite) pairs, with the real embedder."""

from __future__ import annotations

import pytest

from services.rewrite.drift import DriftGuard, copy_ratio, cosine_rows, length_ratio
from services.rewrite.prompts import PRESETS
from services.rewrite.settings import DriftSettings

ORIGINAL = (
    "The river froze early this year, so the ferry between the two villages stopped running "
    "in November and people crossed on the ice instead."
)
PARAPHRASE = (
    "Because the river iced over early this year, the ferry linking the two villages halted "
    "in November, and residents walked across the ice."
)
UNRELATED = (
    "Quarterly revenue at the software company grew twelve percent, driven by subscriptions "
    "in Asia and a new pricing plan for small businesses."
)
INSTRUCTION = PRESETS["paraphrase"]


def _guard(minilm, **kw) -> DriftGuard:  # type: ignore[no-untyped-def]
    return DriftGuard(DriftSettings(**kw), lambda: minilm)


def test_each_check_names_its_reason(minilm) -> None:  # type: ignore[no-untyped-def]
    cases = {
        "": "rewrite:empty",
        ORIGINAL.lower(): "rewrite:echo",
        f"{INSTRUCTION} {ORIGINAL}": "rewrite:echo",
        ORIGINAL.replace(" instead", ""): "rewrite:echo",  # a near-verbatim copy
        "Ice closed the ferry.": "rewrite:too_short",
        " ".join([PARAPHRASE] * 4): "rewrite:too_long",
        UNRELATED: "rewrite:drift",
        PARAPHRASE: "",
    }
    rewrites = list(cases)
    checks = _guard(minilm).check(
        [ORIGINAL] * len(rewrites), rewrites, [INSTRUCTION] * len(rewrites)
    )
    assert [c.reason for c in checks] == list(cases.values())
    by_text = dict(zip(rewrites, checks, strict=True))
    assert by_text[PARAPHRASE].similarity is not None and by_text[PARAPHRASE].similarity > 0.6
    assert by_text[UNRELATED].similarity is not None and by_text[UNRELATED].similarity < 0.3
    # cheap rejections are never embedded
    assert by_text["Ice closed the ferry."].similarity is None


def test_truncated_rewrites_are_rejected_unless_configured(minilm) -> None:  # type: ignore[no-untyped-def]
    args = ([ORIGINAL], [PARAPHRASE], [INSTRUCTION], [True])
    assert _guard(minilm).check(*args)[0].reason == "rewrite:truncated"
    assert _guard(minilm, reject_truncated=False).check(*args)[0].reason == ""


def test_similarity_can_be_switched_off() -> None:
    def no_embedder():  # type: ignore[no-untyped-def]
        raise AssertionError("the embedder must not load")

    guard = DriftGuard(DriftSettings(similarity=False), no_embedder)
    check = guard.check([ORIGINAL], [UNRELATED], [INSTRUCTION])[0]
    assert check.reason == "" and check.similarity is None


def test_ratio_and_cosine_helpers() -> None:
    import numpy as np

    assert length_ratio("a b c d", "a b") == 0.5
    assert copy_ratio("a b c d e", "A b, c d x") == pytest.approx(2 / 3)
    assert copy_ratio("a b c d", "a b") == 0.0  # too short for a trigram
    assert copy_ratio(ORIGINAL, PARAPHRASE) < 0.3
    assert length_ratio("", "a") == 1.0
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[2.0, 0.0], [1.0, 0.0]])
    assert cosine_rows(a, b) == pytest.approx([1.0, 0.0])


def test_bounds_are_validated() -> None:
    with pytest.raises(ValueError, match="min_length_ratio"):
        DriftSettings(min_length_ratio=2.0, max_length_ratio=1.5)
