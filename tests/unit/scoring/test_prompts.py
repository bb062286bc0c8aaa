"""Ask-LLM prompt building and yes/no normalization."""

from __future__ import annotations

import numpy as np
import pytest

from services.scoring.prompts import (
    ASK_LLM_QUESTION,
    answer_token_ids,
    build_ask_llm_prompt,
    normalized_yes_probability,
)


def test_prompt_fences_text_and_asks_the_papers_question() -> None:
    p = build_ask_llm_prompt("  The cat sat.\n")
    assert p.startswith("###\nThe cat sat.\n###\n\n")
    assert ASK_LLM_QUESTION in p
    assert (
        "Does the previous paragraph demarcated within ### and ### contain informative signal" in p
    )
    assert "strictly NOT have any harmful, racist, sexist, etc. content." in p
    assert p.endswith("OPTIONS:\n- yes\n- no")


class _Vocab:
    def __init__(self, table: dict[str, list[int]]) -> None:
        self.table = table

    def token_ids(self, text: str) -> list[int]:
        return self.table.get(text, [])


def test_answer_ids_dedupe_first_tokens() -> None:
    vocab = _Vocab({"yes": [1], " yes": [2], "Yes": [1, 9], "no": [3], " no": [4], "No": [3]})
    yes, no = answer_token_ids(vocab)
    assert yes == [1, 2]
    assert no == [3, 4]


def test_answer_ids_refuse_shared_tokens() -> None:
    vocab = _Vocab({"yes": [1], "no": [1, 2]})
    with pytest.raises(ValueError, match="share"):
        answer_token_ids(vocab)


def test_normalization_pools_variants() -> None:
    # yes variants 0.2 + 0.1, no variants 0.3 + 0.3 (rest of the vocabulary elsewhere)
    lp = np.log(np.array([[0.2, 0.1, 0.3, 0.3]]))
    assert normalized_yes_probability(lp, 2)[0] == pytest.approx(0.3 / 0.9)


def test_normalization_is_stable_for_tiny_probabilities() -> None:
    lp = np.array([[-900.0, -1000.0], [-1000.0, -900.0], [-5.0, -5.0]])
    p = normalized_yes_probability(lp, 1)
    assert p[0] == pytest.approx(1.0)
    assert p[1] == pytest.approx(0.0, abs=1e-30)
    assert p[2] == pytest.approx(0.5)
    assert np.all((p >= 0) & (p <= 1))


def test_normalization_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        normalized_yes_probability(np.zeros((2, 2)), 0)
    with pytest.raises(ValueError):
        normalized_yes_probability(np.zeros(4), 2)
