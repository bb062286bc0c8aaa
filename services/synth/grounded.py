"""Knowledge-grounded QA: one question-answer pair written from a seed document.

Two passes, so even a small chat model stays in format. The question: the model's turn
is primed with ``Question:`` and stops at ``Answer:``; a first pass with no question line
is rejected as 'filter:format'. The answer: a new turn asks the model to answer that
question from the same document (continuing the first turn after "Answer:" often ends
at once with a small model).

``answer_overlap`` guards the grounding cheaply: the share of the answer's content words
(4+ letters, or any number) that occur in the document; an answer made up from elsewhere
scores low ('filter:ungrounded'). The pair becomes an SFT sample: prompt = question,
response = answer; the document's id is its parent in lineage.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+")

QA_INSTRUCTION = (
    "Read the document below and write one question that can be answered from it, followed "
    "by its answer. Use exactly this format:\nQuestion: <question>\nAnswer: <answer>"
)
QA_PRIME = "Question:"
QUESTION_STOP: tuple[str, ...] = ("Answer:",)
ANSWER_INSTRUCTION = (
    "Answer the question using only the document below. Reply with the answer only."
)
ANSWER_STOP: tuple[str, ...] = ("\nQuestion:",)
"""A second question is not wanted: the answer stops where one would start."""


def build_qa_message(document: str) -> str:
    """The user message for one document (before the chat template and the prime)."""
    return f"{QA_INSTRUCTION}\n\nDocument:\n{document.strip()}"


def parse_question(generated: str) -> str | None:
    """The question from the first pass (what follows the ``Question:`` prime): its first
    non-empty line, or None."""
    for line in generated.splitlines():
        question = line.strip()
        if question:
            return question
    return None


def build_answer_message(document: str, question: str) -> str:
    """The user message of the answer pass: the document and the generated question."""
    return f"{ANSWER_INSTRUCTION}\n\nDocument:\n{document.strip()}\n\nQuestion: {question.strip()}"


def parse_answer(generated: str) -> str | None:
    """The answer from the second pass, or None when it is empty."""
    answer = generated.strip()
    return answer or None


def _content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if len(w) >= 4 or any(c.isdigit() for c in w)]


def answer_overlap(answer: str, document: str) -> float:
    """Share of the answer's content words found in the document (1.0 when it has none)."""
    words = _content_words(answer)
    if not words:
        return 1.0
    known = set(_content_words(document))
    return sum(w in known for w in words) / len(words)
