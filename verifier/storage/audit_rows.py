"""The one way audit entries are written: ``append``, called inside the transaction of the
change it records (an appraisal, an enrollment, an operator's change, a revocation), so an
entry exists exactly when its change was committed; ``seal`` for the entries written before
the chains (schema step 7); ``prune_chain`` for retention.

Each entry joins its hash chain (``verifier/audit_chain.py``: the events, the encoding, the
check): the chain's head row (``audit_heads``) is read and replaced in the same transaction,
so two writers extending one chain conflict on that row (PostgreSQL: one of the two
serializable transactions is retried; SQLite has one writer), and writers on different
chains share nothing but an announcing chain (``chains/0``..``chains/f``, by the new chain's
name), which only a chain's first entry extends (announcing it): a burst of first
enrollments spreads over sixteen heads. SQL with ``?`` marks, the same on every backend.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from devtrust.verifier import audit_chain
from devtrust.verifier.audit_chain import CHECKPOINT_EVERY, GENESIS, Entry, Event
from devtrust.verifier.storage.codec import iso

_INSERT = (
    "INSERT INTO audit (at, device_id, event, tier, detail, actor, chain, chain_seq, "
    "prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?)"
)
_HEAD = "SELECT seq, hash FROM audit_heads WHERE chain = ?"
_SET_HEAD = (
    "INSERT INTO audit_heads (chain, seq, hash) VALUES (?,?,?) "
    "ON CONFLICT (chain) DO UPDATE SET seq = excluded.seq, hash = excluded.hash"
)
_CHECKPOINT = (
    "INSERT INTO audit_checkpoints (chain, chain_seq, hash, at, pruned) VALUES (?,?,?,?,?) "
    "ON CONFLICT (chain, chain_seq) DO UPDATE SET pruned = excluded.pruned"
)
_PAGE = 500


class Cursor(Protocol):
    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Executes(Protocol):
    """What these functions need of a connection in an open transaction (sqlite3's, or the
    PostgreSQL adapter of ``storage/sql.py``): ``?`` marks, rows read by position."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...


@dataclass(frozen=True)
class _Head:
    seq: int
    hash: str


def append(
    db: Executes,
    *,
    at: datetime.datetime,
    device_id: str,
    event: str,
    detail: dict[str, Any] | str,
    tier: str = "",
    actor: str = "",
    checkpoint_every: int = CHECKPOINT_EVERY,
) -> None:
    """One audit entry, in ``db``'s open transaction, at the end of its chain. ``detail`` as
    JSON (a str is taken as already encoded: the appraisal's result, as the trust row holds
    it). ValueError, and nothing written, for an event that is not an ``audit_chain.Event``,
    an actor the event does not allow, or a device event without its device."""
    text = detail if isinstance(detail, str) else audit_chain.detail_text(detail)
    placed = audit_chain.place(device_id=device_id, event=event, actor=actor, detail=text)
    head = _head(db, placed.chain) or seal_chain(db, placed.chain)
    entry = Entry(
        chain=placed.chain,
        seq=head.seq + 1,
        at=audit_chain.canonical_at(at),
        device_id=device_id,
        event=event,
        actor=placed.actor,
        tier=tier,
        detail=text,
    )
    _write(db, entry, prev=head, stored=(iso(at), text), every=checkpoint_every)


def _write(db: Executes, entry: Entry, *, prev: _Head, stored: tuple[str, str], every: int) -> None:
    digest = audit_chain.link(prev.hash, entry)
    at, text = stored
    # The head first: a concurrent append to the same chain waits on this row and then
    # fails as a serialization conflict, which the engine runs again (inserting the entry
    # first, it would meet the other's seq in the unique index: an error not retried).
    db.execute(_SET_HEAD, (entry.chain, entry.seq, digest))
    db.execute(
        _INSERT,
        (at, entry.device_id, entry.event, entry.tier, text, entry.actor,
         entry.chain, entry.seq, prev.hash, digest),
    )  # fmt: skip
    if entry.seq % every == 0:
        db.execute(_CHECKPOINT, (entry.chain, entry.seq, digest, at, 0))
    if entry.seq == 1:
        _announce(db, entry, digest)


def _announce(db: Executes, first: Entry, digest: str) -> None:
    """A new chain's first entry, announced in the same transaction (at its time) on the
    chain ``audit_chain.announced_on`` names: a shard ``chains/X`` (a shard's own first
    entry: the root ``chains``). Verify checks that every announced chain is still there,
    from that hash on, so a chain deleted whole shows."""
    if first.chain != audit_chain.CHAINS:
        at = datetime.datetime.fromisoformat(first.at)
        detail = {"chain": first.chain, "first": digest}
        append(db, at=at, device_id="", event=Event.CHAIN_STARTED, detail=detail)


def _head(db: Executes, chain: str) -> _Head | None:
    row = db.execute(_HEAD, (chain,)).fetchone()
    return None if row is None else _Head(int(row[0]), str(row[1]))


# --- entries written before the chains -----------------------------------------------------


def _entry_of(row: Any, chain: str, seq: int) -> Entry:
    return Entry(
        chain=chain,
        seq=seq,
        at=audit_chain.canonical_at(row[1]),
        device_id=str(row[2]),
        event=str(row[3]),
        actor=str(row[6]),
        tier=str(row[4]),
        detail=str(row[5]),
    )


def _seal_row(db: Executes, row: Any, chain: str, prev: _Head) -> _Head:
    entry = _entry_of(row, chain, prev.seq + 1)
    digest = audit_chain.link(prev.hash, entry)
    db.execute(
        "UPDATE audit SET chain = ?, chain_seq = ?, prev_hash = ?, hash = ? WHERE id = ?",
        (chain, entry.seq, prev.hash, digest, row[0]),
    )
    if entry.seq == 1:
        _announce(db, entry, digest)
    return _Head(entry.seq, digest)


# Only entries written before the chains (up to the id schema step 7 recorded): one off a
# chain written since was not written by append, and sealing it would launder it.
_UNSEALED = (
    "SELECT id, at, device_id, event, tier, detail, actor FROM audit WHERE chain IS NULL "
    "AND id > ? AND id <= (SELECT MAX(last_id) FROM audit_legacy) ORDER BY id LIMIT ?"
)
_UNSEALED_OF_DEVICE = (
    "SELECT id, at, device_id, event, tier, detail, actor FROM audit WHERE chain IS NULL "
    "AND id > ? AND device_id = ? AND id <= (SELECT MAX(last_id) FROM audit_legacy) "
    "ORDER BY id LIMIT ?"
)


def _unsealed(db: Executes, device_id: str | None) -> Iterator[Any]:
    """The entries written before the chains and not yet on one (of ``device_id``; None: of
    any), in id order, a page at a time (they are updated as they are read)."""
    after = 0
    while True:
        params = (after, _PAGE) if device_id is None else (after, device_id, _PAGE)
        sql = _UNSEALED if device_id is None else _UNSEALED_OF_DEVICE
        rows = db.execute(sql, params).fetchall()
        yield from rows
        if len(rows) < _PAGE:
            return
        after = int(rows[-1][0])


def seal_chain(db: Executes, chain: str) -> _Head:
    """Put the entries of ``chain`` written before the chains (ids up to the one schema
    step 7 recorded) on it, in id order, and write its head; the head (seq 0, the genesis
    hash, when there were none). Only for a chain without a head: entries found off a
    chain that has one, or written after step 7, were not written by ``append`` and are
    left for ``devtrust audit verify`` to report."""
    head = _Head(0, GENESIS)
    for row in list(_unsealed(db, audit_chain.device_of(chain))):
        if audit_chain.chain_of(str(row[2]), str(row[3]), str(row[5])) == chain:
            head = _seal_row(db, row, chain, head)
    if head.seq:
        db.execute(_SET_HEAD, (chain, head.seq, head.hash))
    return head


def seal(db: Executes) -> int:
    """Seal every chain that has no head yet, in one pass over the entries off a chain;
    how many entries were sealed. Idempotent: run at open after migrating, and by
    ``devtrust audit seal``."""
    heads: dict[str, _Head | None] = {}
    count = 0
    for row in _unsealed(db, None):
        chain = audit_chain.chain_of(str(row[2]), str(row[3]), str(row[5]))
        if chain not in heads:
            heads[chain] = None if _head(db, chain) else _Head(0, GENESIS)
        prev = heads[chain]
        if prev is None:  # the chain has a head: not ours to extend (see seal_chain)
            continue
        heads[chain] = _seal_row(db, row, chain, prev)
        count += 1
    for chain, head in heads.items():
        if head is not None and head.seq:
            db.execute(_SET_HEAD, (chain, head.seq, head.hash))
    return count


# --- retention -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pruning:
    """What retention deletes of one chain: its entries up to ``seq`` (``hash``: that
    entry's), ``count`` of them."""

    chain: str
    seq: int
    hash: str
    count: int


def chains(db: Executes) -> list[str]:
    """Every chain retention may prune (that has a head; not the announcing chains nor
    ``audit``, whose entries vouch for the others), by name."""
    rows = db.execute("SELECT chain FROM audit_heads ORDER BY chain").fetchall()
    return [str(r[0]) for r in rows if str(r[0]) not in audit_chain.UNPRUNED]


def plan_prune(db: Executes, chain: str, *, before: datetime.datetime) -> Pruning | None:
    """What retention deletes of ``chain``: its oldest entries up to the first one at or
    after ``before``, never its last entry; None when nothing. Reads only."""
    head = _head(db, chain)
    if head is None:
        return None
    last = _last_before(db, chain, audit_chain.canonical_at(before), head.seq)
    if last is None:
        return None
    seq, digest, first = last
    return Pruning(chain, seq, digest, seq - first + 1)


def record_prune(
    db: Executes,
    *,
    before: datetime.datetime,
    plan: Sequence[Pruning],
    now: datetime.datetime,
    actor: str,
) -> None:
    """The pruning's own audit entry (audit_pruned, by ``actor``), on the chain ``audit``,
    written BEFORE any entry is deleted: it names each chain's pruning checkpoint (chain,
    seq, hash), which verify requires of every pruning checkpoint. A pruning cut short
    leaves names of checkpoints never written, which is harmless."""
    detail = {
        "before": audit_chain.canonical_at(before),
        "chains": len(plan),
        "entries": sum(p.count for p in plan),
        "pruned": [[p.chain, p.seq, p.hash] for p in plan],
    }
    append(db, at=now, device_id="", event=Event.AUDIT_PRUNED, detail=detail, actor=actor)


def prune_chain(db: Executes, pruning: Pruning, *, now: datetime.datetime) -> int:
    """Delete the entries of ``pruning.chain`` up to its seq, after writing a pruning
    checkpoint there so that the rest verifies from it; how many were deleted (0 when
    the entry at that seq no longer holds the planned hash). One chain per transaction:
    on PostgreSQL it conflicts only with appends to that chain."""
    chain, seq = pruning.chain, pruning.seq
    row = db.execute(
        "SELECT hash FROM audit WHERE chain = ? AND chain_seq = ?", (chain, seq)
    ).fetchone()
    if row is None or str(row[0]) != pruning.hash:
        return 0
    db.execute(_CHECKPOINT, (chain, seq, pruning.hash, iso(now), 1))
    db.execute("DELETE FROM audit WHERE chain = ? AND chain_seq <= ?", (chain, seq))
    # Older checkpoints lie before the chain's first entry now: nothing to check them on.
    db.execute("DELETE FROM audit_checkpoints WHERE chain = ? AND chain_seq < ?", (chain, seq))
    return pruning.count


def _last_before(db: Executes, chain: str, cut: str, head_seq: int) -> tuple[int, str, int] | None:
    """(seq, hash) of the last entry of ``chain`` that retention deletes, with the seq of
    its first entry; None when it deletes none. Reads from the oldest entry on, a page at a
    time, until an entry at or after the cut or the head."""
    found: tuple[int, str] | None = None
    first, after = 0, -1
    while True:
        rows = db.execute(
            "SELECT chain_seq, at, hash FROM audit WHERE chain = ? AND chain_seq > ? "
            "ORDER BY chain_seq LIMIT ?",
            (chain, after, _PAGE),
        ).fetchall()
        for seq, at, digest in ((int(r[0]), r[1], str(r[2])) for r in rows):
            first = first or seq
            if seq >= head_seq or audit_chain.canonical_at(at) >= cut:
                return None if found is None else (*found, first)
            found = (seq, digest)
        if len(rows) < _PAGE:
            return None if found is None else (*found, first)
        after = int(rows[-1][0])
