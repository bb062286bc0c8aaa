"""Heuristic rules: each fires on crafted junk, stays quiet on real news prose, and the
defaults keep at least 97% of the 300 Lee news documents gensim ships."""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from functools import cache

import pydantic
import pytest
from gensim.test.utils import datapath

from services.scoring.heuristics import (
    RULES,
    STOP_WORDS,
    HeuristicFilter,
    HeuristicResult,
    HeuristicSettings,
    ngram_signals,
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@cache
def real_docs() -> tuple[str, ...]:
    with open(datapath("lee_background.cor"), encoding="utf-8") as f:
        return tuple(line.strip() for line in f if line.strip())


def sentences() -> list[str]:
    """Real sentences of 8..40 words, from the first documents."""
    out = [s for d in real_docs()[:20] for s in _SENTENCE_END.split(d)]
    return [s for s in out if 8 <= len(s.split()) <= 40]


DOC = real_docs()[0]  # 400+ words of news prose that passes every rule
FILTER = HeuristicFilter()


def failed(text: str, settings: HeuristicSettings | None = None) -> list[str]:
    return (HeuristicFilter(settings) if settings else FILTER).evaluate(text).failed


# -- calibration on real text ---------------------------------------------------------------
def test_defaults_keep_at_least_97_percent_of_real_news() -> None:
    results = [FILTER.evaluate(d) for d in real_docs()]
    assert len(results) == 300
    rate = sum(r.passed for r in results) / len(results)
    # Measured: 298/300. One 45-word brief (min_words 50) and one document cut off
    # mid-sentence (its only line lacks terminal punctuation).
    assert rate >= 0.97, Counter(r.failed[0] for r in results if r.failed)


@pytest.mark.parametrize("rule", RULES)
def test_no_rule_fires_on_more_than_one_percent_of_real_news(rule: str) -> None:
    only = HeuristicFilter(HeuristicSettings(enabled=[rule]))
    fired = sum(not only.evaluate(d).passed for d in real_docs())
    assert fired <= 3, f"{rule} dropped {fired} real documents"


@pytest.mark.parametrize("layout", ["sentence per line", "paragraphs"])
def test_multiline_real_prose_passes(layout: str) -> None:
    """The line rules read real line structure, not only the corpus's one-line documents."""
    docs = real_docs()[1:61]
    if layout == "sentence per line":
        texts = ["\n".join(_SENTENCE_END.split(d)) for d in docs]
    else:
        texts = ["\n\n".join(docs[i : i + 3]) for i in range(0, len(docs), 3)]
    kept = sum(FILTER.evaluate(t).passed for t in texts)
    assert kept >= 0.97 * len(texts)


# -- each rule, triggered by crafted junk ---------------------------------------------------
def _every(k: int, extra: str, text: str = DOC) -> str:
    words = text.split()
    return " ".join(w + (f" {extra}" if i % k == k - 1 else "") for i, w in enumerate(words))


def _lines(prefix: str = "", suffix: str = "", strip_end: bool = False) -> str:
    out = []
    for s in sentences()[:30]:
        body = s.rstrip(".!?\"'") if strip_end else s
        out.append(f"{prefix}{body}{suffix}")
    return "\n".join(out)


def _short_lines() -> str:
    rows = []
    for s in sentences()[:40]:
        words = s.split()
        rows.append(" ".join(words[:3]).rstrip(",;:") + ".")
    return "\n".join(rows)


def _gibberish(seed: int = 0) -> str:
    rng = random.Random(seed)
    return (
        " ".join(
            "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(150)
        )
        + " and the end."
    )


def _no_stop_words() -> str:
    words = DOC.split()
    return " ".join(w for w in words if w.lower().strip(string.punctuation) not in STOP_WORDS)


CRAFTED: dict[str, str] = {
    "min_words": "The council met on Tuesday and approved the new budget.",
    "max_words": "\n".join(real_docs()) * 2,  # ~120,000 words
    "mean_word_length": " ".join(w[0] for w in DOC.split()) + " the to of and.",
    "symbol_to_word_ratio": _every(4, "#breaking"),
    "alpha_words": _every(1, "1,204 3.5%"),
    "stop_words": _no_stop_words(),
    "bullet_lines": _lines(prefix="• "),
    "ellipsis_lines": _lines(suffix=" ..."),
    "duplicate_lines": "\n".join(sentences()[:10] + sentences()[:5]),
    "duplicate_line_chars": "\n".join(sentences()[:12] + sentences()[:4]),
    "top_ngram": _every(3, "breaking news"),
    "duplicate_ngrams": _every(12, "according to the latest police report"),
    "boilerplate_lines": "\n".join(
        [
            DOC,
            "Home | News | Sport | Weather",
            "Sign in to your account",
            "Subscribe to our newsletter",
            "Privacy Policy | Terms of Use",
        ]
    ),
    "terminal_punctuation": _lines(strip_end=True),
    "short_lines": _short_lines(),
    "gibberish_words": _gibberish(),
}


def test_every_rule_has_crafted_junk() -> None:
    assert set(CRAFTED) == set(RULES)


@pytest.mark.parametrize("rule", RULES)
def test_crafted_junk_fails_its_rule(rule: str) -> None:
    result = FILTER.evaluate(CRAFTED[rule])
    assert rule in result.failed, result.signals


@pytest.mark.parametrize("rule", RULES)
def test_crafted_junk_is_caught_by_its_rule_alone(rule: str) -> None:
    """Each crafted text fails its rule with every other rule switched off."""
    assert failed(CRAFTED[rule], HeuristicSettings(enabled=[rule])) == [rule]


def test_duplicate_line_shares_are_measured_per_line_and_per_char() -> None:
    text = "\n".join(["alpha beta gamma delta.", "x.", "x.", "x.", "alpha beta gamma delta."])
    sig = FILTER.evaluate(text).signals
    assert sig["duplicate_lines"] == pytest.approx(3 / 5)
    assert sig["duplicate_line_chars"] == pytest.approx((2 + 2 + 23) / (23 * 2 + 2 * 3))


def test_boilerplate_needs_more_than_one_hit() -> None:
    # One chrome line after a real article: half the lines, but a single hit.
    text = DOC + "\nClick here to subscribe to our newsletter."
    assert FILTER.evaluate(text).signals["boilerplate_lines"] == 0.5
    assert "boilerplate_lines" not in failed(text)


def test_boilerplate_phrases_inside_prose_paragraphs_do_not_count() -> None:
    para = (
        "The regulator said the company changed its privacy policy without telling users, "
        "and that people who tried to sign in were shown a new consent screen. "
    )
    text = "\n\n".join([para + DOC[:400]] * 3 + [real_docs()[1]])
    sig = FILTER.evaluate(text).signals
    assert sig["boilerplate_line_count"] == 0
    assert "boilerplate_lines" not in failed(text)


def test_terminal_punctuation_allows_closing_quotes() -> None:
    text = "\n".join(f'He said: "{s.rstrip(".")}."' for s in sentences()[:10])
    assert FILTER.evaluate(text).signals["terminal_punctuation"] == 1.0


# -- junk a real pipeline sees ----------------------------------------------------------------
SPAM = "BUY NOW!!! $$$ CHEAP $$$ click here ### 100% FREE ### " * 12
SPAM_PILLS = " ".join(
    [
        "CHEAP PILLS $$$ BUY NOW!!! best pills best pills CLICK HERE 100% FREE >>> "
        "LIMITED TIME OFFER!!! call 1-800-555-0199 risk free!!! WIN $1,000 CASH"
    ]
    * 5
)
NAVIGATION = "\n".join(
    [
        "Home | About Us | Contact",
        "Login | Register | Cart",
        "Skip to main content",
        "Menu",
        "Home | News | Sport | Weather | Business | Entertainment",
        "Search...",
        "Privacy Policy | Terms of Use | Cookie Settings",
        "Sitemap",
        "Back to top",
        "Follow us on Facebook | Twitter | Instagram",
        "Subscribe to our newsletter",
        "© 2024 Example Media. All rights reserved.",
    ]
)
REPEATED_SENTENCE = sentences()[0]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(SPAM, id="spam-symbols"),
        pytest.param(SPAM_PILLS, id="spam-pills"),
        pytest.param(NAVIGATION, id="navigation"),
        pytest.param(NAVIGATION + "\n" + NAVIGATION.replace("Menu", "Shop"), id="navigation-long"),
        pytest.param(_gibberish(1), id="gibberish"),
        pytest.param(" ".join([REPEATED_SENTENCE] * 20), id="repeated-one-line"),
        pytest.param("\n".join([REPEATED_SENTENCE] * 20), id="repeated-lines"),
    ],
)
def test_junk_fails(text: str) -> None:
    assert failed(text)


def test_repeated_sentence_is_caught_by_repetition_rules() -> None:
    # No single 2..4-gram covers 20% of a repeated long sentence; duplicate n-grams cover all.
    assert "duplicate_ngrams" in failed(" ".join([REPEATED_SENTENCE] * 20))
    assert {"duplicate_lines", "duplicate_line_chars"} <= set(
        failed("\n".join([REPEATED_SENTENCE] * 20))
    )


def test_demo_corpus_junk_is_caught_except_shuffled_words() -> None:
    from services.demo.corpus import build_demo_corpus

    caught: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for rec in build_demo_corpus(seed=0, junk_fraction=0.5):
        total[rec.kind] += 1
        caught[rec.kind] += not FILTER.evaluate(rec.text).passed
    for kind in ("junk:spam", "junk:navigation", "junk:gibberish", "junk:repeated"):
        assert caught[kind] == total[kind], kind
    assert total["real"] - caught["real"] >= 0.97 * total["real"]


def test_shuffled_words_are_left_to_perplexity() -> None:
    """Word order is invisible to word and line statistics: a shuffle that keeps the last
    word in place passes. Perplexity, the next step, is the rule for word salad."""
    words = DOC.split()
    body = words[:-1]
    random.Random(0).shuffle(body)
    assert FILTER.evaluate(" ".join([*body, words[-1]])).passed


# -- signals ------------------------------------------------------------------------------------
def test_words_are_trimmed_tokens_and_symbol_runs_are_not_words() -> None:
    sig = FILTER.evaluate("NOW!!! $$$ don't pay $5,000 ...").signals
    assert sig["words"] == 4  # NOW, don't, pay, 5,000
    assert sig["mean_word_length"] == pytest.approx((3 + 5 + 3 + 5) / 4)
    assert sig["alpha_words"] == pytest.approx(3 / 6)  # tokens with a letter
    assert sig["symbol_to_word_ratio"] == pytest.approx(1 / 4)


def test_ngram_coverage_counts_overlaps_once() -> None:
    sig = ngram_signals(["a", "b", "a", "b", "c"], top=[2], dup=[2, 3])
    assert sig["top_2gram"] == pytest.approx(4 / 5)
    assert sig["duplicate_2gram"] == pytest.approx(4 / 5)
    assert sig["duplicate_3gram"] == 0.0
    assert ngram_signals(["a"] * 4, top=[2], dup=[3]) == {"top_2gram": 1.0, "duplicate_3gram": 1.0}


def test_single_occurrence_is_not_a_top_ngram() -> None:
    assert ngram_signals(["one", "two", "three"], top=[2], dup=[]) == {"top_2gram": 0.0}


def test_result_reports_every_signal_and_passed() -> None:
    result = FILTER.evaluate(DOC)
    assert isinstance(result, HeuristicResult)
    assert result.passed and result.failed == []
    for key in (
        "words",
        "mean_word_length",
        "symbol_to_word_ratio",
        "alpha_words",
        "stop_words",
        "bullet_lines",
        "ellipsis_lines",
        "duplicate_lines",
        "duplicate_line_chars",
        "top_2gram",
        "top_4gram",
        "duplicate_5gram",
        "duplicate_10gram",
        "boilerplate_lines",
        "terminal_punctuation",
        "short_lines",
        "gibberish_words",
    ):
        assert key in result.signals
    assert not FILTER.evaluate("").passed


def test_failures_follow_enabled_order() -> None:
    order = list(reversed(RULES))
    got = failed(NAVIGATION, HeuristicSettings(enabled=order))
    assert got == [r for r in order if r in got] and len(got) >= 2


# -- settings -----------------------------------------------------------------------------------
def test_defaults_enable_every_rule_in_order() -> None:
    assert HeuristicSettings().enabled == list(RULES) == list(HeuristicFilter.RULES)


def test_every_threshold_is_documented() -> None:
    for name, field in HeuristicSettings.model_fields.items():
        assert field.description, name


def test_disabling_a_rule_stops_it_firing() -> None:
    text = CRAFTED["gibberish_words"]
    assert "gibberish_words" in failed(text)
    without = [r for r in RULES if r != "gibberish_words"]
    assert "gibberish_words" not in failed(text, HeuristicSettings(enabled=without))
    assert failed(text, HeuristicSettings(enabled=[])) == []


def test_disabled_ngram_rules_skip_ngram_signals() -> None:
    rules = [r for r in RULES if r not in ("top_ngram", "duplicate_ngrams")]
    sig = HeuristicFilter(HeuristicSettings(enabled=rules)).evaluate(DOC).signals
    assert not any("gram" in k for k in sig)


def test_thresholds_are_settings() -> None:
    assert "min_words" in failed(DOC, HeuristicSettings(min_words=10_000))
    short = "The minister said the plan would be put to the cabinet today."
    assert "min_words" not in failed(short, HeuristicSettings(min_words=5))
    strict = HeuristicSettings(max_top_ngram={2: 0.0})
    assert "top_ngram" in failed(DOC, strict)


def test_unknown_rule_is_a_value_error_listing_valid_rules() -> None:
    with pytest.raises(ValueError, match=r"valid rules: .*min_words"):
        HeuristicSettings(enabled=["min_words", "vibes"])
    settings = HeuristicSettings()
    settings.enabled = ["vibes"]  # assigned after validation: the filter still refuses
    with pytest.raises(ValueError, match=r"unknown heuristic rules \['vibes'\].*short_lines"):
        HeuristicFilter(settings)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_words": 100, "max_words": 50},
        {"min_mean_word_length": 11.0},
        {"min_alpha_words": 1.5},
        {"max_short_lines": -0.1},
        {"max_top_ngram": {0: 0.2}},
        {"max_duplicate_ngram": {5: 2.0}},
        {"enabled": ["min_words", "min_words"]},
    ],
)
def test_invalid_settings_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        HeuristicSettings(**kwargs)  # type: ignore[arg-type]


# -- paragraph-level text ---------------------------------------------------------------------
EMPHASIS = (
    "**Note:** the consumer group must be unique per stage, because two stages that share a "
    "group split the partitions between them and each sees only half of the stream."
)


def test_markdown_emphasis_is_not_a_bullet() -> None:
    sig = FILTER.evaluate(EMPHASIS).signals
    assert sig["bullet_lines"] == 0.0
    assert (
        FILTER.evaluate("*Idempotence* is what lets a producer retry.").signals["bullet_lines"]
        == 0.0
    )


@pytest.mark.parametrize("marker", ["* ", "- ", "+ ", "• ", "•", "– "])
def test_list_markers_followed_by_text_are_bullets(marker: str) -> None:
    menu = "\n".join(f"{marker}item number {i} of the menu." for i in range(12))
    assert FILTER.evaluate(menu).signals["bullet_lines"] == 1.0
    assert "bullet_lines" in failed(menu)


def test_paragraph_preset_keeps_short_technical_paragraphs_and_catches_their_junk() -> None:
    from bench.paragraphs import REAL_PARAGRAPHS, paragraph_junk

    para = HeuristicFilter(HeuristicSettings(preset="paragraph"))
    kept = sum(para.evaluate(p).passed for p in REAL_PARAGRAPHS)
    # Measured: 38/40 (two state a fact with fewer than two stop words: Gopher's rule holds).
    assert kept >= 36, Counter(r.failed[0] for r in map(para.evaluate, REAL_PARAGRAPHS) if r.failed)
    junk = paragraph_junk(seed=0)
    escaped = [(kind, text) for kind, text in junk if para.evaluate(text).passed]
    assert not escaped
    # The document preset still holds Gopher's floor: none of these is a document.
    assert not any(FILTER.evaluate(p).passed for p in REAL_PARAGRAPHS)


def test_preset_fills_only_fields_not_set() -> None:
    assert HeuristicSettings(preset="paragraph").min_words == 12
    assert HeuristicSettings(preset="paragraph", min_words=30).min_words == 30
    assert HeuristicSettings().min_words == 50


def test_ngram_allowance_forgives_one_repeat_in_a_paragraph_not_a_repeated_text() -> None:
    text = (
        "The consumer group commits offsets per partition, and the consumer group rebalances "
        "when a member leaves, so each partition of the topic has one owner at a time."
    )
    strict = HeuristicFilter(HeuristicSettings(preset="paragraph", ngram_repeat_allowance=0))
    para = HeuristicFilter(HeuristicSettings(preset="paragraph"))
    assert "top_ngram" in strict.evaluate(text).failed
    assert para.evaluate(text).passed
    sentence = "The council approved the new budget for the city library on Tuesday."
    assert "duplicate_ngrams" in para.evaluate(" ".join([sentence] * 4)).failed
