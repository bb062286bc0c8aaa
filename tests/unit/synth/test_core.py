"""The synthesis core with the packaged model: ids, lineage, methods and filters.

The 135M model writes weak questions and tasks; these tests check structure and lineage,
and that filters act on what the model really produced (the same document twice gives the
same greedy question twice: the second is a near-duplicate).
"""

from __future__ import annotations

import math

import pytest

from services.runtime.domain import Action, Sample
from services.runtime.errors import InvalidArgument
from services.synth.core import Draft, SynthCore, synth_id
from services.synth.filters import ifd_scores
from services.synth.self_instruct import seed_id
from services.synth.settings import SynthSettings

DOC = (
    "The central bank raised interest rates by a quarter of a percentage point on Tuesday, "
    "citing persistent inflation in services. Officials said the decision was unanimous."
)
INSTRUCTION = "Explain why the sky is blue."


def _settings(**kw) -> SynthSettings:  # type: ignore[no-untyped-def]
    s = SynthSettings(**kw)
    s.generation.max_new_tokens = 16
    s.instruction_max_new_tokens = 12
    s.reject_truncated = False  # short generations in tests: keep cut-off answers
    s.min_answer_overlap = 0.0  # scored, not gated: the 135M model's answers drift
    return s


def test_options_validate_overrides() -> None:
    core = SynthCore(_settings(), backend=lambda: pytest.fail("no model needed"))
    opts = core.options(methods=["evol", "grounded_qa"], per_seed=2, generation={"seed": 5})
    assert opts.methods == ("grounded_qa", "evol") and opts.per_seed == 2
    assert opts.params.seed == 5 and opts.params.max_new_tokens == 16
    assert core.default_options.methods == ("grounded_qa", "self_instruct", "evol")
    for bad in (
        {"methods": ["poetry"]},
        {"per_seed": 65},
        {"generation": {"max_new_tokens": 17}},
        {"generation": {"top_p": 0.0}},
    ):
        with pytest.raises(InvalidArgument):
            core.options(**bad)  # type: ignore[arg-type]
    empty = SynthCore(_settings(seed_instructions=[]), backend=lambda: pytest.fail("unused"))
    with pytest.raises(InvalidArgument, match="seed_instructions"):
        empty.options(from_settings_seeds=1)


def test_ids_are_deterministic_per_parent_method_op_index_and_seed() -> None:
    d = Draft("doc-1", "src", "evol", 0, INSTRUCTION, op="deepen")
    assert synth_id(d, None) == synth_id(Draft("doc-1", "x", "evol", 0, "y", op="deepen"), None)
    others = [
        Draft("doc-2", "src", "evol", 0, INSTRUCTION, op="deepen"),
        Draft("doc-1", "src", "self_instruct", 0, INSTRUCTION),
        Draft("doc-1", "src", "evol", 0, INSTRUCTION, op="broaden"),
        Draft("doc-1", "src", "evol", 1, INSTRUCTION, op="deepen"),
    ]
    ids = {synth_id(o, None) for o in others} | {synth_id(d, 7)}
    assert synth_id(d, None) not in ids and len(ids) == 5


def test_seeds_are_forwarded_or_consumed_without_generating() -> None:
    s = _settings(methods=["grounded_qa"])  # instruction-only seeds: nothing to generate
    for forward, action in ((True, Action.KEPT), (False, Action.DROPPED)):
        s.forward_seeds = forward
        core = SynthCore(s, backend=lambda: pytest.fail("no model needed"))
        out = core.process([Sample(id="i", prompt=INSTRUCTION)])
        assert len(out) == 1 and out[0].kept is forward
        assert out[0].sample.lineage[-1].action == action
        assert out[0].reason == ("" if forward else "synth:seed_consumed")


@pytest.mark.slow
def test_all_methods_create_linked_samples_and_drop_near_duplicates(torch_backend, minilm) -> None:  # type: ignore[no-untyped-def]
    s = _settings()
    s.gates.ask_llm, s.gates.ask_llm_threshold = True, 0.0  # score, keep all
    core = SynthCore(s, backend=torch_backend, embedder=minilm)
    seeds = [
        Sample(id="d1", text=DOC, source="news"),
        Sample(id="d2", text=DOC, source="news"),  # same document: same greedy question
        Sample(id="i1", prompt=INSTRUCTION, source="chat"),
    ]
    out = core.synthesize(seeds, core.options(from_settings_seeds=1))
    by = {(o.sample.metadata["parent_id"], o.sample.metadata["method"]): o for o in out}
    first_seed = seed_id(s.seed_instructions[0])
    assert set(by) == {
        ("d1", "grounded_qa"),
        ("d2", "grounded_qa"),
        ("i1", "self_instruct"),
        ("i1", "evol"),
        (first_seed, "self_instruct"),
    }
    assert len({o.sample.id for o in out}) == 5
    for (parent, method), o in by.items():
        created = o.sample.lineage[0]
        assert created.action == Action.CREATED and created.parent_id == parent
        assert created.stage == "synth" and created.reason == f"synth:{method}"
        assert created.model_version == core.model_version
        assert o.sample.id.startswith("syn-") and o.sample.id != parent
        if o.kept:
            assert o.sample.prompt and o.sample.response and len(o.sample.lineage) == 1
            assert 0.0 <= o.sample.scores["ask_llm"] <= 1.0
        else:
            assert o.sample.lineage[-1].action == Action.DROPPED
            assert o.sample.lineage[-1].reason == o.reason and o.reason.startswith("filter:")
    qa1, qa2 = by[("d1", "grounded_qa")], by[("d2", "grounded_qa")]
    assert qa1.kept and qa1.sample.source == "news", qa1.reason
    assert 0.0 <= qa1.sample.scores["answer_overlap"] <= 1.0
    assert qa2.sample.prompt == qa1.sample.prompt
    assert not qa2.kept and qa2.reason == "filter:near_duplicate"
    assert qa2.sample.scores["max_similarity"] >= s.near_dup.threshold
    assert by[("i1", "evol")].sample.metadata["evol_op"] in s.evol_ops
    assert by[(first_seed, "self_instruct")].sample.metadata["seed_origin"] == "settings"
    # kept instructions join the Self-Instruct pool
    kept_instructions = [
        o.sample.prompt for o in out if o.kept and o.sample.metadata["method"] != "grounded_qa"
    ]
    assert len(core.pool) == len(s.seed_instructions) + 1 + len(kept_instructions)


@pytest.mark.slow
def test_gates_reject_with_their_reason(torch_backend) -> None:  # type: ignore[no-untyped-def]
    s = _settings()
    s.gates.ask_llm, s.gates.ask_llm_threshold = True, 1.0  # nothing reaches P(yes) = 1
    core = SynthCore(s, backend=torch_backend)
    drafts = [Draft("p", "", "self_instruct", 0, "", prompt="Name a planet.", response="Mars.")]
    core._gates(drafts)
    assert drafts[0].reason == "filter:ask_llm" and 0 < drafts[0].scores["ask_llm"] < 1

    s.gates.ask_llm, s.gates.ifd, s.gates.ifd_max = False, True, 1e-6
    drafts = [Draft("p", "", "self_instruct", 0, "", prompt="Name a planet.", response="Mars.")]
    core._gates(drafts)
    assert drafts[0].reason == "filter:ifd" and drafts[0].scores["ifd"] > 0


@pytest.mark.slow
def test_ifd_is_lower_when_the_instruction_helps(torch_backend) -> None:  # type: ignore[no-untyped-def]
    answer = "The capital of France is Paris."
    matched, unrelated = ifd_scores(
        torch_backend,
        ["What is the capital of France?", "Describe how to tie a bowline knot."],
        [answer, answer],
        budget=512,
    )
    assert 0 < matched < unrelated
    assert math.isnan(ifd_scores(torch_backend, ["Say hi."], ["hello " * 50], budget=16)[0])
