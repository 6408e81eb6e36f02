"""Each GPU's own attestation, the agent's side (agent/gpu/attest.py, agent/collect.py): NVML
asked through a stand-in ``pynvml`` (this machine has no GPU: the one edge where a stand-in is
allowed; its answers are pynvml's own ctypes structures), one GpuReport per listed GPU with
the nonce derived from the challenge and the GPU's index, in the body the quote binds."""

from __future__ import annotations

import asyncio
import ctypes
import datetime
import json
import os
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pynvml
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from devtrust.agent import main as agent_main
from devtrust.agent.collect import RecordedHost, collect_body, gpu_attester
from devtrust.agent.config import AgentConfig
from devtrust.agent.evidence import evidence_body
from devtrust.agent.gpu.attest import (
    DISABLED_DETAIL,
    MAX_CERTIFICATE,
    MAX_CERTIFICATES,
    MAX_DETAIL,
    MAX_REPORT,
    ChainError,
    DisabledAttester,
    NvmlAttester,
    RecordedAttester,
    collect_reports,
    pem_chain_to_der,
)
from devtrust.core.binding import gpu_nonce, qualifying_data
from devtrust.core.errors import ConfigError
from devtrust.swtpm.hosttree import write_host_tree
from devtrust.v1 import attestation_pb2, common_pb2
from tests.agent_parts import FakeTpm, recorded_host
from tests.corpus import corpus_root
from tests.test_agent_client import Peer, attest, body_of, challenge

if TYPE_CHECKING:
    from devtrust.verifier.pki import PkiFiles

NOW = datetime.datetime(2026, 12, 2, 4, 30, tzinfo=datetime.UTC)
CHALLENGE = bytes(range(32))
NVTRUST = corpus_root() / "gpu" / "nvidia_nvtrust_attestation"
REPORT_545 = bytes.fromhex((NVTRUST / "attestationReport-545.00.txt").read_text().strip())
CHAIN_PEM = (NVTRUST / "gpuAkCertChain-545.00.txt").read_bytes()
CHAIN_DER = [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(CHAIN_PEM)]


# --- a stand-in pynvml -----------------------------------------------------------------------


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_GpuIsLost(NVMLError):
    pass


class NVMLError_Unknown(NVMLError):
    pass


class FakeNvml(types.ModuleType):
    """pynvml's surface GPU attestation uses. ``arch`` per handle (GPU index), the system's
    CC capability, what each call raises (``fail``), and every call counted (``calls``) and
    every nonce asked kept (``nonces``, by GPU)."""

    def __init__(self, gpus: int = 2) -> None:
        super().__init__("pynvml")
        self.NVMLError = NVMLError
        self.arch: dict[int, int] = dict.fromkeys(range(gpus), pynvml.NVML_DEVICE_ARCH_HOPPER)
        self.gpus_caps = pynvml.NVML_CC_SYSTEM_GPUS_CC_CAPABLE
        self.uuids = {i: f"GPU-{i}" for i in range(gpus)}
        self.chain = CHAIN_PEM
        self.fail: dict[str, Exception] = {}
        self.calls: dict[str, int] = {}
        self.nonces: dict[int, list[bytes]] = {}
        self.init_error: Exception | None = None

    def _call(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.fail:
            raise self.fail[name]

    def nvmlInit(self) -> None:
        self._call("nvmlInit")
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._call("nvmlDeviceGetHandleByIndex")
        return index

    def nvmlDeviceGetArchitecture(self, handle: int) -> int:
        self._call("nvmlDeviceGetArchitecture")
        return self.arch[handle]

    def nvmlSystemGetConfComputeCapabilities(self) -> Any:
        self._call("nvmlSystemGetConfComputeCapabilities")
        caps = pynvml.c_nvmlConfComputeSystemCaps_t()
        caps.cpuCaps = pynvml.NVML_CC_SYSTEM_CPU_CAPS_AMD_SEV_SNP
        caps.gpusCaps = self.gpus_caps
        return caps

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        self._call("nvmlDeviceGetUUID")
        return self.uuids[handle]

    def nvmlDeviceGetConfComputeGpuCertificate(self, handle: int) -> Any:
        self._call("nvmlDeviceGetConfComputeGpuCertificate")
        cert = pynvml.c_nvmlConfComputeGpuCertificate_t()
        cert.attestationCertChainSize = len(self.chain)
        ctypes.memmove(cert.attestationCertChain, self.chain, len(self.chain))
        return cert

    def nvmlDeviceGetConfComputeGpuAttestationReport(self, handle: int, nonce: bytes) -> Any:
        """As pynvml's: the nonce goes into the structure; here the "report" is the corpus
        report with the nonce asked in place of the recorded one (bytes 4..35)."""
        self._call("nvmlDeviceGetConfComputeGpuAttestationReport")
        self.nonces.setdefault(handle, []).append(bytes(nonce))
        out = pynvml.c_nvmlConfComputeGpuAttestationReport_t()
        report = REPORT_545[:4] + bytes(nonce) + REPORT_545[36:]
        out.attestationReportSize = len(report)
        ctypes.memmove(out.attestationReport, report, len(report))
        return out


@pytest.fixture
def nv() -> FakeNvml:
    return FakeNvml()


def _attest(attester: Any, indices: list[int], nonce: bytes = CHALLENGE) -> list[Any]:
    return asyncio.run(collect_reports(attester, indices, nonce))


# --- NVML ------------------------------------------------------------------------------------


def test_a_hopper_gpu_answers_with_its_report_and_chain(nv: FakeNvml) -> None:
    [report] = _attest(NvmlAttester(nv), [0])
    assert (report.index, report.status, report.detail) == (0, "report", "")
    assert report.report == REPORT_545[:4] + gpu_nonce(CHALLENGE, 0) + REPORT_545[36:]
    # The PEM chain NVML gives, as DER, in its order (the attestation key's first).
    assert list(report.certificates) == CHAIN_DER
    assert len(CHAIN_DER) == 5
    leaf = x509.load_der_x509_certificate(report.certificates[0])
    assert leaf.issuer == x509.load_der_x509_certificate(report.certificates[1]).subject


def test_each_gpu_is_asked_with_the_nonce_for_its_index(nv: FakeNvml) -> None:
    nv.arch[2] = nv.arch[0]
    nv.uuids[2] = "GPU-2"
    reports = _attest(NvmlAttester(nv), [0, 1, 2])
    assert [r.index for r in reports] == [0, 1, 2]
    for i in range(3):
        assert nv.nonces[i] == [gpu_nonce(CHALLENGE, i)]
    assert len({n for ns in nv.nonces.values() for n in ns}) == 3
    other = bytes(32)
    _attest(NvmlAttester(nv), [1], other)
    assert nv.nonces[1][-1] == gpu_nonce(other, 1) != gpu_nonce(CHALLENGE, 1)


@pytest.mark.parametrize(
    ("arch", "name"),
    [
        (pynvml.NVML_DEVICE_ARCH_AMPERE, "Ampere (7)"),
        (pynvml.NVML_DEVICE_ARCH_ADA, "Ada (8)"),
        (pynvml.NVML_DEVICE_ARCH_DLA, "DLA (11)"),
        (pynvml.NVML_DEVICE_ARCH_UNKNOWN, "unknown (4294967295)"),
    ],
)
def test_gpus_before_hopper_are_not_asked(nv: FakeNvml, arch: int, name: str) -> None:
    nv.arch[0] = arch
    [report] = _attest(NvmlAttester(nv), [0])
    assert report.status == "unsupported"
    assert report.detail == f"GPU architecture {name}: only Hopper and later GPUs attest"
    assert "nvmlDeviceGetConfComputeGpuAttestationReport" not in nv.calls
    assert not report.report
    assert not report.certificates


@pytest.mark.parametrize("arch", [pynvml.NVML_DEVICE_ARCH_BLACKWELL, pynvml.NVML_DEVICE_ARCH_RUBIN])
def test_gpus_after_hopper_are_asked(nv: FakeNvml, arch: int) -> None:
    nv.arch[0] = arch
    [report] = _attest(NvmlAttester(nv), [0])
    assert report.status == "report"


def test_gpus_without_cc_capability_are_not_asked(nv: FakeNvml) -> None:
    nv.gpus_caps = pynvml.NVML_CC_SYSTEM_GPUS_CC_NOT_CAPABLE
    [report] = _attest(NvmlAttester(nv), [0])
    assert report.status == "unsupported"
    assert "not Confidential Computing capable (gpusCaps 0)" in report.detail
    assert "nvmlDeviceGetConfComputeGpuAttestationReport" not in nv.calls


def test_nvml_not_supported_is_unsupported_with_nvml_s_words(nv: FakeNvml) -> None:
    nv.fail["nvmlDeviceGetConfComputeGpuAttestationReport"] = NVMLError_NotSupported(
        "Not Supported"
    )
    [report] = _attest(NvmlAttester(nv), [0])
    assert report.status == "unsupported"
    assert report.detail == (
        "NVML nvmlDeviceGetConfComputeGpuAttestationReport: NVMLError_NotSupported: Not Supported"
    )
    assert nv.calls.get("nvmlShutdown", 0) == 0  # a lasting answer: NVML kept


def test_an_nvml_error_is_error_bounded_and_nvml_starts_afresh(nv: FakeNvml) -> None:
    nv.fail["nvmlDeviceGetConfComputeGpuCertificate"] = NVMLError_Unknown("x" * 5000)
    attester = NvmlAttester(nv)
    [report] = _attest(attester, [0])
    assert report.status == "error"
    assert report.detail.startswith(
        "NVML nvmlDeviceGetConfComputeGpuCertificate: NVMLError_Unknown: xxx"
    )
    assert len(report.detail) == MAX_DETAIL
    assert nv.calls["nvmlShutdown"] == 1
    del nv.fail["nvmlDeviceGetConfComputeGpuCertificate"]
    [report] = _attest(attester, [0])
    assert report.status == "report"
    assert (nv.calls["nvmlInit"], attester.inits) == (2, 2)


def test_a_lost_gpu_is_error(nv: FakeNvml) -> None:
    nv.fail["nvmlDeviceGetArchitecture"] = NVMLError_GpuIsLost("GPU is lost")
    [report] = _attest(NvmlAttester(nv), [1])
    assert (report.index, report.status) == (1, "error")
    assert "nvmlDeviceGetArchitecture: NVMLError_GpuIsLost: GPU is lost" in report.detail


def test_without_nvml_every_gpu_says_why(nv: FakeNvml) -> None:
    nv.init_error = OSError("libnvidia-ml.so.1: cannot open shared object file")
    reports = _attest(NvmlAttester(nv), [0, 1])
    assert [(r.index, r.status) for r in reports] == [(0, "unsupported"), (1, "unsupported")]
    assert reports[0].detail == (
        "NVML is not loadable: OSError: libnvidia-ml.so.1: cannot open shared object file"
    )


def test_the_chain_is_read_once_per_gpu_while_its_uuid_holds(nv: FakeNvml) -> None:
    attester = NvmlAttester(nv)
    for _ in range(3):
        _attest(attester, [0, 1])
    assert nv.calls["nvmlDeviceGetConfComputeGpuCertificate"] == 2
    assert nv.calls["nvmlDeviceGetConfComputeGpuAttestationReport"] == 6  # a report each time
    assert nv.calls["nvmlInit"] == 1
    nv.uuids[1] = "GPU-swapped"
    _attest(attester, [0, 1])
    assert nv.calls["nvmlDeviceGetConfComputeGpuCertificate"] == 3
    attester.close()
    attester.close()
    assert nv.calls["nvmlShutdown"] == 1


def test_a_chain_that_is_not_pem_is_error(nv: FakeNvml) -> None:
    nv.chain = b"\x30\x82garbage"
    [report] = _attest(NvmlAttester(nv), [0])
    assert report.status == "error"
    assert "no PEM certificate in the chain" in report.detail


def test_the_nonce_is_the_spdm_size() -> None:
    with pytest.raises(ValueError, match="32 bytes, got 31"):
        NvmlAttester(FakeNvml()).attest(0, bytes(31))


def test_pem_chains_are_decoded_not_parsed() -> None:
    assert pem_chain_to_der(CHAIN_PEM) == CHAIN_DER
    end = b"-----END CERTIFICATE-----\n"
    first = CHAIN_PEM[: CHAIN_PEM.index(end) + len(end)]
    bad = b"-----BEGIN CERTIFICATE-----\n!!notbase64!!\n" + end
    with pytest.raises(ChainError, match="certificate 1 of the chain is not base64"):
        pem_chain_to_der(first + bad)
    with pytest.raises(ChainError, match="certificate 0 of the chain is empty"):
        pem_chain_to_der(b"-----BEGIN CERTIFICATE-----\n" + end)


# --- one report per GPU, whatever the attester does ------------------------------------------


class Scripted:
    """An attester answering what ``answer`` makes of (index, nonce)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def attest(self, index: int, nonce: bytes) -> attestation_pb2.GpuReport:
        result: attestation_pb2.GpuReport = self.answer(index, nonce)
        return result

    def close(self) -> None:
        pass


def _report(index: int, **fields: Any) -> attestation_pb2.GpuReport:
    args: dict[str, Any] = {
        "index": index,
        "status": "report",
        "report": REPORT_545,
        "certificates": CHAIN_DER,
    }
    args.update(fields)
    return attestation_pb2.GpuReport(**args)


def _raise(index: int, nonce: bytes) -> attestation_pb2.GpuReport:
    raise RuntimeError(f"GPU {index} fell off the bus")


@pytest.mark.parametrize(
    ("name", "answer", "detail"),
    [
        ("raises", _raise, "RuntimeError: GPU 0 fell off the bus"),
        ("not a GpuReport", lambda i, n: b"report", "answered bytes, not a GpuReport"),
        ("another index", lambda i, n: _report(i + 1), "answered for GPU 1, not 0"),
        ("unknown status", lambda i, n: _report(i, status="ok"), "answered status 'ok'"),
        ("no report", lambda i, n: _report(i, report=b""), "status report without a report"),
        (
            "no chain",
            lambda i, n: _report(i, certificates=[]),
            "status report without a certificate chain",
        ),
        (
            "report too large",
            lambda i, n: _report(i, report=bytes(MAX_REPORT + 1)),
            f"{MAX_REPORT + 1} bytes, more than {MAX_REPORT}",
        ),
        (
            "too many certificates",
            lambda i, n: _report(i, certificates=[CHAIN_DER[0]] * (MAX_CERTIFICATES + 1)),
            f"{MAX_CERTIFICATES + 1} certificates, more than {MAX_CERTIFICATES}",
        ),
        (
            "certificate too large",
            lambda i, n: _report(i, certificates=[bytes(MAX_CERTIFICATE + 1)]),
            f"certificate 0 of the chain is {MAX_CERTIFICATE + 1} bytes",
        ),
    ],
)
def test_an_answer_out_of_shape_is_an_error_report(name: str, answer: Any, detail: str) -> None:
    [report] = _attest(Scripted(answer), [0])
    assert (report.index, report.status) == (0, "error"), name
    assert detail in report.detail, name
    assert not report.report
    assert not report.certificates


def test_a_gpu_that_did_not_attest_carries_no_report_and_a_bounded_detail() -> None:
    answer = Scripted(lambda i, n: _report(i, status="unsupported", detail="é" * 2000))
    [report] = _attest(answer, [3])
    assert (report.index, report.status) == (3, "unsupported")
    assert not report.report
    assert not report.certificates
    assert len(report.detail) == MAX_DETAIL


def test_every_listed_gpu_gets_exactly_one_report() -> None:
    answer = Scripted(lambda i, n: _raise(i, n) if i == 5 else _report(i))
    reports = _attest(answer, [4, 5, 4, 7])
    assert [(r.index, r.status) for r in reports] == [(4, "report"), (5, "error"), (7, "report")]
    assert _attest(answer, []) == []


# --- configuration: gpu_attestation ----------------------------------------------------------


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("", "auto"),
        ("gpu_attestation: auto\n", "auto"),
        ("gpu_attestation: off\n", "off"),  # YAML's false
        ("gpu_attestation: 'off'\n", "off"),
        ("gpu_attestation: true\n", "auto"),
    ],
)
def test_gpu_attestation_in_agent_yaml(tmp_path: Path, text: str, value: str) -> None:
    assert AgentConfig.load(_yaml(tmp_path, text)).gpu_attestation == value


def test_an_unknown_gpu_attestation_value_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gpu_attestation 'always': auto .* or off"):
        AgentConfig.load(_yaml(tmp_path, "gpu_attestation: always\n"))


def test_the_shipped_agent_yaml_documents_the_option() -> None:
    shipped = Path(__file__).resolve().parent.parent / "packaging" / "config" / "agent.yaml"
    assert AgentConfig.load(shipped).gpu_attestation == "auto"
    assert "gpu_attestation: auto" in shipped.read_text()


def test_off_reports_every_gpu_unsupported(tmp_path: Path) -> None:
    attester = gpu_attester(AgentConfig(posture_root=tmp_path, gpu_attestation="off"))
    assert isinstance(attester, DisabledAttester)
    reports = _attest(attester, [0, 1])
    assert [(r.status, r.detail) for r in reports] == [("unsupported", DISABLED_DETAIL)] * 2
    assert "disabled in agent.yaml" in DISABLED_DETAIL


def test_which_attester_each_gpu_source_gets(tmp_path: Path) -> None:
    def of(**fields: Any) -> Any:
        return gpu_attester(AgentConfig(posture_root=tmp_path, **fields))

    assert isinstance(of(), NvmlAttester)
    assert isinstance(of(gpu_source="nvml"), NvmlAttester)
    assert of(gpu_source="none") is None
    procfs = of(gpu_source="procfs")
    assert isinstance(procfs, DisabledAttester)
    assert "gpu_source procfs, not NVML" in procfs.detail
    xml = of(gpu_source="nvidia-smi-xml", gpu_xml=tmp_path / "q.xml")
    assert isinstance(xml, DisabledAttester)
    assert "gpu_source nvidia-smi-xml" in xml.detail


# --- the evidence body -----------------------------------------------------------------------


def _gpu_host(attester: Any, gpus: int = 2) -> RecordedHost:
    host = recorded_host()
    state = attestation_pb2.GpuState(
        source="nvml",
        driver_version="545.00",
        gpus=[attestation_pb2.Gpu(index=i, uuid=f"GPU-{i}") for i in range(gpus)],
    )
    return RecordedHost(
        facts=common_pb2.HostFacts(hostname="gpu-node-17"),
        posture=attestation_pb2.OsPosture(os_id="ubuntu"),
        gpu=state,
        event_log=asyncio.run(host.event_log()),
        attester=attester,
    )


def test_the_body_carries_one_report_per_gpu_asked_for_the_challenge() -> None:
    recorded = RecordedAttester.from_nvtrust(
        NVTRUST / "attestationReport-545.00.txt", NVTRUST / "gpuAkCertChain-545.00.txt"
    )
    host = _gpu_host(recorded, gpus=3)
    data = asyncio.run(collect_body(host, now=NOW, nonce=CHALLENGE))
    body = attestation_pb2.EvidenceBody.FromString(data)
    assert [(r.index, r.status) for r in body.gpu_reports] == [(i, "report") for i in range(3)]
    assert all(
        r.report == REPORT_545 and list(r.certificates) == CHAIN_DER for r in body.gpu_reports
    )
    assert sorted(recorded.asked) == [(i, gpu_nonce(CHALLENGE, i)) for i in range(3)]
    # The bytes are those of the whole body serialized deterministically.
    assert data == body.SerializeToString(deterministic=True)
    without = attestation_pb2.EvidenceBody()
    without.CopyFrom(body)
    without.ClearField("gpu_reports")
    assert data.startswith(without.SerializeToString(deterministic=True))


def test_without_a_challenge_no_gpu_is_asked() -> None:
    recorded = RecordedAttester(every=_report(0))
    host = _gpu_host(recorded)
    body = attestation_pb2.EvidenceBody.FromString(asyncio.run(collect_body(host, now=NOW)))
    assert list(body.gpu_reports) == []
    assert recorded.asked == []


def test_a_host_without_an_attester_sends_the_body_as_before() -> None:
    host = _gpu_host(None)
    data = asyncio.run(collect_body(host, now=NOW, nonce=CHALLENGE))
    facts, posture, gpu = (
        asyncio.run(host.facts()),
        asyncio.run(host.posture()),
        asyncio.run(host.gpu()),
    )
    assert data == evidence_body(host=facts, certify_key_spki=b"", now=NOW, os=posture, gpu=gpu)


def test_a_recorded_attester_answers_unrecorded_gpus_unsupported() -> None:
    recorded = RecordedAttester({1: _report(9)})
    reports = _attest(recorded, [0, 1])
    assert [(r.index, r.status) for r in reports] == [(0, "unsupported"), (1, "report")]
    assert reports[0].detail == "no recorded attestation for GPU 0"


def test_a_recording_that_is_not_nvtrust_s_is_refused(tmp_path: Path) -> None:
    (tmp_path / "chain.txt").write_text("not a chain")
    with pytest.raises(ValueError, match=r"chain\.txt: no PEM certificate"):
        RecordedAttester.from_nvtrust(
            NVTRUST / "attestationReport-545.00.txt", tmp_path / "chain.txt"
        )


def test_the_quote_binds_the_gpu_reports(pki: PkiFiles, tmp_path: Path) -> None:
    """Through the attestation client: the reports are in the body whose bytes the quote's
    qualifying data binds with the challenge's nonce."""
    nonce = os.urandom(32)
    tpm = FakeTpm()
    recorded = RecordedAttester(every=_report(0))
    seen: list[attestation_pb2.Evidence] = []

    async def script(peer: Peer) -> None:
        seen.append(await peer.evidence(challenge(nonce)))

    asyncio.run(attest(pki, [script], tmp_path=tmp_path, tpm=tpm, host=_gpu_host(recorded)))
    [evidence] = seen
    body = body_of(evidence)
    assert [(r.index, r.status) for r in body.gpu_reports] == [(0, "report"), (1, "report")]
    assert tpm.quoted == [qualifying_data(nonce, evidence.body)]
    assert sorted(recorded.asked) == [(0, gpu_nonce(nonce, 0)), (1, gpu_nonce(nonce, 1))]


# --- devtrust-agent collect ------------------------------------------------------------------


def test_collect_asks_the_gpus_with_the_nonce_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_host_tree(tmp_path / "host")
    xml = next((corpus_root() / "gpu").rglob("qx-gb200-lost.xml"))
    argv = ["collect", "--root", str(root), "--gpu-xml", str(xml), "--json"]
    assert agent_main.main([*argv, "--gpu-nonce", CHALLENGE.hex()]) == 0
    body = json.loads(capsys.readouterr().out)
    gpus = [g.get("index", 0) for g in body["gpu"]["gpus"]]
    reports = body["gpu_reports"]
    assert [r.get("index", 0) for r in reports] == gpus
    assert {r["status"] for r in reports} == {"unsupported"}
    assert "gpu_source nvidia-smi-xml" in reports[0]["detail"]
    assert agent_main.main(argv[:-1]) == 0
    assert "attestation unsupported" in capsys.readouterr().out


def test_collect_refuses_a_nonce_that_is_not_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        agent_main.main(["collect", "--gpu-nonce", "abcd"])
    assert exit_.value.code == 2
    assert "expected 64 hex digits (a 32-byte challenge nonce), got 'abcd'" in (
        capsys.readouterr().err
    )
