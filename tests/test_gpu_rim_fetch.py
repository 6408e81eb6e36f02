"""`devtrust gpu rim fetch` (issue 14: RIMs kept in a local store that an operator fills from
NVIDIA's RIM service or a mirror, by a command). A real HTTP server on loopback answers as
NVIDIA's service does ({"id", "rim": base64, "sha256", "rim_format"}) with the recorded
nvtrust RIMs (verified at 2024-06-01 against the shipped RIM root) and with simulated ones
(the simulation's RIM root given as --root). Each failure (404, a changed file, a wrong
id, an oversized or garbled answer, a service that is down or silent) is one line, and
nothing that failed is stored."""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import http.server
import ipaddress
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devtrust import cli
from devtrust.swtpm.gpu_sim import SimGpuRoots
from devtrust.verifier.gpu import rim_fetch
from devtrust.verifier.gpu.rim_store import RimStore
from devtrust.verifier.gpu.types import RimKind
from tests.corpus import corpus_root

CORPUS = corpus_root() / "gpu" / "nvidia_nvtrust_attestation"
REPORT = CORPUS / "attestationReport-545.00.txt"
CHAIN = CORPUS / "gpuAkCertChain-545.00.txt"
DRIVER_RIM = CORPUS / "Driver_RIM_test_no_gpu.swidtag"
VBIOS_RIM = CORPUS / "1010_0200_882_96005E0001_test_no_gpu.swidtag"
DRIVER_ID = "NV_GPU_DRIVER_GH100_545.00"
VBIOS_ID = "NV_GPU_VBIOS_1010_0200_882_96005E0001"
AT = "2024-06-01T00:00:00+00:00"  # before the recorded RIMs' signers expire


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    content_length: bool = True


@dataclass
class Service:
    """A loopback RIM service: ``answers`` by ID; ``asked`` the IDs requested."""

    url: str
    answers: dict[str, Answer] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)
    authorization: list[str] = field(default_factory=list)

    def serve(self, rim_id: str, data: bytes, **changes: object) -> None:
        """NVIDIA's envelope for ``data``; ``changes`` replace (or, None, drop) its keys."""
        envelope: dict[str, object] = {
            "id": rim_id,
            "rim": base64.b64encode(data).decode(),
            "sha256": hashlib.sha256(data).hexdigest(),
            "rim_format": "TCG",
            "request_id": "test",
        }
        for key, value in changes.items():
            if value is None:
                envelope.pop(key, None)
            else:
                envelope[key] = value
        self.answers[rim_id] = Answer(body=json.dumps(envelope).encode())


@pytest.fixture
def service() -> Iterator[Service]:
    state = Service(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            rim_id = self.path.rsplit("/", 1)[-1]
            state.asked.append(rim_id)
            state.authorization.append(self.headers.get("Authorization", ""))
            answer = state.answers.get(rim_id, Answer(404, b'{"message": "not found"}'))
            self.send_response(answer.status)
            self.send_header("Content-Type", "application/json")
            if answer.content_length:
                self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            with contextlib.suppress(OSError):  # the client stopped reading (oversize)
                self.wfile.write(answer.body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1/rim/"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def sim_roots(tmp_path_factory: pytest.TempPathFactory) -> SimGpuRoots:
    return SimGpuRoots.create(tmp_path_factory.mktemp("gpu-roots"))


def _fetch(
    capsys: pytest.CaptureFixture[str], store: Path, *argv: str, service: str | None = None
) -> tuple[int, list[str], str]:
    args = ["gpu", "rim", "fetch", *argv, "--store", str(store)]
    if service is not None:
        args += ["--service", service]
    status = cli.main(args)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return status, out.out.splitlines(), out.err


def _stored(store: Path) -> list[tuple[str, str, str]]:
    return [(s.rim.kind.value, s.rim.version, s.rim.source) for s in RimStore.open(store).list()]


def test_fetch_by_id_verifies_and_stores_it_with_its_url(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, service: Service
) -> None:
    service.serve(DRIVER_ID, DRIVER_RIM.read_bytes())
    store = tmp_path / "rims"
    status, lines, err = _fetch(capsys, store, DRIVER_ID, "--at", AT, service=service.url)
    assert status == 0, lines
    assert lines == [
        f"added driver RIM 545.00 (GH100, {len(RimStore.open(store).list()[0].rim.measurements)} "
        f"active measurements, signed by {RimStore.open(store).list()[0].rim.signer}) from "
        f"{service.url}{DRIVER_ID}"
    ]
    assert "plain http" in err  # a mirror over http is said so
    assert _stored(store) == [("driver", "545.00", f"{service.url}{DRIVER_ID}")]
    assert service.asked == [DRIVER_ID]


def test_fetch_simulated_rims_with_their_root(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, service: Service, sim_roots: SimGpuRoots
) -> None:
    service.serve("NV_GPU_DRIVER_GH100_550.54.15", sim_roots.rim("driver", "550.54.15"))
    service.serve("NV_GPU_VBIOS_1010_0200_882_96009F0001", sim_roots.rim("vbios", "96.00.9F.00.01"))
    store = tmp_path / "rims"
    status, lines, _ = _fetch(
        capsys,
        store,
        "NV_GPU_DRIVER_GH100_550.54.15",
        "NV_GPU_VBIOS_1010_0200_882_96009F0001",
        "--root",
        str(sim_roots.rim_root_path),
        service=service.url,
    )
    assert status == 0, lines
    assert [kind for kind, _, _ in _stored(store)] == ["driver", "vbios"]
    # Without the simulation's root (NVIDIA's is the default), nothing verifies.
    other = tmp_path / "other"
    status, lines, _ = _fetch(capsys, other, "NV_GPU_DRIVER_GH100_550.54.15", service=service.url)
    assert status == 1
    assert lines[0].startswith("gpu.rim.invalid: NV_GPU_DRIVER_GH100_550.54.15: ")
    assert _stored(other) == []


def test_report_and_chain_name_the_two_rims(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, service: Service
) -> None:
    service.serve(DRIVER_ID, DRIVER_RIM.read_bytes())
    service.serve(VBIOS_ID, VBIOS_RIM.read_bytes())
    store = tmp_path / "rims"
    status, lines, _ = _fetch(
        capsys,
        store,
        *("--report", str(REPORT), "--chain", str(CHAIN), "--at", AT),
        service=service.url,
    )
    assert status == 0, lines
    assert service.asked == [DRIVER_ID, VBIOS_ID]
    assert [(k, v) for k, v, _ in _stored(store)] == [
        ("driver", "545.00"),
        ("vbios", "96.00.5E.00.01"),
    ]


def test_report_ids_from_the_recorded_report() -> None:
    from devtrust.verifier.gpu.command import load_chain

    ids = rim_fetch.report_ids(
        bytes.fromhex(REPORT.read_text().strip()), load_chain(CHAIN), name="r"
    )
    assert (ids.driver, ids.vbios, ids.chip) == (DRIVER_ID, VBIOS_ID, "GH100")


def test_a_missing_rim_is_named_and_the_others_still_fetched(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, service: Service
) -> None:
    service.serve(DRIVER_ID, DRIVER_RIM.read_bytes())
    store = tmp_path / "rims"
    missing = "NV_GPU_DRIVER_GH100_999.99"
    status, lines, _ = _fetch(capsys, store, missing, DRIVER_ID, "--at", AT, service=service.url)
    assert status == 1
    assert lines[0] == (
        f"not fetched: {missing}: NVIDIA publishes no RIM {missing} ({service.url}{missing} "
        "answered 404): check the ID (the driver and VBIOS versions), or the mirror's copy"
    )
    assert lines[1].startswith("added driver RIM 545.00 ")
    assert [v for _, v, _ in _stored(store)] == ["545.00"]


def _one_failure(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, service: Service, rim_id: str = DRIVER_ID
) -> str:
    store = tmp_path / "rims"
    status, lines, _ = _fetch(capsys, store, rim_id, "--at", AT, service=service.url)
    assert status == 1
    assert len(lines) == 1
    assert _stored(store) == []
    return lines[0]


def test_a_sha256_that_does_not_match_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, service: Service
) -> None:
    service.serve(DRIVER_ID, DRIVER_RIM.read_bytes(), sha256="ab" * 32)
    line = _one_failure(capsys, tmp_path, service)
    assert line.startswith(f"not fetched: {DRIVER_ID}: {service.url}{DRIVER_ID}: the RIM's sha256")
    assert "the answer says " + "ab" * 32 in line


def test_a_changed_rim_byte_fails_its_signature_and_is_not_stored(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, service: Service
) -> None:
    data = DRIVER_RIM.read_bytes()
    at = data.index(b'Hash0="') + len(b'Hash0="')
    changed = data[:at] + (b"1" if data[at : at + 1] != b"1" else b"2") + data[at + 1 :]
    service.serve(DRIVER_ID, changed)  # its sha256 matches: the signature must catch it
    line = _one_failure(capsys, tmp_path, service)
    assert line.startswith(f"gpu.rim.invalid: {DRIVER_ID}: ")
    assert line.endswith("; not added")


def test_an_answer_for_another_id_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, service: Service
) -> None:
    service.serve(DRIVER_ID, DRIVER_RIM.read_bytes(), id="NV_GPU_DRIVER_GH100_550.00")
    line = _one_failure(capsys, tmp_path, service)
    assert line == (
        f"not fetched: {DRIVER_ID}: {service.url}{DRIVER_ID}: expected the RIM {DRIVER_ID}, "
        "the answer is for 'NV_GPU_DRIVER_GH100_550.00'"
    )


def test_a_rim_for_another_version_than_its_id_is_not_stored(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, service: Service
) -> None:
    service.serve(DRIVER_ID, VBIOS_RIM.read_bytes())  # a valid RIM, but not the one named
    line = _one_failure(capsys, tmp_path, service)
    assert line == (
        f"not added: {DRIVER_ID}: {service.url}{DRIVER_ID} sent a vbios RIM for 96.00.5E.00.01, "
        "not the driver RIM 545.00 its ID names"
    )


@pytest.mark.parametrize("content_length", [True, False])
def test_an_oversized_answer_is_refused(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    service: Service,
    content_length: bool,
) -> None:
    service.answers[DRIVER_ID] = Answer(
        body=b" " * (rim_fetch.MAX_RESPONSE + 1), content_length=content_length
    )
    line = _one_failure(capsys, tmp_path, service)
    found = f"the answer has {rim_fetch.MAX_RESPONSE + 1}" if content_length else "found more"
    assert line == (
        f"not fetched: {DRIVER_ID}: {service.url}{DRIVER_ID}: expected at most "
        f"{rim_fetch.MAX_RESPONSE} bytes, {found}: is it a RIM service?"
    )


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"<html>gateway</html>", "expected NVIDIA's JSON answer, found b'<html>gateway</html>'"),
        (b'["a"]', "expected a JSON object, found list"),
        (b'{"id": "X", "id": "Y"}', "the key 'id' twice"),
    ],
)
def test_garbage_is_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, service: Service, body: bytes, says: str
) -> None:
    service.answers[DRIVER_ID] = Answer(body=body)
    line = _one_failure(capsys, tmp_path, service)
    assert line.startswith(f"not fetched: {DRIVER_ID}: {service.url}{DRIVER_ID}: ")
    assert says in line


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"rim": "QUJD!!"}, "'rim' is not base64"),
        ({"rim": None}, "expected the RIM as base64 text in 'rim', found none"),
        ({"sha256": "xyz"}, "'sha256': expected 64 hex digits"),
        ({"rim_format": "PDF"}, "'rim_format': expected TCG or CORIM, found 'PDF'"),
    ],
)
def test_a_malformed_envelope_is_named(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    service: Service,
    changes: dict[str, object],
    says: str,
) -> None:
    service.serve(DRIVER_ID, DRIVER_RIM.read_bytes(), **changes)
    line = _one_failure(capsys, tmp_path, service)
    assert says in line


def test_a_sha256_of_the_base64_text_is_accepted_too(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, service: Service
) -> None:
    """NVIDIA does not say whether its sha256 is of the file or of the base64 carrying it:
    either is accepted (the signature is what is trusted; this catches a broken transfer)."""
    text = base64.b64encode(DRIVER_RIM.read_bytes()).decode()
    service.serve(
        DRIVER_ID, DRIVER_RIM.read_bytes(), sha256=hashlib.sha256(text.encode()).hexdigest()
    )
    status, lines, _ = _fetch(capsys, tmp_path / "rims", DRIVER_ID, "--at", AT, service=service.url)
    assert status == 0, lines


def test_nvidias_api_key_is_sent_over_https_only(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    service: Service,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NVIDIA_API_KEY goes to an https service as Authorization: Bearer, never over http."""
    service.serve(DRIVER_ID, DRIVER_RIM.read_bytes())
    monkeypatch.setenv("NVIDIA_API_KEY", "nvapi-test-key")
    _fetch(capsys, tmp_path / "http", DRIVER_ID, service=service.url)
    assert service.authorization == [""]
    # The same service behind TLS, its certificate from a CA this test trusts.
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "devtrust test service")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = tmp_path / "service.pem"
    pem.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + ca_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem)
    host, port = service.url.split("//", 1)[1].split("/", 1)[0].split(":")
    tls = socket.create_server((host, 0))
    tls_port = tls.getsockname()[1]

    def relay() -> None:  # TLS in front of the plain service
        with tls:
            conn, _ = tls.accept()
            with (
                context.wrap_socket(conn, server_side=True) as inner,
                socket.create_connection((host, int(port))) as plain,
            ):
                plain.sendall(inner.recv(65536))
                while chunk := plain.recv(65536):
                    inner.sendall(chunk)

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))
    _fetch(capsys, tmp_path / "https", DRIVER_ID, service=f"https://{host}:{tls_port}/v1/rim/")
    thread.join(10)
    assert service.authorization == ["", "Bearer nvapi-test-key"]


def test_without_sha256_the_signature_still_decides(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, service: Service
) -> None:
    service.serve(DRIVER_ID, DRIVER_RIM.read_bytes(), sha256=None, rim_format=None)
    status, lines, _ = _fetch(capsys, tmp_path / "r", DRIVER_ID, "--at", AT, service=service.url)
    assert status == 0, lines


def test_an_unreachable_service_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/rim/"
    store = tmp_path / "rims"
    status, lines, _ = _fetch(capsys, store, DRIVER_ID, VBIOS_ID, service=url)
    assert status == 1
    assert len(lines) == 2  # each ID tried
    assert lines[0].startswith(f"not fetched: {DRIVER_ID}: cannot reach 127.0.0.1:{port}: ")
    assert lines[0].endswith("check --service (or gpu.rim_service) and the network")


def test_a_service_that_does_not_answer_times_out(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # connections complete, nothing is ever read or sent
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1/rim/"
        start = time.monotonic()
        status, lines, _ = _fetch(
            capsys, tmp_path / "rims", DRIVER_ID, "--timeout", "0.5", service=url
        )
        elapsed = time.monotonic() - start
    assert status == 1
    assert elapsed < 5
    assert lines == [
        f"not fetched: {DRIVER_ID}: {url}{DRIVER_ID} did not answer within 0.5 s (--timeout)"
    ]


def test_the_service_comes_from_the_configuration(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, service: Service
) -> None:
    service.serve(DRIVER_ID, DRIVER_RIM.read_bytes())
    config = tmp_path / "verifier.yaml"
    config.write_text(f"gpu:\n  rim_service: {service.url}\n  rim_store: {tmp_path / 'c'}\n")
    status = cli.main(["gpu", "rim", "fetch", DRIVER_ID, "--config", str(config), "--at", AT])
    capsys.readouterr()
    assert status == 0
    assert [v for _, v, _ in _stored(tmp_path / "c")] == ["545.00"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "give RIM IDs (such as NV_GPU_DRIVER_GH100_545.00), or --report and --chain"),
        (["--report", str(REPORT)], "--report and --chain go together"),
        (["NV GPU"], "RIM ID 'NV GPU': expected letters, digits"),
        ([DRIVER_ID, "--service", "ftp://mirror/"], "expected an https:// URL"),
        ([DRIVER_ID, "--timeout", "0"], "--timeout: expected 0 < S <= 3600"),
        (["--report", str(CHAIN), "--chain", str(CHAIN)], "found PEM"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], says: str
) -> None:
    status, _, err = _fetch(capsys, tmp_path / "rims", *argv)
    assert status == 2
    assert err.startswith("devtrust: ")
    assert says in err


def test_ids_name_their_kind_and_version() -> None:
    assert rim_fetch.expected_rim(DRIVER_ID) == (RimKind.DRIVER, "545.00")
    assert rim_fetch.expected_rim("NV_GPU_CC_DRIVER_GB100_590.16") == (RimKind.DRIVER, "590.16")
    assert rim_fetch.expected_rim(VBIOS_ID) == (RimKind.VBIOS, "96005E0001")
    assert rim_fetch.expected_rim("NV_SWITCH_BIOS_5612_0002_890_96105E0001") is None
    assert rim_fetch.service_url("https://mirror.example/rims") == (
        "https://mirror.example/rims/",
        False,
    )


@pytest.mark.parametrize(
    ("start", "to", "refused"),
    [
        ("https://rim.example/v1/rim/X", "http://rim.example/v1/rim/X", True),
        ("http://mirror/v1/rim/X", "file:///etc/passwd", True),
        ("https://rim.example/v1/rim/X", "https://cdn.example/X", False),
    ],
)
def test_redirects_never_leave_https(start: str, to: str, refused: bool) -> None:
    handler = rim_fetch._NoDowngrade()
    request = urllib.request.Request(start)  # noqa: S310 - never opened
    if refused:
        with pytest.raises(urllib.error.URLError, match="refused a redirect"):
            handler.redirect_request(request, None, 302, "Found", {}, to)
    else:
        assert handler.redirect_request(request, None, 302, "Found", {}, to) is not None
