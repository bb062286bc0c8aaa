"""Sketches in an S3-compatible object store (MinIO, S3), on the ``minio`` client.

Layout under ``<bucket>/<prefix>/<name>/<fingerprint>/`` (the fingerprint of the sketch
parameters and seed, so sketches that cannot merge never share a folder)::

    v<version>/parts/<worker-id>.sketch    pass 1: one worker's partition sketch
    v<version>/parts/<worker-id>.calib     its calibration sample (bottom-k, npz)
    v<version>/parts/<worker-id>.json      its metadata; written last: the part's commit
    v<version>.sketch                      the merge of every part
    v<version>.calib                       the merged calibration sample
    v<version>.json                        the manifest (params, n, parts, embedding
                                           model); written last: the version's commit

A reader only trusts objects whose ``.json`` exists, so a worker that dies mid-upload
leaves nothing that anyone reads. Merged versions are immutable unless overwritten on
purpose (``overwrite=True``): pass-2 workers may be reading them.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import urllib3
from minio import Minio
from minio.credentials import ChainedProvider, EnvAWSProvider, EnvMinioProvider, StaticProvider
from minio.credentials.providers import Provider
from minio.error import InvalidResponseError, S3Error, ServerError

from services.density.settings import StoreSettings
from services.density.sketch import RaceSketch, SketchParams
from services.density.state import CalibrationSample, PartInfo, SketchState, combine
from services.runtime.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SluiceError,
    Unavailable,
)

log = logging.getLogger(__name__)

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NoSuchObject"}
_AUTH = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_VERSION = re.compile(r"/v(\d+)\.json$")


def credentials_provider(settings: StoreSettings) -> Provider:
    """Keys from settings, else from the environment (AWS_* or MINIO_* variables)."""
    if settings.access_key is not None and settings.secret_key is not None:
        return StaticProvider(
            settings.access_key.get_secret_value(), settings.secret_key.get_secret_value()
        )
    return ChainedProvider([EnvAWSProvider(), EnvMinioProvider()])


class SketchStore:
    """Puts and gets partition and merged sketches; every failure is a SluiceError."""

    def __init__(self, settings: StoreSettings, client: Minio | None = None) -> None:
        if not settings.enabled:
            raise ConfigError("no sketch store configured (store.endpoint is empty)")
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix.strip("/")
        self.client = client or self._client(settings)
        if settings.create_bucket:
            self.ensure_bucket()

    @staticmethod
    def _client(settings: StoreSettings) -> Minio:
        provider = credentials_provider(settings)
        try:
            provider.retrieve()
        except ValueError:
            raise ConfigError(
                "no object store credentials: set store.access_key/secret_key or "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            ) from None
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=60.0),
            retries=urllib3.Retry(
                total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
        return Minio(
            settings.endpoint,
            secure=settings.secure,
            region=settings.region,
            credentials=provider,
            http_client=http,
        )

    # -- keys ------------------------------------------------------------------
    def folder(self, name: str, fingerprint: str) -> str:
        return "/".join(p for p in (self.prefix, name, fingerprint) if p)

    def merged_key(self, name: str, fingerprint: str, version: int, ext: str) -> str:
        return f"{self.folder(name, fingerprint)}/v{version}.{ext}"

    def part_key(self, name: str, fingerprint: str, version: int, worker: str, ext: str) -> str:
        return f"{self.folder(name, fingerprint)}/v{version}/parts/{worker}.{ext}"

    # -- parts -----------------------------------------------------------------
    def put_part(self, part: SketchState, worker_id: str) -> str:
        """Upload one worker's sketch; returns the key of its sketch object."""
        if part.version is None:
            raise InvalidArgument("a part needs the version it belongs to")
        fp = part.fingerprint
        key = self.part_key(part.name, fp, part.version, worker_id, "sketch")
        self._put(key, part.sketch.to_bytes())
        self._put(
            self.part_key(part.name, fp, part.version, worker_id, "calib"),
            part.calibration.to_bytes(),
        )
        meta = {**part.manifest(), "worker_id": worker_id}
        self._put_json(self.part_key(part.name, fp, part.version, worker_id, "json"), meta)
        log.info("published part %s (n=%d)", key, part.sketch.n)
        return key

    def part_ids(self, name: str, fingerprint: str, version: int) -> list[str]:
        """Worker ids of the committed parts of a version, sorted."""
        prefix = f"{self.folder(name, fingerprint)}/v{version}/parts/"
        keys = self._list(prefix)
        return sorted(k[len(prefix) : -len(".json")] for k in keys if k.endswith(".json"))

    def load_part(self, name: str, fingerprint: str, version: int, worker: str) -> SketchState:
        meta = self._get_json(self.part_key(name, fingerprint, version, worker, "json"))
        sketch = RaceSketch.from_bytes(
            self._get(self.part_key(name, fingerprint, version, worker, "sketch"))
        )
        calib = CalibrationSample.from_bytes(
            self._get(self.part_key(name, fingerprint, version, worker, "calib"))
        )
        return SketchState(name, sketch, calib, str(meta.get("embedding_model", "")), version)

    def merge_parts(
        self, name: str, params: SketchParams, version: int, *, overwrite: bool = False
    ) -> SketchState:
        """Merge every committed part of ``version`` and store the result."""
        fp = params.fingerprint()
        if not overwrite and self.exists(self.merged_key(name, fp, version, "json")):
            raise FailedPrecondition(
                f"sketch {name} v{version} is already merged; build a new version "
                "(or overwrite on purpose)"
            )
        workers = self.part_ids(name, fp, version)
        if not workers:
            raise NotFound(f"no parts of sketch {name} v{version} ({fp}) in the store")
        merged = combine([self.load_part(name, fp, version, w) for w in workers], workers)
        self.put_merged(merged)
        return merged

    # -- merged ----------------------------------------------------------------
    def put_merged(self, stored: SketchState) -> str:
        if stored.version is None:
            raise InvalidArgument("a merged sketch needs a version")
        fp = stored.fingerprint
        key = self.merged_key(stored.name, fp, stored.version, "sketch")
        self._put(key, stored.sketch.to_bytes())
        self._put(
            self.merged_key(stored.name, fp, stored.version, "calib"),
            stored.calibration.to_bytes(),
        )
        self._put_json(self.merged_key(stored.name, fp, stored.version, "json"), stored.manifest())
        log.info("stored merged sketch %s (n=%d)", key, stored.sketch.n)
        return key

    def versions(self, name: str, fingerprint: str) -> list[int]:
        """Merged (committed) versions, ascending."""
        keys = self._list(self.folder(name, fingerprint) + "/", recursive=False)
        found = (_VERSION.search("/" + k.rsplit("/", 1)[-1]) for k in keys)
        return sorted(int(m.group(1)) for m in found if m)

    def load_merged(self, name: str, fingerprint: str, version: int | None = None) -> SketchState:
        """A merged sketch; ``version=None`` = the latest."""
        if version is None:
            versions = self.versions(name, fingerprint)
            if not versions:
                raise NotFound(
                    f"no merged sketch {name!r} with fingerprint {fingerprint} in "
                    f"s3://{self.bucket}/{self.folder(name, fingerprint)}/: run pass 1 "
                    "and `sluice density merge` first"
                )
            version = versions[-1]
        manifest = self._get_json(self.merged_key(name, fingerprint, version, "json"))
        sketch = RaceSketch.from_bytes(
            self._get(self.merged_key(name, fingerprint, version, "sketch"))
        )
        calib = CalibrationSample.from_bytes(
            self._get(self.merged_key(name, fingerprint, version, "calib"))
        )
        parts = [PartInfo(str(p["worker_id"]), int(p["n"])) for p in manifest.get("parts", [])]
        model = str(manifest.get("embedding_model", ""))
        return SketchState(name, sketch, calib, model, version, parts)

    # -- S3 primitives -----------------------------------------------------------
    def ensure_bucket(self) -> None:
        with _s3_errors(f"bucket {self.bucket}"):
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)

    def exists(self, key: str) -> bool:
        try:
            with _s3_errors(key):
                self.client.stat_object(self.bucket, key)
        except NotFound:
            return False
        return True

    def _put(self, key: str, data: bytes) -> None:
        with _s3_errors(key):
            self.client.put_object(self.bucket, key, io.BytesIO(data), len(data))

    def _put_json(self, key: str, obj: dict[str, Any]) -> None:
        data = json.dumps(obj, indent=1, sort_keys=True).encode()
        with _s3_errors(key):
            self.client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type="application/json"
            )

    def _get(self, key: str) -> bytes:
        with _s3_errors(key):
            response = self.client.get_object(self.bucket, key)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

    def _get_json(self, key: str) -> dict[str, Any]:
        try:
            obj = json.loads(self._get(key))
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"s3://{self.bucket}/{key} is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise InvalidArgument(f"s3://{self.bucket}/{key} is not a JSON object")
        return obj

    def _list(self, prefix: str, recursive: bool = True) -> list[str]:
        with _s3_errors(prefix):
            return [
                str(o.object_name)
                for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=recursive)
                if o.object_name and not o.is_dir
            ]


@contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """Translate minio/urllib3 failures into the error hierarchy."""
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
