"""The verifier's error types (STYLE 7).

The base, ``DevtrustError``, and ``ConfigError`` are in ``devtrust.core.errors``. "The
evidence is untrustworthy" is not an error: it is a result with findings. Errors are for
input that cannot be appraised at all (malformed structures), requests that are refused, and
missing things.
"""

from __future__ import annotations

from devtrust.core.errors import DevtrustError

__all__ = [
    "FailedPrecondition",
    "LimitExceeded",
    "MalformedInput",
    "NotFound",
    "Rejected",
    "ResourceExhausted",
    "Superseded",
    "Unauthenticated",
]


class MalformedInput(DevtrustError):
    """Bytes that do not parse as the structure they claim to be. Maps to INVALID_ARGUMENT."""


class LimitExceeded(MalformedInput):
    """Input past a configured limit (GPUs per host, event log size, ...). The message names
    the limit and its configuration key. INVALID_ARGUMENT; nothing of it is stored."""


class Rejected(DevtrustError):
    """A well-formed request that policy refuses (untrusted EK, bad AK). PERMISSION_DENIED."""


class Unauthenticated(DevtrustError):
    """The caller's identity is missing or wrong for this call. UNAUTHENTICATED."""


class NotFound(DevtrustError):
    """The named device, enrollment or record does not exist. NOT_FOUND."""


class FailedPrecondition(DevtrustError):
    """The request is valid but the state does not allow it now. FAILED_PRECONDITION."""


class ResourceExhausted(DevtrustError):
    """A caller sends more than its share (enrollment rate, pending enrollments, posture
    notes). RESOURCE_EXHAUSTED; the message says when to try again where it can."""


class Superseded(DevtrustError):
    """A device opened a newer attestation stream; this one ends. ABORTED."""
