"""The one entry point of every stage: modes come from the registry, a configuration
problem is one line on stderr and exit status 2 (no traceback), and a one-shot command
(density's merge) runs without starting a server or a worker."""

from __future__ import annotations

import pytest

from services.runtime.app import main
from services.runtime.registry import KINDS, stage


def test_modes_come_from_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main("scoring", ["merge"])  # density's command, not scoring's
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert stage("density").modes == ("serve", "worker", "all", "merge")
    assert all(stage(k).modes[:3] == ("serve", "worker", "all") for k in KINDS)


def test_config_error_is_one_line_and_status_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLUICE_DENSITY_STORE__ENDPOINT", raising=False)
    assert main("density", ["merge"]) == 2  # merge needs a store and a version
    err = capsys.readouterr().err
    assert err.startswith("density merge: ") and "Traceback" not in err


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert main("rewrite", ["worker", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
