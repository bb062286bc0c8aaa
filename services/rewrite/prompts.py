"""Rewrite instructions and the cleanup of what the model answers (pure functions).

The presets follow WRAP ("Rephrasing the Web", Maini et al., 2024), whose styles
Nemotron-CC (Su et al., 2024) uses to rephrase web text: 'wikipedia' asks for a
high-quality encyclopedic paraphrase, 'qa' for a question-answer conversation,
'simplify' for very simple language. The instruction comes first, the sample after it
(or where a custom instruction puts ``{text}``), inside one user turn of the chat template.
"""

from __future__ import annotations

import re
from typing import Literal

Preset = Literal["wikipedia", "qa", "simplify", "paraphrase", "none"]

WIKIPEDIA_MARKER = "Here is a paraphrased version:"

PRESETS: dict[str, str] = {
    "wikipedia": (
        "For the following paragraph give me a diverse paraphrase of the same in high quality "
        "English language as in sentences on Wikipedia. Begin your answer on a separate line "
        f'with "{WIKIPEDIA_MARKER}".'
    ),
    "qa": (
        "Convert the following paragraph into a conversational format with multiple tags of "
        '"Question:" followed by "Answer:".'
    ),
    "simplify": (
        "For the following paragraph give me a paraphrase of the same using a very small "
        "vocabulary and extremely simple sentences that a toddler will understand."
    ),
    "paraphrase": (
        "Paraphrase the following paragraph in your own words. Keep every fact, name and "
        "number, and add nothing."
    ),
    "none": "",
}
"""Preset name -> instruction; 'none' means no quality rewrite (toxicity control only)."""

DETOXIFY = (
    "Rewrite the following text so that it contains no insults, profanity, threats, hate or "
    "harassment. Keep its factual content and meaning, and add nothing."
)
"""The instruction for toxic samples under the 'rewrite' toxicity policy."""

TEXT_SLOT = "{text}"

# A first line that only announces the answer: "Sure! Here is the rewritten text:".
_PREAMBLE = re.compile(
    r"^\s*(?:sure|certainly|of course|okay|ok|here is|here's|here are|below is|rewritten|"
    r"paraphrased|simplified)\b[^\n]{0,120}:[ \t]*(?:\n|$)",
    re.IGNORECASE,
)
_QUOTES = "\"'“”‘’"
_WORDS = re.compile(r"\w+")
_ECHO_PREFIX_CHARS = 40


def instruction_for(preset: str, custom: str = "") -> str:
    """The instruction text for a preset name, or the custom instruction when given."""
    if custom.strip():
        return custom.strip()
    if preset not in PRESETS:
        raise KeyError(preset)
    return PRESETS[preset]


def build_rewrite_prompt(instruction: str, text: str) -> str:
    """The user message: the instruction with the text in its ``{text}`` slot, or after it."""
    text = text.strip()
    if TEXT_SLOT in instruction:
        return instruction.replace(TEXT_SLOT, text)
    return f"{instruction}\n\n{text}"


def clean_rewrite(output: str) -> str:
    """The rewrite without announcements ("Here is a paraphrased version:") and wrapping quotes."""
    text = output.strip()
    if text.startswith(WIKIPEDIA_MARKER):
        text = text[len(WIKIPEDIA_MARKER) :]
    else:
        text = _PREAMBLE.sub("", text, count=1)
    text = text.strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


def normalize(text: str) -> str:
    """Lower-case words only, single-spaced: for echo comparisons (punctuation-only edits
    are no rewrite)."""
    return " ".join(_WORDS.findall(text.lower()))


def is_echo(rewrite: str, original: str, instruction: str) -> bool:
    """Whether the model gave the input back instead of a rewrite: the original verbatim
    (up to case and spacing), or the instruction repeated."""
    out = normalize(rewrite)
    if out == normalize(original):
        return True
    head = normalize(instruction.split(TEXT_SLOT, 1)[0])[:_ECHO_PREFIX_CHARS]
    return len(head) >= _ECHO_PREFIX_CHARS // 2 and head in out
