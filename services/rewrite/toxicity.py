"""Toxicity detection: a fast lexical pre-filter, then an LLM yes/no judge for the rest.

The lexicon catches the unambiguous cases (strong profanity, direct threats) with one
regular expression and no model. The texts it passes go to the judge: the text inside
``###`` fences and a yes/no question, as in Ask-LLM (services/scoring/prompts.py), and the
score is P(yes) = P(harmful) from ONE prefill pass, pooled over the yes/no token variants.

``DEFAULT_TERMS`` is deliberately small: profanity and threats that are toxic in almost
any context, for a precise default. It holds no identity slurs (a source file is the wrong
place to maintain them); a deployment adds its own list (e.g. LDNOOBW or a vendor list)
through ``toxicity.terms`` / ``toxicity.terms_file``. Whole-word, case-insensitive matching:
"Scunthorpe" and "cockpit" do not match; obfuscations ("f*ck") do not either.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from services.runtime.backends.base import LMBackend
from services.runtime.errors import ConfigError
from services.scoring.prompts import (
    answer_token_ids,
    build_ask_llm_prompt,
    normalized_yes_probability,
)

DEFAULT_TERMS: tuple[str, ...] = (
    # strong profanity and insults
    "fuck",
    "fucking",
    "fucked",
    "fucker",
    "motherfucker",
    "shit",
    "bullshit",
    "shithead",
    "cunt",
    "asshole",
    "bitch",
    "bastard",
    "dickhead",
    # threats and incitement to self-harm
    "kill yourself",
    "kys",
    "i will kill you",
    "i'll kill you",
    "die in a fire",
    "you should die",
)

TOXICITY_QUESTION = (
    "Does the previous paragraph demarcated within ### and ### contain harmful content: "
    "insults, profanity, threats, hate speech, harassment, or sexually explicit or violent "
    "material?"
)

Source = Literal["lexical", "judge", ""]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the checks concluded about one text."""

    toxic: bool
    source: Source
    """What decided: 'lexical' (a term matched), 'judge' (the LLM), '' (nothing ran)."""
    score: float | None
    """P(harmful) from the judge; 1.0 for a lexical hit; None when no check scored it."""


class Lexicon:
    """Whole-word, case-insensitive matching of a term list in one compiled regex."""

    def __init__(self, terms: Iterable[str]) -> None:
        cleaned = sorted({t.strip().lower() for t in terms if t.strip()}, key=len, reverse=True)
        self.terms: tuple[str, ...] = tuple(cleaned)
        alternatives = "|".join(r"\s+".join(map(re.escape, t.split())) for t in cleaned)
        self._regex = (
            re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE) if cleaned else None
        )

    @classmethod
    def from_sources(cls, terms: Iterable[str], terms_file: str = "") -> Lexicon:
        """Terms from settings plus an optional file (one per line, '#' comments)."""
        extra: list[str] = []
        if terms_file:
            path = Path(terms_file)
            if not path.is_file():
                raise ConfigError(f"toxicity terms file not found: {path}")
            for line in path.read_text(encoding="utf-8").splitlines():
                term = line.split("#", 1)[0].strip()
                if term:
                    extra.append(term)
        return cls([*terms, *extra])

    def match(self, text: str) -> str | None:
        """The first term found in ``text``, or None."""
        if self._regex is None:
            return None
        found = self._regex.search(text)
        return " ".join(found.group(0).lower().split()) if found else None


class ToxicityJudge:
    """P(harmful) per text from the LM's next-token distribution after a yes/no question."""

    def __init__(self, backend: LMBackend, question: str, max_tokens: int) -> None:
        self._backend = backend
        self._question = question
        self._max_tokens = max_tokens
        self._answer_ids: tuple[list[int], list[int]] | None = None

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """P(yes) / (P(yes) + P(no)) per text; the text's head is judged (``max_tokens``)."""
        if not texts:
            return np.zeros(0)
        be = self._backend
        if self._answer_ids is None:
            self._answer_ids = answer_token_ids(be)
        yes, no = self._answer_ids
        prompts = [
            be.render_chat(build_ask_llm_prompt(be.truncate(t, self._max_tokens), self._question))
            for t in texts
        ]
        return normalized_yes_probability(be.next_token_logprobs(prompts, yes + no), len(yes))


class ToxicityChecker:
    """Lexicon first (cheap, whole text); the judge only for what the lexicon passes."""

    def __init__(self, lexicon: Lexicon, judge: ToxicityJudge | None, threshold: float) -> None:
        self.lexicon = lexicon
        self.judge = judge
        self.threshold = threshold

    def check(self, texts: Sequence[str]) -> list[Verdict]:
        verdicts: list[Verdict | None] = [
            Verdict(True, "lexical", 1.0) if self.lexicon.match(t) else None for t in texts
        ]
        rest = [i for i, v in enumerate(verdicts) if v is None]
        if self.judge is not None and rest:
            probs = self.judge.probabilities([texts[i] for i in rest])
            for i, p in zip(rest, probs, strict=True):
                verdicts[i] = Verdict(bool(p >= self.threshold), "judge", float(p))
        return [v if v is not None else Verdict(False, "", None) for v in verdicts]
