"""Appraisal throughput on one core, against raw signature verification in the same run.

A real swtpm makes one ECDSA P-256 quote (the devtrust AK) over the verifier's default PCR
selection; the pure appraisal (``verifier.appraisal.appraise``: struct parse, ECDSA verify,
qualifying-data binding, selection, PCR digest) then runs on it repeatedly. The baseline is
``key.verify`` of the same signature over the same bytes. Reported: median of REPEATS runs,
each timing ROUNDS appraisals, and the ratio appraisal/raw (the goal in issue 3: >= 1/3).

    .venv/bin/python bench/appraisal.py [--rounds 2000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from agent.evidence import evidence_body, host_facts, qualifying_data
from agent.state import new_key, spki
from agent.tpm import TpmBackend
from swtpm import EndorsementCA, Swtpm, provision
from verifier.appraisal import Evidence, Expectation, Nonce, appraise
from verifier.config import AttestationConfig
from verifier.tpm.constants import hash_name
from verifier.tpm.structures import parse_public, parse_signature


def rates(fns: list[Callable[[], object]], rounds: int, repeats: int) -> list[float]:
    """Median calls per second of each function; the functions alternate within each repeat
    so that machine noise hits them alike."""
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples, strict=True):
            start = time.perf_counter()
            for _ in range(rounds):
                fn()
            out.append(rounds / (time.perf_counter() - start))
    return [statistics.median(s) for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    selection = AttestationConfig().selection
    now = datetime.datetime.now(datetime.UTC)
    nonce = Nonce(b"\x42" * 32)
    body = evidence_body(host=host_facts(), certify_key_spki=spki(new_key()), now=now)
    with tempfile.TemporaryDirectory() as tmp:
        ca = EndorsementCA.create(Path(tmp) / "ca")
        provision(Path(tmp) / "tpm", ca)
        with Swtpm(Path(tmp) / "tpm").start() as tpm:
            backend = TpmBackend(tpm.tcti)
            ak_public = backend.ak_public()
            sel = [(hash_name(s.hash_alg), list(s.pcrs)) for s in selection]
            attest, signature, values = backend.quote(qualifying_data(nonce, body), sel)
            backend.close()
    key = parse_public(ak_public).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    pcrs = {
        (next(s.hash_alg for s in selection if hash_name(s.hash_alg) == b), i): v
        for (b, i), v in values.items()
    }
    evidence = Evidence(
        nonce=nonce, attest=attest, signature=signature, pcrs=pcrs, body=body, certify_key=None
    )
    expect = Expectation(
        device_id="bench",
        nonce=nonce,
        selection=selection,
        ak_key=key,
        staleness=datetime.timedelta(minutes=3),
    )
    assert appraise(evidence, expect, now=now).passed
    sig = parse_signature(signature)
    der = encode_dss_signature(int.from_bytes(sig.ecc_r, "big"), int.from_bytes(sig.ecc_s, "big"))

    def raw() -> None:
        key.verify(der, attest, ec.ECDSA(hashes.SHA256()))

    raw_rate, appraisal_rate = rates(
        [raw, lambda: appraise(evidence, expect, now=now)], args.rounds, args.repeats
    )
    print(
        json.dumps(
            {
                "ak": "ECDSA P-256 (swtpm)",
                "pcrs_quoted": sum(len(s.pcrs) for s in selection),
                "raw_ecdsa_verify_per_s": round(raw_rate),
                "appraisals_per_s": round(appraisal_rate),
                "ratio": round(appraisal_rate / raw_rate, 3),
                "rounds": args.rounds,
                "repeats": args.repeats,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
