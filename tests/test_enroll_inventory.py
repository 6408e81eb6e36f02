"""Pure parts of issue 7 items 4 and 8 on the enrollment side: the inventory file, the
precedence of zone assignments, peer addresses and the per-peer token bucket."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from devtrust.core.errors import ConfigError
from devtrust.core.ids import DeviceId
from devtrust.swtpm import EndorsementCA
from devtrust.verifier.config import EnrollmentConfig, VerifierConfig
from devtrust.verifier.enrollment import RateLimiter, peer_host
from devtrust.verifier.errors import Rejected
from devtrust.verifier.inventory import (
    UNASSIGNED,
    Assignment,
    Inventory,
    parse_inventory,
    parse_labels,
    resolve,
)
from devtrust.verifier.pki import PkiFiles

DEV_A = DeviceId("a" * 64)
DEV_B = DeviceId("0123456789abcdef" * 4)


# --- the inventory file ------------------------------------------------------------------


def test_inventory_parses_zones_and_labels() -> None:
    text = f"""
# device id -> assignment
{DEV_A}:
  zone: production-inference
  labels: {{sku: h100, rack: "12"}}
{DEV_B.upper()}:
  zone: management
"""
    devices = parse_inventory(text, where="inv.yaml")
    assert devices[DEV_A] == Assignment(
        zone="production-inference", labels={"sku": "h100", "rack": "12"}, source="inventory"
    )
    assert devices[DEV_B] == Assignment(zone="management", labels={}, source="inventory")
    assert parse_inventory("", where="inv.yaml") == {}
    assert parse_inventory("# nothing yet\n", where="inv.yaml") == {}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("not YAML", f"{DEV_A}: [zone\n", "inv.yaml:2: not valid YAML"),
        ("a list", "- a\n- b\n", "inv.yaml:1: expected a mapping of device id"),
        ("bad id", "abc:\n  zone: z\n", "inv.yaml:1: 'abc' is not a device id"),
        (
            "listed twice",
            f"{DEV_A}:\n  zone: a\n{DEV_A.upper()}:\n  zone: b\n",
            f"inv.yaml:3: device {DEV_A} is listed twice (first at line 1)",
        ),
        ("no zone", f"{DEV_A}:\n  labels: {{a: b}}\n", f"inv.yaml:2: device {DEV_A}: no zone"),
        ("empty zone", f'{DEV_A}:\n  zone: ""\n', f"inv.yaml:2: device {DEV_A}: zone is empty"),
        (
            "bad zone",
            f'{DEV_A}:\n  zone: "a b"\n',
            f"inv.yaml:2: device {DEV_A}: zone 'a b' is not",
        ),
        (
            "unknown key",
            f"{DEV_A}:\n  zone: z\n  zome: y\n",
            f"inv.yaml:3: device {DEV_A}: unknown key 'zome'; known: zone, labels",
        ),
        (
            "labels not a mapping",
            f"{DEV_A}:\n  zone: z\n  labels: [a]\n",
            f"inv.yaml:3: device {DEV_A}: labels: expected a mapping",
        ),
        (
            "bad label value",
            f'{DEV_A}:\n  zone: z\n  labels:\n    k: "a\\nb"\n',
            f"inv.yaml:4: device {DEV_A}: label k: value 'a\\nb' is not",
        ),
        (
            "entry not a mapping",
            f"{DEV_A}: production\n",
            f"inv.yaml:1: device {DEV_A}: expected a mapping with keys zone and labels",
        ),
    ],
)
def test_bad_inventory_is_refused_naming_line_and_device(
    name: str, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_inventory(text, where="inv.yaml")
    assert message in str(err.value), name
    assert "\n" not in str(err.value)


def test_unreadable_inventory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Inventory.load(tmp_path / "missing.yaml")


def test_bad_inventory_stops_the_verifier_with_one_line(
    tmp_path: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(f"{DEV_A}:\n  zone: z\n  colour: red\n")
    config = tmp_path / "verifier.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database": str(tmp_path / "v.db"),
                "listen": {"enrollment": "127.0.0.1:0", "attestation": "127.0.0.1:0"},
                "tls": {"server_cert": str(pki.server_cert), "server_key": str(pki.server_key)},
                "ca": {"cert": str(pki.ca_cert), "key": str(pki.ca_key)},
                "endorsement": {"trust_swtpm_local_ca": str(endorsement_ca.cert_path)},
                "policy": None,
                "enrollment": {"inventory": "inventory.yaml"},
            }
        )
    )
    assert VerifierConfig.load(config).enrollment.inventory == inventory
    run = subprocess.run(
        [sys.executable, "-m", "devtrust.verifier.main", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if "devtrust-verifier:" in line]
    assert errors == [
        f"devtrust-verifier: {inventory}:3: device {DEV_A}: unknown key 'colour'; "
        "known: zone, labels"
    ]
    check = subprocess.run(
        [sys.executable, "-m", "devtrust.verifier.main", "inventory", "check", str(inventory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 2
    assert "unknown key 'colour'" in check.stderr


def test_labels_from_the_command_line() -> None:
    assert parse_labels(["sku=h100", "rack=r1=a"]) == {"sku": "h100", "rack": "r1=a"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_labels(["sku"])
    with pytest.raises(ValueError, match="label key"):
        parse_labels(["bad key=1"])


# --- precedence --------------------------------------------------------------------------

LISTED = Assignment(zone="management", labels={"a": "1"}, source="inventory")
PINNED = Assignment(zone="model-development", labels={"sku": "h100"}, source="device")
TOKEN = Assignment(zone="production-inference", labels={}, source="token")


@pytest.mark.parametrize(
    ("name", "listed", "pinned", "token", "expected"),
    [
        ("inventory wins over all", LISTED, PINNED, TOKEN, LISTED),
        ("inventory on first enrollment", LISTED, None, TOKEN, LISTED),
        ("pinned without a token", None, PINNED, None, PINNED),
        (
            "pinned, token of the same zone",
            None,
            PINNED,
            Assignment(zone="model-development", source="token"),
            PINNED,
        ),
        ("token on first enrollment", None, None, TOKEN, TOKEN),
        ("token assigning nothing", None, None, Assignment(source="token"), UNASSIGNED),
        ("nothing", None, None, None, UNASSIGNED),
    ],
)
def test_assignment_precedence(
    name: str,
    listed: Assignment | None,
    pinned: Assignment | None,
    token: Assignment | None,
    expected: Assignment,
) -> None:
    assert resolve(device_id=DEV_A, listed=listed, pinned=pinned, token=token) == expected, name


@pytest.mark.parametrize(
    ("name", "token", "message"),
    [
        ("another zone", TOKEN, "its bootstrap token assigns zone 'production-inference'"),
        (
            "other labels",
            Assignment(zone="model-development", labels={"sku": "a100"}, source="token"),
            "its bootstrap token assigns labels {'sku': 'a100'}",
        ),
    ],
)
def test_token_cannot_move_a_pinned_device(name: str, token: Assignment, message: str) -> None:
    with pytest.raises(Rejected) as err:
        resolve(device_id=DEV_A, listed=None, pinned=PINNED, token=token)
    text = str(err.value)
    assert f"device {DEV_A} is pinned to zone 'model-development'" in text, name
    assert message in text
    assert f"devtrust approve {DEV_A} --zone" in text


# --- floods ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:53412", "127.0.0.1"),
        ("ipv4:10.1.2.3:1", "10.1.2.3"),
        ("ipv6:[::1]:5000", "::1"),
        ("ipv6:[2001:db8::0001]:443", "2001:db8::/64"),
        ("ipv6:[2001:db8::ffff:1]:443", "2001:db8::/64"),  # the same /64: one bucket
        ("ipv6:[::ffff:10.1.2.3]:443", "10.1.2.3"),
        ("ipv6:[fe80::1%eth0]:443", "fe80::/64"),
        ("unix:/run/x.sock", "unix:/run/x.sock"),
        ("ipv4:garbage", "ipv4:garbage"),
    ],
)
def test_peer_host_ignores_the_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    limiter = RateLimiter(rate_per_minute=60, burst=3)
    assert [limiter.take("p", now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("p", now=100.0) == pytest.approx(1.0)  # one token a second
    assert limiter.take("q", now=100.0) == 0.0  # other peers have their own bucket
    assert limiter.take("p", now=100.5) == pytest.approx(0.5)  # a refusal spends nothing
    assert limiter.take("p", now=101.0) == 0.0
    assert limiter.take("p", now=101.0) > 0
    # The clock going backwards refills nothing.
    assert limiter.take("p", now=50.0) > 0


def test_token_bucket_forgets_idle_peers() -> None:
    limiter = RateLimiter(rate_per_minute=60, burst=5, max_keys=3)
    for n in range(3):
        limiter.take(f"p{n}", now=0.0)
    assert len(limiter) == 3
    limiter.take("p3", now=0.0)  # past max_keys: the least recently seen goes
    assert len(limiter) == 3
    limiter.take("p0", now=10.0)  # 5 s refill a bucket of 5: all others were idle
    assert len(limiter) == 1


def test_enrollment_settings_are_validated() -> None:
    for bad in (
        {"rate_per_minute": 0.0},
        {"burst": 0},
        {"max_pending": 0},
        {"max_pending_per_device": 0},
    ):
        with pytest.raises(ValueError, match="must be"):
            EnrollmentConfig(**bad)
