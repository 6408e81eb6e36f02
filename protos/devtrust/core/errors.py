"""The error base shared by the agent and the verifier (STYLE 7). Each side derives its own
errors from it (``devtrust.agent.errors``, ``devtrust.verifier.errors``)."""

from __future__ import annotations


class DevtrustError(Exception):
    """Base of every devtrust error."""


class ConfigError(DevtrustError):
    """A configuration file is unreadable or invalid; the message names file, field, reason."""
