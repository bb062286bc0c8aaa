from __future__ import annotations

from prometheus_client import generate_latest

from services.runtime.domain import Outcome, Sample
from services.runtime.metrics import StageMetrics


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
    assert _value(m, "sluice_stage_samples_in_total", stage="scoring") == 3
    assert _value(m, "sluice_stage_samples_out_total", stage="scoring") == 1
    assert _value(m, "sluice_stage_tokens_in_total", stage="scoring") == 6
    assert _value(m, "sluice_stage_tokens_out_total", stage="scoring") == 3
    dropped = "sluice_stage_samples_dropped_total"
    assert _value(m, dropped, stage="scoring", reason="heuristics:min_words") == 1
    step = "sluice_step_samples_total"
    # heuristics sees 3 and keeps 2; ask_llm sees those 2 and keeps 1
    assert _value(m, step, stage="scoring", step="heuristics", outcome="in") == 3
    assert _value(m, step, stage="scoring", step="heuristics", outcome="kept") == 2
    assert _value(m, step, stage="scoring", step="ask_llm", outcome="in") == 2
    assert _value(m, step, stage="scoring", step="ask_llm", outcome="kept") == 1
    assert _value(m, "sluice_score_ask_llm_count", stage="scoring") == 2
    assert b"sluice_score_ask_llm_bucket" in generate_latest(m.registry)
