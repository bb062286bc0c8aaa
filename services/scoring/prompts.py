"""Ask-LLM prompt construction and score normalization (pure functions).

The prompt is the one from "How to Train Data-Efficient LLMs" (Sachdeva et al., 2024):
the sample inside ``###`` fences, the question, and OPTIONS yes/no. The score is
P(yes) from one prefill pass, normalized over the yes/no token variants.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

ASK_LLM_QUESTION = (
    "Does the previous paragraph demarcated within ### and ### contain informative signal "
    "for pre-training a large-language model? An informative datapoint should be "
    "well-formatted, contain some usable knowledge of the world, and strictly NOT have any "
    "harmful, racist, sexist, etc. content."
)

ASK_LLM_TEMPLATE = "###\n{text}\n###\n\n{question}\n\nOPTIONS:\n- yes\n- no"

BUILTIN_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "Photosynthesis converts light energy into chemical energy. In plants it takes place "
        "in chloroplasts, where chlorophyll absorbs light and drives the synthesis of glucose "
        "from carbon dioxide and water.",
        "yes",
    ),
    (
        "Click here to buy cheap watches!!! Best prices best prices free shipping click here "
        "now limited offer buy now",
        "no",
    ),
    (
        "The TCP three-way handshake opens a connection: the client sends SYN, the server "
        "answers with SYN-ACK, and the client acknowledges with ACK before any data flows.",
        "yes",
    ),
    (
        "Home | About | Contact | Login | Register | Privacy Policy | Terms of Service | "
        "Sitemap | Home | Login",
        "no",
    ),
)
"""``ask_llm.examples: builtin``: four few-shot turns, informative prose (yes) alternating
with spam and navigation boilerplate (no), none of them from any benchmark's data. A small
judge reads the paper's zero-shot prompt poorly (the packaged 135M ranks junk above prose);
these turns show it what the question means (``python -m bench.classifier --teacher-examples
builtin``: AUC real vs junk 0.41 -> 0.61) at ~4x the prompt length (the packaged judge
runs 4.2x slower)."""

# Surface forms of the two answers whose probabilities are pooled.
YES_VARIANTS: tuple[str, ...] = ("yes", " yes", "Yes", " Yes", "YES", " YES")
NO_VARIANTS: tuple[str, ...] = ("no", " no", "No", " No", "NO", " NO")


class TokenEncoder(Protocol):
    """Anything with ``token_ids(text) -> list[int]`` (every LMBackend qualifies)."""

    def token_ids(self, text: str) -> list[int]: ...


def build_ask_llm_prompt(text: str, question: str = ASK_LLM_QUESTION) -> str:
    """The user message for one sample (before any chat template)."""
    return ASK_LLM_TEMPLATE.format(text=text.strip(), question=question)


def few_shot_history(
    examples: Sequence[tuple[str, str]], question: str = ASK_LLM_QUESTION
) -> list[tuple[str, str]]:
    """(user message, answer) turns for few-shot examples: each example's text in the same
    prompt as the sample's, its answer ('yes' or 'no') as the assistant's reply."""
    return [(build_ask_llm_prompt(text, question), answer) for text, answer in examples]


def answer_token_ids(
    encode: TokenEncoder, yes: Sequence[str] = YES_VARIANTS, no: Sequence[str] = NO_VARIANTS
) -> tuple[list[int], list[int]]:
    """First-token ids of each answer variant, deduplicated, yes and no disjoint.

    Only the first token of a variant matters: the score is read at the single
    position after the prompt. A token shared by a yes and a no variant would make
    the normalization meaningless, so it is an error.
    """
    yes_ids = _first_tokens(encode, yes)
    no_ids = _first_tokens(encode, no)
    clash = set(yes_ids) & set(no_ids)
    if clash:
        raise ValueError(f"yes and no variants share first tokens {sorted(clash)}")
    if not yes_ids or not no_ids:
        raise ValueError("no answer tokens: the tokenizer encoded every variant to nothing")
    return yes_ids, no_ids


def _first_tokens(encode: TokenEncoder, variants: Sequence[str]) -> list[int]:
    ids: list[int] = []
    for v in variants:
        toks = encode.token_ids(v)
        if toks and toks[0] not in ids:
            ids.append(toks[0])
    return ids


def normalized_yes_probability(logprobs: np.ndarray, n_yes: int) -> np.ndarray:
    """P(yes) / (P(yes) + P(no)) per row, pooling variants.

    ``logprobs`` has shape (n, n_yes + n_no): the yes-variant columns first. Computed
    in log space (logsumexp) so that tiny probabilities do not underflow to 0/0.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.ndim != 2 or not 0 < n_yes < lp.shape[1]:
        raise ValueError(f"expected (n, n_yes+n_no) with 0 < n_yes < width, got {lp.shape}")
    log_yes = np.logaddexp.reduce(lp[:, :n_yes], axis=1)
    log_no = np.logaddexp.reduce(lp[:, n_yes:], axis=1)
    # sigmoid(log_yes - log_no), stable for large magnitudes
    return 1.0 / (1.0 + np.exp(log_no - log_yes))
