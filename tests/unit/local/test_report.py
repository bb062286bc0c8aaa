"""The run report: score summaries, strict-JSON serialisation, and the files write_report makes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest

from services.local.report import RunReport, StepReport, summarize_scores, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _report(out_dir: Path, *, by_label: bool = True) -> RunReport:
    steps = [
        StepReport(
            name="heuristics",
            samples_in=400,
            samples_kept=330,
            tokens_in=80_000,
            tokens_kept=72_000,
            drop_reasons={"heuristics:min_words": 12, "heuristics:symbol_ratio": 58},
            seconds=0.4,
        ),
        StepReport(
            name="perplexity",
            samples_in=330,
            samples_kept=300,
            tokens_in=72_000,
            tokens_kept=70_000,
            drop_reasons={"perplexity:above_threshold": 30},
            seconds=12.5,
        ),
    ]
    labels = {
        "real": {"in": 300, "kept": 295},
        "junk:spam": {"in": 50, "kept": 0},
        "junk:shuffled": {"in": 50, "kept": 5},
    }
    return RunReport(
        input="/data/demo.jsonl",
        output_dir=str(out_dir),
        samples_in=400,
        samples_kept=300,
        steps=steps,
        scores={
            "perplexity": summarize_scores([10.0, 20.0, float("nan"), 30.0]),
            "never_scored": summarize_scores([]),
        },
        by_label=labels if by_label else {},
        model_version="test-model@0",
        seconds=13.0,
        started_at="2025-01-01T00:00:00+00:00",
        settings={"perplexity": {"max": 1000.0}, "steps": ["heuristics", "perplexity"]},
    )


def test_summarize_scores_known_values() -> None:
    summary = summarize_scores([float(v) for v in range(1, 11)])
    assert summary == pytest.approx(
        {"count": 10, "mean": 5.5, "p10": 1.9, "p50": 5.5, "p90": 9.1, "min": 1.0, "max": 10.0}
    )


def test_summarize_scores_ignores_nan() -> None:
    summary = summarize_scores([float("nan"), 2.0, 4.0, float("nan")])
    assert summary["count"] == 2
    assert summary["mean"] == 3.0
    assert (summary["min"], summary["max"]) == (2.0, 4.0)


@pytest.mark.parametrize("values", [[], [float("nan")]])
def test_summarize_scores_empty_has_no_fake_statistics(values: list[float]) -> None:
    summary = summarize_scores(values)
    assert summary["count"] == 0
    assert all(math.isnan(v) for k, v in summary.items() if k != "count")


def test_step_retention() -> None:
    step = StepReport("s", 10, 4, 100, 50, {}, 0.0)
    assert step.retention == 0.4
    assert step.token_retention == 0.5
    assert StepReport("s", 0, 0, 0, 0, {}, 0.0).retention == 1.0


def test_to_dict_is_strict_json(tmp_path: Path) -> None:
    report = _report(tmp_path)
    data = report.to_dict()
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text) == data
    assert data["retention"] == 0.75
    assert data["steps"][0]["retention"] == pytest.approx(330 / 400)
    assert data["scores"]["never_scored"]["count"] == 0
    assert data["scores"]["never_scored"]["mean"] is None
    assert data["by_label"]["junk:spam"] == {"in": 50, "kept": 0}


@pytest.mark.parametrize("by_label", [True, False])
def test_write_report_creates_valid_json_and_png(tmp_path: Path, by_label: bool) -> None:
    report = _report(tmp_path, by_label=by_label)
    json_path, png_path = write_report(report, tmp_path / "out")
    assert (json_path.name, png_path.name) == ("report.json", "report.png")

    assert json.loads(json_path.read_text(encoding="utf-8")) == report.to_dict()

    raw = png_path.read_bytes()
    assert raw.startswith(PNG_SIGNATURE)
    image = matplotlib.image.imread(png_path)
    height, width = image.shape[:2]
    assert width > height > 300
    # Not a blank canvas: something was drawn.
    assert image.min() < image.max()


def test_write_report_handles_a_run_with_no_steps(tmp_path: Path) -> None:
    report = RunReport(
        input="empty.jsonl",
        output_dir=str(tmp_path),
        samples_in=0,
        samples_kept=0,
        steps=[],
        scores={},
        by_label={},
        model_version="",
        seconds=0.0,
        started_at="2025-01-01T00:00:00+00:00",
        settings={},
    )
    json_path, png_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text(encoding="utf-8"))["retention"] == 1.0
    assert png_path.read_bytes().startswith(PNG_SIGNATURE)
