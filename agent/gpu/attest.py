"""Each GPU's own attestation (NVIDIA Hopper and later): an SPDM GET_MEASUREMENTS report the
GPU signs, and the GPU's certificate chain, asked once per challenge with the nonce
``devtrust.core.binding.gpu_nonce(challenge nonce, GPU index)`` (binding 4), so that one
challenge binds the TPM quote and every GPU report. The reports travel in the quoted evidence
body (EvidenceBody.gpu_reports); the verifier checks them (verifier/gpu/).

``GpuAttester`` is the interface. Its ``attest`` blocks (NVML takes ~100s of ms per GPU on a
real card): ``collect_reports`` runs each GPU's on a worker thread, all GPUs at once, so an
attester may be called from several threads together. Three implementations here:

- ``NvmlAttester``: the real GPUs, through nvidia-ml-py (``pynvml``), as nvtrust's
  local_gpu_verifier asks them (guest_tools/gpu_verifiers/local_gpu_verifier/src/verifier/
  nvml/);
- ``DisabledAttester``: ``gpu_attestation: off`` in agent.yaml, or GPU state that NVML did
  not give (a capture, /proc/driver/nvidia);
- ``RecordedAttester``: recorded reports (tests, recorded hosts): their nonce is the one they
  were recorded with, so the verifier names a nonce mismatch, as it should.

``collect_reports`` returns exactly one GpuReport per GPU, whatever the attester does: an
exception, or an answer out of shape or past the limits the verifier accepts, becomes status
"error" saying so, never a body the verifier refuses whole.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from time import perf_counter
from typing import Any, Protocol

from devtrust.agent.gpu.nvml import nvml_reason
from devtrust.core.binding import gpu_nonce
from devtrust.v1 import attestation_pb2

logger = logging.getLogger(__name__)

# GpuReport.status (protos/devtrust/v1/attestation.proto; verifier/gpu/types.py STATUSES).
REPORT = "report"
UNSUPPORTED = "unsupported"
ERROR = "error"
STATUSES = (REPORT, UNSUPPORTED, ERROR)

# What the verifier accepts of one GpuReport (verifier/wire_body.py checks the same numbers;
# the agent cannot import the verifier). A report past them is sent as status "error".
MAX_DETAIL = 1024  # characters
MAX_REPORT = 64 * 1024  # bytes; NVML's buffer is 8 KiB (NVML_CC_GPU_ATTESTATION_REPORT_SIZE)
MAX_CERTIFICATES = 8  # NVIDIA's chains hold 5
MAX_CERTIFICATE = 16 * 1024  # bytes, DER
NONCE_SIZE = 32  # SPDM 1.1 GET_MEASUREMENTS nonce; NVML_CC_GPU_CEC_NONCE_SIZE

DISABLED_DETAIL = "disabled in agent.yaml (gpu_attestation: off)"


class GpuAttester(Protocol):
    """Asks GPU ``index`` (``Gpu.index`` of the snapshot in the same body: NVML's index) to
    attest. May be called from several threads at once, one per GPU."""

    def attest(self, index: int, nonce: bytes) -> attestation_pb2.GpuReport:
        """The GPU's answer to ``nonce`` (32 bytes, already derived for this GPU): status
        "report" with the report and the chain (DER, leaf first), or "unsupported"/"error"
        with the reason in ``detail``. Blocking. May raise: ``collect_reports`` makes any
        exception an "error" report."""
        ...

    def close(self) -> None:
        """Let go of what the attester holds (NVML stays initialised between challenges)."""
        ...


def bounded_detail(text: str) -> str:
    """``text`` within MAX_DETAIL characters (cut, with an ellipsis)."""
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1] + "\u2026"


def unsupported(index: int, detail: str) -> attestation_pb2.GpuReport:
    return attestation_pb2.GpuReport(index=index, status=UNSUPPORTED, detail=bounded_detail(detail))


def failed(index: int, detail: str) -> attestation_pb2.GpuReport:
    return attestation_pb2.GpuReport(index=index, status=ERROR, detail=bounded_detail(detail))


# --- the certificate chain as NVML gives it ------------------------------------------------

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL)


class ChainError(ValueError):
    """A certificate chain that is not PEM certificates."""


def pem_chain_to_der(data: bytes) -> list[bytes]:
    """The certificates of a PEM chain (NVML's ``attestationCertChain``, nvtrust's
    gpuAkCertChain files), DER, in their order (the attestation key's first). The bytes are
    decoded, not parsed: the verifier parses and checks them. Raises ``ChainError``."""
    ders = []
    for i, match in enumerate(_PEM.finditer(data)):
        body = b"".join(match.group(1).split())
        try:
            der = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ChainError(f"certificate {i} of the chain is not base64: {exc}") from exc
        if not der:
            raise ChainError(f"certificate {i} of the chain is empty")
        ders.append(der)
    if not ders:
        raise ChainError(
            f"no PEM certificate in the chain ({len(data)} bytes): expected "
            "-----BEGIN CERTIFICATE----- blocks"
        )
    return ders


# --- NVML ----------------------------------------------------------------------------------

# nvmlDeviceArchitecture_t (nvml.h): Hopper (9) and later GPUs attest; DLA and NPU
# architectures are not GPUs, and 0xffffffff is NVML's "unknown".
_HOPPER = 9
_NOT_GPUS = {11: "DLA", 12: "DLA2", 15: "NPU3", 0xFFFFFFFF: "unknown"}
_ARCH_NAMES = {
    2: "Kepler",
    3: "Maxwell",
    4: "Pascal",
    5: "Volta",
    6: "Turing",
    7: "Ampere",
    8: "Ada",
    9: "Hopper",
    10: "Blackwell",
    13: "Rubin",
    **_NOT_GPUS,
}
_CC_CAPABLE = 1  # NVML_CC_SYSTEM_GPUS_CC_CAPABLE


def _arch_name(arch: int) -> str:
    return f"{_ARCH_NAMES.get(arch, 'architecture')} ({arch})"


class NvmlAttester:
    """The host's GPUs through NVML, initialised at the first attestation and kept so until
    ``close`` (an NVML failure shuts it down, to start afresh at the next one). Only GPUs
    of Hopper or a later architecture, on a system whose GPUs NVML reports Confidential
    Computing capable, are asked; the others are "unsupported", saying why. A GPU's
    certificate chain is read once per GPU (it is fixed while the driver is loaded), again
    when the index names another GPU (its UUID changed).

    ``nv``: the pynvml module (tests give a stand-in); imported at the first call otherwise,
    so that hosts without NVIDIA never load it."""

    def __init__(self, nv: Any = None) -> None:
        self._module = nv
        self._nv: Any = None
        self._lock = threading.Lock()
        self._chains: dict[int, tuple[str, tuple[bytes, ...]]] = {}
        self.inits = 0

    def _open(self) -> Any:
        """The initialised pynvml module; raises what loading or nvmlInit raised."""
        with self._lock:
            if self._nv is None:
                if self._module is None:
                    import pynvml  # noqa: PLC0415 - optional at run time

                    self._module = pynvml
                self._module.nvmlInit()
                self._nv, self._chains = self._module, {}
                self.inits += 1
            return self._nv

    def attest(self, index: int, nonce: bytes) -> attestation_pb2.GpuReport:
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"a GPU nonce is {NONCE_SIZE} bytes, got {len(nonce)}")
        try:
            nv = self._open()
        except Exception as exc:  # noqa: BLE001 - library missing, driver not loaded, ...
            return unsupported(index, f"NVML is not loadable: {type(exc).__name__}: {exc}")
        call = ["nvmlDeviceGetHandleByIndex"]  # the NVML function being called
        try:
            return self._ask(nv, index, nonce, call)
        except nv.NVMLError as exc:
            reason = nvml_reason(exc)
            if reason in ("error", "gpu_lost"):  # NVML's state may be stale: start afresh
                self.close()
            text = f"NVML {call[0]}: {type(exc).__name__}: {exc}"
            return unsupported(index, text) if reason == "not_supported" else failed(index, text)

    def _ask(self, nv: Any, index: int, nonce: bytes, call: list[str]) -> attestation_pb2.GpuReport:
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        call[0] = "nvmlDeviceGetArchitecture"
        arch = int(nv.nvmlDeviceGetArchitecture(handle))
        if arch in _NOT_GPUS or arch < _HOPPER:
            return unsupported(
                index, f"GPU architecture {_arch_name(arch)}: only Hopper and later GPUs attest"
            )
        call[0] = "nvmlSystemGetConfComputeCapabilities"
        gpus_caps = int(getattr(nv.nvmlSystemGetConfComputeCapabilities(), "gpusCaps", 0))
        if gpus_caps != _CC_CAPABLE:
            return unsupported(
                index,
                "NVML reports the system's GPUs not Confidential Computing capable "
                f"(gpusCaps {gpus_caps}): they do not attest",
            )
        try:
            chain = self._chain(nv, index, handle, call)
        except ChainError as exc:
            return failed(index, f"the attestation certificate chain NVML returned: {exc}")
        call[0] = "nvmlDeviceGetConfComputeGpuAttestationReport"
        answer = nv.nvmlDeviceGetConfComputeGpuAttestationReport(handle, nonce)
        report = bytes(answer.attestationReport[: int(answer.attestationReportSize)])
        if not report:
            return failed(index, "NVML returned an empty attestation report")
        return attestation_pb2.GpuReport(
            index=index, status=REPORT, report=report, certificates=list(chain)
        )

    def _chain(self, nv: Any, index: int, handle: Any, call: list[str]) -> tuple[bytes, ...]:
        """GPU ``index``'s chain, DER: kept while its UUID is the same."""
        call[0] = "nvmlDeviceGetUUID"
        uuid = _text(nv.nvmlDeviceGetUUID(handle))
        with self._lock:
            known = self._chains.get(index)
        if known is not None and known[0] == uuid:
            return known[1]
        call[0] = "nvmlDeviceGetConfComputeGpuCertificate"
        cert = nv.nvmlDeviceGetConfComputeGpuCertificate(handle)
        pem = bytes(cert.attestationCertChain[: int(cert.attestationCertChainSize)])
        chain = tuple(pem_chain_to_der(pem))
        with self._lock:
            self._chains[index] = (uuid, chain)
        return chain

    def close(self) -> None:
        with self._lock:
            if self._nv is not None:
                with contextlib.suppress(Exception):
                    self._nv.nvmlShutdown()
            self._nv, self._chains = None, {}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- the others ----------------------------------------------------------------------------


class DisabledAttester:
    """No GPU is asked: every GPU is reported "unsupported" with ``detail`` (by default,
    that ``gpu_attestation: off`` says so)."""

    def __init__(self, detail: str = DISABLED_DETAIL) -> None:
        self.detail = detail

    def attest(self, index: int, nonce: bytes) -> attestation_pb2.GpuReport:
        return unsupported(index, self.detail)

    def close(self) -> None:
        pass


class RecordedAttester:
    """Recorded answers, whatever the nonce: ``reports`` by GPU index, ``every`` for the
    GPUs not among them (None: those are "unsupported", no recording). What each call
    asked is kept in ``asked`` (index, nonce), for tests."""

    def __init__(
        self,
        reports: Mapping[int, attestation_pb2.GpuReport] | None = None,
        *,
        every: attestation_pb2.GpuReport | None = None,
    ) -> None:
        self._reports = dict(reports or {})
        self._every = every
        self._lock = threading.Lock()
        self.asked: list[tuple[int, bytes]] = []

    @classmethod
    def from_nvtrust(cls, report: Path, chain: Path) -> RecordedAttester:
        """One recording for every GPU, from nvtrust's files: the report as hex text
        (attestationReport*.txt; binary accepted) and the chain as PEM (gpuAkCertChain*.txt).
        Raises ``ValueError`` naming the file."""
        data = report.read_bytes()
        try:
            raw = bytes.fromhex(data.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raw = data
        if not raw:
            raise ValueError(f"{report}: empty: expected the report nvtrust wrote (hex)")
        try:
            ders = pem_chain_to_der(chain.read_bytes())
        except ChainError as exc:
            raise ValueError(f"{chain}: {exc}") from exc
        return cls(every=recorded_report(raw, ders))

    def attest(self, index: int, nonce: bytes) -> attestation_pb2.GpuReport:
        with self._lock:
            self.asked.append((index, nonce))
        recorded = self._reports.get(index, self._every)
        if recorded is None:
            return unsupported(index, f"no recorded attestation for GPU {index}")
        out = attestation_pb2.GpuReport()
        out.CopyFrom(recorded)
        out.index = index
        return out

    def close(self) -> None:
        pass


def recorded_report(report: bytes, certificates: Sequence[bytes]) -> attestation_pb2.GpuReport:
    """A GpuReport of status "report" (the index is set when it is sent)."""
    return attestation_pb2.GpuReport(status=REPORT, report=report, certificates=certificates)


# --- one report per GPU --------------------------------------------------------------------


def checked(answer: object, index: int) -> attestation_pb2.GpuReport:
    """``answer`` as sent for GPU ``index``: an answer out of shape (not a GpuReport, for
    another index, an unknown status, a "report" without report or certificates) or past
    the verifier's limits becomes an "error" report saying what was wrong; detail is cut to
    its limit, and a GPU that did not attest carries no report bytes."""
    if not isinstance(answer, attestation_pb2.GpuReport):
        return failed(index, f"the GPU attester answered {type(answer).__name__}, not a GpuReport")
    if answer.index != index:
        return failed(index, f"the GPU attester answered for GPU {answer.index}, not {index}")
    if answer.status not in STATUSES:
        return failed(index, f"the GPU attester answered status {answer.status!r}")
    if answer.status != REPORT:
        return attestation_pb2.GpuReport(
            index=index, status=answer.status, detail=bounded_detail(answer.detail)
        )
    problem = _past_limits(answer)
    if problem:
        return failed(index, problem)
    out = attestation_pb2.GpuReport()
    out.CopyFrom(answer)
    out.detail = bounded_detail(out.detail)
    return out


def _past_limits(answer: attestation_pb2.GpuReport) -> str:
    if not answer.report:
        return "the GPU attester answered status report without a report"
    if not answer.certificates:
        return "the GPU attester answered status report without a certificate chain"
    if len(answer.report) > MAX_REPORT:
        return f"the attestation report is {len(answer.report)} bytes, more than {MAX_REPORT}"
    if len(answer.certificates) > MAX_CERTIFICATES:
        return (
            f"the certificate chain holds {len(answer.certificates)} certificates, more "
            f"than {MAX_CERTIFICATES}"
        )
    for i, der in enumerate(answer.certificates):
        if len(der) > MAX_CERTIFICATE:
            return f"certificate {i} of the chain is {len(der)} bytes, more than {MAX_CERTIFICATE}"
    return ""


def attest_one(
    attester: GpuAttester, index: int, challenge_nonce: bytes
) -> attestation_pb2.GpuReport:
    """GPU ``index`` asked with its nonce for ``challenge_nonce`` (blocking); never raises."""
    try:
        answer: object = attester.attest(index, gpu_nonce(challenge_nonce, index))
    except Exception as exc:  # noqa: BLE001 - any failure is this GPU's "error" report
        logger.warning("GPU %d: attestation failed: %s: %s", index, type(exc).__name__, exc)
        return failed(index, f"{type(exc).__name__}: {exc}")
    return checked(answer, index)


async def collect_reports(
    attester: GpuAttester, indices: Sequence[int], challenge_nonce: bytes
) -> list[attestation_pb2.GpuReport]:
    """One GpuReport per GPU index in ``indices`` (each once, in their order), each asked on
    a worker thread, all at once."""
    unique = list(dict.fromkeys(indices))
    if not unique:
        return []
    started = perf_counter()
    reports = await asyncio.gather(
        *(asyncio.to_thread(attest_one, attester, i, challenge_nonce) for i in unique)
    )
    logger.debug(
        "GPU attestation: %d GPUs in %.3f s (%s)",
        len(unique),
        perf_counter() - started,
        ", ".join(f"{r.index}:{r.status}" for r in reports),
    )
    return list(reports)
