"""The scaling policy: a pure function from what was observed to how many replicas a stage needs.

No Kubernetes, no Kafka, no clock: every input is an argument, so the policy can be tested
exhaustively (tests/operators/test_planner.py) and replayed from a status snapshot. The
reconciler (operators/reconcile.py) gathers the observation and applies the plan.

Demand is measured in replicas (a float):

- **drain time**: a ready replica consumes ``rate_per_replica`` messages/s while it has a
  backlog (an EWMA measured only while the stage was busy, see ``update_rates``). Draining
  ``lag`` within ``drain_seconds`` while ``incoming_rate`` keeps arriving needs
  ``(incoming_rate + lag / drain_seconds) / rate_per_replica`` replicas.
- **lag per replica** (optional): ``lag / target_lag_per_replica``; a floor that works before
  any rate was measured.
- neither known (nothing measured yet, no lag target): keep the current count, at least one
  replica while there is lag, so a rate can be measured.

Hysteresis: scaling up goes to ``ceil(demand)``; scaling down only below
``ceil(demand / (1 - tolerance))``. Between the two the count holds, so a demand that wobbles
around a boundary does not flap. Cooldowns: up soon after the last change
(``scale_up_cooldown_seconds``), down only after a longer quiet time
(``scale_down_cooldown_seconds``). Warm-up: pods that are not ready yet count as coming
capacity, and no further scale-up happens while pods of the last change are inside their
``warmup_seconds``. Zero: only with ``min_replicas == 0``, only after the stage has been idle
(no lag, nothing arriving) for ``idle_seconds``; the first lag brings it back at once,
ignoring cooldowns. Bounds last: ``[min_replicas, min(max_replicas, partitions)]`` (more
consumers than partitions sit idle in the group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Action = Literal["scale_up", "scale_down", "hold"]

# Demand computed as e.g. 3.0000000001 from float noise must not round up to 4.
_EPS = 1e-9


@dataclass(frozen=True)
class ScalingPolicy:
    """One stage's scaling rules (the ``scaling`` block of a SluiceScaler)."""

    min_replicas: int = 0
    max_replicas: int = 4
    drain_seconds: float = 300.0
    target_lag_per_replica: int | None = None
    warmup_seconds: float = 120.0
    scale_up_cooldown_seconds: float = 30.0
    scale_down_cooldown_seconds: float = 300.0
    idle_seconds: float = 600.0
    tolerance: float = 0.1

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ValueError("min_replicas must be >= 0")
        if self.max_replicas < 1 or self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= 1 and >= min_replicas")
        if self.drain_seconds <= 0:
            raise ValueError("drain_seconds must be > 0")
        if self.target_lag_per_replica is not None and self.target_lag_per_replica < 1:
            raise ValueError("target_lag_per_replica must be >= 1")
        if not 0 <= self.tolerance < 1:
            raise ValueError("tolerance must be in [0, 1)")
        for name in (
            "warmup_seconds",
            "scale_up_cooldown_seconds",
            "scale_down_cooldown_seconds",
            "idle_seconds",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


@dataclass(frozen=True)
class Observation:
    """What the reconciler saw this tick. Times are seconds on one clock (epoch seconds)."""

    lag: int
    """Messages behind: sum over the input topic's partitions of end offset - committed offset."""
    partitions: int
    """Partitions of the input topic: the most consumers the group can use."""
    arrived: int
    """Messages appended to the input topic since the previous observation (0: end offsets
    did not move)."""
    incoming_rate: float
    """Messages/s arriving on the input topic (smoothed)."""
    rate_per_replica: float | None
    """Messages/s one ready replica consumes while it has a backlog (smoothed); None until
    measured."""
    replicas: int
    """Replicas the Deployment asks for now (ready + warming)."""
    ready_replicas: int
    now: float
    last_scale_time: float | None
    """When the replica count last changed; None if never."""
    idle_since: float | None
    """Since when the stage has been idle (the previous plan's ``idle_since``)."""

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError("a topic has at least one partition")
        if min(self.lag, self.arrived, self.replicas, self.ready_replicas) < 0:
            raise ValueError("lag, arrived and replica counts are never negative")
        if self.incoming_rate < 0 or (
            self.rate_per_replica is not None and self.rate_per_replica < 0
        ):
            raise ValueError("rates are never negative")

    @property
    def warming(self) -> int:
        """Replicas asked for but not ready yet: pods starting or loading a model."""
        return max(0, self.replicas - self.ready_replicas)


@dataclass(frozen=True)
class Plan:
    """The decision: the replica count to set, why, and the idle clock to carry forward."""

    replicas: int
    action: Action
    reason: str
    demand: float
    """Replicas the lag and rates call for, before hysteresis, cooldowns and bounds."""
    idle_since: float | None


def plan(policy: ScalingPolicy, obs: Observation) -> Plan:
    """Desired replicas for one stage. Pure and deterministic."""
    cur = obs.replicas
    upper = min(policy.max_replicas, obs.partitions)
    lower = min(policy.min_replicas, upper)

    idle = obs.lag == 0 and obs.arrived == 0
    idle_since = (obs.idle_since if obs.idle_since is not None else obs.now) if idle else None

    demand, why = _demand(policy, obs, idle)
    up = math.ceil(demand - _EPS)
    down = math.ceil(demand / (1.0 - policy.tolerance) - _EPS)
    if obs.lag > 0:
        up, down = max(up, 1), max(down, 1)
    # Inside [up, down] the current count is good enough (the hysteresis band).
    target = min(max(cur, up), down)
    reason = why

    if target == 0 and cur > 0:
        idle_for = obs.now - idle_since if idle_since is not None else 0.0
        if policy.min_replicas > 0 or idle_since is None or idle_for < policy.idle_seconds:
            target = 1
            reason = f"{why}; idle {idle_for:.0f}s of {policy.idle_seconds:.0f}s before zero"
        else:
            reason = f"idle for {idle_for:.0f}s (no lag, nothing arriving): scale to zero"

    since_change = (
        math.inf if obs.last_scale_time is None else max(0.0, obs.now - obs.last_scale_time)
    )
    if target > cur and cur > 0:
        if obs.warming > 0 and since_change < policy.warmup_seconds:
            target = cur
            reason = (
                f"{why}; waiting for {obs.warming} warming pod(s) "
                f"({since_change:.0f}s of {policy.warmup_seconds:.0f}s warm-up)"
            )
        elif since_change < policy.scale_up_cooldown_seconds:
            target = cur
            reason = f"{why}; scale-up cooldown ({since_change:.0f}s since last change)"
    elif target > cur:
        reason = f"{why}; lag appeared, scaling from zero"
    elif target < cur and since_change < policy.scale_down_cooldown_seconds:
        target = cur
        reason = f"{why}; scale-down cooldown ({since_change:.0f}s since last change)"

    bounded = max(lower, min(upper, target))
    if bounded != target:
        reason = (
            f"{reason}; bounded to [{lower}, {upper}] "
            f"(max {policy.max_replicas}, {obs.partitions} partitions)"
        )
    action: Action = "scale_up" if bounded > cur else "scale_down" if bounded < cur else "hold"
    return Plan(bounded, action, reason, demand, idle_since)


def _demand(policy: ScalingPolicy, obs: Observation, idle: bool) -> tuple[float, str]:
    estimates: list[tuple[float, str]] = []
    if obs.rate_per_replica:
        # The smoothed arrival rate decays towards zero but never reaches it: once nothing
        # arrives and nothing is left, the stage needs no capacity at all.
        incoming = 0.0 if idle else obs.incoming_rate
        needed = incoming + obs.lag / policy.drain_seconds
        estimates.append(
            (
                needed / obs.rate_per_replica,
                f"lag {obs.lag}, {incoming:.2f} msg/s arriving, "
                f"{obs.rate_per_replica:.2f} msg/s per replica: drain in "
                f"{policy.drain_seconds:.0f}s",
            )
        )
    if policy.target_lag_per_replica:
        estimates.append(
            (
                obs.lag / policy.target_lag_per_replica,
                f"lag {obs.lag} at {policy.target_lag_per_replica} per replica",
            )
        )
    if estimates:
        demand, why = max(estimates, key=lambda e: e[0])
        return demand, f"{why} needs {demand:.2f} replicas"
    if obs.lag > 0:
        # Nothing to size by yet: run at least one replica so a rate gets measured.
        return float(max(obs.replicas, 1)), f"lag {obs.lag}, no consumption rate measured yet"
    return 0.0, "no lag"


# -- rates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OffsetSample:
    """Offsets of the input topic and the group, summed over partitions, at one time."""

    time: float
    end_total: int
    committed_total: int
    lag: int


@dataclass(frozen=True)
class Rates:
    """Smoothed rates carried from tick to tick (in the scaler's status)."""

    incoming_rate: float = 0.0
    rate_per_replica: float | None = None


def update_rates(
    rates: Rates,
    previous: OffsetSample | None,
    current: OffsetSample,
    ready_replicas: int,
    window_seconds: float,
) -> tuple[Rates, int]:
    """Fold one new offset sample into the smoothed rates; returns (rates, messages arrived).

    Smoothing is an EWMA with time constant ``window_seconds`` (weight ``1 - exp(-dt/window)``),
    so irregular tick spacing weighs samples by the time they cover. Consumption per replica
    is a capacity measure, so it is sampled only when it measured capacity: a backlog at
    both ends of the interval (the consumers were never starved), ready replicas, and
    progress (a stalled group, e.g. pods loading a model on the first batch, says nothing
    about how fast they will go). Offsets that go backwards (topic recreated, offsets reset)
    restart the measurement.
    """
    if previous is None:
        return rates, 0
    dt = current.time - previous.time
    arrived = current.end_total - previous.end_total
    consumed = current.committed_total - previous.committed_total
    if dt <= 0 or arrived < 0 or consumed < 0:
        return rates, max(0, arrived)
    weight = 1.0 - math.exp(-dt / window_seconds) if window_seconds > 0 else 1.0
    incoming = rates.incoming_rate + weight * (arrived / dt - rates.incoming_rate)
    per_replica = rates.rate_per_replica
    if ready_replicas > 0 and previous.lag > 0 and current.lag > 0 and consumed > 0:
        sample = consumed / dt / ready_replicas
        per_replica = (
            sample if per_replica is None else per_replica + weight * (sample - per_replica)
        )
    return Rates(incoming_rate=incoming, rate_per_replica=per_replica), arrived
