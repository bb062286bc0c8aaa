"""The coverage benchmark's corpus: real text of seven domains, from files that ship in packages.

No dataset can be downloaded here, so every domain is text already installed with this
project's dependencies or Python itself. Domain sizes are skewed on purpose (from ~1,200
paragraphs down to ~20 sentences), like a crawl where a few sources dominate:

- ``package-docs``: prose paragraphs of the installed packages' descriptions (the
  ``METADATA`` of every ``*.dist-info``), code-like paragraphs left out.
- ``python-reference``: the Python language reference (``pydoc_data.topics``, stdlib).
- ``news``: the Lee news corpus gensim ships (the ``sluice demo`` corpus's real text).
- ``dialogue``: the English conversations of ``chatterbot-corpus`` (question-answer pairs
  and short chats: tech support, trivia, coding, small talk), one conversation per text.
- ``movie-reviews``: Pang & Lee polarity sentences (gensim test data), labels stripped.
- ``licences``: paragraphs of the installed packages' licence files (a fixed subset).
- ``russian-fiction``: sentences of the opening of Crime and Punishment (gensim test data).

The first two domains and the licences come from whatever is installed in the environment,
so they move when packages are added or upgraded (the bench prints each domain's size).

Embeddings (the packaged all-MiniLM-L6-v2) are cached per text set and model under
``~/.cache/sluice/bench`` (``SLUICE_BENCH_CACHE``), so reruns skip the ~2 min of encoding.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CODE_LIKE = re.compile(r"[{}=<>|]|\$ |```|\.\. |::")


@dataclass(frozen=True)
class Corpus:
    """Texts with their domain label, domain names in order of size (largest first)."""

    texts: list[str]
    labels: np.ndarray
    domains: list[str]

    def sizes(self) -> list[int]:
        return [int((self.labels == d).sum()) for d in range(len(self.domains))]


def _paragraphs(text: str, min_words: int) -> list[str]:
    out = []
    for p in re.split(r"\n\s*\n", text):
        flat = " ".join(p.split())
        if len(flat.split()) >= min_words:
            out.append(flat)
    return out


def _unique(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def _site_packages() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise RuntimeError("bench.coverage needs gensim (a dependency of the demo corpus)")
    return Path(spec.origin).parent.parent


def _gensim_file(name: str) -> Path:
    return _site_packages() / "gensim" / "test" / "test_data" / name


def package_docs() -> list[str]:
    texts = []
    for meta in sorted(glob.glob(str(_site_packages() / "*.dist-info" / "METADATA"))):
        body = Path(meta).read_text(encoding="utf-8", errors="replace").split("\n\n", 1)[-1]
        texts += [p for p in _paragraphs(body, 25) if not _CODE_LIKE.search(p)]
    return _unique(texts)


def python_reference() -> list[str]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return _unique([p for key in sorted(topics) for p in _paragraphs(topics[key], 25)])


def news() -> list[str]:
    lines = _gensim_file("lee_background.cor").read_text(encoding="utf-8").splitlines()
    return _unique([" ".join(line.split()) for line in lines if line.strip()])


def movie_reviews() -> list[str]:
    raw = _gensim_file("pang_lee_polarity.cor").read_bytes().decode("cp1252", errors="replace")
    lines = raw.splitlines()
    return _unique([re.sub(r"^__label__\w+\s*", "", line).strip() for line in lines if line])


def licences(limit: int = 60, seed: int = 0) -> list[str]:
    files = glob.glob(str(_site_packages() / "*.dist-info" / "**" / "LICEN[CS]E*"), recursive=True)
    texts = []
    for f in sorted(f for f in files if Path(f).is_file()):
        texts += _paragraphs(Path(f).read_text(encoding="utf-8", errors="replace"), 20)
    unique = _unique(texts)
    random.Random(seed).shuffle(unique)
    return sorted(unique[:limit])


def dialogue() -> list[str]:
    """The English conversations of chatterbot-corpus, turns joined, one text each."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise RuntimeError("bench.coverage needs chatterbot-corpus (a project dependency)")
    texts = []
    for f in sorted((Path(spec.origin).parent / "data" / "english").glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for turns in doc.get("conversations") or []:
            texts.append(" ".join(" ".join(str(t).split()) for t in turns))
    return _unique([t for t in texts if t])


def russian_fiction() -> list[str]:
    text = _gensim_file("crime-and-punishment.txt").read_text(encoding="utf-8")
    flat = " ".join(text.split())
    return _unique([s for s in _SENTENCE_END.split(flat) if len(s.split()) >= 5])


DOMAINS = {
    "package-docs": package_docs,
    "python-reference": python_reference,
    "news": news,
    "dialogue": dialogue,
    "movie-reviews": movie_reviews,
    "licences": licences,
    "russian-fiction": russian_fiction,
}


def build_corpus() -> Corpus:
    """Every domain's texts, a text that occurs in two domains kept in the first only."""
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    found = {name: make() for name, make in DOMAINS.items()}
    names = sorted(found, key=lambda n: -len(found[n]))
    for d, name in enumerate(names):
        for t in found[name]:
            if t not in seen:
                seen.add(t)
                texts.append(t)
                labels.append(d)
    return Corpus(texts, np.array(labels), names)


def cache_dir() -> Path:
    return Path(os.environ.get("SLUICE_BENCH_CACHE", "~/.cache/sluice/bench")).expanduser()


def embed(texts: list[str], model: str, dtype: str, max_tokens: int) -> np.ndarray:
    """(N, dim) unit vectors of ``texts``, from the cache when the same set was embedded."""
    key = hashlib.blake2b(digest_size=12)
    for part in (model, dtype, str(max_tokens), *texts):
        key.update(part.encode())
        key.update(b"\x00")
    path = cache_dir() / f"coverage-{key.hexdigest()}.npy"
    if path.is_file():
        return np.load(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from services.runtime.backends.embeddings import EmbeddingSettings, create_embedder

    settings = EmbeddingSettings(model=model, dtype=dtype, max_tokens=max_tokens)  # type: ignore[arg-type]
    vectors = create_embedder(settings).embed(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(path)
    return vectors


if __name__ == "__main__":
    corpus = build_corpus()
    print(dict(zip(corpus.domains, corpus.sizes(), strict=True)))
