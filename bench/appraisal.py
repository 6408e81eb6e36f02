"""Appraisal throughput on one core, against raw signature verification in the same run.

For an ECDSA P-256 AK (the devtrust agent's) and an RSA-2048 AK, a real swtpm makes one quote
over the verifier's default PCR selection; the pure appraisal (``verifier.appraisal.appraise``:
struct parse, signature, qualified signer, qualifying-data binding, selection, PCR digest,
clock) then runs on it repeatedly. The baseline is ``verify`` of the same signature over the
same bytes with the same key object. Each repeat times ROUNDS calls of each, alternating, so
machine noise hits both alike; medians are reported, and the ratio appraisal/raw (goal: at
least 1/3). Event-log parse + replay (and the verifier's measured_boot.extend: parse, replay,
data-digest check, facts) is measured in events per second, on the largest log in the
corpus's eventlogs (tests/data/corpus, or $DEVTRUST_CORPUS when set), else on a generated
2,000-event crypto-agile log.

    .venv/bin/python -m bench.appraisal [--rounds 2000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMT_PUBLIC

from bench.common import corpus_root, rates
from devtrust.agent.evidence import evidence_body, host_facts
from devtrust.agent.state import new_key, spki
from devtrust.agent.tpm import AK_ATTRIBUTES, TpmBackend
from devtrust.core.binding import qualifying_data
from devtrust.core.ids import DeviceId, Nonce
from devtrust.swtpm import EndorsementCA, Swtpm, provision
from devtrust.verifier import measured_boot
from devtrust.verifier.appraisal import Appraisal, Evidence, Expectation, appraise
from devtrust.verifier.config import AttestationConfig, LimitsConfig
from devtrust.verifier.tpm import eventlog
from devtrust.verifier.tpm.constants import hash_alg, hash_name
from devtrust.verifier.tpm.structures import ak_qualified_names, parse_public, parse_signature
from devtrust.verifier.wire_body import WireBody, body_from_wire

RSA_HANDLE = 0x81010003

# An AK's public area, the EK's, and a quote: attest, signature and the PCR values read.
Quote = tuple[bytes, bytes, bytes, bytes, dict[tuple[str, int], bytes]]


def make_rsa_ak(backend: TpmBackend) -> None:
    public = TPMT_PUBLIC.parse("rsa2048:rsassa-sha256", objectAttributes=AK_ATTRIBUTES)
    public.parameters.rsaDetail.symmetric.algorithm = TPM2_ALG.NULL
    e = backend.esapi
    handle, _, _, _, _ = e.create_primary(
        TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=public), ESYS_TR.ENDORSEMENT
    )
    e.evict_control(ESYS_TR.OWNER, handle, RSA_HANDLE)
    e.flush_context(handle)


def quotes(nonce: bytes, body: bytes, sel: list[tuple[str, list[int]]]) -> dict[str, Quote]:
    out: dict[str, Quote] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ca = EndorsementCA.create(Path(tmp) / "ca")
        provision(Path(tmp) / "tpm", ca)
        with Swtpm(Path(tmp) / "tpm").start() as tpm:
            backend = TpmBackend(tpm.tcti)
            ek = backend.ek_public()
            out["ecdsa-p256"] = (
                backend.ak_public(),
                ek,
                *backend.quote(qualifying_data(nonce, body), sel),
            )
            backend.close()
            make_rsa_ak(TpmBackend(tpm.tcti))
            rsa_backend = TpmBackend(tpm.tcti, ak_handle=RSA_HANDLE)
            out["rsa-2048"] = (
                rsa_backend.ak_public(),
                ek,
                *rsa_backend.quote(qualifying_data(nonce, body), sel),
            )
            rsa_backend.close()
    return out


def bench_quotes(rounds: int, repeats: int) -> list[dict[str, Any]]:
    selection = AttestationConfig().selection
    now = datetime.datetime.now(datetime.UTC)
    nonce = Nonce(b"\x42" * 32)
    body = evidence_body(host=host_facts(), certify_key_spki=spki(new_key()), now=now)
    sel = [(hash_name(s.hash_alg), list(s.pcrs)) for s in selection]
    rows = []
    for name, (ak_public, ek_public, attest, signature, values) in quotes(nonce, body, sel).items():
        ak = parse_public(ak_public)
        key = ak.public_key()
        pcrs = {(hash_alg(b), i): v for (b, i), v in values.items()}
        evidence = Evidence(
            nonce=nonce,
            attest=attest,
            signature=signature,
            pcrs=pcrs,
            body=body,
            body_doc=WireBody(body_from_wire(body, LimitsConfig())),
            certify_key=None,
        )
        expect = Expectation(
            device_id=DeviceId("bench"),
            nonce=nonce,
            selection=selection,
            ak_key=key,
            staleness=datetime.timedelta(minutes=3),
            qualified_signers=ak_qualified_names(ak, parse_public(ek_public)),
        )
        assert appraise(evidence, expect, now=now).passed
        sig = parse_signature(signature)
        raw: Callable[[], None]
        if isinstance(key, ec.EllipticCurvePublicKey):
            der = encode_dss_signature(
                int.from_bytes(sig.ecc_r, "big"), int.from_bytes(sig.ecc_s, "big")
            )

            def raw_ecdsa(
                k: ec.EllipticCurvePublicKey = key, d: bytes = der, m: bytes = attest
            ) -> None:
                k.verify(d, m, ec.ECDSA(hashes.SHA256()))

            raw = raw_ecdsa
        else:

            def raw_rsa(
                k: rsa.RSAPublicKey = key, s: bytes = sig.rsa_sig, m: bytes = attest
            ) -> None:
                k.verify(s, m, padding.PKCS1v15(), hashes.SHA256())

            raw = raw_rsa

        def appraise_once(e: Evidence = evidence, x: Expectation = expect) -> Appraisal:
            return appraise(e, x, now=now)

        raw_rate, appraisal_rate = rates([raw, appraise_once], rounds, repeats)
        rows.append(
            {
                "ak": name,
                "pcrs_quoted": sum(len(s.pcrs) for s in selection),
                "raw_verify_per_s": round(raw_rate),
                "appraisals_per_s": round(appraisal_rate),
                "ratio": round(appraisal_rate / raw_rate, 3),
            }
        )
    return rows


def synthetic_log(events: int) -> bytes:
    banks = ((0x0004, "sha1"), (0x000B, "sha256"))
    body = (
        b"Spec ID Event03\x00"
        + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 2)
        + struct.pack("<HHHH", 0x0004, 20, 0x000B, 32)
        + b"\x00"
    )
    out = struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(body)) + body
    for n in range(events):
        data = f"event {n}".encode() * 8
        out += struct.pack("<III", n % 10, 0xD, 2)
        for alg, name in banks:
            out += struct.pack("<H", alg) + hashlib.new(name, data).digest()
        out += struct.pack("<I", len(data)) + data
    return out


def bench_eventlog(repeats: int) -> dict[str, Any]:
    corpus = corpus_root()
    if corpus:
        logs = sorted(Path(corpus, "eventlogs").rglob("*"), key=lambda p: p.stat().st_size)
        source = logs[-1]
        data, name = source.read_bytes(), str(source.relative_to(corpus))
    else:
        data, name = synthetic_log(2000), "generated, 2000 events"
    count = len(eventlog.parse(data).events)
    samples, extend = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(20):
            eventlog.replay_log(eventlog.parse(data))
        samples.append(20 * count / (time.perf_counter() - start))
        # What the verifier does with a log: parse, replay, check data digests, collect facts.
        start = time.perf_counter()
        for _ in range(20):
            measured_boot.extend(None, 0, data, max_bytes=len(data), max_events=count)
        extend.append(20 * count / (time.perf_counter() - start))
    return {
        "log": name,
        "events": count,
        "bytes": len(data),
        "parse_and_replay_events_per_s": round(statistics.median(samples)),
        "extend_events_per_s": round(statistics.median(extend)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the figures here (bench/all.py)")
    args = parser.parse_args()
    quotes = bench_quotes(args.rounds, args.repeats)
    print(
        json.dumps(
            {
                "quotes": quotes,
                "eventlog": bench_eventlog(args.repeats),
                "rounds": args.rounds,
                "repeats": args.repeats,
            },
            indent=2,
        )
    )
    if args.json is not None:
        args.json.write_text(json.dumps(figures(quotes), indent=2) + "\n")


def figures(quotes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Appraisal of a quote against the raw signature check it contains, per AK type."""
    return [
        {
            "name": f"quote appraisal, {row['ak']} AK, {row['pcrs_quoted']} PCRs",
            "value": row["appraisals_per_s"],
            "unit": "1/s",
            "baseline_name": f"raw {row['ak']} signature verification",
            "baseline_value": row["raw_verify_per_s"],
        }
        for row in quotes
    ]


if __name__ == "__main__":
    main()
