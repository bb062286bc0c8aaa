"""Record what a local run did, as report.json for tools and report.png for people.

The JSON is the reproducibility record (settings, model version, per-step counts, score
distributions); the PNG answers "what did curation remove, and was it the junk?" at a glance.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

_KEPT_COLOR = "#2e7d32"
_IN_COLOR = "#b0bec5"
_DROP_COLOR = "#c62828"
_TOP_REASONS = 15


@dataclass
class StepReport:
    """One pipeline step's effect. Counts are the step's own input, not the run's input."""

    name: str
    samples_in: int
    samples_kept: int
    tokens_in: int
    tokens_kept: int
    drop_reasons: dict[str, int]
    seconds: float

    @property
    def retention(self) -> float:
        """Fraction of samples kept; 1.0 for an empty input, since nothing was thrown away."""
        return _ratio(self.samples_kept, self.samples_in)

    @property
    def token_retention(self) -> float:
        """Fraction of tokens kept: differs from ``retention`` when drops skew long or short."""
        return _ratio(self.tokens_kept, self.tokens_in)


@dataclass
class RunReport:
    """Everything needed to judge and reproduce one local run."""

    input: str
    output_dir: str
    samples_in: int
    samples_kept: int
    steps: list[StepReport]
    scores: dict[str, dict[str, float]]
    """Signal name -> ``summarize_scores`` output."""
    by_label: dict[str, dict[str, int]]
    """Metadata ``kind`` -> {"in", "kept"}; empty when the input carries no labels."""
    model_version: str
    seconds: float
    started_at: str
    """ISO-8601, UTC."""
    settings: dict[str, Any]
    """Effective settings, JSON-ready (pydantic: ``model_dump(mode="json")``), to rerun alike."""

    @property
    def retention(self) -> float:
        """Fraction of the run's input that reached the output."""
        return _ratio(self.samples_kept, self.samples_in)

    def to_dict(self) -> dict[str, Any]:
        """Plain, strict-JSON data: derived retentions included, non-finite floats as null.

        Strict JSON matters because report.json is read by jq, browsers and other languages,
        none of which accept Python's ``NaN``/``Infinity`` tokens.
        """
        data = asdict(self)
        data["retention"] = self.retention
        for step_dict, step in zip(data["steps"], self.steps, strict=True):
            step_dict["retention"] = step.retention
            step_dict["token_retention"] = step.token_retention
        return _strict_json(data)


def _ratio(kept: int, total: int) -> float:
    return kept / total if total else 1.0


def _strict_json(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    return value


def summarize_scores(values: Sequence[float]) -> dict[str, float]:
    """Distribution of one signal. NaNs (a scorer that could not score) are left out.

    An empty or all-NaN input gives ``count`` 0 and NaN statistics, which ``to_dict`` writes
    as null: a missing distribution must not look like a distribution of zeros.
    """
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return {"count": 0} | dict.fromkeys(("mean", "p10", "p50", "p90", "min", "max"), math.nan)
    p10, p50, p90 = (float(p) for p in np.percentile(arr, [10, 50, 90]))
    return {
        "count": int(arr.size),
        "mean": float(arr.mean()),
        "p10": p10,
        "p50": p50,
        "p90": p90,
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


def write_report(report: RunReport, out_dir: Path) -> tuple[Path, Path]:
    """Write report.json and report.png into ``out_dir`` (created if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    png_path = out_dir / "report.png"
    json_path.write_text(
        json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    _render_png(report, png_path)
    return json_path, png_path


def _render_png(report: RunReport, path: Path) -> None:
    # A bare Figure renders through Agg without pyplot, so no global backend or figure
    # registry is touched and nothing leaks between runs or threads.
    panels = 3 if report.by_label else 2
    fig = Figure(figsize=(6.2 * panels, 5.8), layout="constrained", dpi=110)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    _plot_steps(axes[0], report.steps)
    _plot_drop_reasons(axes[1], report.steps)
    if report.by_label:
        _plot_labels(axes[2], report.by_label)
    fig.suptitle(
        f"Sluice run: kept {report.samples_kept:,} of {report.samples_in:,} samples "
        f"({report.retention:.1%})  ·  {Path(report.input).name}  ·  {report.seconds:.1f}s",
        fontsize=14,
        fontweight="bold",
    )
    fig.savefig(path, format="png")


def _empty(ax: Axes, title: str, message: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_axis_off()


def _plot_steps(ax: Axes, steps: Sequence[StepReport]) -> None:
    title = "Samples per step"
    if not steps:
        _empty(ax, title, "no steps ran")
        return
    x = np.arange(len(steps))
    width = 0.38
    ins = [s.samples_in for s in steps]
    kept = [s.samples_kept for s in steps]
    ax.bar(x - width / 2, ins, width, label="in", color=_IN_COLOR)
    ax.bar(x + width / 2, kept, width, label="kept", color=_KEPT_COLOR)
    top = max(max(ins), 1)
    # Centred over the pair, above the taller "in" bar, so the text never covers a bar.
    for xi, step in zip(x, steps, strict=True):
        ax.annotate(
            f"{step.retention:.0%}\n({step.token_retention:.0%} tok)",
            (float(xi), step.samples_in),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_ylim(0, top * 1.25)
    ax.set_xticks(x, [s.name for s in steps], rotation=20 if len(steps) > 4 else 0)
    ax.set_ylabel("samples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.set_title(f"{title} (kept %, token kept %)")
    ax.legend(loc="upper right", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)


def _plot_drop_reasons(ax: Axes, steps: Sequence[StepReport]) -> None:
    title = f"Drop reasons (top {_TOP_REASONS})"
    reasons: Counter[str] = Counter()
    for step in steps:
        reasons.update(step.drop_reasons)
    top = [(r, n) for r, n in reasons.most_common(_TOP_REASONS) if n > 0]
    if not top:
        _empty(ax, title, "nothing was dropped")
        return
    labels = [_shorten(r) for r, _ in reversed(top)]
    counts = [n for _, n in reversed(top)]
    bars = ax.barh(range(len(labels)), counts, height=0.6, color=_DROP_COLOR)
    ax.set_yticks(range(len(labels)), labels)
    ax.bar_label(bars, padding=3, fontsize=9)
    ax.set_xlim(0, max(counts) * 1.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.set_xlabel("samples dropped")
    ax.set_title(title)
    ax.tick_params(axis="y", labelsize=9)
    ax.spines[["top", "right"]].set_visible(False)


def _shorten(label: str, limit: int = 40) -> str:
    # Long reasons would squeeze the bars to nothing under constrained layout.
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _plot_labels(ax: Axes, by_label: dict[str, dict[str, int]]) -> None:
    # "real" first, then the junk types: the reader compares real against each junk type.
    names = sorted(by_label, key=lambda k: (k != "real", k))
    fractions = [_ratio(by_label[k].get("kept", 0), by_label[k].get("in", 0)) for k in names]
    colors = [_KEPT_COLOR if k == "real" else _DROP_COLOR for k in names]
    y = np.arange(len(names))[::-1]
    bars = ax.barh(y, fractions, height=0.6, color=colors)
    ax.bar_label(
        bars,
        labels=[
            f"{f:.0%}  ({by_label[k].get('kept', 0)}/{by_label[k].get('in', 0)})"
            for k, f in zip(names, fractions, strict=True)
        ],
        padding=3,
        fontsize=9,
    )
    ax.set_yticks(y, names)
    ax.set_xlim(0, 1.3)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0], ["0%", "25%", "50%", "75%", "100%"])
    ax.set_xlabel("fraction kept")
    ax.set_title("Kept per label (real should stay, junk should go)")
    ax.spines[["top", "right"]].set_visible(False)
