"""The one object store client: settings of every stage that stores objects share it, a
missing credential is found at start, and S3 failures map onto the error hierarchy."""

from __future__ import annotations

import pytest
from minio.credentials import StaticProvider
from minio.error import S3Error
from pydantic import SecretStr

from services.density.settings import StoreSettings
from services.distill.settings import S3Settings
from services.runtime.errors import ConfigError, NotFound, Unavailable
from services.runtime.objectstore import (
    ObjectStoreSettings,
    create_client,
    credentials_provider,
    parse_uri,
    s3_errors,
)


def test_stage_blocks_differ_only_in_defaults() -> None:
    for cls in (StoreSettings, S3Settings):
        assert issubclass(cls, ObjectStoreSettings)
        assert set(cls.model_fields) == set(ObjectStoreSettings.model_fields)
    assert (StoreSettings().bucket, S3Settings().bucket) == ("sluice-sketches", "sluice-distill")


def test_credentials_from_settings_else_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    keyed = ObjectStoreSettings(access_key=SecretStr("a"), secret_key=SecretStr("s"))
    assert isinstance(credentials_provider(keyed), StaticProvider)
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "MINIO_ACCESS_KEY",
        "MINIO_SECRET_KEY",
    ):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="no object store credentials"):
        create_client(ObjectStoreSettings(endpoint="localhost:9"))
    with pytest.raises(ConfigError, match="endpoint is empty"):
        create_client(ObjectStoreSettings())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    assert create_client(ObjectStoreSettings(endpoint="localhost:9", secure=False))


def _s3_error(code: str) -> S3Error:
    return S3Error(code, code, "res", "req", "host", None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (_s3_error("NoSuchKey"), NotFound),
        (_s3_error("AccessDenied"), ConfigError),
        (_s3_error("SlowDown"), Unavailable),
        (ConnectionRefusedError("no"), Unavailable),
    ],
)
def test_errors_map_to_the_hierarchy(raised: Exception, expected: type[Exception]) -> None:
    with pytest.raises(expected), s3_errors("s3://b/k"):
        raise raised


def test_parse_uri() -> None:
    assert parse_uri("s3://b/a/k.stk") == ("b", "a/k.stk")
    with pytest.raises(Exception, match="not an s3://"):
        parse_uri("http://b/k")
