"""The rewriting core with the packaged model: lineage, toxicity policies, drift guard.

The 135M model writes weak rewrites, so these tests check structure, lineage and that each
guard fires on what the model really produced (a 3-token answer is too short, whatever
its words), not the quality of the prose.
"""

from __future__ import annotations

import pytest

from services.rewrite.core import RewriteCore, target
from services.rewrite.settings import RewriteSettings
from services.runtime.backends.base import GenerationParams, merge_generation
from services.runtime.domain import Action, Sample
from services.runtime.errors import InvalidArgument

FACTS = [
    "Photosynthesis is the process by which green plants use sunlight, water and carbon "
    "dioxide to make glucose and oxygen.",
    "The train from Leeds was delayed by two hours on Monday because of heavy snow on the "
    "tracks near York.",
    "Honey bees communicate the direction and distance of flowers to each other with a "
    "waggle dance inside the hive.",
]
TOXIC = "Our fucking train was delayed by two hours because of snow on the tracks."


def _settings(**kw) -> RewriteSettings:  # type: ignore[no-untyped-def]
    s = RewriteSettings(**kw)
    s.generation.max_new_tokens = 24
    s.drift.reject_truncated = False  # short generations in tests: keep cut-off rewrites
    return s


@pytest.fixture(scope="module")
def core(torch_backend, minilm) -> RewriteCore:  # type: ignore[no-untyped-def]
    s = _settings()
    s.toxicity.judge = False
    return RewriteCore(s, backend=torch_backend, embedder=minilm)


def test_options_validate_overrides() -> None:
    core = RewriteCore(_settings(), backend=lambda: pytest.fail("no model needed"))
    opts = core.options(preset="qa", generation={"max_new_tokens": 8, "stop": ["\n\n"]})
    assert opts.label == "qa" and opts.params.max_new_tokens == 8 and opts.params.stop == ["\n\n"]
    assert core.options(instruction="Shorten: {text}").label == "custom"
    assert core.default_options.label == "wikipedia"
    for bad in (
        {"preset": "poetry"},
        {"toxicity_policy": "ignore"},
        {"generation": {"max_new_tokens": 25}},  # over the server's cap
        {"generation": {"temperature": -1.0}},
        {"generation": {"stop": [""]}},
    ):
        with pytest.raises(InvalidArgument):
            core.options(**bad)


def test_merge_generation_keeps_unset_fields() -> None:
    base = GenerationParams(max_new_tokens=64, temperature=0.7, seed=3)
    assert merge_generation(base, None) is base
    merged = merge_generation(base, {"seed": 9})
    assert (merged.max_new_tokens, merged.temperature, merged.seed) == (64, 0.7, 9)


def test_target_is_text_else_response() -> None:
    assert target(Sample(id="a", text="doc", response="r")) == ("text", "doc")
    assert target(Sample(id="b", prompt="q", response="r")) == ("response", "r")
    assert target(Sample(id="c", prompt="q")) == ("text", "")


def test_lexical_drop_and_flag_need_no_model() -> None:
    s = _settings(instruction={"preset": "none"})
    s.toxicity.judge = False
    core = RewriteCore(s, backend=lambda: pytest.fail("no model needed"))
    out = core.process([Sample(id="t", text=TOXIC), Sample(id="c", text=FACTS[0])])
    assert [(o.kept, o.reason) for o in out] == [(False, "toxicity:lexical"), (True, "")]
    assert out[0].sample.lineage[-1].action == Action.DROPPED
    assert out[0].sample.scores["toxicity"] == 1.0
    assert out[0].sample.metadata["toxicity"] == "lexical"
    assert (
        out[1].sample.lineage[-1].action == Action.KEPT and "toxicity" not in out[1].sample.scores
    )

    flagged = core.rewrite([Sample(id="t", text=TOXIC)], core.options(toxicity_policy="flag"))[0]
    assert flagged.kept and flagged.sample.text == TOXIC
    assert flagged.sample.metadata["toxicity"] == "lexical"


@pytest.mark.slow
def test_rewrites_keep_id_and_link_the_original(core: RewriteCore) -> None:
    samples = [Sample(id=f"f{i}", text=t, source="test") for i, t in enumerate(FACTS[:2])]
    samples.append(Sample(id="sft", prompt="What do bees do?", response=FACTS[2]))
    samples.append(Sample(id="empty", prompt="only a prompt"))
    outcomes = core.rewrite(samples, core.options(preset="paraphrase"))
    assert [o.sample.id for o in outcomes] == ["f0", "f1", "sft", "empty"]
    assert all(o.kept for o in outcomes)
    changed = 0
    for o, original in zip(outcomes[:3], FACTS, strict=True):
        event = o.sample.lineage[-1]
        assert event.stage == "rewrite" and event.model_version == core.model_version
        field = o.sample.response if o.sample.id == "sft" else o.sample.text
        if event.action == Action.CHANGED:
            changed += 1
            assert event.reason == "rewrite:paraphrase" and event.parent_id == o.sample.id
            assert field != original and o.sample.metadata["original_text"] == original
            assert o.sample.metadata["rewrite"] == "paraphrase"
            assert o.sample.scores["rewrite_similarity"] >= core.settings.drift.min_similarity
        else:  # the guard rejected it: original kept, reason in lineage
            assert event.action == Action.KEPT and event.reason.startswith("rewrite:")
            assert field == original and "original_text" not in o.sample.metadata
    assert changed >= 1, [o.sample.lineage[-1].reason for o in outcomes]
    assert outcomes[2].sample.prompt == "What do bees do?"  # only the response is rewritten
    assert outcomes[3].sample.lineage[-1].reason == "rewrite:no_text"


@pytest.mark.slow
def test_a_three_token_rewrite_is_too_short(core: RewriteCore) -> None:
    opts = core.options(preset="paraphrase", generation={"max_new_tokens": 3})
    kept = core.rewrite([Sample(id="a", text=FACTS[0])], opts)[0]
    assert kept.kept and kept.sample.text == FACTS[0]
    assert kept.sample.lineage[-1].action == Action.KEPT
    assert kept.sample.lineage[-1].reason == "rewrite:too_short"
    assert kept.sample.scores["rewrite_length_ratio"] < 0.5

    strict = _settings()
    strict.toxicity.enabled = False
    strict.drift.on_reject = "drop"
    dropping = RewriteCore(strict, backend=core.backend, embedder=lambda: pytest.fail("unused"))
    dropped = dropping.rewrite([Sample(id="a", text=FACTS[0])], opts)[0]
    assert not dropped.kept and dropped.reason == "rewrite:too_short"
    assert dropped.sample.lineage[-1].action == Action.DROPPED


@pytest.mark.slow
def test_detoxify_policy_rewrites_then_rechecks(core: RewriteCore) -> None:
    out = core.rewrite([Sample(id="t", text=TOXIC)], core.options(toxicity_policy="rewrite"))[0]
    event = out.sample.lineage[-1]
    if out.kept:
        assert event.action == Action.CHANGED and event.reason == "toxicity:detoxified"
        assert core.lexicon.match(out.sample.text) is None
        assert out.sample.metadata["original_text"] == TOXIC
        assert out.sample.metadata["toxicity"] == "lexical:detoxified"
    else:  # the model could not remove it: a toxic sample is never kept
        assert out.reason in ("toxicity:persistent", "toxicity:rewrite_failed")
        assert event.action == Action.DROPPED


@pytest.mark.slow
def test_judge_flag_policy_and_long_inputs(torch_backend) -> None:  # type: ignore[no-untyped-def]
    s = _settings(instruction={"preset": "none"})
    s.toxicity.threshold = 0.0  # every judged text counts as harmful
    s.toxicity.policy = "flag"
    s.model.max_tokens = 8
    core = RewriteCore(s, backend=torch_backend, embedder=lambda: pytest.fail("unused"))
    out = core.process([Sample(id="c", text=FACTS[1])])[0]
    assert out.kept and out.sample.text == FACTS[1]
    assert out.sample.metadata["toxicity"] == "judge"
    assert 0.0 < out.sample.scores["toxicity"] < 1.0

    # a text over model.max_tokens is never cut and rewritten: kept, with the reason
    s.toxicity.enabled = False
    core = RewriteCore(s, backend=torch_backend, embedder=lambda: pytest.fail("unused"))
    out = core.rewrite([Sample(id="c", text=FACTS[1])], core.options(preset="simplify"))[0]
    assert out.kept and out.sample.text == FACTS[1]
    assert out.sample.lineage[-1].reason == "rewrite:input_too_long"
