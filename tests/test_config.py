"""Configuration files: typed, validated once, and every mistake named."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtrust.agent.config import AgentConfig
from devtrust.core.errors import ConfigError
from devtrust.verifier.config import VerifierConfig

PACKAGING = Path(__file__).resolve().parent.parent / "packaging" / "config"


def test_shipped_configs_load() -> None:
    v = VerifierConfig.load(PACKAGING / "verifier.yaml")
    assert v.certificates.device_lifetime_s == 900
    a = AgentConfig.load(PACKAGING / "agent.yaml")
    assert a.tpm.tcti == "device:/dev/tpmrm0"
    assert a.runtime_dir == Path("/run/devtrust")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("not yaml", "listen: [unclosed\n", r"line 2, column 1: not valid YAML"),
        ("not a mapping", "- a\n- b\n", "top level must be a mapping, got list"),
        ("unknown key", "listne: {}\n", r"unknown key\(s\) listne"),
        (
            "wrong type",
            "attestation:\n  interval_s: soon\n",
            r"attestation.interval_s: expected float, got 'soon'",
        ),
        ("bad value", "attestation:\n  interval_s: -1\n", "must be positive"),
        ("bad bank", "attestation:\n  pcrs: {md5: [0]}\n", "unsupported hash algorithm 'md5'"),
        ("none tier", "certificates:\n  min_tier: none\n", "would certify devices"),
        ("binary garbage", "\x00\x01\x02", "not valid YAML"),
    ],
)
def test_garbage_verifier_config_is_a_clear_error(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / "verifier.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        VerifierConfig.load(path)
    assert str(path) in str(err.value), name


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        AgentConfig.load(tmp_path / "absent.yaml")


def test_ak_handle_outside_endorsement_range(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("tpm:\n  ak_handle: 0x81000001\n")
    with pytest.raises(ConfigError, match="outside the endorsement persistent range"):
        AgentConfig.load(path)


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    path = tmp_path / "verifier.yaml"
    path.write_text("database: state/v.db\n")
    assert VerifierConfig.load(path).database == tmp_path / "state" / "v.db"
