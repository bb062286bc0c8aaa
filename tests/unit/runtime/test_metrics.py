from __future__ import annotations

import contextvars

from prometheus_client import generate_latest

from services.runtime.domain import Outcome, Sample
from services.runtime.metrics import TRANSPORT, StageMetrics


def _value(metrics: StageMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_outcomes_feed_counts_tokens_scores_and_per_step_retention() -> None:
    m = StageMetrics("scoring")
    outcomes = [
        Outcome(Sample(id="a", text="one two three", scores={"ask_llm": 0.9}), True),
        Outcome(Sample(id="b", text="four five"), False, "heuristics:min_words"),
        Outcome(Sample(id="c", text="six", scores={"ask_llm": 0.1}), False, "ask_llm:top_fraction"),
    ]
    m.observe_outcomes(outcomes, ["ask_llm"], ["heuristics", "ask_llm"])
    assert _value(m, "sluice_stage_samples_in_total", stage="scoring", transport="kafka") == 3
    assert _value(m, "sluice_stage_samples_out_total", stage="scoring", transport="kafka") == 1
    assert _value(m, "sluice_stage_tokens_in_total", stage="scoring", transport="kafka") == 6
    assert _value(m, "sluice_stage_tokens_out_total", stage="scoring", transport="kafka") == 3
    dropped = "sluice_stage_samples_dropped_total"
    assert (
        _value(m, dropped, stage="scoring", reason="heuristics:min_words", transport="kafka") == 1
    )
    step = "sluice_step_samples_total"
    kafka = {"transport": "kafka"}
    # heuristics sees 3 and keeps 2; ask_llm sees those 2 and keeps 1
    assert _value(m, step, stage="scoring", step="heuristics", outcome="in", **kafka) == 3
    assert _value(m, step, stage="scoring", step="heuristics", outcome="kept", **kafka) == 2
    assert _value(m, step, stage="scoring", step="ask_llm", outcome="in", **kafka) == 2
    assert _value(m, step, stage="scoring", step="ask_llm", outcome="kept", **kafka) == 1
    assert _value(m, "sluice_score_ask_llm_count", stage="scoring") == 2
    assert b"sluice_score_ask_llm_bucket" in generate_latest(m.registry)


def test_samples_are_counted_under_the_transport_that_brought_them() -> None:
    """In ``all`` mode one process serves both: each counter reconciles with its own source."""
    m = StageMetrics("scoring")
    m.observe_outcomes([Outcome(Sample(id="k", text="from kafka"), True)], [])

    def served() -> None:  # what the gRPC server does for each call, in the call's context
        TRANSPORT.set("grpc")
        m.observe_outcomes([Outcome(Sample(id=i, text="x"), True) for i in "ab"], [])
        m.observe_step("heuristics", 2, 1)

    contextvars.Context().run(served)
    m.observe_step("heuristics", 1, 1)
    counted = "sluice_stage_samples_in_total"
    assert _value(m, counted, stage="scoring", transport="kafka") == 1
    assert _value(m, counted, stage="scoring", transport="grpc") == 2
    step = "sluice_step_samples_total"
    assert _value(m, step, stage="scoring", step="heuristics", outcome="in", transport="grpc") == 2
    assert _value(m, step, stage="scoring", step="heuristics", outcome="in", transport="kafka") == 1
