"""``sluice run`` with a generation stage after scoring: the kept samples of scoring are
distilled in process with the packaged model, dropped ones never reach it, and the report
has a line per stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gensim.test.utils import datapath
from pydantic import ValidationError

from services.local.runner import RunSettings, run_local

pytestmark = pytest.mark.slow


def test_scoring_then_distill(tmp_path: Path) -> None:
    lines = Path(datapath("lee_background.cor")).read_text(encoding="utf-8").splitlines()
    rows = [{"id": f"d{i}", "text": lines[i].strip()} for i in range(3)]
    rows.append({"id": "junk", "text": "buy now " * 40})
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    settings = RunSettings.model_validate(
        {
            "stages": ["scoring", "distill"],
            "scoring": {"steps": ["heuristics"]},
            "distill": {"generation": {"max_new_tokens": 6}, "model": {"max_tokens": 64}},
        }
    )
    report = run_local(corpus, tmp_path / "out", settings, progress=False)

    assert [s.name for s in report.steps] == ["heuristics", "distill"]
    heuristics, distill = report.steps
    assert heuristics.samples_in == 4 and distill.samples_in == heuristics.samples_kept
    kept = [json.loads(x) for x in (tmp_path / "out/kept.jsonl").read_text().splitlines()]
    assert {k["id"] for k in kept} <= {"d0", "d1", "d2"} and kept
    for k in kept:
        assert k["response"] and k["prompt"]  # the teacher answered the document
        assert "distill.topk" in k["metadata"]
    scores = [json.loads(x) for x in (tmp_path / "out/scores.jsonl").read_text().splitlines()]
    assert {s["id"] for s in scores} == {"d0", "d1", "d2", "junk"}
    assert next(s for s in scores if s["id"] == "junk")["reason"].startswith("heuristics:")


def test_stages_chain_in_the_order_given() -> None:
    """No fixed order: the list is the chain, as topics would chain on Kafka; a stage that
    would write a topic the pipeline already uses (a loop) is refused."""
    settings = RunSettings(stages=["distill", "rewrite"])  # type: ignore[arg-type]
    distill, rewrite = settings.stages
    assert distill.topics.input == settings.source == "sluice.scored"
    assert rewrite.topics.input == distill.topics.output == "sluice.distilled"
    assert settings.sinks == ["sluice.rewritten"]
    with pytest.raises(ValidationError, match="already in use"):
        RunSettings(stages=["distill", "scoring"])  # type: ignore[arg-type]
