"""The package's error types (STYLE 7).

``DevtrustError`` is the base. "The evidence is untrustworthy" is not an error: it is a
result with findings. Errors are for input that cannot be appraised at all (malformed
structures), requests that are refused, and missing things.
"""

from __future__ import annotations

from agent.errors import ConfigError, DevtrustError

__all__ = [
    "ConfigError",
    "DevtrustError",
    "FailedPrecondition",
    "MalformedInput",
    "NotFound",
    "Rejected",
    "Unauthenticated",
]


class MalformedInput(DevtrustError):
    """Bytes that do not parse as the structure they claim to be. Maps to INVALID_ARGUMENT."""


class Rejected(DevtrustError):
    """A well-formed request that policy refuses (untrusted EK, bad AK). PERMISSION_DENIED."""


class Unauthenticated(DevtrustError):
    """The caller's identity is missing or wrong for this call. UNAUTHENTICATED."""


class NotFound(DevtrustError):
    """The named device, enrollment or record does not exist. NOT_FOUND."""


class FailedPrecondition(DevtrustError):
    """The request is valid but the state does not allow it now. FAILED_PRECONDITION."""
