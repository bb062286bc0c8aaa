"""Evol-Instruct (Xu et al., 2023, WizardLM): an instruction made harder or broader.

In-depth operations (deepen, concretize, add_constraints, reasoning) make a prompt more
complex; in-breadth (broaden) writes a new prompt in the same domain. The templates are
shortened from the paper's. ``evol_failure`` applies the paper's elimination rules: an
evolved prompt that equals the original (no information gain) or copies the template's
words is rejected, and so is a response that only apologises.
"""

from __future__ import annotations

import re
from typing import Literal

EvolOp = Literal["deepen", "broaden", "concretize", "add_constraints", "reasoning"]

_REWRITER = (
    "I want you to act as a Prompt Rewriter. Rewrite the given prompt into a more complex "
    "version that a person can still understand and answer. {how} Add at most 20 words. "
    "Reply with the rewritten prompt only.\n\n#Given Prompt#:\n{instruction}\n\n"
    "#Rewritten Prompt#:"
)
EVOL_TEMPLATES: dict[str, str] = {
    "deepen": _REWRITER.replace(
        "{how}", "If the prompt asks about a topic, increase the depth and breadth of the inquiry."
    ),
    "concretize": _REWRITER.replace(
        "{how}", "Replace general concepts with more specific concepts."
    ),
    "add_constraints": _REWRITER.replace(
        "{how}", "Add one more constraint or requirement to the prompt."
    ),
    "reasoning": _REWRITER.replace(
        "{how}",
        "If the prompt can be solved with a few simple steps, ask for multiple-step "
        "reasoning instead.",
    ),
    "broaden": (
        "I want you to act as a Prompt Creator. Draw inspiration from the given prompt to "
        "create a brand new prompt in the same domain, but rarer. It must be reasonable and "
        "answerable by a person. Reply with the new prompt only.\n\n#Given Prompt#:\n"
        "{instruction}\n\n#Created Prompt#:"
    ),
}
EVOL_STOP: tuple[str, ...] = ("\n\n", "#Given Prompt#")

_TEMPLATE_WORDS = re.compile(
    r"#?\s*(?:given|rewritten|created)\s+prompt\s*#?|prompt rewriter|prompt creator",
    re.IGNORECASE,
)
_SORRY = re.compile(r"\b(?:sorry|i apologi[sz]e|as an ai)\b", re.IGNORECASE)
_REFUSAL_MAX_WORDS = 80


def build_evol_message(op: str, instruction: str) -> str:
    """The user message asking for one evolution ``op`` of ``instruction``."""
    return EVOL_TEMPLATES[op].replace("{instruction}", instruction.strip())


def clean_evolved(generated: str) -> str:
    """The evolved prompt without surrounding quotes and whitespace."""
    return generated.strip().strip("\"'").strip()


def evol_failure(original: str, evolved: str) -> str:
    """'' if the evolution is usable, else why not (the paper's elimination rules)."""
    if not evolved:
        return "filter:format"
    if " ".join(evolved.lower().split()) == " ".join(original.lower().split()):
        return "filter:evol_unchanged"
    if _TEMPLATE_WORDS.search(evolved):
        return "filter:evol_copied_template"
    return ""


def is_refusal(response: str) -> bool:
    """A short response that apologises instead of answering (Evol-Instruct eliminates it)."""
    return len(response.split()) < _REFUSAL_MAX_WORDS and _SORRY.search(response) is not None
