"""Session fixtures: real servers (Tansu broker, moto S3) on free loopback ports."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Models load from installed packages only: never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.support.servers import Server, start_moto, start_tansu


@pytest.fixture(scope="session")
def kafka_server() -> Iterator[Server]:
    server = start_tansu()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_server: Server) -> str:
    return kafka_server.address


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Server]:
    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def torch_backend():  # type: ignore[no-untyped-def]
    """The packaged SmolLM2-135M-Instruct on the torch CPU backend, loaded once."""
    from services.runtime.backends.base import ModelSettings
    from services.runtime.backends.torch_backend import TorchBackend

    return TorchBackend(ModelSettings())
