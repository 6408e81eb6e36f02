"""GPU attestation report verifications per second on one core, against raw ECDSA P-384
signature verification in the same run.

A verification is ``devtrust.verifier.gpu.appraise.appraise_report`` on nvtrust's recorded
545.00 report (tests/data/corpus/gpu/nvidia_nvtrust_attestation) with its five-certificate
chain and NVIDIA's two test RIMs: parse, nonce, the chain to NVIDIA's Device Identity CA
(``cryptography.x509.verification``: four ECDSA P-384 signatures), the report's signature
(one more) and the comparison of 33 active RIM measurements. The RIMs are verified once,
before timing (the RIM store verifies them when they are added, never per report).
With the chain cache (verifier/gpu/appraise.py ``ChainCache``: the next report of a GPU
whose chain verified costs its own signature only) and without it (``size=0``).
Alongside: the raw verify of the report's signature with the leaf key, the chain alone,
and the parse alone. Each repeat times ROUNDS calls of each, alternating, so machine noise
hits all alike; medians.

    .venv/bin/python -m bench.gpu_verify [--rounds 200] [--repeats 9] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from bench.common import IN_REPO_CORPUS, corpus_root, rates
from devtrust.verifier.gpu import spdm
from devtrust.verifier.gpu.appraise import (
    ChainCache,
    GpuAnchors,
    GpuVerdict,
    HostGpu,
    appraise_report,
)
from devtrust.verifier.gpu.rim import FileRims, load_rim
from devtrust.verifier.gpu.types import REPORT, GpuEvidence

RIM_TIME = datetime(2024, 6, 1, tzinfo=UTC)  # the test RIMs' signers expire in June 2025
RIM_FILES = ("Driver_RIM_test_no_gpu.swidtag", "1010_0200_882_96005E0001_test_no_gpu.swidtag")


def bench(rounds: int, repeats: int) -> dict[str, object]:
    folder = Path(corpus_root() or IN_REPO_CORPUS) / "gpu" / "nvidia_nvtrust_attestation"
    report = bytes.fromhex((folder / "attestationReport-545.00.txt").read_text().strip())
    chain = x509.load_pem_x509_certificates((folder / "gpuAkCertChain-545.00.txt").read_bytes())
    root = x509.load_pem_x509_certificate((folder / "verifier_device_root.pem").read_bytes())
    rim_root = x509.load_pem_x509_certificate((folder / "verifier_RIM_root.pem").read_bytes())
    rims = FileRims(
        load_rim((folder / name).read_bytes(), roots=[rim_root], at=RIM_TIME, source=name)
        for name in RIM_FILES
    )
    parsed = spdm.parse_report(report)
    nonce = parsed.request.nonce
    evidence = GpuEvidence(
        0, REPORT, "", report, tuple(c.public_bytes(Encoding.DER) for c in chain)
    )
    gpu = HostGpu(0, "gpu0:bench", parsed.vbios_version)
    cached = GpuAnchors(device_roots=(root,), rims=rims)
    uncached = GpuAnchors(device_roots=(root,), rims=rims, chains=ChainCache(size=0))
    now = datetime.now(UTC)

    def appraise(anchors: GpuAnchors) -> GpuVerdict:
        return appraise_report(
            evidence,
            gpu,
            driver_version=parsed.driver_version,
            expected_nonce=nonce,
            anchors=anchors,
            now=now,
            device_id="bench",
        )

    def verification() -> GpuVerdict:
        return appraise(uncached)

    def verification_cached() -> GpuVerdict:
        return appraise(cached)

    for verdict in (verification(), verification_cached()):
        assert not [f for f in verdict.findings if f.severity > 1], verdict.findings
    assert len(cached.chains) == 1
    assert len(uncached.chains) == 0
    active = sum(len(r.measurements) for r in rims.rims)

    leaf_key = chain[0].public_key()
    assert isinstance(leaf_key, ec.EllipticCurvePublicKey)
    raw = parsed.response.signature
    der = encode_dss_signature(int.from_bytes(raw[:48], "big"), int.from_bytes(raw[48:], "big"))
    transcript = parsed.transcript

    def raw_verify() -> None:
        leaf_key.verify(der, transcript, ec.ECDSA(hashes.SHA384()))

    def chain_only() -> list[x509.Certificate]:
        return spdm.verify_chain(chain, root, now)

    def parse_only() -> spdm.SpdmReport:
        return spdm.parse_report(report)

    raw_rate, verify_rate, cached_rate, chain_rate, parse_rate = rates(
        [raw_verify, verification, verification_cached, chain_only, parse_only], rounds, repeats
    )
    return {
        "raw_p384_verify_per_s": round(raw_rate),
        "gpu_report_verifications_per_s": round(verify_rate),
        "gpu_report_verifications_chain_cached_per_s": round(cached_rate),
        "chain_verifications_per_s": round(chain_rate),
        "report_parses_per_s": round(parse_rate),
        "verification_ratio": round(verify_rate / raw_rate, 3),
        "verification_chain_cached_ratio": round(cached_rate / raw_rate, 3),
        "chain_share_of_verification": round(verify_rate / chain_rate, 3),
        "chain_certificates": len(chain),
        "active_rim_measurements": active,
        "rounds": rounds,
        "repeats": repeats,
    }


def figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    """GPU report verification, with and without the chain cache, against the raw ECDSA
    P-384 verify measured beside it (bench/all.py's format)."""
    baseline = {
        "unit": "1/s",
        "baseline_name": "raw ECDSA P-384 signature verification",
        "baseline_value": result["raw_p384_verify_per_s"],
    }
    return [
        {
            "name": "GPU report verification (parse, nonce, 5-certificate chain, "
            "signature, 33 RIM measurements)",
            "value": result["gpu_report_verifications_per_s"],
            **baseline,
        },
        {
            "name": "GPU report verification, chain cached",
            "value": result["gpu_report_verifications_chain_cached_per_s"],
            **baseline,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", type=Path, help="also write the figures here (bench/all.py)")
    args = parser.parse_args()
    result = bench(args.rounds, args.repeats)
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(figures(result), indent=2) + "\n")


if __name__ == "__main__":
    main()
