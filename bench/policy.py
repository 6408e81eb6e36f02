"""Policy evaluation cost with the default policy, beside the quote signature check.

Evidence: a simulated well-configured host (swtpm/hosttree.py) with the corpus's real
8x H100 nvidia-smi capture (tests/data/corpus, or $DEVTRUST_CORPUS when set; without a corpus,
no GPUs). Measured on one core, alternating within each repeat, medians:
- rule evaluations per second (uncached: every rule, every GPU);
- whole policy evaluations per second, uncached (document build + every rule) and cached (what
  the verifier does while a device's posture is unchanged: a key comparison);
- a raw ECDSA P-256 verification, the cost of the quote signature check;
- scaling: one whole uncached evaluation (document build + every rule) with the capture's
  GPUs replicated to 8, 64 and 256 (ECC off on every other GPU, so half the GPUs fail a rule
  and are reported with their finding), zone model-development; median of repeats, the cost
  per GPU, and the ratio to 8 GPUs, which is about the GPU ratio (32 at 256) when the cost
  is linear in the GPU count.

    .venv/bin/python -m bench.policy [--rounds 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from bench.common import corpus_root, rates
from devtrust.agent.gpu.smi_xml import parse_smi_xml
from devtrust.agent.posture import collect_posture
from devtrust.swtpm.hosttree import write_host_tree
from devtrust.v1 import attestation_pb2
from devtrust.verifier.config import DEFAULT_POLICY
from devtrust.verifier.document import build
from devtrust.verifier.policy import Policy
from devtrust.verifier.wire_body import plain


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    policy = Policy.load(DEFAULT_POLICY)
    corpus = corpus_root()
    gpu = attestation_pb2.GpuState(source="none")
    if corpus:
        gpu = parse_smi_xml(next(Path(corpus, "gpu").rglob("qx-h100.xml")).read_bytes())
    with tempfile.TemporaryDirectory() as tmp:
        os_ = collect_posture(write_host_tree(Path(tmp)))
    body = plain(attestation_pb2.EvidenceBody(os=os_, gpu=gpu))
    doc = build(body, bulletins=policy.bulletins)
    host_rules = [r for r in policy.rules if r.scope == "host"]
    gpu_rules = [r for r in policy.rules if r.scope == "gpu"]
    evaluations = len(host_rules) + len(gpu_rules) * len(doc["gpu"]["gpus"])
    cache = ("key", policy.evaluate(doc, device_id="bench"))

    def uncached() -> None:
        policy.evaluate(build(body, bulletins=policy.bulletins), device_id="bench")

    def cached() -> None:
        assert cache[0] == "key"

    key = ec.generate_private_key(ec.SECP256R1())
    message = os.urandom(145)
    signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
    public = key.public_key()

    def verify() -> None:
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))

    full, hit, ecdsa = rates([uncached, cached, verify], args.rounds, args.repeats)
    scaling = _scaling(policy, os_, gpu, args.repeats)
    print(
        json.dumps(
            {
                "gpus": len(doc["gpu"]["gpus"]),
                "rules": len(policy.rules),
                "rule_evaluations_per_policy": evaluations,
                "rule_evaluations_per_s": round(full * evaluations),
                "policy_uncached_per_s": round(full),
                "policy_cached_per_s": round(hit),
                "ecdsa_p256_verify_per_s": round(ecdsa),
                "uncached_cost_vs_signature": round(ecdsa / full, 2),
                "scaling": scaling,
            },
            indent=2,
        )
    )


def _replicated(gpu: attestation_pb2.GpuState, count: int) -> attestation_pb2.GpuState:
    """The capture's GPUs (or one made-up H100 without a corpus) repeated to ``count``, each
    with its own index, UUID and bus id; ECC off on every other one."""
    models = list(gpu.gpus) or [
        attestation_pb2.Gpu(
            name="NVIDIA H100 80GB HBM3",
            ecc_enabled=True,
            ecc_uncorrected_volatile=0,
            remapped_rows_pending=0,
            remapped_rows_failed=0,
            cc_state="off",
        )
    ]
    out = attestation_pb2.GpuState()
    out.CopyFrom(gpu)
    del out.gpus[:]
    for i in range(count):
        g = out.gpus.add()
        g.CopyFrom(models[i % len(models)])
        g.index = i
        g.uuid = f"GPU-bench-{i:08d}"
        g.pci_bus_id = f"0000:{i // 32:02X}:{i % 32:02X}.0"
        g.ecc_enabled = i % 2 == 0
    return out


def _ecc_findings(policy: Policy, body: dict[str, object]) -> int:
    zone = "model-development"
    doc = build(body, bulletins=policy.bulletins, zone=zone)
    out = policy.evaluate(doc, device_id="bench", zone=zone)
    return sum(f.id == "gpu.ecc_enabled" for f in out.findings)


def _scaling(
    policy: Policy, os_: attestation_pb2.OsPosture, gpu: attestation_pb2.GpuState, repeats: int
) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = []
    for count in (8, 64, 256):
        body = plain(attestation_pb2.EvidenceBody(os=os_, gpu=_replicated(gpu, count)))
        assert _ecc_findings(policy, body) == count // 2  # each failing GPU found, once
        rounds = max(3, 512 // count)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(rounds):
                _ecc_findings(policy, body)
            samples.append((time.perf_counter() - start) / rounds)
        seconds = statistics.median(samples)
        rows.append(
            {
                "gpus": count,
                "policy_ms": round(seconds * 1e3, 2),
                "per_gpu_us": round(seconds / count * 1e6, 1),
                "vs_8_gpus": round(seconds / (rows[0]["policy_ms"] / 1e3), 1) if rows else 1.0,
            }
        )
    return rows


if __name__ == "__main__":
    main()
