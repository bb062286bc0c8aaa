"""Longest test files first, so two xdist workers finish together.

Under ``--dist loadfile`` a test file is one unit of work, handed to whichever worker is free
in the order the items were collected (``make test`` turns off xdist's own reordering by test
count, which sent files with few but long tests, such as the operator's emulator tests,
last: the run's tail). ``order`` sorts the items by their file's measured seconds, longest
first (longest-processing-time scheduling), keeping each file's items together and in order;
files not measured yet go last, in collection order.

The seconds per file live in ``tests/durations.json``. ``SLUICE_STORE_TEST_DURATIONS=1 make
test`` measures a run and rewrites it; an outdated file only makes the order less good.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

FILE = Path(__file__).resolve().parents[1] / "durations.json"
STORE_ENV = "SLUICE_STORE_TEST_DURATIONS"


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def load(path: Path = FILE) -> dict[str, float]:
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
    except FileNotFoundError:
        return {}


def order(items: list[pytest.Item], seconds: dict[str, float]) -> None:
    """Sort ``items`` in place: files longest first, unmeasured files last, stable."""
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        first.setdefault(_file(item.nodeid), i)
    items.sort(key=lambda it: (-seconds.get(_file(it.nodeid), -1.0), first[_file(it.nodeid)]))


class Recorder:
    """Sums each file's setup, call and teardown seconds over a run; writes them at its end
    when ``SLUICE_STORE_TEST_DURATIONS=1``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, report: pytest.TestReport) -> None:
        self.seconds[_file(report.nodeid)] += report.duration

    def store(self, path: Path = FILE) -> None:
        if os.environ.get(STORE_ENV) != "1" or not self.seconds:
            return
        rounded = {f: round(s, 1) for f, s in sorted(self.seconds.items())}
        path.write_text(json.dumps(rounded, indent=1) + "\n")
