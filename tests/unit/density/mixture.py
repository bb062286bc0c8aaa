"""Synthetic embeddings for density tests: one big cluster and several small ones."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.runtime.domain import Sample


@dataclass
class Mixture:
    vectors: np.ndarray
    """(N, dim) float32, unit norm."""
    labels: np.ndarray
    """Cluster of each row: 0 = the big cluster, 1.. = the small ones."""

    def samples(self, prefix: str = "s") -> list[Sample]:
        return [
            Sample(id=f"{prefix}{i:05d}", embedding=[float(v) for v in row], source=f"c{lab}")
            for i, (row, lab) in enumerate(zip(self.vectors, self.labels, strict=True))
        ]

    @property
    def small(self) -> np.ndarray:
        return self.labels > 0


def mixture(
    seed: int = 0,
    dim: int = 384,
    big: int = 800,
    small: tuple[int, ...] = (50, 50, 50, 50),
    spread: float = 0.3,
) -> Mixture:
    """Tight clusters around random directions (unrelated directions are ~sqrt(2) apart,
    points within a cluster ~spread * sqrt(2)), shuffled."""
    rng = np.random.default_rng(seed)
    sizes = (big, *small)
    centers = rng.standard_normal((len(sizes), dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    rows, labels = [], []
    for k, size in enumerate(sizes):
        noise = rng.standard_normal((size, dim)) * (spread / np.sqrt(dim))
        rows.append(centers[k] + noise)
        labels.append(np.full(size, k))
    x = np.concatenate(rows)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(len(x))
    return Mixture(x[order].astype(np.float32), np.concatenate(labels)[order])
