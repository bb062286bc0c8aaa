"""One reconcile pass, with the two outside worlds replaced by recorders: what the operator
does (and does not do) when the spec, the target or the broker is not as it should be.

The happy path runs against the real emulator and broker (test_operator_emulator.py); here
each failure mode is one pass, decided without waiting on anything."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from operators.actuator import TargetState
from operators.lag import LagReading, LagSourceError
from operators.metrics import OperatorMetrics
from operators.reconcile import Reconciler, ScalerRef
from operators.settings import OperatorSettings

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
REF = ScalerRef(name="sluice-density", namespace="ns", generation=2)
KAFKA = {"bootstrap_servers": "k:9092", "input_topic": "in", "group_id": "g"}


class FakeKube:
    def __init__(self, target: TargetState | None, fail: Exception | None = None) -> None:
        self.target_state = target
        self.fail = fail
        self.scaled: list[tuple[str, int]] = []

    def target(self, namespace: str, name: str) -> TargetState | None:
        if self.fail is not None:
            raise self.fail
        return self.target_state

    def scale(self, namespace: str, name: str, replicas: int) -> None:
        self.scaled.append((name, replicas))


class FakeLag:
    def __init__(self, reading: LagReading | None) -> None:
        self.reading = reading
        self.asked: list[tuple[str, str, str]] = []

    def read(self, bootstrap: str, topic: str, group: str) -> LagReading:
        self.asked.append((bootstrap, topic, group))
        if self.reading is None:
            raise LagSourceError("broker down")
        return self.reading


def spec(**config: Any) -> dict[str, Any]:
    return {
        "scaleTargetRef": {"name": "sluice-density"},
        "stage": {
            "kind": "density",
            "config": {"kafka": KAFKA, "store": {"endpoint": "s3:9000"}, **config},
        },
        "scaling": {"minReplicas": 1, "maxReplicas": 4, "targetLagPerReplica": 10},
    }


def reconcile(
    kube: FakeKube, lag: FakeLag, body: dict[str, Any], status: dict[str, Any] | None = None
) -> tuple[dict[str, Any], list[str]]:
    r = Reconciler(kube, lag, OperatorMetrics(), OperatorSettings())  # type: ignore[arg-type]
    result = r.reconcile(REF, body, status, NOW)
    return result.status, [e.reason for e in result.events]


def ready(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Ready")


def test_scales_the_target_on_the_lag_of_the_group_its_workers_commit() -> None:
    kube = FakeKube(TargetState(replicas=1, ready_replicas=1))
    lag = FakeLag(LagReading(lag=35, end_offsets=35, committed_offsets=0, partitions=4))
    status, events = reconcile(kube, lag, spec(sketch={"name": "corpus", "version": 3}))
    assert lag.asked == [("k:9092", "in", "g.sample.corpus.v3")]
    assert kube.scaled == [("sluice-density", 4)]  # 35 at 10 per replica
    assert events == ["ScaledUp"]
    assert (status["consumerGroup"], status["topic"]) == ("g.sample.corpus.v3", "in")
    assert (status["desiredReplicas"], status["observedGeneration"]) == (4, 2)


def test_a_density_stage_without_a_pinned_version_is_an_invalid_spec() -> None:
    kube, lag = FakeKube(TargetState(2, 2)), FakeLag(None)
    status, events = reconcile(kube, lag, spec())
    assert ready(status)["reason"] == "InvalidSpec" and "sketch.version" in ready(status)["message"]
    assert events == ["InvalidSpec"]
    assert (kube.scaled, lag.asked) == ([], [])
    # The same problem again: no second event.
    _, again = reconcile(kube, lag, spec(), status)
    assert again == []


@pytest.mark.parametrize(
    ("kube", "reason"),
    [
        (FakeKube(None), "TargetNotFound"),
        (FakeKube(None, fail=RuntimeError("apiserver away")), "ReconcileError"),
    ],
)
def test_no_target_no_action(kube: FakeKube, reason: str) -> None:
    lag = FakeLag(LagReading(lag=35, end_offsets=35, committed_offsets=0, partitions=4))
    body = spec(sketch={"version": 1})
    status, events = reconcile(kube, lag, body)
    assert ready(status)["reason"] == reason and events == [reason]
    assert kube.scaled == [] and lag.asked == []
    assert status["consumerGroup"] == "g.sample.default.v1"  # still says which group


def test_an_unreadable_broker_keeps_the_replicas_and_backs_off() -> None:
    kube, lag = FakeKube(TargetState(3, 3)), FakeLag(None)
    body = spec(mode="online")
    status, events = reconcile(kube, lag, body)
    assert kube.scaled == [] and events == ["LagSourceUnavailable"]
    assert status["lagSource"]["failures"] == 1 and status["replicas"] == 3
    source = next(c for c in status["conditions"] if c["type"] == "LagSourceAvailable")
    assert source["status"] == "False" and "group g on in" in source["message"]
    # Within the backoff the broker is not asked again.
    status, events = reconcile(kube, lag, body, status)
    assert len(lag.asked) == 1 and events == []
