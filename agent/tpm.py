"""The real TPM (``interfaces.Tpm``) over tpm2-pytss; the TCTI is configuration.

``TpmBackend`` is synchronous: every call blocks on the TPM (100-700 ms for a quote on real
hardware). ``AsyncTpm`` runs each call on one dedicated thread, which serialises them (the
one lock of STYLE 15) and keeps the event loop free: the thread is this backend's business,
not the interface's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_RC,
    TPM2_SE,
    TPMA_OBJECT,
    TSS2_RC,
)
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_ATTEST,
    TPMT_PUBLIC,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from devtrust.agent.errors import TpmError, TpmUnavailable
from devtrust.agent.interfaces import Quote, Selection

T = TypeVar("T")

AK_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)
QUOTE_RETRIES = 3
# tpm2-tss response codes that mean the TPM did not answer at all (its transport failed),
# as opposed to a TPM that answered with an error: any code of the TCTI layer, and these
# base codes from the layers above it (TSS 2.0 Overview and Common Structures, 6.1.2).
_TCTI_LAYER = TSS2_RC.TCTI_RC_LAYER
_DEAD_BASE_CODES = frozenset(
    {
        TSS2_RC.BASE_RC_IO_ERROR,
        TSS2_RC.BASE_RC_NO_CONNECTION,
        TSS2_RC.BASE_RC_MALFORMED_RESPONSE,
        TSS2_RC.BASE_RC_INSUFFICIENT_RESPONSE,
        TSS2_RC.BASE_RC_NO_TPM,
    }
)


def ak_template() -> TPM2B_PUBLIC:
    """The devtrust AK: restricted ECC P-256 signing key, ECDSA-SHA256, no symmetric."""
    public = TPMT_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=AK_ATTRIBUTES)
    public.parameters.eccDetail.symmetric.algorithm = TPM2_ALG.NULL
    return TPM2B_PUBLIC(publicArea=public)


def _selection_text(selection: Selection) -> str:
    return "+".join(
        f"{bank}:{','.join(str(p) for p in sorted(pcrs))}" for bank, pcrs in selection if pcrs
    )


class TpmBackend:
    def __init__(
        self, tcti: str, *, ek_type: str = "EK-RSA2048", ak_handle: int = 0x81010002
    ) -> None:
        self.tcti = tcti
        self.ek_type = ek_type
        self.ak_handle = ak_handle
        self._esapi: ESAPI | None = None
        self._ek: tuple[bytes | None, Any, bytes] | None = None  # cert, handle, public
        self._ak: tuple[Any, bytes] | None = None  # handle, TPM2B_PUBLIC bytes

    # --- plumbing -------------------------------------------------------------------------

    @property
    def esapi(self) -> ESAPI:
        if self._esapi is None:
            # tpm2-tss logs every TPM error code at WARNING to stderr, and we report errors
            # ourselves. It reads TSS2_LOG at its first log line, so setting it here, before
            # the TCTI opens, is in time, and importing this module changes nothing.
            os.environ.setdefault("TSS2_LOG", "all+NONE")
            try:
                self._esapi = ESAPI(self.tcti)
            except (TSS2_Exception, RuntimeError) as exc:
                raise TpmUnavailable(f"cannot open TPM at {self.tcti!r}: {exc}") from exc
        return self._esapi

    def close(self) -> None:
        """Flush the transient EK and close. Without a resource manager (swtpm over TCP,
        /dev/tpm0) transient objects outlive the connection and the TPM has only a few slots."""
        esapi, self._esapi = self._esapi, None
        ek, self._ek, self._ak = self._ek, None, None
        if esapi is not None:
            if ek is not None:
                with contextlib.suppress(Exception):
                    esapi.flush_context(ek[1])
            with contextlib.suppress(Exception):
                esapi.close()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except TSS2_Exception as exc:
            # The connection may be dead (TPM restarted): reopen on the next call.
            self.close()
            error = TpmUnavailable if transport_failed(exc.rc) else TpmError
            raise error(f"TPM {what} failed: {exc}") from exc

    def _nv_read(self, index: int) -> bytes:
        e = self.esapi
        try:
            handle = e.tr_from_tpmpublic(index)
        except TSS2_Exception as exc:
            if exc.rc & 0xFFF in (TPM2_RC.HANDLE & 0xFFF,) or "handle" in str(exc).lower():
                raise NoSuchIndex(index) from exc
            raise
        public, _ = e.nv_read_public(handle)
        size = public.nvPublic.dataSize
        data = b""
        while len(data) < size:
            chunk = e.nv_read(handle, min(1024, size - len(data)), len(data), auth_handle=handle)
            data += bytes(chunk)
        e.tr_close(handle)
        return data

    # --- endorsement key ------------------------------------------------------------------

    def _load_ek(self) -> tuple[bytes | None, Any, bytes]:
        if self._ek is None:

            def load() -> tuple[bytes | None, Any, bytes]:
                cert, template = create_ek_template(self.ek_type, self._nv_read)
                handle, public, _, _, _ = self.esapi.create_primary(
                    TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
                )
                return cert, handle, bytes(public.marshal())

            try:
                self._ek = self._call("EK creation", load)
            except ValueError as exc:
                raise TpmError(f"EK {self.ek_type}: {exc}") from exc
        return self._ek

    def ek_certificate(self) -> bytes | None:
        """The EK certificate from NV, or None for a TPM without one (some cloud vTPMs)."""
        return self._load_ek()[0] or None

    def ek_public(self) -> bytes:
        """TPM2B_PUBLIC of the EK."""
        return self._load_ek()[2]

    # --- attestation key ------------------------------------------------------------------

    def _load_ak(self) -> tuple[Any, bytes]:
        if self._ak is None:
            self._ak = self._call("AK load", self._load_or_create_ak)
        return self._ak

    def _load_or_create_ak(self) -> tuple[Any, bytes]:
        e = self.esapi
        try:
            handle = e.tr_from_tpmpublic(self.ak_handle)
            public, _, _ = e.read_public(handle)
            if public.publicArea.objectAttributes == AK_ATTRIBUTES:
                return handle, bytes(public.marshal())
            raise TpmError(
                f"persistent handle 0x{self.ak_handle:08x} holds a key that is not a "
                "devtrust AK; clear it with tpm2_evictcontrol"
            )
        except TSS2_Exception:
            pass
        # A primary key in the endorsement hierarchy: derived from the endorsement seed and
        # the template, so it is the same key after a reinstall until the TPM is cleared.
        transient, public, _, _, _ = e.create_primary(
            TPM2B_SENSITIVE_CREATE(), ak_template(), ESYS_TR.ENDORSEMENT
        )
        handle = e.evict_control(ESYS_TR.OWNER, transient, self.ak_handle)
        e.flush_context(transient)
        return handle, bytes(public.marshal())

    def ak_public(self) -> bytes:
        """TPM2B_PUBLIC of the AK (created and persisted on first use)."""
        return self._load_ak()[1]

    # --- commands -------------------------------------------------------------------------

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        ak, _ = self._load_ak()
        _, ek, _ = self._load_ek()
        e = self.esapi

        def activate() -> bytes:
            blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
            secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
            # The EK's authPolicy is PolicySecret(TPM_RH_ENDORSEMENT) (EK Credential Profile).
            session = e.start_auth_session(
                ESYS_TR.NONE,
                ESYS_TR.NONE,
                TPM2_SE.POLICY,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                TPM2_ALG.SHA256,
            )
            try:
                e.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
                return bytes(e.activate_credential(ak, ek, blob, secret, session2=session))
            finally:
                e.flush_context(session)

        return self._call("ActivateCredential", activate)

    def pcr_read(self, selection: Selection) -> dict[tuple[str, int], bytes]:
        out: dict[tuple[str, int], bytes] = {}
        for bank, pcrs in selection:
            remaining = sorted(pcrs)
            while remaining:  # a TPM returns at most 8 PCRs per TPM2_PCR_Read
                text = f"{bank}:{','.join(map(str, remaining))}"
                _, selected, digests = self._read_pcrs(text)
                got = [i for s in selected for i in _bits(s)]
                if not got:
                    raise TpmError(f"TPM returned no values for PCR bank {bank}")
                for index, digest in zip(got, digests, strict=True):
                    out[(bank, index)] = bytes(digest)
                remaining = [p for p in remaining if p not in got]
        return out

    def _read_pcrs(self, text: str) -> tuple[Any, Any, Any]:
        result: tuple[Any, Any, Any] = self._call("PCR_Read", lambda: self.esapi.pcr_read(text))
        return result

    def quote(
        self,
        qualifying_data: bytes,
        selection: Selection,
    ) -> tuple[bytes, bytes, dict[tuple[str, int], bytes]]:
        """TPM2_Quote plus the PCR values it covers: (TPMS_ATTEST, TPMT_SIGNATURE, values).

        PCRs can change between the read and the quote; the values are read again until
        their hash matches the quoted pcrDigest.
        """
        ak, _ = self._load_ak()
        text = _selection_text(selection)
        for _ in range(QUOTE_RETRIES):
            values = self.pcr_read(selection)
            attest, signature = self._call(
                "Quote", lambda: self.esapi.quote(ak, text, qualifying_data)
            )
            attest_bytes = bytes(attest.attestationData)
            info, _ = TPMS_ATTEST.unmarshal(attest_bytes)
            h = hashlib.sha256()  # the AK signs with ECDSA-SHA256: pcrDigest is SHA-256
            for bank, pcrs in selection:
                for index in sorted(pcrs):
                    h.update(values[(bank, index)])
            if h.digest() == bytes(info.attested.quote.pcrDigest):
                return attest_bytes, bytes(signature.marshal()), values
        raise TpmError(f"PCRs kept changing during {QUOTE_RETRIES} quotes")


def transport_failed(rc: int) -> bool:
    """Whether a tpm2-tss response code says the TPM did not answer (``TpmUnavailable``)."""
    layer = rc & TSS2_RC.RC_LAYER_MASK
    if layer == _TCTI_LAYER:
        return True
    return layer != 0 and (rc & 0xFFFF) in _DEAD_BASE_CODES


def _bits(selection: Any) -> list[int]:
    size = selection.sizeofSelect
    bitmap = bytes(selection.pcrSelect)[:size]
    return [byte * 8 + bit for byte, b in enumerate(bitmap) for bit in range(8) if b & (1 << bit)]


class AsyncTpm:
    """The ``Tpm`` interface over a TpmBackend: its calls run on one thread, in order, off the
    event loop. ``run`` and ``backend`` reach the TPM directly (tests extend PCRs with it)."""

    def __init__(self, backend: TpmBackend) -> None:
        self.backend = backend
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpm")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def ek_certificate(self) -> bytes | None:
        return await self.run(self.backend.ek_certificate)

    async def ek_public(self) -> bytes:
        return await self.run(self.backend.ek_public)

    async def ak_public(self) -> bytes:
        return await self.run(self.backend.ak_public)

    async def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        return await self.run(self.backend.activate_credential, credential_blob, encrypted_secret)

    async def pcr_read(self, selection: Selection) -> dict[tuple[str, int], bytes]:
        return await self.run(self.backend.pcr_read, selection)

    async def quote(self, qualifying_data: bytes, selection: Selection) -> Quote:
        attest, signature, values = await self.run(self.backend.quote, qualifying_data, selection)
        return Quote(attest, signature, values)

    def close(self) -> None:
        self._executor.submit(self.backend.close)
        self._executor.shutdown(wait=True)
