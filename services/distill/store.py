"""Content-addressed top-k payloads in the object store (services.runtime.objectstore).

Objects are named by the SHA-256 of their bytes: writing the same payload twice (a
redelivered Kafka batch) writes the same object, so at-least-once delivery leaves no
orphans behind, and a reader can verify what it fetched.
"""

from __future__ import annotations

import hashlib

from minio import Minio

from services.distill.core import DistillCore
from services.distill.settings import DistillSettings, S3Settings
from services.runtime.metrics import StageMetrics
from services.runtime.objectstore import ObjectStore, parse_uri

__all__ = ["S3ObjectStore", "build_core", "parse_uri"]


class S3ObjectStore:
    """``codec.ObjectStore`` on one bucket of an S3-compatible endpoint."""

    def __init__(self, settings: S3Settings, client: Minio | None = None) -> None:
        self.settings = settings
        self.objects = ObjectStore(settings, client)

    @property
    def client(self) -> Minio:
        return self.objects.client

    def put(self, data: bytes) -> str:
        key = f"{self.settings.prefix}{hashlib.sha256(data).hexdigest()}.stk"
        return self.objects.put(key, data, content_type="application/x-sluice-topk")

    def get(self, uri: str) -> bytes:
        return self.objects.get_uri(uri)


def build_core(settings: DistillSettings, metrics: StageMetrics | None = None) -> DistillCore:
    """The registry's core factory: the core with its object store (when one is
    configured); the model loads lazily."""
    s3 = settings.topk_store.s3
    return DistillCore(settings, store=S3ObjectStore(s3) if s3.enabled else None, metrics=metrics)
