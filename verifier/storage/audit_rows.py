"""The one way an audit entry is written: ``append``, called inside the transaction of the
change it records (an appraisal, an enrollment, an operator's change, a revocation), so an
entry exists exactly when its change was committed. Issue 12 chains the entries here.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Protocol

from devtrust.verifier.storage.codec import iso

_INSERT = "INSERT INTO audit (at, device_id, event, tier, detail, actor) VALUES (?,?,?,?,?,?)"


class Executes(Protocol):
    """What ``append`` needs of a connection (sqlite3.Connection has it)."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...


def append(
    db: Executes,
    *,
    at: datetime.datetime,
    device_id: str,
    event: str,
    detail: dict[str, Any] | str,
    tier: str = "",
    actor: str = "",
) -> None:
    """One audit entry, in ``db``'s open transaction. ``detail`` as JSON (a str is taken as
    already encoded: the appraisal's result, as the trust row holds it)."""
    text = detail if isinstance(detail, str) else json.dumps(detail)
    db.execute(_INSERT, (iso(at), device_id, event, tier, text, actor))
