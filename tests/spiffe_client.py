"""A workload that speaks SPIFFE through py-spiffe, a client nobody here wrote: run as its own
process by tests/test_workload_api.py (``python tests/spiffe_client.py MODE SOCKET``), because
py-spiffe's generated code and devtrust's define the same root-level protobuf messages, which
one process cannot load together. One JSON line per answer on stdout.

``fetch``: one X.509 context and the X.509 bundles (exit 1 with an error line when refused).
``watch COUNT``: the FetchX509SVID stream, one line per update or error, until COUNT lines.
"""

from __future__ import annotations

import json
import sys
import threading

from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain, WorkloadApiClient, X509BundleSet
from spiffe.workloadapi.x509_context import X509Context


def _context(ctx: X509Context) -> dict[str, object]:
    svid = ctx.default_svid
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return {
        "spiffe_id": str(svid.spiffe_id),
        "serial": f"{svid.leaf.serial_number:x}",
        "key_matches": svid.private_key.public_key().public_bytes(der, public)
        == svid.leaf.public_key().public_bytes(der, public),
        "bundle": _bundles(ctx.x509_bundle_set, str(svid.spiffe_id.trust_domain)),
    }


def _bundles(bundles: X509BundleSet, trust_domain: str) -> list[str]:
    bundle = bundles.get_bundle_for_trust_domain(TrustDomain(trust_domain))
    if bundle is None:
        return []
    return sorted(c.subject.rfc4514_string() for c in bundle.x509_authorities)


def _print(line: dict[str, object]) -> None:
    print(json.dumps(line), flush=True)


def fetch(socket: str) -> int:
    try:
        with WorkloadApiClient(socket_path=f"unix:{socket}", default_timeout=10.0) as client:
            line = _context(client.fetch_x509_context())
            line["bundles"] = _bundles(
                client.fetch_x509_bundles(), str(line["spiffe_id"]).split("/")[2]
            )
    except Exception as exc:  # noqa: BLE001 (what the client raised is the answer)
        _print({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _print(line)
    return 0


def watch(socket: str, count: int) -> int:
    lines: list[dict[str, object]] = []
    done = threading.Event()

    def emit(line: dict[str, object]) -> None:
        _print(line)
        lines.append(line)
        if len(lines) >= count:
            done.set()

    client = WorkloadApiClient(socket_path=f"unix:{socket}")
    handler = client.stream_x509_contexts(
        on_success=lambda ctx: emit(_context(ctx)),
        on_error=lambda exc: emit({"error": f"{type(exc).__name__}: {exc}"}),
        retry_connect=False,
    )
    finished = done.wait(60.0)
    handler.cancel()
    client.close()
    return 0 if finished else 1


def main(argv: list[str]) -> int:
    mode, socket = argv[0], argv[1]
    if mode == "fetch":
        return fetch(socket)
    return watch(socket, int(argv[2]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
