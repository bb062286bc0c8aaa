"""Kafka security settings: the kafka-python kwargs they make, and the mistakes they refuse."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.runtime.errors import ConfigError
from services.runtime.settings import KafkaClientEnv, KafkaSecuritySettings, KafkaSettings
from services.scoring.settings import ScoringSettings


def _files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name in ("ca", "cert", "key", "password"):
        f = tmp_path / name
        f.write_text("s3cret\n" if name == "password" else "-----BEGIN-----\n")
        out[name] = str(f)
    return out


def test_plaintext_adds_nothing_but_the_bootstrap_timeout() -> None:
    kw = KafkaSettings(bootstrap_servers="a:1,b:2").client_kwargs()
    assert kw == {"bootstrap_servers": ["a:1", "b:2"], "bootstrap_timeout_ms": 30000}


def test_sasl_ssl_with_password_file_and_mtls(tmp_path: Path) -> None:
    f = _files(tmp_path)
    sec = KafkaSecuritySettings(
        protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="sluice",
        sasl_password="ignored-when-a-file-is-set",  # type: ignore[arg-type]
        sasl_password_file=f["password"],
        ca_file=f["ca"],
        cert_file=f["cert"],
        key_file=f["key"],
    )
    assert KafkaSettings(security=sec).client_kwargs() == {
        "bootstrap_servers": ["localhost:9092"],
        "bootstrap_timeout_ms": 30000,
        "security_protocol": "SASL_SSL",
        "ssl_check_hostname": True,
        "ssl_cafile": f["ca"],
        "ssl_certfile": f["cert"],
        "ssl_keyfile": f["key"],
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "sluice",
        "sasl_plain_password": "s3cret",
    }


def test_sasl_plaintext_has_no_tls_kwargs() -> None:
    sec = KafkaSecuritySettings(
        protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password="hunter2",  # type: ignore[arg-type]
    )
    assert sec.client_kwargs() == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "u",
        "sasl_plain_password": "hunter2",
    }
    assert "hunter2" not in repr(sec)  # the password is a SecretStr


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"protocol": "SSL", "cert_file": "/c"}, "go together"),
        ({"protocol": "PLAINTEXT", "ca_file": "/ca"}, "has no TLS"),
        ({"protocol": "SASL_SSL", "sasl_password": "p"}, "needs sasl_username"),
        ({"protocol": "SASL_SSL", "sasl_username": "u"}, "needs sasl_password"),
        ({"protocol": "TLS"}, "protocol"),
        ({"protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"}, "sasl_mechanism"),
    ],
)
def test_inconsistent_settings_are_refused(fields: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        KafkaSecuritySettings.model_validate(fields)


def test_missing_files_are_config_errors_naming_the_setting(tmp_path: Path) -> None:
    sec = KafkaSecuritySettings(protocol="SSL", ca_file=str(tmp_path / "nope.pem"))
    with pytest.raises(ConfigError, match=r"kafka\.security\.ca_file"):
        sec.client_kwargs()
    sec = KafkaSecuritySettings(
        protocol="SASL_SSL", sasl_username="u", sasl_password_file=str(tmp_path / "pw")
    )
    with pytest.raises(ConfigError, match="sasl_password_file"):
        sec.client_kwargs()


def test_stage_env_sets_the_nested_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = _files(tmp_path)
    monkeypatch.setenv("SLUICE_SCORING_KAFKA__SECURITY__PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("SLUICE_SCORING_KAFKA__SECURITY__SASL_USERNAME", "sluice")
    monkeypatch.setenv("SLUICE_SCORING_KAFKA__SECURITY__SASL_PASSWORD_FILE", f["password"])
    monkeypatch.setenv("SLUICE_SCORING_KAFKA__SECURITY__CA_FILE", f["ca"])
    kw = ScoringSettings().kafka.client_kwargs()
    assert kw["security_protocol"] == "SASL_SSL"
    assert kw["sasl_plain_password"] == "s3cret"
    assert kw["ssl_cafile"] == f["ca"]


def test_security_is_not_part_of_the_decision_fingerprint() -> None:
    plain = ScoringSettings()
    secured = ScoringSettings(
        kafka=KafkaSettings(security=KafkaSecuritySettings(protocol="SSL"))  # type: ignore[call-arg]
    )
    assert plain.decision_fingerprint() == secured.decision_fingerprint()


def test_cli_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_KAFKA_SECURITY__PROTOCOL", "SSL")
    monkeypatch.setenv("SLUICE_KAFKA_SECURITY__CHECK_HOSTNAME", "false")
    kw = KafkaClientEnv().kafka("b:9093").client_kwargs()
    assert kw["security_protocol"] == "SSL"
    assert kw["ssl_check_hostname"] is False
    assert kw["bootstrap_servers"] == ["b:9093"]
