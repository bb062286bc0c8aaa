"""Delivery settings: drops recorded by default, the decision fingerprint in batch ids."""

from __future__ import annotations

from services.runtime.kafka_stage import decision_digest
from services.runtime.settings import KafkaSettings
from services.scoring.settings import ScoringSettings


def test_exactly_once_is_the_default_with_a_bounded_session() -> None:
    k = KafkaSettings()
    assert k.processing_guarantee == "exactly_once"
    assert k.session_timeout_ms <= 10_000
    assert k.transaction_timeout_ms > k.transaction_interval_ms


def test_drops_are_recorded_by_default_and_can_be_turned_off() -> None:
    s = ScoringSettings(kafka=KafkaSettings(output_topic="sluice.scored"))
    assert s.dropped_topic_name == "sluice.scored.dropped"
    assert ScoringSettings(dropped_topic="audit").dropped_topic_name == "audit"
    assert ScoringSettings(dropped_topic="none").dropped_topic_name == ""


def test_fingerprint_follows_decisions_not_transport() -> None:
    base = ScoringSettings(steps=["heuristics"])
    moved = ScoringSettings(
        steps=["heuristics"],
        kafka=KafkaSettings(bootstrap_servers="elsewhere:9092", group_id="other"),
        dropped_topic="audit",
    )
    assert base.decision_fingerprint() == moved.decision_fingerprint()
    stricter = ScoringSettings(steps=["heuristics", "perplexity"])
    assert stricter.decision_fingerprint() != base.decision_fingerprint()


def test_decision_digest_separates_stages_and_versions() -> None:
    a = decision_digest("scoring", "m1")
    assert a == decision_digest("scoring", "m1")
    assert len({a, decision_digest("scoring", "m2"), decision_digest("density", "m1")}) == 3
