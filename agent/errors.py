"""The error base shared by the agent and the verifier (STYLE 7)."""

from __future__ import annotations


class DevtrustError(Exception):
    """Base of every devtrust error."""


class ConfigError(DevtrustError):
    """A configuration file is unreadable or invalid; the message names file, field, reason."""


class TpmError(DevtrustError):
    """The TPM could not be reached or refused a command; the message says which."""
