"""Prompt builders and parsers of the three synthesis methods (pure functions)."""

from __future__ import annotations

import pytest

from services.synth.evol import (
    EVOL_TEMPLATES,
    build_evol_message,
    clean_evolved,
    evol_failure,
    is_refusal,
)
from services.synth.grounded import (
    QA_PRIME,
    answer_overlap,
    build_answer_message,
    build_qa_message,
    parse_answer,
    parse_question,
)
from services.synth.self_instruct import (
    InstructionPool,
    build_self_instruct_message,
    parse_instruction,
    seed_id,
    self_instruct_failure,
)


@pytest.mark.parametrize(
    ("generated", "question"),
    [
        (" What froze?", "What froze?"),
        ("\n  When did the ferry stop?\nMore text", "When did the ferry stop?"),
        ("  \n ", None),
    ],
)
def test_parse_question(generated: str, question: str | None) -> None:
    assert parse_question(generated) == question


def test_answer_pass_shows_document_and_question() -> None:
    msg = build_answer_message(" The river froze. ", " What froze? ")
    assert msg.endswith("Document:\nThe river froze.\n\nQuestion: What froze?")
    assert parse_answer("  The river. ") == "The river."
    assert parse_answer(" \n") is None


def test_answer_overlap_counts_content_words_found_in_the_document() -> None:
    doc = "The council voted on Tuesday to build a footbridge costing 4 million pounds."
    assert answer_overlap("A footbridge costing 4 million pounds.", doc) == 1.0
    assert answer_overlap("It was a record for the 2022 Australian Open.", doc) == 0.0
    assert answer_overlap("The council voted for a tunnel.", doc) == pytest.approx(2 / 3)
    assert answer_overlap("Yes, it is.", doc) == 1.0  # no content words to check


def test_qa_message_holds_the_document() -> None:
    msg = build_qa_message("  The river froze.  ")
    assert msg.endswith("Document:\nThe river froze.") and QA_PRIME in msg


@pytest.mark.parametrize(
    ("generated", "task"),
    [
        (" Write a limerick about tea.\nTask 5: more", "Write a limerick about tea."),
        ("\n\nTask 4: List two rivers.", "List two rivers."),
        ('3) "Name a planet."', "Name a planet."),
        ("   \n  ", None),
    ],
)
def test_parse_instruction(generated: str, task: str | None) -> None:
    assert parse_instruction(generated) == task


def test_self_instruct_failures() -> None:
    demos = ("Write a haiku about rain.", "List three fruits.")
    assert self_instruct_failure(None, demos) == "filter:format"
    assert self_instruct_failure("write a HAIKU about rain", demos) == "filter:copied_demo"
    assert self_instruct_failure("Write a haiku about snow.", demos) == ""


def test_self_instruct_message_numbers_the_demonstrations() -> None:
    msg = build_self_instruct_message(["A.", "B."])
    assert "Task 1: A.\nTask 2: B." in msg


def test_pool_is_bounded_and_draws_deterministically() -> None:
    pool = InstructionPool(["s1", "s2", "s3"], capacity=2)
    pool.add(["a", "b", "s1", "a"])  # seeds and repeats are not stored twice
    assert len(pool) == 5
    pool.add(["c"])  # evicts "a"
    assert len(pool) == 5
    demos = pool.demonstrations("primary", 3, key="x:0")
    assert demos[-1] == "primary" and len(demos) == 3 and "a" not in demos
    assert pool.demonstrations("primary", 3, key="x:0") == demos
    draws = {tuple(pool.demonstrations("primary", 3, key=f"x:{i}")) for i in range(20)}
    assert len(draws) > 1
    assert pool.demonstrations("s1", 10, key="k")[-1] == "s1"
    assert len(pool.demonstrations("s1", 10, key="k")) == 5  # all the others, then the seed


def test_seed_ids_are_stable_and_distinct() -> None:
    assert seed_id("a") == seed_id("a") != seed_id("b")
    assert seed_id("a").startswith("seed-")


def test_evol_templates_and_elimination() -> None:
    for op in EVOL_TEMPLATES:
        msg = build_evol_message(op, "  Explain tides. ")
        assert "Explain tides." in msg and "{" not in msg
    assert clean_evolved(' "Explain tides in detail." ') == "Explain tides in detail."
    assert evol_failure("Explain tides.", "") == "filter:format"
    assert evol_failure("Explain tides.", "explain  TIDES.") == "filter:evol_unchanged"
    assert evol_failure("Explain tides.", "#Rewritten Prompt#: x") == "filter:evol_copied_template"
    assert evol_failure("Explain tides.", "Explain spring and neap tides.") == ""
    assert is_refusal("I'm sorry, I cannot help with that.")
    assert not is_refusal("Tides come from the moon's pull. " * 30 + "Sorry for the length.")
