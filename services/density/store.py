"""Sketches in an S3-compatible object store (MinIO, S3), on the runtime's ``ObjectStore``.

Layout under ``<bucket>/<prefix>/<name>/<fingerprint>/`` (the fingerprint of the sketch
parameters and seed, so sketches that cannot merge never share a folder)::

    v<version>/partitions/<topic>/<partition>/<offset>.ckpt
                                           pass 1: the sketch of one input partition's
                                           records [0, offset) with its calibration sample,
                                           one object (so written atomically)
    v<version>.sketch                      the merge of every partition's latest checkpoint
    v<version>.calib                       the merged calibration sample
    v<version>.json                        the manifest (params, n, partitions, embedding
                                           model); written last: the version's commit

and, beside the fingerprint folders, ``<bucket>/<prefix>/<name>/bandwidth/v<version>.json``:
the width pass 1 chose for a version when ``sketch.width`` is ``auto`` (the fingerprint
depends on it, so it is pinned before any checkpoint of the version is written). It is
written once with a conditional PUT (``If-None-Match: *``): of two workers choosing at the
same time, one wins and both hash with its width.

A checkpoint is immutable and named by the offset it covers (zero-padded, so keys sort by
offset); the latest is the one with the highest offset. A partition's state at an offset is
a pure function of its records (sketches are deterministic), so two workers that both wrote
offset N wrote the same counts, and a late write from a fenced worker can only add an older
checkpoint, never hide a newer one. Older checkpoints are deleted once a newer one is
written. A merged version is read only through its ``.json``, so an interrupted upload is
never read; merged versions are immutable unless overwritten on purpose
(``overwrite=True``): pass-2 workers may be reading them.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from minio import Minio

from services.density.bandwidth import BandwidthChoice
from services.density.settings import StoreSettings
from services.density.sketch import RaceSketch, SketchParams
from services.density.state import CalibrationSample, PartInfo, SketchState, combine
from services.runtime.errors import (
    ConfigError,
    DecodeError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from services.runtime.objectstore import ObjectStore

log = logging.getLogger(__name__)

_VERSION = re.compile(r"/v(\d+)\.json$")
_CHECKPOINT = re.compile(r"/partitions/([^/]+)/(\d+)/(\d{20})\.ckpt$")
_CHECKPOINT_MAGIC = b"SLUICE-CKPT1"
_LOAD_ATTEMPTS = 3  # a checkpoint listed may be pruned by its writer before it is read


@dataclass(frozen=True)
class Checkpoint:
    """One input partition's pass-1 state: the sketch of its records [0, offset)."""

    topic: str
    partition: int
    offset: int
    state: SketchState
    worker_id: str = ""

    @property
    def label(self) -> str:
        return f"{self.topic}-{self.partition}"

    def to_bytes(self) -> bytes:
        sketch, calib = self.state.sketch.to_bytes(), self.state.calibration.to_bytes()
        header = {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "n": self.state.n,
            "name": self.state.name,
            "version": self.state.version,
            "embedding_model": self.state.embedding_model,
            "worker_id": self.worker_id,
            "sketch_bytes": len(sketch),
            "calib_bytes": len(calib),
        }
        head = json.dumps(header, sort_keys=True).encode()
        return _CHECKPOINT_MAGIC + struct.pack("<I", len(head)) + head + sketch + calib

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        """Decode ``to_bytes`` output; anything else raises DecodeError."""
        m = len(_CHECKPOINT_MAGIC)
        if data[:m] != _CHECKPOINT_MAGIC or len(data) < m + 4:
            raise DecodeError("not a sketch checkpoint (bad magic)")
        (size,) = struct.unpack("<I", data[m : m + 4])
        try:
            h = json.loads(data[m + 4 : m + 4 + size])
            body = data[m + 4 + size :]
            cut = int(h["sketch_bytes"])
            if len(body) != cut + int(h["calib_bytes"]):
                raise DecodeError(f"checkpoint body is {len(body)} bytes, header says otherwise")
            state = SketchState(
                str(h["name"]),
                RaceSketch.from_bytes(body[:cut]),
                CalibrationSample.from_bytes(body[cut:]),
                str(h["embedding_model"]),
                h["version"],
            )
            return cls(
                str(h["topic"]), int(h["partition"]), int(h["offset"]), state, str(h["worker_id"])
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise DecodeError(f"not a sketch checkpoint: {exc}") from exc


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

    def checkpoint_folder(
        self, name: str, fingerprint: str, version: int, topic: str = "", partition: int = -1
    ) -> str:
        folder = f"{self.folder(name, fingerprint)}/v{version}/partitions/"
        if topic:
            folder += f"{topic}/" + (f"{partition}/" if partition >= 0 else "")
        return folder

    # -- the pinned width of a version ('auto') -----------------------------------
    def bandwidth_key(self, name: str, version: int) -> str:
        return f"{self.folder(name, 'bandwidth')}/v{version}.json"

    def pinned_bandwidth(
        self, name: str, version: int, family: Mapping[str, int | str] | None = None
    ) -> BandwidthChoice | None:
        """The width pinned for a version, or None. ``family`` (the params other than the
        width) must match the pin's: a width chosen for another K is not this sketch's."""
        try:
            doc = self.objects.get_json(self.bandwidth_key(name, version))
        except NotFound:
            return None
        except InvalidArgument as exc:
            raise DecodeError(f"corrupt bandwidth pin: {exc.message}") from exc
        pinned = doc.get("params", {})
        if family is not None and {k: pinned.get(k) for k in family} != dict(family):
            raise FailedPrecondition(
                f"sketch {name} v{version} was pinned with width {doc.get('width')} for params "
                f"{pinned}, this worker has {family}: build a new version for new params"
            )
        try:
            return BandwidthChoice.from_dict(doc)
        except InvalidArgument as exc:
            raise DecodeError(f"corrupt bandwidth pin: {exc.message}") from exc

    def pin_bandwidth(
        self, name: str, version: int, choice: BandwidthChoice, family: Mapping[str, int | str]
    ) -> BandwidthChoice:
        """Pin ``choice`` for the version unless a width is pinned already; returns the
        pinned one (this choice, or the one that got there first)."""
        doc = {**choice.to_dict(), "params": dict(family)}
        data = json.dumps(doc, indent=1, sort_keys=True).encode()
        if self.objects.put_if_absent(self.bandwidth_key(name, version), data, "application/json"):
            log.info("pinned sketch %s v%s width %s", name, version, choice.width)
        pinned = self.pinned_bandwidth(name, version, family)
        if pinned is None:
            raise FailedPrecondition(f"the bandwidth pin of {name} v{version} vanished")
        return pinned

    def pinned_versions(self, name: str) -> list[int]:
        """Versions with a pinned width, ascending."""
        keys = self.objects.keys(self.folder(name, "bandwidth") + "/", recursive=False)
        found = (_VERSION.search("/" + k.rsplit("/", 1)[-1]) for k in keys)
        return sorted(int(m.group(1)) for m in found if m)

    # -- pass-1 checkpoints ------------------------------------------------------
    def put_checkpoint(self, ckpt: Checkpoint) -> str:
        """Store one partition's state (one object), then delete its older checkpoints.
        Returns the key."""
        state = ckpt.state
        if state.version is None:
            raise InvalidArgument("a checkpoint needs the version it belongs to")
        folder = self.checkpoint_folder(
            state.name, state.fingerprint, state.version, ckpt.topic, ckpt.partition
        )
        key = f"{folder}{ckpt.offset:020d}.ckpt"
        self.objects.put(key, ckpt.to_bytes())
        for old in self.objects.keys(folder):
            m = _CHECKPOINT.search(old)
            if m and int(m.group(3)) < ckpt.offset:
                self.objects.delete(old)
        log.debug("checkpoint %s (n=%d)", key, state.n)
        return key

    def checkpoint_keys(
        self, name: str, fingerprint: str, version: int
    ) -> dict[tuple[str, int], str]:
        """The latest checkpoint key of every partition of a version."""
        latest: dict[tuple[str, int], tuple[int, str]] = {}
        for key in self.objects.keys(self.checkpoint_folder(name, fingerprint, version)):
            m = _CHECKPOINT.search(key)
            if m is None:
                continue
            tp, offset = (m.group(1), int(m.group(2))), int(m.group(3))
            if tp not in latest or offset > latest[tp][0]:
                latest[tp] = (offset, key)
        return {tp: key for tp, (_offset, key) in sorted(latest.items())}

    def latest_checkpoint(
        self, name: str, fingerprint: str, version: int, topic: str, partition: int
    ) -> Checkpoint | None:
        """The partition's checkpoint with the highest offset, or None."""
        folder = self.checkpoint_folder(name, fingerprint, version, topic, partition)
        for attempt in range(_LOAD_ATTEMPTS):
            found = sorted(k for k in self.objects.keys(folder) if _CHECKPOINT.search(k))
            if not found:
                return None
            key = found[-1]  # offsets are zero-padded: the last key is the highest offset
            try:
                return Checkpoint.from_bytes(self.objects.get(key))
            except NotFound:  # pruned by a newer write between listing and reading
                if attempt == _LOAD_ATTEMPTS - 1:
                    raise
        return None

    def checkpoints(self, name: str, fingerprint: str, version: int) -> list[Checkpoint]:
        """The latest checkpoint of every partition of a version, by topic and partition."""
        out = []
        for topic, partition in self.checkpoint_keys(name, fingerprint, version):
            ckpt = self.latest_checkpoint(name, fingerprint, version, topic, partition)
            if ckpt is not None:
                out.append(ckpt)
        return out

    def is_merged(self, name: str, fingerprint: str, version: int) -> bool:
        return self.exists(self.merged_key(name, fingerprint, version, "json"))

    def merge_checkpoints(
        self, name: str, params: SketchParams, version: int, *, overwrite: bool = False
    ) -> SketchState:
        """Sum the latest checkpoint of every partition of ``version`` and store it as the
        merged version."""
        fp = params.fingerprint()
        if not overwrite and self.is_merged(name, fp, version):
            raise FailedPrecondition(
                f"sketch {name} v{version} is already merged; build a new version "
                "(or overwrite on purpose)"
            )
        found = self.checkpoints(name, fp, version)
        if not found:
            raise NotFound(f"no pass-1 checkpoints of sketch {name} v{version} ({fp}) in the store")
        merged = combine([c.state for c in found], [c.worker_id for c in found])
        merged.parts = [
            PartInfo(c.worker_id, c.state.n, partition=c.label, offset=c.offset) for c in found
        ]
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
        parts = [
            PartInfo(str(p["worker_id"]), int(p["n"]), str(p.get("partition", "")), p.get("offset"))
            for p in manifest.get("parts", [])
        ]
        model = str(manifest.get("embedding_model", ""))
        return SketchState(name, sketch, calib, model, version, parts)

    def load_latest_pinned(self, name: str) -> SketchState:
        """The latest merged version of a sketch whose width was pinned ('auto'): the
        highest pinned version that is merged."""
        for version in reversed(self.pinned_versions(name)):
            pin = self.pinned_bandwidth(name, version)
            if pin is None:
                continue
            for fp in self._fingerprints(name):
                if self.is_merged(name, fp, version):
                    state = self.load_merged(name, fp, version)
                    if _pinned_by(state.sketch.params, pin):
                        return state
        raise NotFound(
            f"no merged sketch {name!r} with a pinned width in "
            f"s3://{self.bucket}/{self.folder(name, '')}/: run pass 1 and the merge first"
        )

    def _fingerprints(self, name: str) -> list[str]:
        """The fingerprint folders of a name."""
        folder = self.folder(name, "") + "/"
        found = {k[len(folder) :].split("/", 1)[0] for k in self.objects.keys(folder) if "/v" in k}
        return sorted(f for f in found if re.fullmatch(r"[0-9a-f]{32}", f))

    # -- S3 primitives (services.runtime.objectstore) -----------------------------
    def ensure_bucket(self) -> None:
        self.objects.ensure_bucket()

    def exists(self, key: str) -> bool:
        return self.objects.exists(key)


def _pinned_by(params: SketchParams, pin: BandwidthChoice) -> bool:
    """Whether a sketch of ``params`` has the bandwidth ``pin`` chose: its width, and for an
    angular sketch its K."""
    if (params.hash == "angular") != (pin.hashes_per_row > 0):
        return False
    return params.width == pin.width and (
        params.hash != "angular" or params.hashes_per_row == pin.hashes_per_row
    )
