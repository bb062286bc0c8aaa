"""Self-Instruct (Wang et al., 2023): new instructions from a few demonstrations.

The prompt lists demonstration tasks from the instruction pool (the configured seed
instructions, instructions seen on the stream, and instructions this stage generated and
kept, as in the paper's bootstrapping) and asks for one new task; the rendered prompt is
primed with ``Task:`` and generation stops at the end of the line. The response to the new
instruction is generated in a second pass.
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
from collections import deque
from collections.abc import Iterable, Sequence

SELF_INSTRUCT_HEAD = "Here are some example tasks:"
SELF_INSTRUCT_ASK = (
    "Write one new task that is different from all of these. Reply with the task only."
)
TASK_PRIME = "Task:"
TASK_STOP: tuple[str, ...] = ("\n",)

DEFAULT_SEED_INSTRUCTIONS: tuple[str, ...] = (
    "Explain how a bicycle gear system makes pedalling easier on hills.",
    "Write a short, polite email asking a colleague to review a document by Friday.",
    "List three practical ways to reduce food waste at home.",
    "Summarize the main causes of the French Revolution in two sentences.",
    "Give a simple recipe for a vegetable soup.",
    "Describe the difference between weather and climate.",
    "Suggest a name for a small bakery and explain your choice.",
    "Convert 25 degrees Celsius to Fahrenheit and show the calculation.",
)
"""A small, diverse default pool (in the spirit of the paper's 175 hand-written seeds)."""

_WORDS = re.compile(r"\w+")
_NUMBERED = re.compile(r"^\s*(?:task\s*\d*\s*[:.)-]|\d+\s*[:.)-])\s*", re.IGNORECASE)


def seed_id(instruction: str) -> str:
    """A stable id for a configured seed instruction (the parent of what it seeds)."""
    return "seed-" + hashlib.sha256(instruction.encode()).hexdigest()[:16]


def build_self_instruct_message(demonstrations: Sequence[str]) -> str:
    """The user message: the numbered demonstrations and the request for one new task."""
    tasks = "\n".join(f"Task {i}: {d.strip()}" for i, d in enumerate(demonstrations, 1))
    return f"{SELF_INSTRUCT_HEAD}\n{tasks}\n{SELF_INSTRUCT_ASK}"


def parse_instruction(generated: str) -> str | None:
    """The new task: the first non-empty line without a 'Task 4:' style prefix."""
    for line in generated.splitlines():
        task = _NUMBERED.sub("", line).strip().strip("\"'")
        if task:
            return task
    return None


def self_instruct_failure(task: str | None, demonstrations: Sequence[str]) -> str:
    """'' for a usable new task; 'filter:format' when none parsed; 'filter:copied_demo' when
    it repeats a demonstration (up to case and punctuation)."""
    if task is None:
        return "filter:format"
    if _words(task) in {_words(d) for d in demonstrations}:
        return "filter:copied_demo"
    return ""


def _words(text: str) -> str:
    return " ".join(_WORDS.findall(text.lower()))


class InstructionPool:
    """Demonstrations for Self-Instruct: fixed seeds plus a bounded memory of recent ones."""

    def __init__(self, seeds: Iterable[str], capacity: int) -> None:
        self.seeds: tuple[str, ...] = tuple(s.strip() for s in seeds if s.strip())
        self._recent: deque[str] = deque(maxlen=capacity)
        self._known: set[str] = set(self.seeds)
        self._lock = threading.Lock()

    def add(self, instructions: Iterable[str]) -> None:
        """Remember instructions (exact repeats are ignored)."""
        with self._lock:
            for text in instructions:
                text = text.strip()
                if not text or text in self._known:
                    continue
                if len(self._recent) == self._recent.maxlen:
                    self._known.discard(self._recent[0])
                self._recent.append(text)
                self._known.add(text)

    def __len__(self) -> int:
        return len(self.seeds) + len(self._recent)

    def demonstrations(self, primary: str, n: int, key: str) -> list[str]:
        """``n`` demonstrations ending with ``primary``: the others drawn from the pool by
        a generator seeded with ``key`` (same pool and key, same draw)."""
        with self._lock:
            others = [t for t in (*self.seeds, *self._recent) if t != primary.strip()]
        rng = random.Random(hashlib.sha256(key.encode()).digest())
        picked = rng.sample(others, min(max(n - 1, 0), len(others)))
        return [*picked, primary.strip()]
