"""Output filters of the synthesis stage, cheapest first.

- length: words of the prompt and the response within bounds ('filter:too_short',
  'filter:too_long');
- Ask-LLM gate (optional): P(yes) of the generated pair under the paper's prompt, one
  prefill (services/scoring/prompts.py), below the threshold -> 'filter:ask_llm';
- IFD gate (optional): Instruction-Following Difficulty (Li et al., 2024, "Cherry LLM"),
  PPL(response | instruction) / PPL(response), from three ``sequence_nll`` passes; IFD >= 1
  means the instruction does not help predict the response -> 'filter:ifd';
- near-duplicates: the sentence embedding of the instruction (or the whole pair) against a
  bounded memory of what this stage kept before and earlier samples of the same batch;
  cosine >= threshold -> 'filter:near_duplicate'.

The memory is per process (per worker replica): two replicas can each keep one copy of a
near-duplicate. A stream-wide check belongs to the density stage's sketch, which scores
coverage across replicas; this memory is the cheap local guard the synthesis papers use
(Self-Instruct: ROUGE-L against the pool).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np

from services.runtime.backends.base import LMBackend
from services.scoring.prompts import (
    ASK_LLM_QUESTION,
    answer_token_ids,
    build_ask_llm_prompt,
    normalized_yes_probability,
)


def length_failure(
    prompt: str, response: str, min_words: tuple[int, int], max_words: tuple[int, int]
) -> str:
    """'' or the length rule that fails; bounds are (prompt, response) word counts."""
    for text, lo, hi in (
        (prompt, min_words[0], max_words[0]),
        (response, min_words[1], max_words[1]),
    ):
        n = len(text.split())
        if n < lo:
            return "filter:too_short"
        if n > hi:
            return "filter:too_long"
    return ""


class NearDupMemory:
    """The last ``capacity`` kept embeddings (a ring buffer); a vector is a near-duplicate
    when its cosine with any of them reaches ``threshold``. Thread-safe."""

    def __init__(self, capacity: int, threshold: float) -> None:
        self.capacity = capacity
        self.threshold = threshold
        self._rows: np.ndarray | None = None
        self._size = 0
        self._next = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._size

    def admit(self, vectors: np.ndarray) -> list[tuple[bool, float]]:
        """For each row in order: (kept, highest cosine seen). Kept rows are remembered; a
        row is a near-duplicate of the memory or of an earlier row kept in this call."""
        vecs = _normalized(np.asarray(vectors, dtype=np.float32))
        out = []
        with self._lock:
            for v in vecs:
                best = self._best(v)
                kept = best < self.threshold
                if kept:
                    self._remember(v)
                out.append((kept, best))
        return out

    def max_similarity(self, vectors: np.ndarray) -> list[float]:
        """Each row's highest cosine against the memory (-1 when empty); no update."""
        vecs = _normalized(np.asarray(vectors, dtype=np.float32))
        with self._lock:
            return [self._best(v) for v in vecs]

    def _best(self, v: np.ndarray) -> float:
        if self._rows is None or not self._size:
            return -1.0
        return float((self._rows[: self._size] @ v).max())

    def _remember(self, v: np.ndarray) -> None:
        if self._rows is None:
            self._rows = np.zeros((self.capacity, v.shape[0]), dtype=np.float32)
        self._rows[self._next] = v
        self._next = (self._next + 1) % self.capacity
        self._size = min(self._size + 1, self.capacity)


def _normalized(m: np.ndarray) -> np.ndarray:
    if m.ndim != 2:
        raise ValueError(f"expected (n, dim) vectors, got shape {m.shape}")
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def ask_llm_scores(
    backend: LMBackend, contents: Sequence[str], max_tokens: int, question: str = ASK_LLM_QUESTION
) -> list[float]:
    """Ask-LLM P(yes) per generated sample (head of ``max_tokens`` tokens judged)."""
    if not contents:
        return []
    yes, no = answer_token_ids(backend)
    prompts = [
        backend.render_chat(build_ask_llm_prompt(backend.truncate(c, max_tokens), question))
        for c in contents
    ]
    probs = normalized_yes_probability(backend.next_token_logprobs(prompts, yes + no), len(yes))
    return [float(p) for p in probs]


def ifd_scores(
    backend: LMBackend, instructions: Sequence[str], responses: Sequence[str], budget: int
) -> list[float]:
    """IFD = PPL(response | instruction) / PPL(response) per pair; NaN when not measurable
    (an empty response, or a pair over ``budget`` tokens, which ``sequence_nll`` would cut).

    The conditional NLL is NLL(chat(instruction) + response) - NLL(chat(instruction)):
    exact up to a token merging across the boundary, which chat templates make rare (the
    generation prompt ends in a newline).
    """
    if not instructions:
        return []
    contexts = [backend.render_chat(i) for i in instructions]
    joined = [c + r for c, r in zip(contexts, responses, strict=True)]
    nlls = backend.sequence_nll([*contexts, *joined])
    alone = backend.sequence_nll(list(responses))
    fits = [n < budget for n in backend.count_tokens(joined)]
    n = len(instructions)
    out = []
    for ctx, full, resp, ok in zip(nlls[:n], nlls[n:], alone, fits, strict=True):
        cond_tokens = full.tokens - ctx.tokens
        if not ok or cond_tokens <= 0 or resp.tokens <= 0:
            out.append(math.nan)
            continue
        cond = (full.total - ctx.total) / cond_tokens
        out.append(float(math.exp(cond - resp.total / resp.tokens)))
    return out
