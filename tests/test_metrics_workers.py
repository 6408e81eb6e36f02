"""One metrics endpoint for several worker processes (verifier/metrics_workers.py): the
parent serves the sum of its workers' metrics, whichever worker served each device."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace
from typing import cast

from prometheus_client.parser import text_string_to_metric_families

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

    async def scenario() -> tuple[Samples, Samples]:
        concrete, held = hold_ports(config)
        metrics = WorkerMetrics.open(concrete, 2)
        assert metrics is not None
        assert os.environ[MULTIPROC_ENV] == str(metrics.directory)
        supervisor = Supervisor(concrete, 2)
        try:
            await supervisor.start()
            keep = asyncio.create_task(supervisor.supervise())
            ports = SimpleNamespace(
                enrollment_port=parse_address(concrete.listen.enrollment)[1],
                attestation_port=parse_address(concrete.listen.attestation)[1],
            )
            verifier = cast("RunningVerifier", ports)
            for n, tpm in enumerate(tpms):
                async with enrolled_agent(workdir, pki, verifier, tpm, f"agent{n}") as agent:
                    [result] = await first_results(agent)
                    assert result.certificate is not None
            first = await scrape(metrics.port)
            # Both workers keep their values in the parent's directory.
            pids = {f.stem.rsplit("_", 1)[1] for f in metrics.directory.glob("counter_*.db")}
            assert pids == {str(pid) for pid in supervisor.pids}, pids
            # The devices gauge, read by the workers from the store.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while True:
                last = await scrape(metrics.port)
                fleet = value(last, "devtrust_devices", zone="", state="enrolled", tier="affirming")
                if fleet == 3 or loop.time() > deadline:
                    break
                await asyncio.sleep(0.1)
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
        return first, last

    first, last = asyncio.run(scenario())
    # Summed over both workers, whichever served each device's calls.
    assert value(first, "devtrust_enrollments_total", outcome="enrolled") == 3
    assert value(first, "devtrust_certificates_issued_total", kind="channel") == 3
    assert value(first, "devtrust_certificates_issued_total", kind="device") == 3
    assert value(first, "devtrust_appraisals_total", zone="", tier="affirming") == 3
    assert value(first, "devtrust_appraisal_seconds_count") == 3
    assert value(last, "devtrust_devices", zone="", state="enrolled", tier="affirming") == 3
    assert value(last, "devtrust_attestation_streams") == 0
