"""A verifier restarted under a running agent (issue 12): killed (SIGKILL, mid-stream) or
stopped (SIGTERM: it drains), then started again on the same address and database. The
agent's stream breaks, its real attestation client reconnects to the restarted verifier
within its backoff, and the device's results go on; every result the agent received is in
the store (its certificates among the device's live ones), none lost."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from devtrust.agent.messages import AttestationResult
from devtrust.swtpm import EndorsementCA
from devtrust.verifier.pki import PkiFiles
from tests.conftest import SwtpmFactory
from tests.env import enrolled_agent
from tests.verifier_process import (
    free_port,
    stored_appraisals,
    stored_serials,
    verifier_process,
    write_config,
)

# Results before the restart, and after it.
BEFORE, AFTER = 3, 3


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_a_verifier_restarted_mid_stream_loses_nothing_and_the_agent_goes_on(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    how: signal.Signals,
) -> None:
    database = str(workdir / "verifier.db")
    config = write_config(
        workdir / "verifier.yaml",
        pki,
        endorsement_ca,
        database=database,
        ports=(free_port(), free_port()),
        # A challenge every half second: the restart falls in the middle of the stream.
        attestation={"interval_s": 0.5, "stream_challenge_gap_s": 0},
        server={"drain_s": 5},
    )
    results: list[tuple[int, AttestationResult]] = []
    with verifier_process(workdir, config) as proc:

        async def scenario() -> tuple[str, float]:
            async with enrolled_agent(workdir, pki, proc.verifier, swtpm_factory()) as agent:
                got = asyncio.Event()

                def on_result(result: AttestationResult) -> None:
                    results.append((proc.starts, result))
                    got.set()

                async def until(count: int) -> None:
                    while len(results) < count:
                        got.clear()
                        await asyncio.wait_for(got.wait(), 30)

                stop = asyncio.Event()
                client = asyncio.create_task(agent.client(on_result=on_result).run(stop))
                try:
                    await until(BEFORE)
                    proc.signal(how)
                    await asyncio.to_thread(proc.wait, 15)
                    await asyncio.to_thread(proc.start)
                    restarted = time.monotonic()
                    first = len(results) + 1
                    await until(first)
                    reconnected = time.monotonic() - restarted
                    await until(len(results) + AFTER - 1)
                finally:
                    stop.set()
                    await client
                return agent.enrollment.device_id, reconnected

        device, reconnected = asyncio.run(scenario())
    assert proc.starts == 2
    assert sum(1 for start, _ in results if start == 2) >= AFTER
    # The agent's backoff is at most 1 s here (tests.env agent_config), and an appraisal.
    assert reconnected < 5.0, reconnected
    stored = asyncio.run(stored_appraisals(database, device))
    assert len(stored) >= len(results)
    received = {r.certificate.serial for _, r in results if r.certificate is not None}
    assert received
    assert received <= asyncio.run(stored_serials(database, device))
    log = proc.text()
    assert "Traceback" not in log, log
    if how == signal.SIGTERM:
        assert "drained in" in log, log
