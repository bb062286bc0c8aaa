"""gRPC transport security on real servers with a generated PKI (tests/support/tls.py):
TLS, mutual TLS and the bearer token. Each refusal is checked for its status code: a failed
handshake is UNAVAILABLE (the client never reaches the server), a missing or wrong token
UNAUTHENTICATED; health answers without a token (probes send none), reflection does not."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from services.gen.sluice.common.v1 import sample_pb2
from services.gen.sluice.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from services.runtime.errors import ConfigError
from services.runtime.grpc_server import RunningServer, serve
from services.runtime.metrics import StageMetrics
from services.runtime.settings import GrpcSettings, GrpcTlsSettings
from services.scoring.core import ScoringCore
from services.scoring.grpc_service import SERVICE_NAME, register
from services.scoring.settings import ScoringSettings
from tests.support.tls import Pki, make_pki

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token-for-tests"
TEXT = (
    "The central bank raised interest rates by a quarter of a percentage point on Tuesday, "
    "citing persistent inflation in services and a tight labour market across the country. "
    "Officials said the decision was unanimous and that further increases remain possible if "
    "wage growth does not slow in the coming months."
)
REQUEST = scoring_pb2.ScoreRequest(samples=[sample_pb2.Sample(id="a", text=TEXT)])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")  # a Secret's file often ends in a newline
    return path


@pytest.fixture
def start() -> Iterator[Callable[..., tuple[RunningServer, StageMetrics]]]:
    running: list[RunningServer] = []

    def _start(**grpc_settings: Any) -> tuple[RunningServer, StageMetrics]:
        settings = GrpcSettings(host="127.0.0.1", port=0, **grpc_settings)
        metrics = StageMetrics("scoring")
        core = ScoringCore(ScoringSettings(steps=["heuristics"], grpc=settings))
        running.append(serve(settings, register(core, metrics), metrics=metrics))
        return running[-1], metrics

    yield _start
    for r in running:
        r.stop(grace=0.2)


def _tls(pki: Pki, mutual: bool = False) -> GrpcTlsSettings:
    return GrpcTlsSettings(
        enabled=True,
        cert_file=str(pki.server_cert),
        key_file=str(pki.server_key),
        client_ca_file=str(pki.ca) if mutual else "",
    )


def _secure(
    server: RunningServer,
    ca: bytes | None,
    cert: tuple[bytes, bytes] | None = None,
    token: str | None = None,
) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=cert[1] if cert else None,
        certificate_chain=cert[0] if cert else None,
    )
    if token is not None:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(f"127.0.0.1:{server.port}", creds)


def _score(channel: grpc.Channel, metadata: Any = None) -> scoring_pb2.ScoreResponse:
    with channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        return stub.Score(REQUEST, timeout=10, metadata=metadata)


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    code: grpc.StatusCode = err.value.code()
    return code


def test_tls_serves_clients_that_trust_its_ca(start: Callable[..., Any], pki: Pki) -> None:
    server, _ = start(tls=_tls(pki))
    assert _score(_secure(server, pki.read("ca"))).results[0].kept
    # Without the CA (the system's roots), trusting another CA, or in cleartext: no call.
    for ca in (None, pki.read("other_ca")):
        assert _code(lambda ca=ca: _score(_secure(server, ca))) == grpc.StatusCode.UNAVAILABLE
    plain = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    assert _code(lambda: _score(plain)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_certificate_its_ca_signed(
    start: Callable[..., Any], pki: Pki
) -> None:
    server, _ = start(tls=_tls(pki, mutual=True))
    ca = pki.read("ca")
    mine = (pki.read("client_cert"), pki.read("client_key"))
    assert _score(_secure(server, ca, mine)).results[0].kept
    stranger = (pki.read("other_client_cert"), pki.read("other_client_key"))
    assert _code(lambda: _score(_secure(server, ca))) == grpc.StatusCode.UNAVAILABLE
    assert _code(lambda: _score(_secure(server, ca, stranger))) == grpc.StatusCode.UNAVAILABLE


def test_bearer_token_is_required_but_not_for_health(
    start: Callable[..., Any], pki: Pki, token_file: Path
) -> None:
    server, metrics = start(tls=_tls(pki), auth_token_file=str(token_file))
    ca = pki.read("ca")
    assert _score(_secure(server, ca, token=TOKEN)).results[0].kept
    for token in (None, "wrong", TOKEN + "x", ""):
        with pytest.raises(grpc.RpcError) as err:
            _score(_secure(server, ca, token=token))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
        assert "bearer token" in (err.value.details() or "")
    # A token in the wrong scheme, or twice, is no token.
    for md in ([("authorization", TOKEN)], [("authorization", f"Bearer {TOKEN}")] * 2):
        code = _code(lambda md=md: _score(_secure(server, ca), metadata=md))
        assert code == grpc.StatusCode.UNAUTHENTICATED

    with _secure(server, ca) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        resp = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(channel)
        assert _code(db.get_services) == grpc.StatusCode.UNAUTHENTICATED

    labels = {"stage": "scoring", "method": "Score", "code": "UNAUTHENTICATED"}
    assert metrics.registry.get_sample_value("sluice_grpc_requests_total", labels) == 6


def test_bearer_token_over_cleartext(start: Callable[..., Any], token_file: Path) -> None:
    server, _ = start(auth_token_file=str(token_file))
    target = f"127.0.0.1:{server.port}"
    ok = [("authorization", f"Bearer {TOKEN}")]
    assert _score(grpc.insecure_channel(target), metadata=ok).results[0].kept
    code = _code(lambda: _score(grpc.insecure_channel(target)))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_unreadable_secrets_stop_the_start(
    start: Callable[..., Any], pki: Pki, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="auth_token_file"):
        start(auth_token_file=str(empty))
    with pytest.raises(ConfigError, match="auth_token_file"):
        start(auth_token_file=str(tmp_path / "missing"))
    tls = _tls(pki).model_copy(update={"key_file": str(tmp_path / "missing.key")})
    with pytest.raises(ConfigError, match=r"tls\.key_file"):
        start(tls=tls)


@pytest.mark.parametrize(
    "tls",
    [
        {"enabled": True},
        {"enabled": True, "cert_file": "c.pem"},
        {"cert_file": "c.pem", "key_file": "k.pem"},
        {"client_ca_file": "ca.pem"},
    ],
    ids=["no-files", "no-key", "files-but-disabled", "client-ca-without-tls"],
)
def test_incomplete_tls_settings_are_refused(tls: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"grpc\.tls"):
        GrpcSettings(tls=tls)
