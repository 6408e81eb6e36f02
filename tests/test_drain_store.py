"""A database that stops answering (issue 12): the call that meets the outage ends with
UNAVAILABLE (the agent retries; nothing of the refused decision is stored), never INTERNAL;
the stream machinery and the process live on; health says NOT_SERVING while the database does
not answer and SERVING again once it does, without a restart.

The outage here is an SQLite store that raises SQLite's own outage error (a disk I/O error)
for a while, from every repository method (``Outage``): what a PostgreSQL restart looks like
to the verifier is tested against a real server in tests/test_drain_pg.py."""

from __future__ import annotations

import asyncio
import inspect
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from devtrust.core.ids import DeviceId
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import attestation_pb2, query_pb2
from devtrust.verifier import server
from devtrust.verifier.config import ServerConfig, VerifierConfig
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.storage import Repositories
from devtrust.verifier.storage.sql import StoreUnavailable
from devtrust.verifier.store_health import OUTAGE_DETAILS, is_outage
from tests.conftest import SwtpmFactory
from tests.env import (
    channel_credentials,
    enrolled_agent,
    operator_stub,
    quote_evidence,
    running,
    stream_channel,
    verifier_config,
)
from tests.test_drain import answered, challenged, end_of, health_of

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The repositories an outage reaches (the change feed and the stream leases keep their own
# connection: a real outage would reach them too, and they retry on their own).
_REPOSITORIES = (
    "devices",
    "enrollments",
    "tokens",
    "trust",
    "certificates",
    "audit",
    "revocations",
    "roles",
    "operations",
)


class Outage:
    """While ``on``, every repository method raises SQLite's error for a failed disk."""

    def __init__(self) -> None:
        self.on = False
        self.met = 0

    def check(self) -> None:
        if self.on:
            self.met += 1
            raise sqlite3.OperationalError("disk I/O error")


class _Failing:
    """One repository, its coroutine methods failing during the outage."""

    def __init__(self, inner: Any, outage: Outage) -> None:
        self._inner = inner
        self._outage = outage

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            self._outage.check()
            return await attr(*args, **kwargs)

        return call


class FailingRepositories:
    """The repositories, each failing during the outage; everything else as it is."""

    def __init__(self, inner: Repositories, outage: Outage) -> None:
        self._inner = inner
        self._outage = outage
        self._wrapped = {name: _Failing(getattr(inner, name), outage) for name in _REPOSITORIES}

    def __getattr__(self, name: str) -> Any:
        if name in self._wrapped:
            return self._wrapped[name]
        return getattr(self._inner, name)

    def policies(self) -> Any:
        return _Failing(self._inner.policies(), self._outage)


def failing_store(monkeypatch: pytest.MonkeyPatch, outage: Outage) -> None:
    """The verifier started next opens its database through ``outage``."""
    real: Callable[..., Any] = server.open_repositories  # type: ignore[attr-defined]

    async def open_failing(*args: Any, **kwargs: Any) -> Any:
        return FailingRepositories(await real(*args, **kwargs), outage)

    monkeypatch.setattr(server, "open_repositories", open_failing)


def probed(workdir: Path, pki: PkiFiles, ek_ca: EndorsementCA) -> VerifierConfig:
    return replace(verifier_config(workdir, pki, ek_ca), server=ServerConfig(store_probe_s=0.2))


async def health_becomes(channel: grpc.aio.Channel, status: int, limit_s: float = 5.0) -> float:
    """Seconds until health says ``status``."""
    started = time.monotonic()
    while await health_of(channel) != status:
        assert time.monotonic() - started < limit_s, f"health never became {status}"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def test_the_outage_errors_are_told_from_bugs() -> None:
    assert is_outage(StoreUnavailable("the database server does not answer"))
    assert is_outage(sqlite3.OperationalError("database is locked"))
    assert not is_outage(sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert not is_outage(ValueError("disk I/O error"))

    class OperationalError(Exception):  # as psycopg names its own
        pass

    OperationalError.__module__ = "psycopg.errors"
    assert is_outage(OperationalError("connection refused"))


def test_a_decision_that_meets_an_outage_ends_the_stream_unavailable_and_health_follows(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The device's evidence arrives while the database is down: the stream ends with
    UNAVAILABLE (not INTERNAL, no traceback in the log), nothing of it is stored, health
    says NOT_SERVING at once and the operator's query is UNAVAILABLE too. The database
    answers again: health says SERVING within the probe's interval, and the device's next
    stream is appraised, stored and answered by the same process."""
    outage = Outage()
    failing_store(monkeypatch, outage)
    config = probed(workdir, pki, endorsement_ca)

    async def scenario() -> float:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
            stream_channel(pki, verifier, agent.enrollment) as channel,
        ):
            device = agent.enrollment.device_id
            call, challenge = await challenged(channel)
            evidence = await quote_evidence(agent, challenge)
            outage.on = True
            await call.write(attestation_pb2.AgentMessage(evidence=evidence))
            ended = await end_of(call)
            assert ended.code() == grpc.StatusCode.UNAVAILABLE, ended
            assert ended.details() == OUTAGE_DETAILS
            assert await health_of(channel) == NOT_SERVING
            ops, stub = operator_stub(pki, verifier, workdir)
            with pytest.raises(grpc.aio.AioRpcError) as query:
                await stub.GetDevice(query_pb2.GetDeviceRequest(device_id=device), timeout=10)
            assert query.value.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(0.5)  # the probe keeps failing meanwhile
            assert await health_of(channel) == NOT_SERVING
            outage.on = False
            back = await health_becomes(channel, SERVING)
            call, challenge = await challenged(channel)
            reply = await answered(call, agent, challenge)
            history = await verifier.repos.audit.history(DeviceId(device))
            appraisals = [e.detail for e in history if e.event == "appraisal"]
            assert [a["evidence_digest"] for a in appraisals] == [
                reply.result.trust.evidence_digest
            ]
            await ops.close()
            return back

    with caplog.at_level(logging.INFO):
        back = asyncio.run(scenario())
    assert back < 2.0, back
    assert outage.met >= 3
    assert "Traceback" not in caplog.text
    assert "failed" not in " ".join(r.getMessage() for r in caplog.records if r.exc_info)
    assert "database unavailable (disk I/O error): health NOT_SERVING" in caplog.text
    assert "database answers again: health SERVING" in caplog.text


def test_the_probe_finds_an_outage_no_call_met(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No device, no operator: health follows the database by the probe alone, both ways,
    on both ports."""
    outage = Outage()
    failing_store(monkeypatch, outage)
    config = probed(workdir, pki, endorsement_ca)

    async def scenario() -> tuple[float, float]:
        async with running(config) as verifier:
            channel, _ = operator_stub(pki, verifier, workdir)
            enrollment = grpc.aio.secure_channel(
                f"127.0.0.1:{verifier.enrollment_port}", channel_credentials(pki)
            )
            async with channel, enrollment:
                assert await health_of(channel) == SERVING
                outage.on = True
                down = await health_becomes(channel, NOT_SERVING)
                assert await health_of(enrollment) == NOT_SERVING
                outage.on = False
                up = await health_becomes(channel, SERVING)
                assert await health_of(enrollment) == SERVING
                assert verifier.store_health is not None
                assert verifier.store_health.outages == 1
                return down, up

    down, up = asyncio.run(scenario())
    assert down < 2.0
    assert up < 2.0
