"""The agent's own errors; the base and ``ConfigError`` are in ``devtrust.core.errors``."""

from __future__ import annotations

from devtrust.core.errors import DevtrustError


class TpmError(DevtrustError):
    """The TPM could not be reached or refused a command; the message says which."""
