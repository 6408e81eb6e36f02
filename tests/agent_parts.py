"""Agent parts for tests of the agent's logic without swtpm: an in-memory TPM double and a
recorded host (``devtrust.agent.interfaces``)."""

from __future__ import annotations

import hashlib

from devtrust.agent.collect import RecordedHost
from devtrust.agent.interfaces import PcrValues, Quote, Selection
from devtrust.v1 import attestation_pb2, common_pb2

ATTEST_PREFIX = b"fake-attest:"


class FakeTpm:
    """A Tpm double. Nothing is signed; the quote's ``attest`` is ``ATTEST_PREFIX`` followed by
    the qualifying data it was asked for, so a scripted verifier can check what the agent
    bound, and every qualifying data quoted is kept in ``quoted``."""

    def __init__(self) -> None:
        self.quoted: list[bytes] = []

    async def ek_certificate(self) -> bytes | None:
        return None

    async def ek_public(self) -> bytes:
        return b"fake-ek"

    async def ak_public(self) -> bytes:
        return b"fake-ak"

    async def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        return hashlib.sha256(credential_blob + encrypted_secret).digest()

    async def pcr_read(self, selection: Selection) -> PcrValues:
        return {(bank, i): pcr_value(bank, i) for bank, pcrs in selection for i in pcrs}

    async def quote(self, qualifying_data: bytes, selection: Selection) -> Quote:
        self.quoted.append(qualifying_data)
        return Quote(
            ATTEST_PREFIX + qualifying_data, b"fake-signature", await self.pcr_read(selection)
        )


def pcr_value(bank: str, index: int) -> bytes:
    return hashlib.sha256(f"{bank}:{index}".encode()).digest()


def recorded_host(*, event_log: bytes | None = b"recorded event log") -> RecordedHost:
    """A plausible GPU host as recorded."""
    return RecordedHost(
        facts=common_pb2.HostFacts(hostname="gpu-node-17", os_release="Ubuntu 24.04 LTS"),
        posture=attestation_pb2.OsPosture(
            os_id="ubuntu",
            os_version="24.04",
            kernel_release="6.8.0-45-generic",
            secure_boot=True,
            lockdown="integrity",
            sshd=attestation_pb2.SshdSettings(
                permit_root_login="no", password_authentication=False
            ),
        ),
        gpu=attestation_pb2.GpuState(
            source="nvidia-smi-xml",
            driver_version="550.90.07",
            gpus=[attestation_pb2.Gpu(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-1")],
        ),
        event_log=event_log,
    )
