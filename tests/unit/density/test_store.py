"""The sketch store against a real S3 server (moto): layout, parts -> merge -> latest,
immutability, and errors mapped onto the error hierarchy."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from pydantic import SecretStr

from services.density.core import DensityCore
from services.density.settings import DensitySettings, SketchSettings, StoreSettings
from services.density.state import SketchState
from services.density.store import SketchStore
from services.runtime.errors import (
    ConfigError,
    DecodeError,
    FailedPrecondition,
    NotFound,
    Unavailable,
)
from tests.support.servers import Server, free_port
from tests.unit.density.mixture import mixture

pytestmark = pytest.mark.integration

DIM = 384


def _store_settings(address: str, create_bucket: bool = True) -> StoreSettings:
    return StoreSettings(
        endpoint=address,
        bucket=f"sk-{uuid.uuid4().hex[:8]}",
        prefix="density/test",
        secure=False,
        access_key=SecretStr("test"),
        secret_key=SecretStr("test"),
        create_bucket=create_bucket,
    )


def _part(name: str, version: int, seed: int, n: int) -> SketchState:
    core = DensityCore(
        DensitySettings(sketch=SketchSettings(name=name, version=version, dim=DIM, rows=50))
    )
    samples = mixture(seed=seed, big=n, small=(n // 4,)).samples(prefix=f"p{seed}-")
    core.build_batch(samples, core.vectors(samples))
    return core.state()


def test_parts_merge_into_a_versioned_sketch(s3_server: Server) -> None:
    store = SketchStore(_store_settings(s3_server.address))
    a, b = _part("news", 1, seed=1, n=200), _part("news", 1, seed=2, n=120)
    fp = a.fingerprint
    key = store.put_part(a, "worker-a")
    assert key == f"density/test/news/{fp}/v1/parts/worker-a.sketch"
    store.put_part(b, "worker-b")
    assert store.part_ids("news", fp, 1) == ["worker-a", "worker-b"]
    with pytest.raises(NotFound):
        store.load_merged("news", fp)  # nothing merged yet

    merged = store.merge_parts("news", a.sketch.params, 1)
    assert merged.n == a.n + b.n
    assert [(p.worker_id, p.n) for p in merged.parts] == [("worker-a", a.n), ("worker-b", b.n)]
    assert store.exists(f"density/test/news/{fp}/v1.sketch")
    assert store.exists(f"density/test/news/{fp}/v1.json")

    loaded = store.load_merged("news", fp)  # latest
    assert loaded.version == 1
    np.testing.assert_array_equal(loaded.sketch.counts, a.sketch.counts + b.sketch.counts)
    np.testing.assert_array_equal(loaded.calibration.keys, merged.calibration.keys)
    assert loaded.embedding_model == "packaged:all-minilm-l6-v2"

    # A merged version is immutable unless overwritten on purpose.
    with pytest.raises(FailedPrecondition, match="already merged"):
        store.merge_parts("news", a.sketch.params, 1)
    assert store.merge_parts("news", a.sketch.params, 1, overwrite=True).n == merged.n

    # Versions: the latest is loaded by default, any one by number.
    v2 = _part("news", 2, seed=3, n=40)
    store.put_part(v2, "worker-c")
    store.merge_parts("news", v2.sketch.params, 2)
    assert store.versions("news", fp) == [1, 2]
    assert store.load_merged("news", fp).n == v2.n
    assert store.load_merged("news", fp, 1).n == merged.n


def test_missing_and_corrupt_objects(s3_server: Server) -> None:
    store = SketchStore(_store_settings(s3_server.address))
    params = _part("x", 1, seed=4, n=20).sketch.params
    with pytest.raises(NotFound, match="no parts"):
        store.merge_parts("x", params, 1)
    with pytest.raises(NotFound):
        store.load_merged("x", params.fingerprint(), 5)
    part = _part("x", 1, seed=4, n=20)
    store.put_part(part, "w")
    fp = part.fingerprint
    key = store.part_key("x", fp, 1, "w", "sketch")
    store.client.put_object(store.bucket, key, io.BytesIO(b"garbage"), 7)
    with pytest.raises(DecodeError):
        store.merge_parts("x", params, 1)


def test_unreachable_store_is_unavailable() -> None:
    settings = _store_settings(f"127.0.0.1:{free_port()}", create_bucket=False)
    store = SketchStore(settings)
    with pytest.raises(Unavailable):
        store.versions("x", "f")


def test_credentials_come_from_settings_or_environment(
    s3_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY", "MINIO_ACCESS_KEY", "MINIO_ROOT_USER"):
        monkeypatch.delenv(var, raising=False)
    bare = StoreSettings(endpoint=s3_server.address, secure=False)
    with pytest.raises(ConfigError, match="credentials"):
        SketchStore(bare)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    store = SketchStore(bare.model_copy(update={"bucket": "from-env", "create_bucket": True}))
    assert store.versions("x", "f") == []
    with pytest.raises(ConfigError, match="no sketch store"):
        SketchStore(StoreSettings())
