"""The distillation core with the real packaged teacher (SmolLM2-135M-Instruct)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from services.distill.codec import TOPK_KEY, load_topk
from services.distill.core import (
    FINISH_REASON_KEY,
    ORIGINAL_RESPONSE_KEY,
    PROMPT_TRUNCATED_KEY,
    REASON_EMPTY,
    RESPONSE_TOKENS_KEY,
    STAGE,
    DistillCore,
)
from services.distill.settings import DistillSettings
from services.runtime.backends.base import GenerationParams
from services.runtime.backends.torch_backend import TorchBackend
from services.runtime.domain import Action, Sample
from services.runtime.errors import InvalidArgument
from services.runtime.metrics import StageMetrics

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
DOCUMENT = "Name three colours."


def make_core(backend: TorchBackend, **fields: Any) -> DistillCore:
    fields.setdefault("generation", {"max_new_tokens": 8, "top_logprobs": 4})
    return DistillCore(DistillSettings.model_validate(fields), backend=backend)


def samples() -> list[Sample]:
    return [
        Sample(id="sft", prompt=QUESTION, response="Lyon.", source="t"),
        Sample(id="doc", text=DOCUMENT),
    ]


def test_samples_become_teacher_pairs_with_their_top_k(torch_backend: TorchBackend) -> None:
    core = make_core(torch_backend, keep_original_response=True)
    core.metrics = StageMetrics(STAGE)
    outcomes = core.distill(samples())
    params = GenerationParams(max_new_tokens=8, top_logprobs=4)
    want = torch_backend.generate(
        [torch_backend.render_chat(q) for q in (QUESTION, DOCUMENT)], params
    )

    assert [o.sample.id for o in outcomes] == ["sft", "doc"]
    for o, gen in zip(outcomes, want, strict=True):
        s = o.sample
        assert o.kept and o.reason == ""
        assert s.response == gen.text and s.response
        event = s.lineage[-1]
        assert (event.stage, event.action, event.reason) == (
            STAGE,
            Action.CHANGED,
            "teacher_response",
        )
        assert event.model_version == torch_backend.model_version
        assert s.metadata[FINISH_REASON_KEY] == gen.finish_reason
        assert s.metadata[RESPONSE_TOKENS_KEY] == str(len(gen.token_ids))
        topk = load_topk(s)
        assert topk.tokens.tolist() == gen.token_ids
        assert topk.k == 4
        np.testing.assert_array_equal(topk.top_ids, gen.top_ids)  # type: ignore[arg-type]
        np.testing.assert_allclose(topk.top_logprobs, gen.top_logprobs, rtol=1e-3, atol=1e-3)  # type: ignore[arg-type]
    sft, doc = (o.sample for o in outcomes)
    assert sft.prompt == QUESTION and sft.metadata[ORIGINAL_RESPONSE_KEY] == "Lyon."
    assert (doc.prompt, doc.text) == (DOCUMENT, "")  # the document became the prompt
    assert ORIGINAL_RESPONSE_KEY not in doc.metadata

    registry = core.metrics.registry
    tokens = registry.get_sample_value("sluice_stage_generated_tokens_total", {"stage": STAGE})
    assert tokens == sum(len(g.token_ids) for g in want)
    assert registry.get_sample_value("sluice_generation_seconds_count", {"stage": STAGE}) == 1


def test_request_overrides_apply(torch_backend: TorchBackend) -> None:
    core = make_core(torch_backend)
    (o,) = core.distill([Sample(id="a", prompt=QUESTION)], {"max_new_tokens": 2, "top_logprobs": 2})
    assert int(o.sample.metadata[RESPONSE_TOKENS_KEY]) <= 2
    assert load_topk(o.sample).k == 2


@pytest.mark.parametrize(
    "overrides",
    [{"max_new_tokens": 2000}, {"top_logprobs": 0}, {"temperature": -1.0}, {"stop": [""]}],
)
def test_bad_overrides_are_invalid_argument(
    torch_backend: TorchBackend, overrides: dict[str, Any]
) -> None:
    core = make_core(torch_backend)
    with pytest.raises(InvalidArgument):
        core.distill([Sample(id="a", prompt=QUESTION)], overrides)


def test_a_sample_without_prompt_is_invalid_and_nothing_changes(
    torch_backend: TorchBackend,
) -> None:
    batch = [Sample(id="ok", prompt=QUESTION), Sample(id="bad", response="an orphan answer")]
    with pytest.raises(InvalidArgument, match="'bad' has no prompt"):
        make_core(torch_backend).distill(batch)
    assert batch[0].response == "" and not batch[0].lineage


def test_long_prompts_are_cut_and_flagged(torch_backend: TorchBackend) -> None:
    core = make_core(torch_backend, model={"max_tokens": 16})
    long = "Summarise this: " + "the river runs past the old mill and on to the sea " * 10
    (o,) = core.distill([Sample(id="a", prompt=long)])
    assert o.sample.metadata[PROMPT_TRUNCATED_KEY] == "true"
    assert long.startswith(o.sample.prompt) and len(o.sample.prompt) < len(long)
    assert torch_backend.count_tokens([o.sample.prompt]) == [16]


def test_an_empty_teacher_response_is_dropped(torch_backend: TorchBackend) -> None:
    core = make_core(torch_backend)
    (first,) = core.distill([Sample(id="a", prompt=QUESTION)])
    # Stop at the response's own first characters: the teacher then answers nothing.
    (o,) = core.distill([Sample(id="a", prompt=QUESTION)], {"stop": [first.sample.response[:3]]})
    assert not o.kept and o.reason == REASON_EMPTY
    assert o.sample.lineage[-1].action == Action.DROPPED
    assert TOPK_KEY not in o.sample.metadata
