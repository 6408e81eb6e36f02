"""Policy evaluation cost with the default policy, beside the quote signature check.

Evidence: a simulated well-configured host (swtpm/hosttree.py) with the corpus's real
8x H100 nvidia-smi capture when $DEVTRUST_CORPUS is set (else no GPUs). Measured on one core,
alternating within each repeat, medians:
- rule evaluations per second (uncached: every rule, every GPU);
- whole policy evaluations per second, uncached (document build + every rule) and cached (what
  the verifier does while a device's posture is unchanged: a key comparison);
- a raw ECDSA P-256 verification, the cost of the quote signature check.

    DEVTRUST_CORPUS=../shared/corpus .venv/bin/python -m bench.policy [--rounds 200]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.gpu.smi_xml import parse_smi_xml
from agent.posture import collect_posture
from bench.common import rates
from protos.devtrust.v1 import attestation_pb2
from swtpm.hosttree import write_host_tree
from verifier.config import DEFAULT_POLICY
from verifier.document import build, plain
from verifier.policy import Policy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    policy = Policy.load(DEFAULT_POLICY)
    corpus = os.environ.get("DEVTRUST_CORPUS")
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
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
