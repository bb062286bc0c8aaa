"""The scoring core: step order, policies, lineage, per-step counts."""

from __future__ import annotations

from pathlib import Path

import pytest
from gensim.test.utils import datapath

from services.runtime.domain import Action, Sample, step_counts
from services.runtime.errors import ConfigError, InvalidArgument
from services.scoring.core import ScoringCore
from services.scoring.prompts import BUILTIN_EXAMPLES
from services.scoring.settings import ScoringSettings, SignalPolicy

DOCS = [
    line.strip()
    for line in Path(datapath("lee_background.cor")).read_text(encoding="utf-8").splitlines()
][:12]
SPAM = "BUY NOW!!! $$$ CHEAP $$$ click here ### 100% FREE ### " * 12


def _samples() -> list[Sample]:
    out = [Sample(id=f"real-{i}", text=t) for i, t in enumerate(DOCS)]
    out.append(Sample(id="spam", text=SPAM))
    return out


def test_heuristics_only_drops_junk_with_named_rule_and_lineage() -> None:
    core = ScoringCore(ScoringSettings(steps=["heuristics"]))
    outcomes = core.process(_samples())
    assert [o.sample.id for o in outcomes] == [s.id for s in _samples()]
    spam = outcomes[-1]
    assert not spam.kept
    assert spam.reason.startswith("heuristics:") and spam.reason != "heuristics:"
    assert spam.sample.lineage[-1].action == Action.DROPPED
    assert spam.sample.lineage[-1].reason == spam.reason
    assert sum(o.kept for o in outcomes[:-1]) >= len(DOCS) - 1
    assert core.model_version == "heuristics"


def test_unknown_step_is_invalid_argument() -> None:
    core = ScoringCore(ScoringSettings(steps=["heuristics"]))
    with pytest.raises(InvalidArgument, match="unknown signals"):
        core.score(_samples(), ["heuristics", "vibes"])


def test_a_step_the_server_is_not_configured_for_is_refused_before_any_model_loads() -> None:
    core = ScoringCore(ScoringSettings(steps=["heuristics"]), backend=_no_model)
    for asked in (["perplexity"], ["heuristics", "ask_llm"]):
        with pytest.raises(InvalidArgument, match="not computed by this server"):
            core.score(_samples(), asked)
    assert core.resolve_steps(["heuristics"]) == ["heuristics"]
    assert core.resolve_steps([]) == ["heuristics"]


def _no_model() -> None:
    raise AssertionError("a heuristics-only core must not load a model")


def test_step_counts_follow_the_sequence() -> None:
    core = ScoringCore(ScoringSettings(steps=["heuristics"]))
    counts = step_counts(core.process(_samples()), ["heuristics"])
    assert counts[0].samples_in == len(DOCS) + 1
    assert counts[0].samples_kept <= len(DOCS)


@pytest.mark.slow
def test_llm_steps_score_and_apply_policies(torch_backend) -> None:  # type: ignore[no-untyped-def]
    settings = ScoringSettings(steps=["heuristics", "perplexity", "ask_llm"])
    settings.model.max_tokens = 96
    settings.perplexity.policy = SignalPolicy(mode="threshold", threshold=200.0)
    core = ScoringCore(settings, backend=torch_backend)
    words = DOCS[0].split()
    shuffled = " ".join(words[i] for i in sorted(range(len(words)), key=lambda i: (i * 7919) % 97))
    shuffled = shuffled.replace(".", "") + "."  # word salad that still passes the cheap rules
    samples = [
        Sample(id="real", text=DOCS[0]),
        Sample(id="shuffled", text=shuffled),
        Sample(id="spam", text=SPAM),
    ]
    real, shuf, spam = core.process(samples)
    assert real.kept and real.sample.scores["perplexity"] < 200
    assert 0.0 <= real.sample.scores["ask_llm"] <= 1.0
    assert not shuf.kept and shuf.reason == "perplexity:above_threshold"
    assert shuf.sample.scores["perplexity"] > real.sample.scores["perplexity"] * 5
    assert "ask_llm" not in shuf.sample.scores  # dropped before the expensive step
    assert spam.reason.startswith("heuristics:")
    assert core.step_seconds["perplexity"] > 0

    # annotate-only: scores without drops
    outcomes = core.score([Sample(id="s", text=shuffled)], ["perplexity"], apply_policy=False)
    assert outcomes[0].kept and outcomes[0].sample.scores["perplexity"] > 200


def test_few_shot_examples_precede_each_sample_and_version_the_decisions(torch_backend) -> None:  # type: ignore[no-untyped-def]
    zero = ScoringCore(ScoringSettings(steps=["ask_llm"]), backend=torch_backend)
    settings = ScoringSettings.model_validate(
        {"steps": ["ask_llm"], "ask_llm": {"examples": "builtin"}}
    )
    few = ScoringCore(settings, backend=torch_backend)
    assert "prompt-" not in zero.model_version
    assert few.model_version.startswith(zero.model_version + "+prompt-")
    other = ScoringCore(
        ScoringSettings.model_validate(
            {
                "steps": ["ask_llm"],
                "ask_llm": {"examples": [{"text": "Water boils.", "answer": "yes"}]},
            }
        ),
        backend=torch_backend,
    )
    assert other.model_version not in (zero.model_version, few.model_version)

    seen: list[str] = []
    score = torch_backend.next_token_logprobs

    def spy(prompts, ids):  # type: ignore[no-untyped-def]
        seen.extend(prompts)
        return score(prompts, ids)

    torch_backend.next_token_logprobs = spy
    try:
        sample = [Sample(id="s", text=DOCS[1])]
        p_zero = zero.score(sample, apply_policy=False)[0].sample.scores["ask_llm"]
        p_few = few.score(sample, apply_policy=False)[0].sample.scores["ask_llm"]
    finally:
        del torch_backend.next_token_logprobs
    prompt = seen[-1]
    texts = [text for text, _ in BUILTIN_EXAMPLES]
    at = [prompt.index(t) for t in texts]
    assert at == sorted(at) and prompt.index(DOCS[1][:40]) > at[-1]
    assert prompt.count("<|im_start|>assistant") == len(BUILTIN_EXAMPLES) + 1
    assert BUILTIN_EXAMPLES[0][0] not in seen[0]  # the zero-shot prompt has none
    assert p_zero != pytest.approx(p_few, abs=1e-4)  # the examples change what it reads


def test_examples_too_long_for_the_prompt_margin_are_refused_up_front(torch_backend) -> None:  # type: ignore[no-untyped-def]
    long = {"text": " ".join(DOCS[:3]), "answer": "yes"}
    settings = ScoringSettings.model_validate(
        {"steps": ["ask_llm"], "ask_llm": {"examples": [long, long, long]}}
    )
    core = ScoringCore(settings, backend=torch_backend)
    with pytest.raises(ConfigError, match="prompt_margin_tokens"):
        core.model_version  # noqa: B018  (read at worker start, before any batch)


@pytest.mark.slow
def test_top_fraction_policy_keeps_the_best_share(torch_backend) -> None:  # type: ignore[no-untyped-def]
    settings = ScoringSettings(steps=["perplexity"])
    settings.model.max_tokens = 64
    settings.perplexity.policy = SignalPolicy(mode="top_fraction", top_fraction=0.5)
    core = ScoringCore(settings, backend=torch_backend)
    samples = [Sample(id=f"d{i}", text=t) for i, t in enumerate(DOCS)]
    outcomes = core.process(samples)
    kept = [o for o in outcomes if o.kept]
    assert 4 <= len(kept) <= 8
    worst_kept = max(o.sample.scores["perplexity"] for o in kept)
    best_dropped = min(o.sample.scores["perplexity"] for o in outcomes if not o.kept)
    assert worst_kept <= best_dropped
