"""The replay's comparison report: retention per version, changed decisions, correlation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.runtime.errors import InvalidArgument
from services.runtime.replay import Decision, baseline_from_scores, compare, write_report


def _decisions(
    kept: list[bool], scores: list[float], key: str, version: str
) -> dict[str, Decision]:
    return {
        f"s{i}": Decision(k, {key: v}, version=version, text=f"text {i}")
        for i, (k, v) in enumerate(zip(kept, scores, strict=True))
    }


def test_compare_counts_changes_both_ways_and_correlates_scores(tmp_path: Path) -> None:
    base = _decisions(
        [True, True, False, False, True], [0.9, 0.8, 0.2, 0.1, 0.7], "ask_llm", "lm-1"
    )
    new = _decisions(
        [True, False, True, False, True], [0.95, 0.3, 0.6, 0.05, 0.8], "classifier", "c-2"
    )
    new["extra"] = Decision(True, {"classifier": 0.5})
    report = compare(base, new)
    assert report["versions"] == {"baseline": "lm-1", "replay": "c-2"}
    assert report["samples"] == 5 and report["only_in_replay"] == 1
    assert report["retention"] == {"baseline": 0.6, "replay": 0.6}
    assert report["agreement"] == pytest.approx(0.6)
    ch = report["changed"]
    assert (ch["kept_to_dropped"], ch["dropped_to_kept"]) == (1, 1)
    assert ch["examples"]["kept_to_dropped"][0]["id"] == "s1"
    assert ch["examples"]["dropped_to_kept"][0]["replay_score"] == 0.6
    sc = report["score_correlation"]
    assert (sc["baseline_score"], sc["replay_score"], sc["pairs"]) == ("ask_llm", "classifier", 5)
    assert sc["spearman"] == pytest.approx(0.7)  # ranks 5,4,2,1,3 vs 5,2,3,1,4: 1 - 6*6/120
    js, png = write_report(report, tmp_path)
    body = json.loads(js.read_text())
    assert "_scatter" not in body and body["changed"]["kept_to_dropped"] == 1
    assert png.stat().st_size > 5_000


def test_a_rules_only_baseline_is_compared_by_its_decisions(tmp_path: Path) -> None:
    scores = tmp_path / "scores.jsonl"
    rows = [
        {"id": "a", "kept": True, "scores": {}, "reason": ""},
        {"id": "b", "kept": False, "scores": {}, "reason": "heuristics:min_words"},
        {"id": "c", "kept": True, "scores": {}, "reason": ""},
        {"id": "x", "kept": False, "scores": {}, "reason": "input:bad_json"},
    ]
    scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = baseline_from_scores(scores)
    assert set(base) == {"a", "b", "c"}
    new = {k: Decision(True, {"classifier": v}) for k, v in (("a", 0.9), ("b", 0.2), ("c", 0.7))}
    report = compare(base, new, baseline_version="heuristics")
    assert report["score_correlation"]["baseline_score"] == "kept"
    assert report["score_correlation"]["auc_vs_baseline_decisions"] == 1.0
    assert report["changed"]["dropped_to_kept"] == 1
    with pytest.raises(InvalidArgument, match="no sample"):
        compare(base, {"zz": Decision(True, {})})
