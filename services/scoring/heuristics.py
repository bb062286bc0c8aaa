"""Heuristic quality rules: the cheap first pass of scoring, before any model runs.

Gopher (Rae et al., 2021), C4 (Raffel et al., 2020) and FineWeb (Penedo et al., 2024)
style rules over words, lines and word n-grams. Each rule measures a signal and compares it
with a threshold from ``HeuristicSettings``; a document fails a rule when the signal is on
the wrong side. Pure Python + numpy, no I/O: the scoring core, the benchmarks and tests all
call ``HeuristicFilter.evaluate``.

The rules are tuned for English prose (the stop-word and gibberish rules say so); the
defaults keep 298 of the 300 Lee news documents gensim ships (see the tests).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from services.runtime.settings import StrictModel

RULES: tuple[str, ...] = (
    "min_words",
    "max_words",
    "mean_word_length",
    "symbol_to_word_ratio",
    "alpha_words",
    "stop_words",
    "bullet_lines",
    "ellipsis_lines",
    "duplicate_lines",
    "duplicate_line_chars",
    "top_ngram",
    "duplicate_ngrams",
    "boilerplate_lines",
    "terminal_punctuation",
    "short_lines",
    "gibberish_words",
)

# Gopher's list: a real English document of any topic uses at least two of these.
STOP_WORDS: frozenset[str] = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})

# A word is a maximal run of non-space characters trimmed to start and end on a letter or
# digit: "NOW!!!" -> "NOW", "$5,000" -> "5,000", "don't" stays whole, "$$$" is no word.
_WORD = re.compile(r"[^\W_](?:\S*[^\W_])?")
_ALPHA = re.compile(r"[^\W\d_]")
# Gibberish: a lowercase ASCII word of 3+ letters with no vowel ("qwrt", "zxcvbnm"; real
# English has almost none; acronyms are upper case and do not match), a letter held 4+ times
# ("rrrrrrrr"), or a 41+ character "word" (base64, hashes, run-together strings).
_NO_VOWEL = re.compile(r"[b-df-hj-np-tv-xz]{3,}")
_HELD_LETTER = re.compile(r"([^\W\d_])\1{3}")
_LONGEST_WORD = 40
_BULLETS = (
    "•",
    "●",
    "○",
    "◦",
    "▪",
    "▫",
    "■",
    "□",
    "‣",
    "⁃",
    "∙",
    "·",
    "►",
    "▶",
    "➢",
    "➤",
    "✓",
    "✔",
)
# ASCII and dash markers are list items only when a space follows ("* item", "- item"):
# "*word*", "**Note:**", "-v" and "+1" open ordinary lines (markdown emphasis, flags).
_MARKER_BULLET = re.compile(r"[-*+–—]\s")
_ELLIPSES = ("...", "…")
# Closing marks stripped before looking for the sentence end: 'He said "no."' ends a sentence.
_CLOSERS = "\"'”’»)]}"
_TERMINAL = (".", "!", "?", "…", "。", "！", "？", "؟", "।")
# C4's boilerplate markers, widened to the navigation and consent chrome of modern pages.
# Phrases, not bare words ("cookie" alone is a recipe; "uses cookies" is a consent banner).
_BOILERPLATE = re.compile(
    r"\b(?:javascript|lorem ipsum|cookie (?:policy|settings|preferences|consent)"
    r"|(?:use|uses|using|accept|accept all|reject all) cookies|use of cookies"
    r"|terms (?:of (?:use|service)|and conditions)|privacy policy|all rights reserved"
    r"|click here|sign (?:in|up)|log ?in|log ?out|subscribe|newsletter"
    r"|skip to (?:main )?content|back to top|share this|follow us|powered by|sitemap)\b",
    re.IGNORECASE,
)


def _check_rules(names: Iterable[str]) -> None:
    names = list(names)
    unknown = [n for n in names if n not in RULES]
    if unknown:
        raise ValueError(f"unknown heuristic rules {unknown}; valid rules: {list(RULES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"heuristic rules repeat: {names}")


PRESETS: dict[str, dict[str, object]] = {
    "document": {},
    # Paragraph-level samples (one chunk of a page, a docstring, an answer): Gopher's 50-word
    # floor drops complete 20-50-word paragraphs, so the floor is a sentence or two.
    "paragraph": {"min_words": 12},
}
"""Defaults by sample granularity; a field set explicitly always wins over its preset."""


class HeuristicSettings(StrictModel):
    """Which rules run and every threshold they use (defaults: the published values, with
    the deviations each field explains)."""

    preset: Literal["document", "paragraph"] = Field(
        "document",
        description="Granularity of the samples: 'document' (web pages, articles: Gopher's "
        "length floor) or 'paragraph' (chunks of a page: min_words 12). Only fills fields "
        "not set explicitly.",
    )
    enabled: list[str] = Field(
        default_factory=lambda: list(RULES),
        description="Rules to apply, in the order failures are reported; the first failure "
        f"becomes the drop reason 'heuristics:<rule>'. Known: {', '.join(RULES)}.",
    )
    min_words: int = Field(
        50, ge=0, description="Fewer words than this is a fragment, not a document (Gopher: 50)."
    )
    max_words: int = Field(
        100_000, ge=1, description="More words than this is usually a dump (Gopher: 100,000)."
    )
    min_mean_word_length: float = Field(
        3.0,
        ge=0,
        description="Mean word length in characters below this is mostly "
        "single letters or symbols (Gopher: 3).",
    )
    max_mean_word_length: float = Field(
        10.0,
        ge=0,
        description="Mean word length above this is URLs, hashes, or words run "
        "together (Gopher: 10).",
    )
    max_symbol_to_word_ratio: float = Field(
        0.1,
        ge=0,
        description="'#' characters plus ellipses ('...', '…') per word above this "
        "is hashtag spam or truncated teasers (Gopher: 0.1).",
    )
    min_alpha_words: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Share of whitespace-separated tokens containing a letter; "
        "below this is tables, numbers or symbol runs (Gopher: 0.8).",
    )
    min_stop_words: int = Field(
        2,
        ge=0,
        description="Fewest occurrences (repeats count) of the, be, to, of, and, that, "
        "have, with; English prose cannot avoid them (Gopher: 2).",
    )
    max_bullet_lines: float = Field(
        0.9,
        ge=0,
        le=1,
        description="Share of lines starting with a bullet above this is a "
        "list or a menu, not prose (Gopher: 0.9).",
    )
    max_ellipsis_lines: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Share of lines ending in an ellipsis above this is a page "
        "of teasers (Gopher: 0.3).",
    )
    max_duplicate_lines: float = Field(
        0.3, ge=0, le=1, description="Share of lines that repeat an earlier line (Gopher: 0.3)."
    )
    max_duplicate_line_chars: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Share of line characters in lines that repeat an earlier line (Gopher: 0.2).",
    )
    max_top_ngram: dict[int, float] = Field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16},
        description="n -> the most the single most frequent word n-gram may cover, as a share "
        "of word characters (Gopher: 2: 0.20, 3: 0.18, 4: 0.16). Only an n-gram seen twice "
        "or more counts.",
    )
    max_duplicate_ngram: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> the most that all word n-grams occurring twice or more may cover, as "
        "a share of word characters (Gopher: 5: 0.15 down to 10: 0.10).",
    )
    ngram_repeat_allowance: float = Field(
        1.0,
        ge=0,
        description="Repeats of one n-gram forgiven before the n-gram shares count, as extra "
        "n-gram occurrences: each n-gram threshold t becomes t + allowance * n / words. A "
        "short technical paragraph that names its subject twice ('the consumer group' in 40 "
        "words) covers a large share by arithmetic alone; in a long document the allowance "
        "vanishes (n / words -> 0) and repeated-text junk repeats far more than once.",
    )
    max_boilerplate_lines: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Share of lines that are boilerplate (cookie banners, "
        "'privacy policy', 'click here', 'sign in', ... as in C4) above which the page is "
        "chrome, not content.",
    )
    min_boilerplate_hits: int = Field(
        2,
        ge=1,
        description="Boilerplate lines needed before the share counts: one mention "
        "in a short or one-line document must not drop it.",
    )
    boilerplate_max_line_words: int = Field(
        40,
        ge=1,
        description="Lines with more words than this are prose that mentions a "
        "phrase, never boilerplate (menus and banners are short).",
    )
    min_terminal_punctuation: float = Field(
        0.12,
        ge=0,
        le=1,
        description="Share of lines ending in terminal punctuation "
        "(. ! ? …, closing quotes allowed) below which text is menus or lists (FineWeb: 0.12).",
    )
    max_short_lines: float = Field(
        0.67,
        ge=0,
        le=1,
        description="Share of lines shorter than short_line_chars above which "
        "text is navigation or a list (FineWeb: 0.67).",
    )
    short_line_chars: int = Field(
        30, ge=1, description="A line with fewer characters than this is short (FineWeb: 30)."
    )
    max_gibberish_words: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Share of words that look like keyboard mashing: lowercase "
        "words of 3+ letters without a vowel (a e i o u y), a letter held 4+ times, or 41+ "
        "characters. Real English news measures 0.0; random letter strings about 0.3.",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            preset = PRESETS.get(str(data.get("preset", "document")), {})
            data = {**preset, **data}
        return data

    @field_validator("enabled")
    @classmethod
    def _known_rules(cls, v: list[str]) -> list[str]:
        _check_rules(v)
        return v

    @field_validator("max_top_ngram", "max_duplicate_ngram")
    @classmethod
    def _ngram_thresholds(cls, v: dict[int, float]) -> dict[int, float]:
        for n, frac in v.items():
            if not 1 <= n <= 20:
                raise ValueError(f"n-gram size must be in 1..20, got {n}")
            if not 0.0 <= frac <= 1.0:
                raise ValueError(f"n-gram threshold for n={n} must be in [0, 1], got {frac}")
        return v

    @model_validator(mode="after")
    def _bounds_ordered(self) -> HeuristicSettings:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words {self.min_words} > max_words {self.max_words}")
        if self.min_mean_word_length > self.max_mean_word_length:
            raise ValueError(
                f"min_mean_word_length {self.min_mean_word_length} > "
                f"max_mean_word_length {self.max_mean_word_length}"
            )
        return self


@dataclass
class HeuristicResult:
    """What the rules measured and which of them failed.

    ``signals`` keeps the measurements even for a passing document, so thresholds can be
    re-derived from a run without re-reading the data.
    """

    signals: dict[str, float]
    failed: list[str]

    @property
    def passed(self) -> bool:
        return not self.failed


def _is_gibberish(word: str) -> bool:
    return (
        len(word) > _LONGEST_WORD
        or _NO_VOWEL.fullmatch(word) is not None
        or _HELD_LETTER.search(word) is not None
    )


def _share(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def _covered_chars(starts: np.ndarray, n: int, lens: np.ndarray) -> int:
    """Characters of the words covered by n-grams starting at ``starts``, overlaps once."""
    size = len(lens) + 1
    depth = np.cumsum(np.bincount(starts, minlength=size) - np.bincount(starts + n, minlength=size))
    return int(lens[depth[:-1] > 0].sum())


def ngram_signals(words: Sequence[str], top: Iterable[int], dup: Iterable[int]) -> dict[str, float]:
    """Gopher's repetition signals over lower-cased ``words``, in O(N log N) per n.

    ``top_<n>gram``: share of word characters inside occurrences of the most frequent n-gram
    (0 unless it occurs twice). ``duplicate_<n>gram``: share inside any n-gram occurring twice
    or more. Overlapping occurrences count each character once, so shares never exceed 1.
    n-grams get integer ids by extending (n-1)-gram ids one word at a time, so no tuples of
    strings are ever built.
    """
    top, dup = set(top), set(dup)
    out = {f"top_{n}gram": 0.0 for n in sorted(top)}
    out.update({f"duplicate_{n}gram": 0.0 for n in sorted(dup)})
    wanted = top | dup
    if not wanted or len(words) < 2:
        return out
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), np.int64, len(words))
    lens = np.fromiter((len(w) for w in words), np.int64, len(words))
    total = float(lens.sum())
    cur = ids
    for n in range(1, max(wanted) + 1):
        if n > 1:
            if n > len(words):
                break
            # (n-1)-gram at i followed by word i+n-1; re-densify so ids stay < len(words).
            cur = np.unique(cur[:-1] * len(vocab) + ids[n - 1 :], return_inverse=True)[1]
        if n not in wanted:
            continue
        counts = np.bincount(cur)
        if n in top:
            best = int(counts.argmax())
            if counts[best] >= 2:
                starts = np.flatnonzero(cur == best)
                out[f"top_{n}gram"] = _covered_chars(starts, n, lens) / total
        if n in dup:
            starts = np.flatnonzero(counts[cur] >= 2)
            if len(starts):
                out[f"duplicate_{n}gram"] = _covered_chars(starts, n, lens) / total
    return out


class HeuristicFilter:
    """Applies the enabled rules of one ``HeuristicSettings`` to documents.

    Stateless after construction, so one instance serves every thread of a stage.
    """

    RULES: tuple[str, ...] = RULES

    def __init__(self, settings: HeuristicSettings | None = None) -> None:
        self.settings = settings if settings is not None else HeuristicSettings()
        # Settings validate on construction, but a caller may assign ``enabled`` afterwards.
        _check_rules(self.settings.enabled)
        self.enabled: tuple[str, ...] = tuple(self.settings.enabled)

    def evaluate(self, text: str) -> HeuristicResult:
        """Measure ``text`` and list the enabled rules it fails, in ``enabled`` order.

        Word and line signals are always measured (they are cheap); n-gram signals only when
        a rule that reads them is enabled.
        """
        s = self.settings
        sig = self._word_signals(text)
        sig.update(self._line_signals(text))
        if "top_ngram" in self.enabled or "duplicate_ngrams" in self.enabled:
            words = [w.lower() for w in _WORD.findall(text)]
            sig.update(
                ngram_signals(
                    words,
                    s.max_top_ngram if "top_ngram" in self.enabled else (),
                    s.max_duplicate_ngram if "duplicate_ngrams" in self.enabled else (),
                )
            )
        failed = [rule for rule in self.enabled if self._fails(rule, sig)]
        return HeuristicResult(signals=sig, failed=failed)

    def _fails(self, rule: str, sig: dict[str, float]) -> bool:
        s = self.settings
        if rule == "min_words":
            return sig["words"] < s.min_words
        if rule == "max_words":
            return sig["words"] > s.max_words
        if rule == "mean_word_length":
            return not s.min_mean_word_length <= sig["mean_word_length"] <= s.max_mean_word_length
        if rule == "symbol_to_word_ratio":
            return sig["symbol_to_word_ratio"] > s.max_symbol_to_word_ratio
        if rule == "alpha_words":
            return sig["alpha_words"] < s.min_alpha_words
        if rule == "stop_words":
            return sig["stop_words"] < s.min_stop_words
        if rule == "bullet_lines":
            return sig["bullet_lines"] > s.max_bullet_lines
        if rule == "ellipsis_lines":
            return sig["ellipsis_lines"] > s.max_ellipsis_lines
        if rule == "duplicate_lines":
            return sig["duplicate_lines"] > s.max_duplicate_lines
        if rule == "duplicate_line_chars":
            return sig["duplicate_line_chars"] > s.max_duplicate_line_chars
        if rule == "top_ngram":
            return any(
                sig[f"top_{n}gram"] > self._ngram_cut(n, t, sig) for n, t in s.max_top_ngram.items()
            )
        if rule == "duplicate_ngrams":
            return any(
                sig[f"duplicate_{n}gram"] > self._ngram_cut(n, t, sig)
                for n, t in s.max_duplicate_ngram.items()
            )
        if rule == "boilerplate_lines":
            return (
                sig["boilerplate_line_count"] >= s.min_boilerplate_hits
                and sig["boilerplate_lines"] > s.max_boilerplate_lines
            )
        if rule == "terminal_punctuation":
            return sig["terminal_punctuation"] < s.min_terminal_punctuation
        if rule == "short_lines":
            return sig["short_lines"] > s.max_short_lines
        if rule == "gibberish_words":
            return sig["gibberish_words"] > s.max_gibberish_words
        raise AssertionError(f"rule without a check: {rule}")  # RULES and _fails disagree

    def _ngram_cut(self, n: int, threshold: float, sig: dict[str, float]) -> float:
        """The n-gram threshold at this length: one forgiven repeat covers ~n / words."""
        words = sig["words"]
        return threshold + (self.settings.ngram_repeat_allowance * n / words if words else 0.0)

    @staticmethod
    def _word_signals(text: str) -> dict[str, float]:
        words = _WORD.findall(text)
        tokens = text.split()
        n = len(words)
        return {
            "words": float(n),
            "mean_word_length": _share(sum(map(len, words)), n),
            "symbol_to_word_ratio": _share(
                text.count("#") + sum(text.count(e) for e in _ELLIPSES), n
            ),
            "alpha_words": _share(sum(1 for t in tokens if _ALPHA.search(t)), len(tokens)),
            "stop_words": float(sum(1 for w in words if w.lower() in STOP_WORDS)),
            "gibberish_words": _share(sum(1 for w in words if _is_gibberish(w)), n),
        }

    def _line_signals(self, text: str) -> dict[str, float]:
        s = self.settings
        lines = [ln.strip() for ln in text.splitlines()]
        lines = [ln for ln in lines if ln]
        n = len(lines)
        seen: set[str] = set()
        dup_lines = dup_chars = bullets = ellipses = terminal = short = boiler = 0
        for ln in lines:
            if ln in seen:
                dup_lines += 1
                dup_chars += len(ln)
            seen.add(ln)
            bullets += ln.startswith(_BULLETS) or _MARKER_BULLET.match(ln) is not None
            ellipses += ln.endswith(_ELLIPSES)
            terminal += ln.rstrip(_CLOSERS).endswith(_TERMINAL)
            short += len(ln) < s.short_line_chars
            boiler += (
                _BOILERPLATE.search(ln) is not None
                and len(ln.split()) <= s.boilerplate_max_line_words
            )
        return {
            "lines": float(n),
            "bullet_lines": _share(bullets, n),
            "ellipsis_lines": _share(ellipses, n),
            "duplicate_lines": _share(dup_lines, n),
            "duplicate_line_chars": _share(dup_chars, sum(map(len, lines))),
            "boilerplate_lines": _share(boiler, n),
            "boilerplate_line_count": float(boiler),
            "terminal_punctuation": _share(terminal, n),
            "short_lines": _share(short, n),
        }
