"""Where a dataset's files live: a local directory or a bucket prefix (S3/MinIO), behind one
small interface so the commit protocol is written once.

Both give the two primitives exactly-once files need: a whole-file write under a temporary
name made visible under its final name in one step (rename; server-side copy), and a write
that fails if the name is taken (``O_EXCL`` + link; S3's ``If-None-Match: *``), which makes
a manifest number a claim two writers cannot both win.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from minio.commonconfig import CopySource

from services.runtime.errors import NotFound
from services.runtime.objectstore import ObjectStore, ObjectStoreSettings, s3_errors


class Target(Protocol):
    """A dataset root. Keys are '/'-separated, relative to the root."""

    def put(self, key: str, data: bytes) -> None: ...

    def publish(self, tmp_key: str, key: str) -> None:
        """Make the file written under ``tmp_key`` visible under ``key`` (and drop the tmp)."""
        ...

    def put_if_absent(self, key: str, data: bytes) -> bool: ...

    def get(self, key: str) -> bytes: ...

    def keys(self, prefix: str) -> list[str]: ...

    def delete(self, key: str) -> None: ...

    def location(self, key: str) -> str:
        """What a reader opens: a path, or an s3:// URI."""
        ...


class LocalTarget:
    """A directory; renames and links are atomic on one filesystem."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def publish(self, tmp_key: str, key: str) -> None:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path(tmp_key), dst)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, dst)  # fails if dst exists: the claim is atomic and whole
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self._path(key)} not found") from None

    def keys(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.exists():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def location(self, key: str) -> str:
        return str(self._path(key))


class S3Target:
    """A prefix of a bucket. An object appears whole or not at all, so the tmp name is what
    a killed upload leaves behind, never a half shard under a final name."""

    def __init__(self, settings: ObjectStoreSettings, store: ObjectStore | None = None) -> None:
        self.store = store or ObjectStore(settings)
        self.prefix = settings.prefix.strip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        self.store.put(self._key(key), data)

    def publish(self, tmp_key: str, key: str) -> None:
        src, dst = self._key(tmp_key), self._key(key)
        with s3_errors(self.store.uri(dst)):
            self.store.client.copy_object(
                self.store.bucket, dst, CopySource(self.store.bucket, src)
            )
        self.store.delete(src)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        return self.store.put_if_absent(self._key(key), data, "application/json")

    def get(self, key: str) -> bytes:
        return self.store.get(self._key(key))

    def keys(self, prefix: str) -> list[str]:
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[cut:] for k in self.store.keys(self._key(prefix)))

    def delete(self, key: str) -> None:
        self.store.delete(self._key(key))

    def location(self, key: str) -> str:
        return self.store.uri(self._key(key))


def open_target(directory: str, store: ObjectStoreSettings) -> Target:
    """The object store when it has an endpoint, else the directory."""
    if store.enabled:
        return S3Target(store)
    if not directory:
        from services.runtime.errors import ConfigError

        raise ConfigError("the sink needs store.endpoint or directory")
    return LocalTarget(directory)
