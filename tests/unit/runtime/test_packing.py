"""Padding-free scoring: prompts packed back to back into rows, against the padded path.

Packing must change where tokens sit, never what the model computes for them: every packed
result is compared with the length-bucketed (padded) result of the same real model in
float32, and a model whose attention ignores the packing must be caught before it scores.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random
from typing import Any

import numpy as np
import pytest
import torch

from services.runtime.backends.base import ModelSettings
from services.runtime.backends.torch_backend import TorchBackend, build_packed, pack_rows
from services.runtime.errors import ConfigError
from services.scoring.prompts import answer_token_ids, build_ask_llm_prompt
from tests.unit.runtime.test_torch_backend import TEXTS


def settings(**fields: Any) -> ModelSettings:
    return ModelSettings.model_validate(fields)


def with_packing(backend: TorchBackend, mode: str) -> TorchBackend:
    backend._settings = backend._settings.model_copy(update={"packing": mode})
    backend._packing_ok = None
    return backend


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    # Rows of 256 tokens (two Ask-LLM prompts of ~120) and passes of 512: several rows per
    # pass, several passes per call.
    return TorchBackend(
        settings(dtype="float32", max_tokens=64, batch_tokens=512, pack_tokens=256, packing="on")
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_rows_places_every_item_once_within_the_row(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(500)]
    rows = pack_rows(lengths, 256)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    for row in rows:
        assert sum(lengths[i] for i in row) <= 256 or len(row) == 1
    # best-fit decreasing wastes little: within 10% of the tokens' own lower bound
    fits = [n for n in lengths if n <= 256]
    assert len(rows) <= 1.1 * sum(fits) / 256 + sum(n > 256 for n in lengths) + 1
    fills = [sum(lengths[i] for i in row) for row in rows]
    assert fills == sorted(fills, reverse=True)


def test_build_packed_restarts_positions_per_sequence_and_for_the_filler() -> None:
    seqs = [[5, 6, 7], [8, 9], [10]]
    packed = build_packed(seqs, [[0, 1], [2]], pad=0)
    assert packed.ids.tolist() == [[5, 6, 7, 8, 9], [10, 0, 0, 0, 0]]
    assert packed.positions.tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert packed.row.tolist() == [0, 0, 1]
    assert packed.start.tolist() == [0, 3, 0]
    row, col = packed.last
    assert list(zip(row.tolist(), col.tolist(), strict=True)) == [(0, 2), (0, 4), (1, 0)]


def test_packed_ask_llm_logprobs_equal_the_padded_ones(backend: TorchBackend) -> None:
    texts = [t for t in TEXTS if t]
    prompts = [backend.render_chat(build_ask_llm_prompt(backend.truncate(t, 64))) for t in texts]
    yes, no = answer_token_ids(backend)
    packed = with_packing(backend, "on").next_token_logprobs(prompts, yes + no)
    assert backend._packing_ok is True
    padded = with_packing(backend, "off").next_token_logprobs(prompts, yes + no)
    np.testing.assert_allclose(packed, padded, atol=2e-4)
    assert len({round(float(v), 4) for v in packed[:, 0]}) == len(texts)  # real, varied scores


def test_packed_perplexity_equals_the_padded_one(backend: TorchBackend) -> None:
    texts = [*TEXTS, "word " * 200]  # empty, one-token and over-budget texts included
    packed = with_packing(backend, "on").sequence_nll(texts)
    padded = with_packing(backend, "off").sequence_nll(texts)
    assert [n.tokens for n in packed] == [n.tokens for n in padded]
    np.testing.assert_allclose(
        [n.total for n in packed], [n.total for n in padded], rtol=1e-4, atol=1e-3
    )
    assert any(n.tokens == 0 for n in packed) and max(n.tokens for n in packed) == 64


def test_a_model_that_attends_across_packed_sequences_is_refused(
    backend: TorchBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a model without packed-sequence support computes: one causal sequence per row.
    def unaware(packed: Any) -> torch.Tensor:
        ids = packed.ids
        out = backend._decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        return out.last_hidden_state  # type: ignore[no-any-return]

    monkeypatch.setattr(backend, "_packed_hidden", unaware)
    with pytest.raises(ConfigError, match="attends across packed sequences"):
        with_packing(backend, "on").next_token_logprobs(["Is this informative?"], [1])
    with_packing(backend, "off")


def test_auto_packs_only_on_cuda_and_sizes_batches_there(backend: TorchBackend) -> None:
    assert with_packing(backend, "auto")._packs() is False  # CPU: masked attention costs more
    assert backend._packing_ok is None  # and the check did not even run
    cpu = TorchBackend(settings(dtype="float32", max_tokens=64))
    assert cpu.batch_tokens == 8192  # auto (0) on CPU
