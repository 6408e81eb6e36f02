"""Zones and labels are assigned by an operator and pinned to the device, never claimed by it
(issue 7, item 4): over the real wire protocol, real swtpm TPMs, the real CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509

from devtrust.agent.enroll import EnrollmentPending, enroll
from devtrust.agent.evidence import host_facts
from devtrust.agent.main import make_host, make_tpm
from devtrust.agent.state import AgentFiles, new_key, spki
from devtrust.agent.tpm import TpmBackend
from devtrust.core.binding import proof_for
from devtrust.core.claims import DeviceClaims
from devtrust.core.ids import DeviceId
from devtrust.swtpm import EndorsementCA, Swtpm
from devtrust.v1 import common_pb2, enrollment_pb2, enrollment_pb2_grpc
from devtrust.verifier.config import EnrollmentConfig, VerifierConfig
from devtrust.verifier.enrollment import device_id_for
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.records import DeviceRecord
from devtrust.verifier.server import RunningVerifier
from devtrust.verifier.tpm.structures import parse_public
from tests.conftest import SwtpmFactory
from tests.db import with_repos
from tests.env import (
    Agent,
    agent_config,
    channel_credentials,
    first_results,
    running,
    verifier_config,
)
from tests.test_ops_cli import Run, devtrust, profile

pytestmark = pytest.mark.swtpm

CLAIMED = "management"  # what every agent here says of itself; never taken


def _device_id(tpm: Swtpm) -> DeviceId:
    backend = TpmBackend(tpm.tcti)
    try:
        return device_id_for(parse_public(backend.ek_public()).public_key())
    finally:
        backend.close()


async def _cli(workdir: Path, pki: PkiFiles, verifier: RunningVerifier, *argv: str) -> Run:
    """`devtrust ARGV` against the running verifier, as its admin alice (tests/env.py)."""
    return await devtrust(*argv, "--profile", str(profile(workdir, pki, verifier, "alice")))


async def _token(workdir: Path, pki: PkiFiles, verifier: RunningVerifier, *options: str) -> str:
    run = await _cli(workdir, pki, verifier, "token", "create", *options)
    assert run.status == 0, run.err
    return run.out.strip()


def _claiming_host() -> common_pb2.HostFacts:
    """Host facts of a modified agent that claims a zone and labels for itself (ours sends
    none: operators assign them)."""
    facts = host_facts()
    facts.zone = CLAIMED
    facts.labels["claimed"] = "yes"
    return facts


@pytest.fixture(autouse=True)
def claims(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every agent in this module claims zone CLAIMED, at enrollment and in its evidence (both
    take the host's facts from its host probe, agent/collect.py)."""
    import devtrust.agent.collect

    monkeypatch.setattr(devtrust.agent.collect, "host_facts", lambda **_: _claiming_host())


async def _enroll(
    workdir: Path,
    pki: PkiFiles,
    verifier: RunningVerifier,
    tpm: Swtpm,
    *,
    token: str = "",
    name: str = "agent",
    attest: bool = False,
) -> str:
    """Enroll with the real agent code, made to claim zone CLAIMED (the ``claims`` fixture);
    the outcome as a string, and with ``attest`` the zone written into the first device
    certificate."""
    cfg = replace(agent_config(workdir, pki, verifier, tpm, name), bootstrap_token=token)
    atpm = make_tpm(cfg)
    files = AgentFiles(cfg.state_dir, cfg.runtime_dir)
    try:
        enrollment = await enroll(cfg, atpm, files, host=make_host(cfg))
        if attest:
            [result] = await first_results(Agent(cfg, atpm, files, enrollment))
            assert result.certificate is not None
            pem = (cfg.runtime_dir / "device.pem").read_bytes()
            claims = DeviceClaims.from_certificate(x509.load_pem_x509_certificate(pem))
            assert claims is not None
            return f"certificate zone {claims.zone}"
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    except EnrollmentPending:
        return "pending"
    finally:
        atpm.close()
    return "enrolled"


def _record(config: VerifierConfig, device_id: DeviceId) -> DeviceRecord:
    record = with_repos(config.database, lambda repos: repos.devices.get(device_id))
    assert record is not None
    return record


def _audit(config: VerifierConfig, device_id: str, event: str) -> list[dict[str, object]]:
    db = sqlite3.connect(config.database)
    try:
        rows = db.execute(
            "SELECT detail FROM audit WHERE device_id = ? AND event = ? ORDER BY id",
            (device_id, event),
        ).fetchall()
    finally:
        db.close()
    return [json.loads(r[0]) for r in rows]


def test_token_zone_lands_on_the_device_and_its_certificate_not_the_claim(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tokened, bare = swtpm_factory(), swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> list[str]:
        async with running(config) as verifier:
            token = await _token(
                workdir, pki, verifier, "--zone", "production-inference", "--label", "sku=h100"
            )
            return [
                await _enroll(workdir, pki, verifier, tokened, token=token, attest=True),
                await _enroll(workdir, pki, verifier, bare, name="bare", attest=True),
            ]

    assert asyncio.run(scenario()) == [
        "certificate zone production-inference",
        "certificate zone ",  # no token, no inventory: unassigned, whatever the host says
    ]
    record = _record(config, _device_id(tokened))
    assert (record.zone, record.labels) == ("production-inference", {"sku": "h100"})
    assert record.host["claimed_zone"] == CLAIMED
    assert record.host["claimed_labels"] == {"claimed": "yes"}
    assert _audit(config, record.device_id, "enrolled:enrolled")[0]["zone"] == (
        "production-inference"
    )
    bare_record = _record(config, _device_id(bare))
    assert (bare_record.zone, bare_record.labels) == ("", {})


@pytest.mark.parametrize("require_approval", [False, True])
def test_reenrollment_cannot_change_the_pinned_zone(
    require_approval: bool,
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tpm = swtpm_factory()
    device_id = _device_id(tpm)
    config = replace(
        verifier_config(workdir, pki, endorsement_ca),
        enrollment=EnrollmentConfig(require_approval=require_approval),
    )
    tokens: list[str] = []

    async def scenario() -> list[str]:
        async with running(config) as verifier:
            for options in (
                ("--zone", "model-development"),
                ("--zone", "management"),
                ("--zone", "model-development", "--label", "x=y"),
                ("--zone", "model-development"),
            ):
                tokens.append(await _token(workdir, pki, verifier, *options))
            first, move, relabel, same = tokens
            outcomes = [await _enroll(workdir, pki, verifier, tpm, token=first)]
            if require_approval:
                run = await _cli(workdir, pki, verifier, "approve", device_id)
                assert run.status == 0, run.err
            for token in ("", move, relabel, same):
                outcomes.append(await _enroll(workdir, pki, verifier, tpm, token=token))
            return outcomes

    outcomes = asyncio.run(scenario())
    assert outcomes[0] == ("pending" if require_approval else "enrolled")
    assert outcomes[1] == "enrolled"  # no token, claiming CLAIMED: keeps its zone
    assert outcomes[2].startswith("PERMISSION_DENIED: ")
    assert (
        f"device {device_id} is pinned to zone 'model-development' with labels {{}}; "
        "its bootstrap token assigns zone 'management'"
    ) in outcomes[2]
    assert f"devtrust approve {device_id} --zone Z" in outcomes[2]
    assert outcomes[3].startswith("PERMISSION_DENIED: ")
    assert "its bootstrap token assigns labels {'x': 'y'}" in outcomes[3]
    assert outcomes[4] == "enrolled"  # a token naming the pinned zone is fine
    record = _record(config, device_id)
    assert (record.zone, record.labels) == ("model-development", {})
    for refused in tokens[1:3]:  # a refused token is not spent: usable elsewhere
        digest = hashlib.sha256(refused.encode()).hexdigest()
        token = with_repos(config.database, lambda repos: repos.tokens.get(digest))  # noqa: B023
        assert token is not None
        assert token.used_at is None


def test_inventory_wins_and_is_applied_at_start(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fresh, known = swtpm_factory(), swtpm_factory()
    fresh_id, known_id = _device_id(fresh), _device_id(known)
    base = verifier_config(workdir, pki, endorsement_ca)

    async def before() -> tuple[str, str]:
        async with running(base) as verifier:
            to_inference = await _token(workdir, pki, verifier, "--zone", "production-inference")
            to_dev = await _token(workdir, pki, verifier, "--zone", "model-development")
            enrolled = await _enroll(workdir, pki, verifier, known, token=to_dev, name="known")
            return enrolled, to_inference

    enrolled, to_inference = asyncio.run(before())
    assert enrolled == "enrolled"
    assert _record(base, known_id).zone == "model-development"

    inventory = workdir / "inventory.yaml"
    inventory.write_text(
        yaml.safe_dump(
            {
                fresh_id: {"zone": "management", "labels": {"role": "bmc"}},
                known_id.upper(): {"zone": "data-processing"},
            }
        )
    )
    config = replace(base, enrollment=EnrollmentConfig(inventory=inventory))

    async def after() -> tuple[str, str, Run]:
        async with running(config) as verifier:
            store_zone = await verifier.repos.devices.get(known_id)
            assert store_zone is not None
            # Applied when the verifier starts, before the device says anything.
            assert store_zone.zone == "data-processing"
            return (
                await _enroll(workdir, pki, verifier, fresh, token=to_inference, name="fresh"),
                await _enroll(workdir, pki, verifier, known, name="known"),
                # The inventory wins over approval too: the command says where to change it.
                await _cli(workdir, pki, verifier, "approve", fresh_id, "--zone", "x"),
            )

    fresh_outcome, known_outcome, refused = asyncio.run(after())
    assert (fresh_outcome, known_outcome) == ("enrolled", "enrolled")
    record = _record(config, fresh_id)
    assert (record.zone, record.labels) == ("management", {"role": "bmc"})
    assert _record(config, known_id).zone == "data-processing"
    [change] = _audit(config, known_id, "assigned:inventory")
    assert change == {
        "zone": "data-processing",
        "labels": {},
        "was": {"zone": "model-development", "labels": {}},
    }
    assert refused.status != 0
    assert f"device {fresh_id} is listed in the inventory" in refused.err
    assert _record(config, fresh_id).zone == "management"


def test_approve_sets_zone_and_labels(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tpm = swtpm_factory()
    device_id = _device_id(tpm)
    config = replace(
        verifier_config(workdir, pki, endorsement_ca),
        enrollment=EnrollmentConfig(require_approval=True),
    )

    async def scenario() -> dict[str, Run | str]:
        async with running(config) as verifier:
            token = await _token(workdir, pki, verifier, "--zone", "model-development")
            pending = await _enroll(workdir, pki, verifier, tpm, token=token)
            approved = await _cli(
                workdir, pki, verifier, "approve", device_id,
                "--zone", "production-inference", "--label", "sku=h100",
            )  # fmt: skip
            return {
                "pending": pending,
                "approve": approved,
                "again": await _enroll(workdir, pki, verifier, tpm, token=token),
                # An enrolled device: zone moves it again; approve has nothing left to do.
                "move": await _cli(workdir, pki, verifier, "zone", device_id, "management"),
                "approve enrolled": await _cli(workdir, pki, verifier, "approve", device_id),
                "bad zone": await _cli(workdir, pki, verifier, "zone", device_id, "bad zone"),
            }

    runs = asyncio.run(scenario())
    assert runs["pending"] == "pending"
    approve = runs["approve"]
    assert isinstance(approve, Run)
    assert approve.status == 0, approve.err
    assert f"approved {device_id}" in approve.out
    assert runs["again"] == "enrolled"  # its own spent token, again: fine
    record = _record(config, device_id)
    assert record.labels == {"sku": "h100"}
    [change] = _audit(config, device_id, "assigned:approval")
    assert change["was"] == {"zone": "model-development", "labels": {}}
    assert change["zone"] == "production-inference"
    move, enrolled, bad = runs["move"], runs["approve enrolled"], runs["bad zone"]
    assert isinstance(move, Run)
    assert isinstance(enrolled, Run)
    assert isinstance(bad, Run)
    assert move.status == 0, move.err
    assert record.zone == "management"
    assert enrolled.status != 0
    assert "not pending approval" in enrolled.err
    assert bad.status != 0
    assert "zone 'bad zone' is not" in bad.err


def test_a_move_between_challenge_and_answer_is_kept(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The zone is settled when the proof arrives, from the device record as it is then: an
    operator's move made while a re-enrollment's challenge was outstanding stands."""
    tpm = swtpm_factory()
    device_id = _device_id(tpm)
    config = verifier_config(workdir, pki, endorsement_ca)
    backend = TpmBackend(tpm.tcti)

    async def scenario() -> None:
        async with running(config) as verifier:
            token = await _token(workdir, pki, verifier, "--zone", "model-development")
            assert await _enroll(workdir, pki, verifier, tpm, token=token) == "enrolled"
            async with grpc.aio.secure_channel(
                f"127.0.0.1:{verifier.enrollment_port}", channel_credentials(pki)
            ) as channel:
                stub = enrollment_pb2_grpc.EnrollmentStub(channel)
                request = enrollment_pb2.EnrollRequest(
                    ek_certificate=backend.ek_certificate() or b"",
                    ek_public=backend.ek_public(),
                    ak_public=backend.ak_public(),
                    host=_claiming_host(),
                    channel_key_spki=spki(new_key()),
                )
                challenge = await stub.Enroll(request, timeout=10)
                run = await _cli(workdir, pki, verifier, "zone", device_id, "data-processing")
                assert run.status == 0, run.err
                secret = backend.activate_credential(
                    challenge.credential_blob, challenge.encrypted_secret
                )
                await stub.Activate(
                    enrollment_pb2.ActivateRequest(
                        enrollment_id=challenge.enrollment_id,
                        proof=proof_for(secret, challenge.enrollment_id, request.channel_key_spki),
                    ),
                    timeout=10,
                )

    try:
        asyncio.run(scenario())
    finally:
        backend.close()
    assert _record(config, device_id).zone == "data-processing"
