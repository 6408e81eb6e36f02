"""PostgreSQL restarted under a running verifier (issue 12): a real `devtrust-verifier serve`
process on a real PostgreSQL (tests/pg.py), a device's real attestation client. While the
database is down the verifier says NOT_SERVING and the device's streams end UNAVAILABLE; once
it is back the same process (no restart of its own) says SERVING and the device's results
go on; every result the device received is in the database."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from devtrust.agent.messages import AttestationResult
from devtrust.swtpm import EndorsementCA
from devtrust.verifier.pki import PkiFiles
from tests.conftest import SwtpmFactory
from tests.env import channel_credentials, enrolled_agent
from tests.pg import PgServer
from tests.test_drain import health_of
from tests.verifier_process import (
    stored_appraisals,
    stored_serials,
    verifier_process,
    write_config,
)

pytest_plugins = ["tests.pg"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_becomes(channel: grpc.aio.Channel, status: int, limit_s: float) -> float:
    """Seconds until health says ``status`` (a verifier that does not answer counts as
    not yet)."""
    started = time.monotonic()
    while True:
        try:
            if await health_of(channel) == status:
                return time.monotonic() - started
        except grpc.aio.AioRpcError:
            pass
        assert time.monotonic() - started < limit_s, f"health never became {status}"
        await asyncio.sleep(0.05)


def test_a_postgresql_restart_under_a_running_verifier_loses_nothing(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    pg_server: PgServer,
    pg_url: str,
) -> None:
    config = write_config(
        workdir / "verifier.yaml",
        pki,
        endorsement_ca,
        database=pg_url,
        attestation={"interval_s": 0.5, "stream_challenge_gap_s": 0},
        server={"store_probe_s": 0.2},
    )
    results: list[tuple[str, AttestationResult]] = []
    phase = ["before"]
    with verifier_process(workdir, config) as proc:
        assert proc.process is not None
        pid = proc.process.pid

        async def scenario() -> tuple[str, float, float]:
            async with enrolled_agent(workdir, pki, proc.verifier, swtpm_factory()) as agent:
                got = asyncio.Event()

                def on_result(result: AttestationResult) -> None:
                    results.append((phase[0], result))
                    got.set()

                async def until(count: int) -> None:
                    while len(results) < count:
                        got.clear()
                        await asyncio.wait_for(got.wait(), 60)

                enrollment = grpc.aio.secure_channel(
                    f"127.0.0.1:{proc.enrollment_port}", channel_credentials(pki)
                )
                stop = asyncio.Event()
                client = asyncio.create_task(agent.client(on_result=on_result).run(stop))
                try:
                    await until(2)
                    await asyncio.to_thread(pg_server.stop)
                    phase[0] = "down"
                    down = await health_becomes(enrollment, NOT_SERVING, 15)
                    await asyncio.sleep(1.0)  # the device tries meanwhile
                    await asyncio.to_thread(pg_server.start)
                    phase[0] = "after"
                    up = await health_becomes(enrollment, SERVING, 30)
                    after = len(results)
                    await until(after + 2)
                finally:
                    stop.set()
                    await client
                    await enrollment.close()
                return agent.enrollment.device_id, down, up

        device, down, up = asyncio.run(scenario())
        assert proc.process.pid == pid
        assert proc.process.poll() is None  # the verifier lived through it
    assert down < 5.0, down
    assert up < 20.0, up
    assert [p for p, _ in results if p == "down"] == []  # nothing answered without a store
    assert sum(1 for p, _ in results if p == "after") >= 2
    stored = asyncio.run(stored_appraisals(pg_url, device))
    assert len(stored) >= len(results)
    received = {r.certificate.serial for _, r in results if r.certificate is not None}
    assert received <= asyncio.run(stored_serials(pg_url, device))
    log = proc.text()
    assert "database unavailable" in log, log
    assert "database answers again: health SERVING" in log, log
