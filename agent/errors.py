"""The agent's own errors; the base and ``ConfigError`` are in ``devtrust.core.errors``."""

from __future__ import annotations

from devtrust.core.errors import DevtrustError


class TpmError(DevtrustError):
    """The TPM could not be reached or refused a command; the message says which."""


class TpmUnavailable(TpmError):
    """The TPM does not answer: it cannot be opened, or its transport failed (swtpm or the
    resource manager gone: connection refused or reset, a TCTI I/O error). The agent reports
    it to the verifier and retries the TPM; it does not exit for it (issue 12, C5)."""


class MalformedMessage(DevtrustError):
    """The verifier sent what the agent cannot read (a certificate that does not parse, a
    device id that is not one): another server or a bug, which retrying does not fix."""
