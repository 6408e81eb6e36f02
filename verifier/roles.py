"""Operator roles: what an operator identity may do on the verifier's APIs.

A role is assigned to an operator's NAME (``spiffe://TD/operator/NAME``) by the verifier,
never read from the certificate: a certificate lives for months and cannot be taken back,
an assignment can (verifier/authz.py reads it at every call). Roles are ordered; each grants
what the ones below it grant:

- ``relying-party``: the revocation feed only (a service that gates on device certificates);
- ``viewer``: read devices, trust scores, their history, watch trust changes;
- ``operator``: approve, revoke and move devices between zones;
- ``admin``: reload the policy.

Pure: no gRPC, no database. Used by the configuration, the authorization table and the
commands that assign roles.
"""

from __future__ import annotations

import re
from enum import IntEnum

# As verifier/pki.py checks operator names before it issues their certificates.
OPERATOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Role(IntEnum):
    RELYING_PARTY = 1
    VIEWER = 2
    OPERATOR = 3
    ADMIN = 4

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")

    @classmethod
    def parse(cls, text: str) -> Role:
        for role in cls:
            if role.label == text:
                return role
        raise ValueError(f"unknown role {text!r}: one of {', '.join(LABELS)}")

    def grants(self, needed: Role) -> bool:
        return self >= needed


LABELS = tuple(role.label for role in Role)


def operator_name_problem(name: str) -> str | None:
    """Why ``name`` is not an operator name (what goes into ``spiffe://TD/operator/NAME``),
    or None."""
    if OPERATOR_NAME.fullmatch(name):
        return None
    return (
        f"operator name {name[:64]!r} is not 1-64 of letters, digits, '.', '_', '-' "
        "(starting alphanumeric)"
    )
