"""The S3/MinIO object store for large top-k payloads (minio client).

Objects are named by the SHA-256 of their bytes: writing the same payload twice (a
redelivered Kafka batch) writes the same object, so at-least-once delivery leaves no
orphans behind, and a reader can verify what it fetched.
"""

from __future__ import annotations

import hashlib
import io

from minio import Minio
from minio.error import MinioException
from urllib3.exceptions import HTTPError

from services.distill.core import DistillCore
from services.distill.settings import DistillSettings, S3Settings
from services.runtime.errors import InvalidArgument, NotFound, Unavailable
from services.runtime.metrics import StageMetrics

SCHEME = "s3://"


class S3ObjectStore:
    """``ObjectStore`` on one bucket of an S3-compatible endpoint."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self._client = Minio(
            settings.endpoint,
            access_key=settings.access_key or None,
            secret_key=settings.secret_key.get_secret_value() or None,
            secure=settings.secure,
            region=settings.region,
        )

    @property
    def client(self) -> Minio:
        return self._client

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        key = f"{self.settings.prefix}{digest}.stk"
        try:
            self._client.put_object(
                self.settings.bucket,
                key,
                io.BytesIO(data),
                len(data),
                content_type="application/x-sluice-topk",
            )
        except (MinioException, HTTPError) as exc:
            raise Unavailable(f"object store put {self.settings.bucket}/{key}: {exc}") from exc
        return f"{SCHEME}{self.settings.bucket}/{key}"

    def get(self, uri: str) -> bytes:
        bucket, key = parse_uri(uri)
        try:
            response = self._client.get_object(bucket, key)
        except MinioException as exc:
            if getattr(exc, "code", "") in ("NoSuchKey", "NoSuchBucket"):
                raise NotFound(f"{uri} does not exist") from exc
            raise Unavailable(f"object store get {uri}: {exc}") from exc
        except HTTPError as exc:
            raise Unavailable(f"object store get {uri}: {exc}") from exc
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()


def build_core(settings: DistillSettings, metrics: StageMetrics | None = None) -> DistillCore:
    """The registry's core factory: the core with its object store (when one is
    configured); the model loads lazily."""
    s3 = settings.topk_store.s3
    return DistillCore(settings, store=S3ObjectStore(s3) if s3.endpoint else None, metrics=metrics)


def parse_uri(uri: str) -> tuple[str, str]:
    """('bucket', 'key') of 's3://bucket/key'."""
    bucket, _, key = uri.removeprefix(SCHEME).partition("/")
    if not uri.startswith(SCHEME) or not bucket or not key:
        raise InvalidArgument(f"not an s3://bucket/key URI: {uri!r}")
    return bucket, key
