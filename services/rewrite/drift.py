"""The drift guard: a rewrite must keep the content it replaces, in new words.

Cheapest checks first: an empty rewrite; an echo (the input or the instruction given
back, or a near-verbatim copy: most of its word trigrams taken from the input); a rewrite
cut off at max_new_tokens; a length ratio out of bounds (words of the rewrite / words of
the original). Only rewrites that pass those are embedded, and one whose cosine
similarity to the original is under the threshold has drifted. Each rejection names its
check: 'rewrite:empty', 'rewrite:echo', 'rewrite:truncated', 'rewrite:too_short',
'rewrite:too_long', 'rewrite:drift'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from services.rewrite.prompts import is_echo, normalize
from services.rewrite.settings import DriftSettings
from services.runtime.backends.embeddings import Embedder

REASONS: tuple[str, ...] = (
    "rewrite:empty",
    "rewrite:echo",
    "rewrite:truncated",
    "rewrite:too_short",
    "rewrite:too_long",
    "rewrite:drift",
)


@dataclass(frozen=True, slots=True)
class DriftCheck:
    """The guard's measurements and verdict for one rewrite."""

    reason: str
    """'' when the rewrite is accepted, else one of REASONS."""
    length_ratio: float
    copy_ratio: float
    similarity: float | None
    """Cosine of the two embeddings; None when not measured (rejected earlier, or off)."""


def length_ratio(original: str, rewrite: str) -> float:
    """Words of the rewrite per word of the original."""
    return len(rewrite.split()) / max(1, len(original.split()))


def copy_ratio(original: str, rewrite: str, n: int = 3) -> float:
    """Share of the rewrite's word n-grams (lower case, punctuation ignored) that occur in
    the original: 1.0 for a text pieced together from the original, ~0 for new wording."""
    source, words = normalize(original).split(), normalize(rewrite).split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    known = {tuple(source[i : i + n]) for i in range(len(source) - n + 1)}
    return sum(g in known for g in grams) / len(grams)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, d) matrices (normalised here: any embedder)."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.einsum("ij,ij->i", a, b)


class DriftGuard:
    """Checks (original, rewrite) pairs; the embedder is created on first use."""

    def __init__(self, settings: DriftSettings, embedder: Callable[[], Embedder]) -> None:
        self.settings = settings
        self._embedder = embedder

    def check(
        self,
        originals: Sequence[str],
        rewrites: Sequence[str],
        instructions: Sequence[str],
        truncated: Sequence[bool] | None = None,
    ) -> list[DriftCheck]:
        """One check per pair; ``truncated[i]``: generation stopped at max_new_tokens."""
        cut = truncated if truncated is not None else [False] * len(rewrites)
        cheap = [
            self._cheap(o, r, i, c)
            for o, r, i, c in zip(originals, rewrites, instructions, cut, strict=True)
        ]
        ratios = [length_ratio(o, r) for o, r in zip(originals, rewrites, strict=True)]
        copies = [copy_ratio(o, r) for o, r in zip(originals, rewrites, strict=True)]
        sims: list[float | None] = [None] * len(cheap)
        todo = [i for i, why in enumerate(cheap) if not why]
        if self.settings.similarity and todo:
            emb = self._embedder().embed([originals[i] for i in todo] + [rewrites[i] for i in todo])
            for i, s in zip(todo, cosine_rows(emb[: len(todo)], emb[len(todo) :]), strict=True):
                sims[i] = float(s)
                if s < self.settings.min_similarity:
                    cheap[i] = "rewrite:drift"
        return [
            DriftCheck(why, ratio, copied, sim)
            for why, ratio, copied, sim in zip(cheap, ratios, copies, sims, strict=True)
        ]

    def _cheap(self, original: str, rewrite: str, instruction: str, truncated: bool) -> str:
        if not rewrite.strip():
            return "rewrite:empty"
        if (
            is_echo(rewrite, original, instruction)
            or copy_ratio(original, rewrite) >= self.settings.max_copy_ratio
        ):
            return "rewrite:echo"
        if truncated and self.settings.reject_truncated:
            return "rewrite:truncated"
        ratio = length_ratio(original, rewrite)
        if ratio < self.settings.min_length_ratio:
            return "rewrite:too_short"
        if ratio > self.settings.max_length_ratio:
            return "rewrite:too_long"
        return ""
