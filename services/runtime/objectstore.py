"""The one S3-compatible object store client (MinIO, S3, Ceph) of every stage that keeps
objects: its settings block, credentials, connection policy and error mapping.

Stages hold what they store differently (density: sketch parts and merged versions under
a folder per sketch; distill: content-addressed top-k payloads), so each keeps a small
store of its own on top of ``ObjectStore``; how to reach the bucket and what a failure
means is decided here once. The chart wires one ``s3`` block into each stage's
``ObjectStoreSettings`` (registry ``object_store``: where it sits in the stage's settings).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import urllib3
from minio import Minio
from minio.credentials import ChainedProvider, EnvAWSProvider, EnvMinioProvider, StaticProvider
from minio.credentials.providers import Provider
from minio.error import InvalidResponseError, S3Error, ServerError
from pydantic import Field, SecretStr

from services.runtime.errors import ConfigError, InvalidArgument, NotFound, SluiceError, Unavailable
from services.runtime.settings import StrictModel

SCHEME = "s3://"
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NoSuchObject"}
_AUTH = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_PRECONDITION = {"PreconditionFailed", "ConditionalRequestConflict"}


class ObjectStoreSettings(StrictModel):
    """Where a stage's objects live. A stage subclasses it only to change the defaults of
    ``bucket`` and ``prefix`` (so an env override of one field keeps the others)."""

    endpoint: str = Field(
        "", description="host:port of the S3 API, e.g. 'minio:9000'; '' = no store."
    )
    bucket: str = Field("sluice", description="Bucket holding the objects.")
    prefix: str = Field("", description="Key prefix inside the bucket.")
    secure: bool = Field(True, description="HTTPS; false for an in-cluster plain-HTTP MinIO.")
    region: str = Field("us-east-1", description="Region the client signs requests for.")
    access_key: SecretStr | None = Field(
        None,
        description="Access key; unset = AWS_ACCESS_KEY_ID / MINIO_ACCESS_KEY from the "
        "environment (e.g. a Kubernetes Secret mounted as env).",
    )
    secret_key: SecretStr | None = Field(
        None, description="Secret key; unset = AWS_SECRET_ACCESS_KEY / MINIO_SECRET_KEY."
    )
    create_bucket: bool = Field(
        False, description="Create the bucket if missing (dev); production provisions it."
    )

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)


def credentials_provider(settings: ObjectStoreSettings) -> Provider:
    """Keys from settings, else from the environment (AWS_* or MINIO_* variables)."""
    access, secret = settings.access_key, settings.secret_key
    if access is not None and secret is not None and access.get_secret_value():
        return StaticProvider(access.get_secret_value(), secret.get_secret_value())
    return ChainedProvider([EnvAWSProvider(), EnvMinioProvider()])


def create_client(settings: ObjectStoreSettings) -> Minio:
    """A client with credentials checked now (a missing key is a ConfigError at start, not
    on the first upload), short connect and bounded retries on 5xx."""
    if not settings.enabled:
        raise ConfigError("no object store configured (endpoint is empty)")
    provider = credentials_provider(settings)
    try:
        provider.retrieve()
    except ValueError:
        raise ConfigError(
            "no object store credentials: set access_key/secret_key or "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        ) from None
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5.0, read=60.0),
        retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )
    return Minio(
        settings.endpoint,
        secure=settings.secure,
        region=settings.region,
        credentials=provider,
        http_client=http,
    )


class ObjectStore:
    """Bytes under keys of one bucket; every failure is a SluiceError."""

    def __init__(self, settings: ObjectStoreSettings, client: Minio | None = None) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.client = client or create_client(settings)
        if settings.create_bucket:
            self.ensure_bucket()

    def uri(self, key: str) -> str:
        return f"{SCHEME}{self.bucket}/{key}"

    def ensure_bucket(self) -> None:
        with s3_errors(f"bucket {self.bucket}"):
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)

    def exists(self, key: str) -> bool:
        try:
            with s3_errors(key):
                self.client.stat_object(self.bucket, key)
        except NotFound:
            return False
        return True

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Store ``data`` under ``key``; returns its s3:// URI."""
        with s3_errors(self.uri(key)):
            self.client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            )
        return self.uri(key)

    def put_if_absent(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> bool:
        """Store ``data`` under ``key`` only if no object is there (S3's conditional write,
        ``If-None-Match: *``): True if this call wrote it, False if one was there already.
        Of concurrent writers exactly one wins, so a value chosen once (density's pinned
        sketch width) is the same for every reader."""
        headers: dict[str, str | list[str] | tuple[str]] = {
            "Content-Type": content_type,
            "If-None-Match": "*",
        }
        try:
            with s3_errors(self.uri(key)):
                # minio's public put_object turns unknown headers into user metadata
                self.client._put_object(self.bucket, key, data, headers)
        except Unavailable as exc:
            if isinstance(exc.__cause__, S3Error) and exc.__cause__.code in _PRECONDITION:
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        """Remove ``key`` (no error if it is already gone)."""
        with s3_errors(self.uri(key)):
            self.client.remove_object(self.bucket, key)

    def put_json(self, key: str, obj: dict[str, Any]) -> str:
        data = json.dumps(obj, indent=1, sort_keys=True).encode()
        return self.put(key, data, content_type="application/json")

    def get(self, key: str, bucket: str | None = None) -> bytes:
        bucket = bucket or self.bucket
        with s3_errors(f"{SCHEME}{bucket}/{key}"):
            response = self.client.get_object(bucket, key)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

    def get_uri(self, uri: str) -> bytes:
        """The object an s3://bucket/key URI names (any bucket this client may read)."""
        bucket, key = parse_uri(uri)
        return self.get(key, bucket)

    def get_json(self, key: str) -> dict[str, Any]:
        try:
            obj = json.loads(self.get(key))
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{self.uri(key)} is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise InvalidArgument(f"{self.uri(key)} is not a JSON object")
        return obj

    def keys(self, prefix: str, recursive: bool = True) -> list[str]:
        """Keys under ``prefix`` (objects only)."""
        with s3_errors(self.uri(prefix)):
            return [
                str(o.object_name)
                for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=recursive)
                if o.object_name and not o.is_dir
            ]


def parse_uri(uri: str) -> tuple[str, str]:
    """('bucket', 'key') of 's3://bucket/key'."""
    bucket, _, key = uri.removeprefix(SCHEME).partition("/")
    if not uri.startswith(SCHEME) or not bucket or not key:
        raise InvalidArgument(f"not an s3://bucket/key URI: {uri!r}")
    return bucket, key


@contextmanager
def s3_errors(what: str) -> Iterator[None]:
    """Translate minio/urllib3 failures into the error hierarchy: a missing object is
    NotFound, refused credentials a ConfigError, anything else Unavailable (retryable)."""
    try:
        yield
    except SluiceError:
        raise
    except S3Error as exc:
        if exc.code in _NOT_FOUND:
            raise NotFound(f"{what}: {exc.code}") from exc
        if exc.code in _AUTH:
            raise ConfigError(f"{what}: object store refused the credentials ({exc.code})") from exc
        raise Unavailable(f"{what}: object store error {exc.code}: {exc.message}") from exc
    except (ServerError, InvalidResponseError, urllib3.exceptions.HTTPError, OSError) as exc:
        raise Unavailable(f"{what}: object store unreachable: {exc}") from exc
    except ValueError as exc:  # credential providers report missing keys so
        raise ConfigError(f"{what}: {exc}") from exc
