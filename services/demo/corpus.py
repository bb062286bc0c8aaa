"""Build the `sluice demo` corpus: 300 real news documents plus labelled, deterministic junk.

The demo has to show curation working without a network or a dataset download, so the real
text is the Lee news corpus that gensim ships, and the junk is manufactured here from that
text and small word lists. Every record carries its ``kind`` so a run report can show, per
kind, how much curation kept: real text should survive, each junk type should not.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REAL_SOURCE = "gensim:lee_background"
JUNK_SOURCE = "demo:junk"
JUNK_TYPES: tuple[str, ...] = ("shuffled", "spam", "navigation", "gibberish", "repeated")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

_PROMOS: tuple[str, ...] = (
    "BUY NOW!!!",
    "$$$ CHEAP $$$",
    "CLICK HERE",
    "100% FREE",
    "LIMITED TIME OFFER!!!",
    "ACT NOW",
    "WIN $1,000 CASH",
    "BEST PRICES GUARANTEED",
    "NO CREDIT CHECK",
    "LOSE 10 KG IN 7 DAYS",
    "MAKE $$$ FROM HOME",
    "HOT DEALS >>>",
    "*** EXCLUSIVE BONUS ***",
    "Don't miss out!!!",
    "Order today, ships tomorrow",
    "VISIT www.best-deals-4u.example NOW",
    "call 1-800-555-0199",
    "50% OFF EVERYTHING",
    "risk free!!!",
    "Only 3 left in stock!!!",
    "Congratulations, you have been selected!",
    "Claim your prize >>>",
    "click here click here",
    "FREE SHIPPING $$$",
)
_PRODUCTS: tuple[str, ...] = (
    "watches",
    "pills",
    "loans",
    "sneakers",
    "phones",
    "crypto coins",
    "sunglasses",
    "handbags",
    "software",
    "followers",
)
_SPAM_SYMBOLS: tuple[str, ...] = ("$$$", "!!!", ">>>", "***", "###", "+++", "€€€", "%%%")

_NAV_LINES: tuple[str, ...] = (
    "Home | About Us | Contact",
    "Home | News | Sport | Weather | Business | Entertainment",
    "Login",
    "Login | Register",
    "Sign in to your account",
    "Skip to main content",
    "Menu",
    "Search...",
    "Privacy Policy",
    "Privacy Policy | Terms of Use | Cookie Settings",
    "Terms and Conditions",
    "Sitemap",
    "Back to top",
    "Share this article: Facebook | Twitter | Email",
    "Follow us on Facebook | Twitter | Instagram | YouTube",
    "Subscribe to our newsletter",
    "Page 1 of 12 Next »",
    "« Previous | Next »",
    "Related articles",
    "Advertisement",
    "Careers | Advertise with us | Help",
    "We use cookies to improve your experience. By continuing to browse you agree to our "
    "use of cookies. Accept",
    "This site uses cookies. Manage preferences | Accept all | Reject all",
    "Accept cookies",
    "Powered by WordPress",
)
_SITE_NAMES: tuple[str, ...] = (
    "Daily Example Media",
    "Example News Group",
    "Metro Herald Online",
    "Coastal Times Digital",
    "Northside Press Ltd",
)
_KEYBOARD_ROWS: tuple[str, ...] = ("qwertyuiop", "asdfghjkl;", "zxcvbnm,./", "1234567890")


@dataclass(frozen=True)
class DemoRecord:
    """One demo document. ``kind`` ("real" or "junk:<type>") is the ground truth a report uses."""

    id: str
    text: str
    source: str
    kind: str


@cache
def _lee_documents() -> tuple[str, ...]:
    # Imported here: gensim pulls in scipy, which callers that only need DemoRecord should
    # not pay for.
    from gensim.test.utils import datapath

    lines = Path(datapath("lee_background.cor")).read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def _shuffled(rng: random.Random, docs: Sequence[str]) -> str:
    words = rng.choice(docs).split()
    rng.shuffle(words)
    return " ".join(words)


def _spam(rng: random.Random, docs: Sequence[str]) -> str:
    product = rng.choice(_PRODUCTS)
    hook = f"CHEAP {product.upper()} {rng.choice(_SPAM_SYMBOLS)}"
    parts: list[str] = []
    for _ in range(rng.randint(12, 30)):
        roll = rng.random()
        if roll < 0.2:
            parts.append(hook)
        elif roll < 0.3:
            parts.append(rng.choice(_SPAM_SYMBOLS) * rng.randint(1, 3))
        elif roll < 0.4:
            parts.append(f"best {product} best {product}")
        else:
            parts.append(rng.choice(_PROMOS))
    return " ".join([hook, *parts, "CLICK HERE", "100% FREE"])


def _navigation(rng: random.Random, docs: Sequence[str]) -> str:
    lines = rng.sample(_NAV_LINES, rng.randint(6, 14))
    site = rng.choice(_SITE_NAMES)
    year = rng.randint(2001, 2024)
    lines.append(f"© {year} {site}. All rights reserved.")
    if rng.random() < 0.5:
        lines.insert(0, "Home | About Us | Contact")
    return "\n".join(lines)


def _gibberish(rng: random.Random, docs: Sequence[str]) -> str:
    tokens: list[str] = []
    for _ in range(rng.randint(30, 120)):
        roll = rng.random()
        if roll < 0.6:
            tokens.append("".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 12))))
        elif roll < 0.9:
            row = rng.choice(_KEYBOARD_ROWS)
            start = rng.randrange(len(row) - 3)
            tokens.append(row[start : start + rng.randint(3, len(row) - start)])
        else:
            tokens.append(rng.choice(string.ascii_letters) * rng.randint(3, 9))
    return " ".join(tokens)


def _repeated(rng: random.Random, docs: Sequence[str]) -> str:
    doc = rng.choice(docs)
    sentences = [s for s in _SENTENCE_END.split(doc) if 6 <= len(s.split()) <= 40]
    sentence = rng.choice(sentences) if sentences else " ".join(doc.split()[:20])
    return " ".join([sentence] * rng.randint(8, 25))


_GENERATORS: dict[str, Callable[[random.Random, Sequence[str]], str]] = {
    "shuffled": _shuffled,
    "spam": _spam,
    "navigation": _navigation,
    "gibberish": _gibberish,
    "repeated": _repeated,
}


def build_demo_corpus(seed: int = 0, junk_fraction: float = 0.25) -> list[DemoRecord]:
    """All 300 real documents plus enough junk that junk is ``junk_fraction`` of the total.

    Junk is split as evenly as possible across the types. Each type draws from its own
    generator seeded from ``seed`` and the type name (string seeds are hashed with SHA-512,
    not ``hash()``), so a seed gives the same corpus on every machine and every run.
    """
    if not 0.0 <= junk_fraction < 1.0:
        raise ValueError(f"junk_fraction must be in [0, 1), got {junk_fraction}")
    docs = _lee_documents()
    records = [
        DemoRecord(id=f"lee-{i:04d}", text=text, source=REAL_SOURCE, kind="real")
        for i, text in enumerate(docs)
    ]
    n_junk = round(len(docs) * junk_fraction / (1.0 - junk_fraction))
    per_type, extra = divmod(n_junk, len(JUNK_TYPES))
    for t, junk_type in enumerate(JUNK_TYPES):
        rng = random.Random(f"sluice-demo:{seed}:{junk_type}")
        generate = _GENERATORS[junk_type]
        for i in range(per_type + (1 if t < extra else 0)):
            records.append(
                DemoRecord(
                    id=f"junk-{junk_type}-{i:03d}",
                    text=generate(rng, docs),
                    source=JUNK_SOURCE,
                    kind=f"junk:{junk_type}",
                )
            )
    random.Random(f"sluice-demo:{seed}:order").shuffle(records)
    return records


def write_jsonl(records: Iterable[DemoRecord], path: Path) -> int:
    """Write records in the JSONL shape `sluice run` reads; ``kind`` rides in metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            line = {
                "id": record.id,
                "text": record.text,
                "source": record.source,
                "metadata": {"kind": record.kind},
            }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            count += 1
    return count
