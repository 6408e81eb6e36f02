"""Latency from a posture change on the host to the verifier's changed result.

A real verifier (SQLite, mTLS on loopback) and a swtpm-backed agent whose posture root is a
simulated host tree; the default policy; a 60 s challenge interval, so only PostureChanged
can explain a fast result. Each repeat flips PermitRootLogin and times the file write to the
result with the new tier. Reports the median and the maximum.

Each flip is a *first* change: the agent sends the first change at once and coalesces later
ones for ``posture_debounce_s``, the verifier challenges for the first note at once and for
later ones at most every ``posture_min_interval_s`` (issue 7, item 8). Both windows are set
to 2 s here and the flips are 2.5 s apart, so what is measured is detection, not coalescing.

    .venv/bin/python -m bench.posture_latency [--repeats 7]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from devtrust.agent.attest import AttestationClient
from devtrust.agent.config import AgentConfig, TpmConfig, VerifierEndpoint
from devtrust.agent.enroll import enroll
from devtrust.agent.main import make_host, make_tpm
from devtrust.agent.messages import AttestationResult
from devtrust.agent.state import AgentFiles
from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA, Swtpm, provision
from devtrust.swtpm.bootlog import header_only_log
from devtrust.swtpm.hosttree import write_host_tree
from devtrust.verifier.config import (
    AttestationConfig,
    CaConfig,
    EndorsementConfig,
    ListenConfig,
    TlsConfig,
    VerifierConfig,
)
from devtrust.verifier.pki import init_pki
from devtrust.verifier.server import start_verifier

HARDENING = "etc/ssh/sshd_config.d/10-hardening.conf"
WINDOW_S = 2.0


async def measure(work: Path, repeats: int) -> list[float]:
    pki = init_pki(work / "pki", hostnames=["127.0.0.1"], now=datetime.datetime.now(datetime.UTC))
    ca = EndorsementCA.create(work / "ek-ca")
    provision(work / "tpm", ca)
    tpm = Swtpm(work / "tpm").start()
    verifier = await start_verifier(
        VerifierConfig(
            database=work / "v.db",
            listen=ListenConfig("127.0.0.1:0", "127.0.0.1:0"),
            tls=TlsConfig(pki.server_cert, pki.server_key),
            ca=CaConfig(pki.ca_cert, pki.ca_key),
            endorsement=EndorsementConfig(roots=[], trust_swtpm_local_ca=ca.cert_path),
            attestation=AttestationConfig(interval_s=60.0, posture_min_interval_s=WINDOW_S),
        )
    )
    root = write_host_tree(work / "host")
    cfg = AgentConfig(
        verifier=VerifierEndpoint(
            f"127.0.0.1:{verifier.enrollment_port}",
            f"127.0.0.1:{verifier.attestation_port}",
            pki.ca_cert,
        ),
        tpm=TpmConfig(tcti=tpm.tcti),
        state_dir=work / "state",
        runtime_dir=work / "run",
        event_log=header_only_log(work / "event-log.bin"),
        gpu_source="none",
        posture_root=root,
        posture_debounce_s=WINDOW_S,
    )
    atpm = make_tpm(cfg)
    files = AgentFiles(cfg.state_dir, cfg.runtime_dir)
    queue: asyncio.Queue[AttestationResult] = asyncio.Queue()
    stop = asyncio.Event()
    try:
        host = make_host(cfg)
        client = AttestationClient(
            cfg,
            tpm=atpm,
            host=host,
            files=files,
            enrollment=await enroll(cfg, atpm, files, host=host),
            on_result=queue.put_nowait,
        )
        task = asyncio.create_task(client.run(stop))
        await queue.get()
        await asyncio.sleep(0.5)
        samples = []
        for n in range(repeats):
            login = "yes" if n % 2 == 0 else "no"
            want = Tier.WARNING if login == "yes" else Tier.AFFIRMING
            (root / HARDENING).write_text(f"PermitRootLogin {login}\nPasswordAuthentication no\n")
            start = time.monotonic()
            while (await asyncio.wait_for(queue.get(), 30)).trust.tier != want:
                pass
            samples.append(time.monotonic() - start)
            # A random phase against the 0.25 s poll: otherwise each flip lands just before
            # a poll and the latency reads as near zero.
            await asyncio.sleep(WINDOW_S + 0.5 + random.uniform(0, AgentConfig().watch_interval_s))  # noqa: S311
        stop.set()
        await task
        return samples
    finally:
        atpm.close()
        await verifier.stop(grace=None)
        tpm.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        samples = asyncio.run(measure(Path(tmp), args.repeats))
    print(
        json.dumps(
            {
                "posture_change_to_result_s": {
                    "median": round(statistics.median(samples), 3),
                    "max": round(max(samples), 3),
                    "repeats": len(samples),
                },
                "watch_interval_s": AgentConfig().watch_interval_s,
                "posture_debounce_s": WINDOW_S,
                "posture_min_interval_s": WINDOW_S,
            }
        )
    )


if __name__ == "__main__":
    main()
