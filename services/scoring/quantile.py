"""Streaming quantile estimate (the P² algorithm, Jain & Chlamtac 1985) and the
top-fraction filter built on it.

P² keeps five markers and adjusts them with piecewise-parabolic interpolation:
O(1) memory and time per observation, so a stage can keep "the best X% so far"
over an unbounded stream without storing scores.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any


class P2Quantile:
    """Running estimate of the ``p``-quantile of everything observed."""

    def __init__(self, p: float) -> None:
        if not 0.0 < p < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {p}")
        self.p = p
        self._init: list[float] = []
        self.q: list[float] = []  # marker heights
        self.n: list[int] = []  # marker positions (1-based)
        self.np: list[float] = []  # desired positions
        self.dn = [0.0, p / 2, p, (1 + p) / 2, 1.0]
        self.count = 0

    def add(self, x: float) -> None:
        if math.isnan(x):
            return
        self.count += 1
        if len(self._init) < 5 and not self.q:
            self._init.append(x)
            if len(self._init) == 5:
                self._init.sort()
                p = self.p
                self.q = list(self._init)
                self.n = [1, 2, 3, 4, 5]
                self.np = [1, 1 + 2 * p, 1 + 4 * p, 3 + 2 * p, 5]
            return
        q, n = self.q, self.n
        if x < q[0]:
            q[0] = x
            k = 0
        elif x >= q[4]:
            q[4] = x
            k = 3
        else:
            k = next(i for i in range(4) if q[i] <= x < q[i + 1])
        for i in range(k + 1, 5):
            n[i] += 1
        for i in range(5):
            self.np[i] += self.dn[i]
        for i in (1, 2, 3):
            d = self.np[i] - n[i]
            if (d >= 1 and n[i + 1] - n[i] > 1) or (d <= -1 and n[i - 1] - n[i] < -1):
                s = 1 if d > 0 else -1
                qp = self._parabolic(i, s)
                if not q[i - 1] < qp < q[i + 1]:
                    qp = q[i] + s * (q[i + s] - q[i]) / (n[i + s] - n[i])
                q[i] = qp
                n[i] += s

    def _parabolic(self, i: int, s: int) -> float:
        q, n = self.q, self.n
        return q[i] + s / (n[i + 1] - n[i - 1]) * (
            (n[i] - n[i - 1] + s) * (q[i + 1] - q[i]) / (n[i + 1] - n[i])
            + (n[i + 1] - n[i] - s) * (q[i] - q[i - 1]) / (n[i] - n[i - 1])
        )

    def state(self) -> dict[str, Any]:
        """Everything the estimate depends on (JSON-ready, exact floats)."""
        return {"c": self.count, "i": self._init, "q": self.q, "n": self.n, "d": self.np}

    def load(self, state: dict[str, Any]) -> None:
        """Continue from ``state()`` of an estimator of the same ``p``."""
        self.count = int(state["c"])
        self._init = [float(x) for x in state["i"]]
        self.q = [float(x) for x in state["q"]]
        self.n = [int(x) for x in state["n"]]
        self.np = [float(x) for x in state["d"]]
        markers = (len(self.q), len(self.n), len(self.np))
        if len(self._init) > 5 or (self.q and markers != (5, 5, 5)):
            raise ValueError("malformed P² state")

    def value(self) -> float:
        """The current estimate (exact while fewer than five values were seen)."""
        if self.q:
            return self.q[2]
        if not self._init:
            return math.nan
        xs = sorted(self._init)
        # linear interpolation between order statistics, like numpy's default
        pos = self.p * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class TopFractionFilter:
    """Keeps roughly the best ``fraction`` of a stream by a score.

    Each batch first updates the quantile estimate, then is cut at it, so the
    very first batch is already judged against its own distribution (no warm-up
    that lets everything through). ``higher_is_better=False`` for scores such as
    perplexity. Thread-safe: gRPC handlers share one filter.
    """

    def __init__(self, fraction: float, higher_is_better: bool = True) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.higher_is_better = higher_is_better
        p = 1.0 - fraction if higher_is_better else fraction
        self._q = P2Quantile(min(max(p, 1e-6), 1 - 1e-6))
        self._lock = threading.Lock()

    @property
    def cutoff(self) -> float:
        return self._q.value()

    def state(self) -> dict[str, Any]:
        """The filter's identity and its estimate's state (``load`` continues from it)."""
        with self._lock:
            return {"f": self.fraction, "h": self.higher_is_better, "p2": self._q.state()}

    def load(self, state: dict[str, Any]) -> None:
        """Continue from another filter's ``state()``; ValueError if that filter kept a
        different fraction or direction (its estimate is of another quantile)."""
        if state.get("f") != self.fraction or state.get("h") != self.higher_is_better:
            raise ValueError(
                f"state of a top-{state.get('f')} filter (higher_is_better={state.get('h')}) "
                f"cannot continue a top-{self.fraction} one"
            )
        with self._lock:
            self._q.load(state["p2"])

    def decide(self, scores: Sequence[float]) -> list[bool]:
        if self.fraction >= 1.0:
            return [True] * len(scores)
        with self._lock:
            for s in scores:
                self._q.add(s)
            cut = self._q.value()
        if self.higher_is_better:
            return [not math.isnan(s) and s >= cut for s in scores]
        return [not math.isnan(s) and s <= cut for s in scores]
