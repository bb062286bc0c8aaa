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

import logging
import re

from minio import Minio

from services.density.settings import StoreSettings
from services.density.sketch import RaceSketch, SketchParams
from services.density.state import CalibrationSample, PartInfo, SketchState, combine
from services.runtime.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound
from services.runtime.objectstore import ObjectStore

log = logging.getLogger(__name__)

_VERSION = re.compile(r"/v(\d+)\.json$")


class SketchStore:
    """Puts and gets partition and merged sketches; every failure is a SluiceError."""

    def __init__(self, settings: StoreSettings, client: Minio | None = None) -> None:
        if not settings.enabled:
            raise ConfigError("no sketch store configured (store.endpoint is empty)")
        self.settings = settings
        self.objects = ObjectStore(settings, client)
        self.bucket = settings.bucket
        self.prefix = settings.prefix.strip("/")
        self.client = self.objects.client

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
        self.objects.put(key, part.sketch.to_bytes())
        self.objects.put(
            self.part_key(part.name, fp, part.version, worker_id, "calib"),
            part.calibration.to_bytes(),
        )
        meta = {**part.manifest(), "worker_id": worker_id}
        self.objects.put_json(self.part_key(part.name, fp, part.version, worker_id, "json"), meta)
        log.info("published part %s (n=%d)", key, part.sketch.n)
        return key

    def part_ids(self, name: str, fingerprint: str, version: int) -> list[str]:
        """Worker ids of the committed parts of a version, sorted."""
        prefix = f"{self.folder(name, fingerprint)}/v{version}/parts/"
        keys = self.objects.keys(prefix)
        return sorted(k[len(prefix) : -len(".json")] for k in keys if k.endswith(".json"))

    def load_part(self, name: str, fingerprint: str, version: int, worker: str) -> SketchState:
        meta = self.objects.get_json(self.part_key(name, fingerprint, version, worker, "json"))
        sketch = RaceSketch.from_bytes(
            self.objects.get(self.part_key(name, fingerprint, version, worker, "sketch"))
        )
        calib = CalibrationSample.from_bytes(
            self.objects.get(self.part_key(name, fingerprint, version, worker, "calib"))
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
        self.objects.put(key, stored.sketch.to_bytes())
        self.objects.put(
            self.merged_key(stored.name, fp, stored.version, "calib"),
            stored.calibration.to_bytes(),
        )
        self.objects.put_json(
            self.merged_key(stored.name, fp, stored.version, "json"), stored.manifest()
        )
        log.info("stored merged sketch %s (n=%d)", key, stored.sketch.n)
        return key

    def versions(self, name: str, fingerprint: str) -> list[int]:
        """Merged (committed) versions, ascending."""
        keys = self.objects.keys(self.folder(name, fingerprint) + "/", recursive=False)
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
        manifest = self.objects.get_json(self.merged_key(name, fingerprint, version, "json"))
        sketch = RaceSketch.from_bytes(
            self.objects.get(self.merged_key(name, fingerprint, version, "sketch"))
        )
        calib = CalibrationSample.from_bytes(
            self.objects.get(self.merged_key(name, fingerprint, version, "calib"))
        )
        parts = [PartInfo(str(p["worker_id"]), int(p["n"])) for p in manifest.get("parts", [])]
        model = str(manifest.get("embedding_model", ""))
        return SketchState(name, sketch, calib, model, version, parts)

    # -- S3 primitives (services.runtime.objectstore) -----------------------------
    def ensure_bucket(self) -> None:
        self.objects.ensure_bucket()

    def exists(self, key: str) -> bool:
        return self.objects.exists(key)
