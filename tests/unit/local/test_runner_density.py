"""``sluice run`` with the density stage: both passes in process over what scoring kept,
with the real packaged embedding model. A story repeated many times (near-duplicates) is
thinned far more than the distinct news articles around it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from gensim.test.utils import datapath
from pydantic import ValidationError

from services.density.core import REASON_SUBSAMPLED, SCORE_WEIGHT
from services.local.runner import RunSettings, run_local
from services.runtime.errors import ConfigError

N_DISTINCT = 36
N_COPIES = 54


def _corpus(path: Path) -> None:
    lines = Path(datapath("lee_background.cor")).read_text(encoding="utf-8").splitlines()
    # The first sentences of each article: enough words for the rules, short to embed.
    firsts = [" ".join(re.split(r"(?<=\.)\s+", line.strip())[:3]) for line in lines]
    docs = [d for d in firsts if len(d.split()) >= 50 and d.endswith(".")][: N_DISTINCT + 1]
    assert len(docs) == N_DISTINCT + 1
    rows: list[dict[str, object]] = [{"id": f"news-{i}", "text": d} for i, d in enumerate(docs[1:])]
    rows += [{"id": f"copy-{i}", "text": f"Mirror {i}: {docs[0]}"} for i in range(N_COPIES)]
    rows.append({"id": "bad-vec", "text": docs[1], "embedding": ["x"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_run_with_density_thins_near_duplicates(tmp_path: Path) -> None:
    corpus = tmp_path / "in.jsonl"
    _corpus(corpus)
    settings = RunSettings.model_validate(
        {
            "stages": ["scoring", "density"],
            "scoring": {"steps": ["heuristics"]},
            "density": {"target_rate": 0.4, "seed": 3, "embedding": {"dtype": "auto"}},
            "batch_size": 16,
        }
    )
    report = run_local(corpus, tmp_path / "out", settings, progress=False)

    step = {s.name: s for s in report.steps}
    assert step["input"].drop_reasons == {"input:embedding_not_a_list_of_numbers": 1}
    density = step["density"]
    assert step["heuristics"].samples_kept == N_DISTINCT + N_COPIES  # real prose passes
    assert density.samples_in == step["heuristics"].samples_kept
    assert report.samples_kept == density.samples_kept
    assert abs(density.samples_kept / density.samples_in - 0.4) < 0.15
    assert set(density.drop_reasons) == {REASON_SUBSAMPLED}

    rows = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").open()]
    final = {r["id"]: r for r in rows}
    kept_copies = sum(final[f"copy-{i}"]["kept"] for i in range(N_COPIES))
    kept_news = sum(final[f"news-{i}"]["kept"] for i in range(N_DISTINCT))
    assert kept_copies / N_COPIES < 0.5 * kept_news / N_DISTINCT
    kept_rows = [json.loads(line) for line in (tmp_path / "out" / "kept.jsonl").open()]
    assert len(kept_rows) == report.samples_kept
    assert all(r["scores"][SCORE_WEIGHT] >= 1 for r in kept_rows)


def test_density_alone_runs_density_only(tmp_path: Path) -> None:
    """``stages: [density]`` applies no scoring rule: junk that heuristics would drop reaches
    density, and the report has no heuristics line (precomputed embeddings: no model)."""
    rng = np.random.default_rng(0)
    rows = [
        {"id": f"v{i}", "text": "buy now " * 3, "embedding": rng.normal(size=8).tolist()}
        for i in range(60)
    ]
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    settings = RunSettings.model_validate(
        {"stages": ["density"], "density": {"target_rate": 0.5, "sketch": {"dim": 8}}}
    )
    report = run_local(corpus, tmp_path / "out", settings, progress=False)

    assert [s.name for s in report.steps] == ["density"]
    density = report.steps[0]
    assert density.samples_in == 60 and 0 < density.samples_kept < 60
    assert set(density.drop_reasons) == {REASON_SUBSAMPLED}
    assert report.model_version.startswith("density=")


def test_unknown_stage_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="known: scoring"):
        RunSettings(stages=["scoring", "dedupe"])  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="does not run"):
        RunSettings.model_validate({"stages": ["scoring"], "density": {"seed": 1}})
