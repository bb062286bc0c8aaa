"""The model_version label: which version decides now, per stage."""

from __future__ import annotations

from services.runtime.metrics import StageMetrics


def test_model_info_marks_the_current_version_only() -> None:
    m = StageMetrics("scoring")
    m.set_model_version("classifier:quality-aaa")
    m.set_model_version("classifier:quality-bbb")
    get = m.registry.get_sample_value
    assert (
        get(
            "sluice_stage_model_info",
            {"stage": "scoring", "model_version": "classifier:quality-bbb"},
        )
        == 1
    )
    assert (
        get(
            "sluice_stage_model_info",
            {"stage": "scoring", "model_version": "classifier:quality-aaa"},
        )
        == 0
    )
