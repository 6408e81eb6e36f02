"""One metrics endpoint for several worker processes (verifier/metrics_workers.py): the
parent serves the sum of its workers' metrics, whichever worker served each device; only
worker 0 reads the fleet; a dead worker's fleet readings go with it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import cast

from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA
from devtrust.verifier.config import MetricsConfig, ServerConfig, parse_address
from devtrust.verifier.metrics import MULTIPROC_ENV
from devtrust.verifier.metrics_workers import WorkerMetrics
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.server import RunningVerifier
from devtrust.verifier.workers import Supervisor, hold_ports
from tests.conftest import SwtpmFactory
from tests.env import enrolled_agent, first_results, verifier_config
from tests.test_metrics import Samples, scrape_text, value


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def in_file(path: Path, name: str) -> float:
    """The sum of the samples ``name`` in one worker's metrics file (that worker's share)."""
    families = MultiProcessCollector.merge([str(path)])  # type: ignore[no-untyped-call]
    return float(sum(s.value for f in families for s in f.samples if s.name == name))


def share(directory: Path, kind: str, pid: int, name: str) -> float:
    return sum(in_file(p, name) for p in directory.glob(f"{kind}_{pid}.db"))


def test_the_parent_serves_the_sum_of_its_workers(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    tpms = [swtpm_factory() for _ in range(3)]
    config = dataclasses.replace(
        verifier_config(workdir, pki, endorsement_ca),
        metrics=MetricsConfig(listen="127.0.0.1:0", refresh_s=0.1),
        server=ServerConfig(workers=2),
    )

    async def scrape(port: int) -> Samples:
        return parse(await asyncio.to_thread(scrape_text, port))

    async def scenario() -> tuple[Samples, Samples, int]:
        concrete, held = hold_ports(config)
        metrics = WorkerMetrics.open(concrete, 2)
        assert metrics is not None
        assert os.environ[MULTIPROC_ENV] == str(metrics.directory)
        supervisor = Supervisor(concrete, 2, on_exit=metrics.worker_exited)  # as supervise()
        try:
            await supervisor.start()
            keep = asyncio.create_task(supervisor.supervise())
            ports = SimpleNamespace(
                enrollment_port=parse_address(concrete.listen.enrollment)[1],
                attestation_port=parse_address(concrete.listen.attestation)[1],
            )
            verifier = cast("RunningVerifier", ports)
            async with contextlib.AsyncExitStack() as stack:
                agents = [
                    await stack.enter_async_context(
                        enrolled_agent(workdir, pki, verifier, tpm, f"agent{n}")
                    )
                    for n, tpm in enumerate(tpms)
                ]
                # Each stream is a new connection, which SO_REUSEPORT gives either worker:
                # attest until each worker appraised some (at most 40 streams; all 40 on one
                # worker is a chance of 2^-39), so that the endpoint's figure must be a sum.
                appraised = 0
                while appraised < 3 or (
                    appraised < 40
                    and not all(
                        share(metrics.directory, "counter", pid, "devtrust_appraisals_total")
                        for pid in supervisor.pids
                    )
                ):
                    [result] = await first_results(agents[appraised % 3])
                    assert result.trust.tier is Tier.AFFIRMING
                    # Its first stream gets a certificate; a later one, the first still
                    # valid, asks for none (the agent keeps it).
                    assert appraised >= 3 or result.certificate is not None
                    appraised += 1
            first = await scrape(metrics.port)
            # Both workers keep their values in the parent's directory, each a share.
            pids = {f.stem.rsplit("_", 1)[1] for f in metrics.directory.glob("counter_*.db")}
            assert pids == {str(pid) for pid in supervisor.pids}, pids
            shares = [
                share(metrics.directory, "counter", pid, "devtrust_appraisals_total")
                for pid in supervisor.pids
            ]
            assert all(shares), shares
            assert sum(shares) == appraised, (shares, appraised)
            # The devices gauge, read by the workers from the store.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while True:
                last = await scrape(metrics.port)
                fleet = value(last, "devtrust_devices", zone="", state="enrolled", tier="affirming")
                if fleet == 3 or loop.time() > deadline:
                    break
                await asyncio.sleep(0.1)
            # Only worker 0 reads the fleet (review L1): the other's file has no devices.
            zero, other = supervisor.pids
            assert share(metrics.directory, "gauge_mostrecent", zero, "devtrust_devices") == 3
            assert share(metrics.directory, "gauge_mostrecent", other, "devtrust_devices") == 0
            # Worker 0 killed: its fleet readings go with it (review L2), not kept at their
            # last value under a successor that may never set those series.
            assert list(metrics.directory.glob(f"gauge_mostrecent_{zero}.db"))
            os.kill(zero, signal.SIGKILL)
            deadline = loop.time() + 20
            while supervisor.pids[0] in (zero, 0) and loop.time() < deadline:
                await asyncio.sleep(0.05)
            assert supervisor.pids[0] not in (zero, 0), "worker 0 was not started again"
            assert not list(metrics.directory.glob(f"gauge_mostrecent_{zero}.db"))
            supervisor.stop()
            await keep
        finally:
            supervisor.stop()
            await supervisor.shutdown()
            await metrics.aclose()
            for sock in held:
                sock.close()
        assert MULTIPROC_ENV not in os.environ
        assert not metrics.directory.exists()
        return first, last, appraised

    first, last, appraised = asyncio.run(scenario())
    # Summed over both workers, whichever served each device's calls.
    assert value(first, "devtrust_enrollments_total", outcome="enrolled") == 3
    assert value(first, "devtrust_certificates_issued_total", kind="channel") == 3
    # One device certificate for each device's first stream; a later stream, the first
    # certificate still valid, asks for none.
    assert value(first, "devtrust_certificates_issued_total", kind="device") == 3
    assert value(first, "devtrust_appraisals_total", zone="", tier="affirming") == appraised
    assert value(first, "devtrust_appraisal_seconds_count") == appraised
    assert value(last, "devtrust_devices", zone="", state="enrolled", tier="affirming") == 3
    assert value(last, "devtrust_attestation_streams") == 0
