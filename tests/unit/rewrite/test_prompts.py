"""Rewrite instructions and the cleanup of model answers."""

from __future__ import annotations

import pytest

from services.rewrite.prompts import (
    PRESETS,
    WIKIPEDIA_MARKER,
    build_rewrite_prompt,
    clean_rewrite,
    instruction_for,
    is_echo,
)

TEXT = "The river froze early this year, and the ferry stopped running in November."


def test_every_preset_but_none_is_an_instruction() -> None:
    assert PRESETS["none"] == ""
    for name in ("wikipedia", "qa", "simplify", "paraphrase"):
        assert len(PRESETS[name].split()) > 8
    assert "Wikipedia" in PRESETS["wikipedia"]


def test_custom_instruction_wins_and_unknown_preset_raises() -> None:
    assert instruction_for("qa", "  Rewrite as a haiku. ") == "Rewrite as a haiku."
    assert instruction_for("qa") == PRESETS["qa"]
    with pytest.raises(KeyError):
        instruction_for("poetry")


def test_text_goes_into_its_slot_or_after_the_instruction() -> None:
    assert build_rewrite_prompt("Fix this: {text} Thanks.", f"  {TEXT} ") == (
        f"Fix this: {TEXT} Thanks."
    )
    assert build_rewrite_prompt("Simplify.", TEXT) == f"Simplify.\n\n{TEXT}"


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (f"{WIKIPEDIA_MARKER}\nThe ferry stopped.", "The ferry stopped."),
        ("Sure! Here is the rewritten paragraph:\nThe ferry stopped.", "The ferry stopped."),
        ('"The ferry stopped."', "The ferry stopped."),
        ("The ferry stopped: ice closed the river.", "The ferry stopped: ice closed the river."),
    ],
)
def test_clean_rewrite(raw: str, clean: str) -> None:
    assert clean_rewrite(raw) == clean


def test_echo_is_the_input_or_the_instruction_given_back() -> None:
    instruction = PRESETS["paraphrase"]
    assert is_echo(TEXT.upper().replace(",", ""), TEXT, instruction)
    assert is_echo(f"{instruction}\n{TEXT} more", TEXT, instruction)
    assert not is_echo(
        "Ice closed the river early, so the ferry halted in November.", TEXT, instruction
    )
