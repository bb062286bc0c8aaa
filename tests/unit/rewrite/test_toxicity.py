"""The lexical pre-filter, the LLM judge and how they combine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.rewrite.toxicity import (
    DEFAULT_TERMS,
    TOXICITY_QUESTION,
    Lexicon,
    ToxicityChecker,
    ToxicityJudge,
    Verdict,
)
from services.runtime.errors import ConfigError


def test_lexicon_matches_whole_words_and_phrases_case_insensitively() -> None:
    lex = Lexicon(DEFAULT_TERMS)
    assert lex.match("What the FUCK happened") == "fuck"
    assert lex.match("I will   kill you tomorrow") == "i will kill you"
    assert lex.match("shit.") == "shit"
    # substrings of innocent words never match
    assert lex.match("Scunthorpe's cockpit, a shitake typo, and a class assessment") is None
    assert lex.match("") is None


def test_lexicon_reads_extra_terms_from_a_file(tmp_path: Path) -> None:
    f = tmp_path / "terms.txt"
    f.write_text("# site list\nzorblax\n\n  gloop  # comment\n", encoding="utf-8")
    lex = Lexicon.from_sources(["fuck"], str(f))
    assert set(lex.terms) == {"fuck", "zorblax", "gloop"}
    assert lex.match("a Gloop appeared") == "gloop"
    with pytest.raises(ConfigError, match="not found"):
        Lexicon.from_sources([], str(tmp_path / "missing.txt"))


def test_empty_lexicon_matches_nothing() -> None:
    assert Lexicon([]).match("anything at all") is None


def test_checker_without_judge_only_uses_the_lexicon() -> None:
    checker = ToxicityChecker(Lexicon(["gloop"]), None, 0.5)
    assert checker.check(["a gloop", "clean"]) == [
        Verdict(True, "lexical", 1.0),
        Verdict(False, "", None),
    ]


@pytest.mark.slow
def test_judge_scores_only_what_the_lexicon_passes(torch_backend) -> None:  # type: ignore[no-untyped-def]
    judge = ToxicityJudge(torch_backend, TOXICITY_QUESTION, max_tokens=64)
    texts = ["You absolute shit.", "Bread rises because yeast makes gas.", "I hate you all."]
    probs = judge.probabilities(texts[1:])
    assert probs.shape == (2,) and np.all((probs > 0) & (probs < 1))
    # threshold 0: everything the judge sees is toxic; the lexicon's hit is decided first
    everything = ToxicityChecker(Lexicon(DEFAULT_TERMS), judge, 0.0).check(texts)
    assert [v.source for v in everything] == ["lexical", "judge", "judge"]
    assert all(v.toxic for v in everything)
    assert [v.score for v in everything[1:]] == pytest.approx(list(probs), abs=1e-6)
    nothing = ToxicityChecker(Lexicon([]), judge, 1.0).check(texts)
    assert not any(v.toxic for v in nothing)
