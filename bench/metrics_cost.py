"""What the verifier's metrics cost on the hot path (issue 13): appraisal throughput with
and without the metrics sink, in the same run.

1. Appraise and publish, one core: a real swtpm quote (ECDSA P-256 AK, the default PCR
   selection) appraised by ``verifier.appraisal.appraise``, its decision published to the
   sinks that do no I/O: the log line (logging at WARNING, as a quiet production level
   leaves it) without, and with the metrics sink (plus the decision's timestamps, as the
   attestation service sets them when metrics are on). Rounds alternate within each
   repeat, so machine noise hits both alike; medians are reported, and their ratio.
2. Appraise, store and publish: the same, each decision also stored in a real SQLite file
   (the store sink, group commit, ``concurrency`` at a time), as the verifier does.

    .venv/bin/python -m bench.metrics_cost [--rounds 2000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from bench.appraisal import quotes
from bench.common import rates
from devtrust.agent.evidence import evidence_body, host_facts
from devtrust.agent.state import new_key, spki
from devtrust.core.ids import DeviceId, Nonce
from devtrust.verifier.appraisal import Evidence, Expectation, appraise
from devtrust.verifier.config import AttestationConfig, LimitsConfig
from devtrust.verifier.decision import Decision, LogSink, Sinks
from devtrust.verifier.metrics import MetricsSink, VerifierMetrics
from devtrust.verifier.storage import StoreSink, open_repositories
from devtrust.verifier.tpm.constants import hash_alg, hash_name
from devtrust.verifier.tpm.structures import ak_qualified_names, parse_public
from devtrust.verifier.trust import Claim, Finding, Severity, TrustResult
from devtrust.verifier.wire_body import WireBody, body_from_wire
from tests.db import NOW, device


def _done(coro: Coroutine[Any, Any, object]) -> None:
    """Run a coroutine that never suspends (the sinks without I/O) without a loop."""
    try:
        coro.send(None)
    except StopIteration:
        return
    raise RuntimeError("a sink suspended")


def _appraiser() -> tuple[Callable[[], TrustResult], DeviceId]:
    """One real quote's appraisal, as a function returning its trust result."""
    selection = AttestationConfig().selection
    now = datetime.datetime.now(datetime.UTC)
    nonce = Nonce(b"\x42" * 32)
    body = evidence_body(host=host_facts(), certify_key_spki=spki(new_key()), now=now)
    sel = [(hash_name(s.hash_alg), list(s.pcrs)) for s in selection]
    ak_public, ek_public, attest, signature, values = quotes(nonce, body, sel)["ecdsa-p256"]
    ak = parse_public(ak_public)
    evidence = Evidence(
        nonce=nonce,
        attest=attest,
        signature=signature,
        pcrs={(hash_alg(b), i): v for (b, i), v in values.items()},
        body=body,
        body_doc=WireBody(body_from_wire(body, LimitsConfig())),
        certify_key=None,
    )
    device_id = device(1).device_id
    expect = Expectation(
        device_id=device_id,
        nonce=nonce,
        selection=selection,
        ak_key=ak.public_key(),
        staleness=datetime.timedelta(minutes=3),
        qualified_signers=ak_qualified_names(ak, parse_public(ek_public)),
    )
    # Two findings, as a device with a warning carries (their ids are counted).
    extra = (Finding("policy.unknown", Severity.WARNING, Claim.CONFIGURATION, "bench"),)

    def once() -> TrustResult:
        result = appraise(evidence, expect, now=now).result
        return replace(result, device_id=device_id, findings=result.findings + extra)

    return once, device_id


def _decision(result: TrustResult, device_id: DeviceId) -> Decision:
    return Decision(
        device_id=device_id,
        zone="lab",
        result=result,
        previous_tier=result.tier,
        certificate=None,
        withheld="bench",
        tpm=None,
        rebooted=False,
    )


def bench_pure(rounds: int, repeats: int) -> dict[str, Any]:
    appraise_once, device_id = _appraiser()
    metrics = VerifierMetrics(CollectorRegistry())
    without = Sinks([LogSink()])
    with_metrics = Sinks([MetricsSink(metrics), LogSink()])

    def plain() -> None:
        _done(without.publish(_decision(appraise_once(), device_id)))

    def measured() -> None:
        received = time.monotonic()
        decision = replace(
            _decision(appraise_once(), device_id), received=received, posture_noted=None
        )
        _done(with_metrics.publish(decision))

    base, metered = rates([plain, measured], rounds, repeats)
    # The sink alone, per decision (microseconds).
    decision = replace(_decision(appraise_once(), device_id), received=time.monotonic())
    sink = MetricsSink(metrics)
    sink_rate = rates([lambda: _done(sink.publish(decision))], rounds * 10, repeats)[0]
    return {
        "appraisals_per_s_without_metrics": round(base),
        "appraisals_per_s_with_metrics": round(metered),
        "ratio": round(metered / base, 3),
        "metrics_sink_us_per_decision": round(1e6 / sink_rate, 2),
    }


async def _stored(
    repos: Any, sinks: Sinks, appraise_once: Callable[[], TrustResult], devices: int, r: int
) -> float:
    gate = asyncio.Semaphore(64)

    async def one(n: int) -> None:
        dev = device(n)
        result = replace(
            appraise_once(),
            device_id=dev.device_id,
            appraised_at=NOW + datetime.timedelta(seconds=r),
        )
        decision = replace(_decision(result, dev.device_id), received=time.monotonic())
        async with gate:
            await sinks.publish(decision)

    start = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(devices)))
    return devices / (time.perf_counter() - start)


async def bench_stored(devices: int, repeats: int) -> dict[str, Any]:
    appraise_once, _ = _appraiser()
    metrics = VerifierMetrics(CollectorRegistry())
    with tempfile.TemporaryDirectory() as tmp:
        repos = await open_repositories(Path(tmp) / "v.db")
        try:
            for n in range(devices):
                await repos.devices.save(device(n), now=NOW, event="enrolled:enrolled")
            without = Sinks([StoreSink(repos), LogSink()])
            with_metrics = Sinks([StoreSink(repos), MetricsSink(metrics), LogSink()])
            await _stored(repos, without, appraise_once, devices, 0)  # warm: rows exist
            base: list[float] = []
            metered: list[float] = []
            for r in range(1, repeats + 1):
                base.append(await _stored(repos, without, appraise_once, devices, 2 * r))
                metered.append(
                    await _stored(repos, with_metrics, appraise_once, devices, 2 * r + 1)
                )
        finally:
            await repos.close()
    b, m = statistics.median(base), statistics.median(metered)
    return {
        "stored_per_s_without_metrics": round(b),
        "stored_per_s_with_metrics": round(m),
        "ratio": round(m / b, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--devices", type=int, default=500)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    pure = bench_pure(args.rounds, args.repeats)
    stored = asyncio.run(bench_stored(args.devices, args.repeats))
    print(
        json.dumps({"appraise_and_publish": pure, "appraise_store_and_publish": stored}, indent=2)
    )


if __name__ == "__main__":
    main()
