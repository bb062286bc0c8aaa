"""The compact top-k payload a distilled sample carries, and where it is kept.

One payload per sample: the teacher's response token ids (int32), and for every response
position the k most likely token ids (int32) and their natural-log probabilities
(float16), zlib-compressed behind a fixed little-endian header::

    magic b"STK1" | uint32 T | uint16 k | uint8 codec (1 = zlib) | uint8 reserved
    zlib( tokens int32[T] | top_ids int32[T*k] | top_logprobs float16[T*k] )

At k = 8 that is ~7 bytes per response token before compression, ~5 after. Small
payloads ride inside the sample (base64 in ``metadata['distill.topk']``); larger ones
become S3 objects named by their SHA-256 (so a redelivered batch rewrites the same
object) with ``metadata['distill.topk_uri'] = 's3://bucket/key'``. ``load_topk`` reads
either form back.
"""

from __future__ import annotations

import base64
import binascii
import struct
import zlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.runtime.domain import Sample
from services.runtime.errors import InvalidArgument

MAGIC = b"STK1"
HEADER = struct.Struct("<4sIHBB")
CODEC_ZLIB = 1
TOPK_KEY = "distill.topk"
TOPK_URI_KEY = "distill.topk_uri"
FLOAT16_MIN = float(np.finfo(np.float16).min)


@dataclass(frozen=True, slots=True)
class TopK:
    """A teacher's response ids and its top-k distribution at each response position."""

    tokens: np.ndarray
    """(T,) int32: the response token ids."""
    top_ids: np.ndarray
    """(T, k) int32: the k most likely ids at each position, best first."""
    top_logprobs: np.ndarray
    """(T, k) float16: their natural-log probabilities."""

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[1])

    @classmethod
    def build(cls, tokens: list[int], top_ids: np.ndarray, top_logprobs: np.ndarray) -> TopK:
        """From a generation's arrays, cast to the stored dtypes (logprobs clipped to
        float16's range, so a vanishing probability is a large negative, never -inf)."""
        lp = np.clip(np.asarray(top_logprobs, dtype=np.float32), FLOAT16_MIN, 0.0)
        return cls(
            tokens=np.asarray(tokens, dtype=np.int32),
            top_ids=np.asarray(top_ids, dtype=np.int32),
            top_logprobs=lp.astype(np.float16),
        )


class ObjectStore(Protocol):
    """Where payloads too large to travel inline are kept (S3/MinIO in production)."""

    def put(self, data: bytes) -> str:
        """Stores ``data`` and returns its URI."""
        ...

    def get(self, uri: str) -> bytes: ...


def encode(topk: TopK) -> bytes:
    t, k = topk.top_ids.shape
    if topk.tokens.shape != (t,) or topk.top_logprobs.shape != (t, k):
        raise ValueError(
            f"shapes disagree: tokens {topk.tokens.shape}, ids {topk.top_ids.shape}, "
            f"logprobs {topk.top_logprobs.shape}"
        )
    body = b"".join(
        (
            topk.tokens.astype("<i4").tobytes(),
            topk.top_ids.astype("<i4").tobytes(),
            topk.top_logprobs.astype("<f2").tobytes(),
        )
    )
    return HEADER.pack(MAGIC, t, k, CODEC_ZLIB, 0) + zlib.compress(body, 6)


def decode(data: bytes) -> TopK:
    if len(data) < HEADER.size:
        raise InvalidArgument("top-k payload shorter than its header")
    magic, t, k, codec, _ = HEADER.unpack_from(data)
    if magic != MAGIC or codec != CODEC_ZLIB:
        raise InvalidArgument(f"not a top-k payload (magic {magic!r}, codec {codec})")
    sizes = (4 * t, 4 * t * k, 2 * t * k)
    inflate = zlib.decompressobj()
    try:  # bounded: a corrupt or hostile payload cannot inflate past what the header says
        body = inflate.decompress(data[HEADER.size :], sum(sizes) + 1)
    except zlib.error as exc:
        raise InvalidArgument(f"corrupt top-k payload: {exc}") from None
    if len(body) != sum(sizes) or not inflate.eof:
        raise InvalidArgument(f"top-k payload does not hold the {sum(sizes)} bytes its header says")
    tokens = np.frombuffer(body, "<i4", t, 0).astype(np.int32)
    ids = np.frombuffer(body, "<i4", t * k, sizes[0]).astype(np.int32).reshape(t, k)
    lps = np.frombuffer(body, "<f2", t * k, sizes[0] + sizes[1]).astype(np.float16)
    return TopK(tokens=tokens, top_ids=ids, top_logprobs=lps.reshape(t, k))


def attach(
    sample: Sample, payload: bytes, inline_max_bytes: int, store: ObjectStore | None
) -> None:
    """Put ``payload`` on ``sample``: inline when small enough or when there is no store,
    else as an object referenced by URI."""
    sample.metadata.pop(TOPK_KEY, None)
    sample.metadata.pop(TOPK_URI_KEY, None)
    if store is None or len(payload) <= inline_max_bytes:
        sample.metadata[TOPK_KEY] = base64.b64encode(payload).decode("ascii")
    else:
        sample.metadata[TOPK_URI_KEY] = store.put(payload)


def load_topk(sample: Sample, store: ObjectStore | None = None) -> TopK:
    """The payload a distilled sample carries, inline or in the object store."""
    inline = sample.metadata.get(TOPK_KEY)
    if inline is not None:
        try:
            return decode(base64.b64decode(inline, validate=True))
        except binascii.Error as exc:
            raise InvalidArgument(f"sample {sample.id!r}: bad base64 top-k: {exc}") from None
    uri = sample.metadata.get(TOPK_URI_KEY)
    if uri is None:
        raise InvalidArgument(f"sample {sample.id!r} carries no top-k payload")
    if store is None:
        raise InvalidArgument(f"sample {sample.id!r} references {uri}; no object store given")
    return decode(store.get(uri))
