"""What the operator command (verifier/ops.py) prints: aligned tables and key-value blocks
for people, JSON with stable snake_case keys for scripts. Pure: views in
(verifier/wire_ops.py), lines and dicts out, the time passed in.

Text a device reported (its hostname, kernel, labels set from its token) reaches an
operator's terminal: every string is shown with its control and other unprintable
characters escaped, so that no device can move the cursor or recolour the screen. JSON
escapes them itself.

Device ids are shown shortened in tables (12 hex digits, longer where two listed devices
share them); ``show`` and ``--json`` give them whole, and every command takes the short form
back as long as it names one device.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from devtrust.verifier.wire_ops import (
    ChangeView,
    DeviceView,
    EarView,
    FindingView,
    HistoryView,
    RevokedView,
    RoleView,
    TokenView,
    TrustView,
)

SHORT_ID = 12
NONE = "-"


def printable(text: str) -> str:
    """``text`` with each unprintable character as ``\\xNN`` / ``\\uNNNN``."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def short_ids(ids: Iterable[str]) -> dict[str, str]:
    """Each id by its shortest prefix of at least SHORT_ID digits that no other has."""
    unique = sorted(set(ids))
    length = SHORT_ID
    while length < 64 and len({i[:length] for i in unique}) < len(unique):
        length += 4
    return {i: i[:length] for i in unique}


def when(value: datetime.datetime | None) -> str:
    if value is None:
        return NONE
    return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def age(value: datetime.datetime | None, now: datetime.datetime, *, never: str = "never") -> str:
    """``12s ago``, ``in 3m``: how far ``value`` is from ``now``, in its largest unit."""
    if value is None:
        return never
    seconds = int((now - value).total_seconds())
    ahead = seconds < 0
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            text = f"{seconds // size}{unit}"
            break
    else:
        text = f"{seconds}s"
    return f"in {text}" if ahead else f"{text} ago"


def labels_text(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or NONE


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Columns left-aligned to their widest cell, two spaces apart; the last one unpadded."""
    cells = [list(header), *([printable(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)), row[-1]])
        for row in cells
    ]


def _tier(trust: TrustView | None) -> str:
    return trust.tier.label if trust is not None else "none"


def _score(trust: TrustView | None) -> str:
    return str(trust.score) if trust is not None else "0"


# --- people ----------------------------------------------------------------------------------


def devices_table(devices: Sequence[DeviceView], now: datetime.datetime) -> list[str]:
    short = short_ids(d.device_id for d in devices)
    header = ("DEVICE", "STATE", "TIER", "SCORE", "ZONE", "LABELS", "HOST", "LAST SEEN")
    rows = [
        (
            short[d.device_id],
            d.state.value,
            _tier(d.trust),
            _score(d.trust),
            d.zone or NONE,
            labels_text(d.labels),
            d.host.get("hostname") or NONE,
            age(d.last_seen, now),
        )
        for d in devices
    ]
    return table(header, rows)


def _block(pairs: Iterable[tuple[str, str]]) -> list[str]:
    items = list(pairs)
    width = max(len(k) for k, _ in items)
    return [f"{k.ljust(width)}  {printable(v)}" for k, v in items]


def _findings(findings: Sequence[FindingView], indent: str = "  ") -> list[str]:
    lines = []
    for f in findings:
        subject = f" [{f.subject}]" if f.subject else ""
        lines.append(printable(f"{indent}{f.severity:<15} {f.id}{subject}: {f.message}"))
        if f.expected or f.found:
            lines.append(
                printable(
                    f"{indent}{'':<15} expected {f.expected or NONE}, found {f.found or NONE}"
                )
            )
    return lines


def _claims(claims: Mapping[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in claims.items()) or NONE


def _trust_pairs(trust: TrustView, now: datetime.datetime) -> list[tuple[str, str]]:
    appraised = (
        f"{when(trust.appraised_at)} ({age(trust.appraised_at, now)})"
        if trust.appraised_at
        else "never"
    )
    pairs = [
        ("tier", trust.tier.label),
        ("score", f"{trust.score}/100"),
        ("appraised", appraised),
    ]
    if trust.expires_at is not None:
        pairs.append(("stale from", f"{when(trust.expires_at)} ({age(trust.expires_at, now)})"))
    return [*pairs, ("policy", trust.policy_id or NONE), ("claims", _claims(trust.claims))]


def _trust_details(trust: TrustView) -> list[str]:
    lines = ["findings:", *_findings(trust.findings)] if trust.findings else []
    for sub in trust.submods:
        lines.append(printable(f"submod {sub.name}: {sub.tier.label}, {_claims(sub.claims)}"))
        lines += _findings(sub.findings)
    return lines


def trust_lines(trust: TrustView, now: datetime.datetime) -> list[str]:
    """A result: tier, score, when, the policy, its claims; then each finding and submod."""
    return [*_block(_trust_pairs(trust, now)), *_trust_details(trust)]


def score_lines(trust: TrustView, now: datetime.datetime) -> list[str]:
    pairs = [("device", trust.device_id), *_trust_pairs(trust, now)]
    return [*_block(pairs), *_trust_details(trust)]


def device_lines(device: DeviceView, now: datetime.datetime) -> list[str]:
    host = device.host
    pairs = [
        ("device", device.device_id),
        ("state", device.state.value),
        ("zone", device.zone or NONE),
        ("labels", labels_text(device.labels)),
        ("host", host.get("hostname") or NONE),
        ("os", host.get("os_release") or NONE),
        ("kernel", host.get("kernel") or NONE),
        ("agent", host.get("agent_version") or NONE),
        ("enrolled", when(device.enrolled_at)),
        ("last seen", f"{when(device.last_seen)} ({age(device.last_seen, now)})"),
        ("ek certificate sha256", device.ek_certificate_sha256 or NONE),
        ("ak name", device.ak_name or NONE),
    ]
    lines = _block(pairs)
    if device.trust is None:
        return [*lines, "trust: never appraised"]
    return [*lines, "trust:", *("  " + line for line in trust_lines(device.trust, now))]


def _event_detail(entry: HistoryView) -> str:
    if entry.trust is not None:
        t = entry.trust
        ids = ", ".join(f.id for f in t.findings)
        found = f"; {len(t.findings)} findings: {ids}" if t.findings else ""
        return f"{t.tier.label}, score {t.score}{found}"
    if not entry.detail:
        return NONE
    return " ".join(f"{k}={_compact(v)}" for k, v in entry.detail.items())


def _compact(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}={_compact(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_compact(v) for v in value) + "]"
    return "''" if value == "" else str(value)


def history_table(entries: Sequence[HistoryView]) -> list[str]:
    rows = [(when(e.at), e.event, e.actor or NONE, _event_detail(e)) for e in entries]
    return table(("AT", "EVENT", "ACTOR", "DETAIL"), rows)


def change_line(change: ChangeView, now: datetime.datetime) -> str:
    """One watched change: when, the device (short), zone, tier before and after, score.
    ``now`` where the result carries no appraisal time (a device never appraised)."""
    trust = change.trust
    at = trust.appraised_at if trust is not None and trust.appraised_at else now
    previous = change.previous_tier.label if change.previous_tier is not None else "new"
    return printable(
        f"{when(at)}  {change.device_id[:SHORT_ID]}  {change.zone or NONE:<20}  "
        f"{previous:>15} -> {_tier(trust):<15}  score {_score(trust)}"
    )


def initial_line(change: ChangeView, now: datetime.datetime) -> str:
    """A device's result when the watch began."""
    trust = change.trust
    at = trust.appraised_at if trust is not None and trust.appraised_at else now
    return printable(
        f"{when(at)}  {change.device_id[:SHORT_ID]}  {change.zone or NONE:<20}  "
        f"{'now':>15}    {_tier(trust):<15}  score {_score(trust)}"
    )


def device_summary(verb: str, device: DeviceView) -> str:
    return printable(
        f"{verb} {device.device_id}: {device.state.value}, zone {device.zone or NONE}, "
        f"labels {labels_text(device.labels)}"
    )


def revoked_summary(revoked: RevokedView) -> str:
    serials = len(revoked.serials)
    feed = f" ({', '.join(revoked.serials)})" if revoked.serials else ""
    return (
        f"revoked {revoked.device.device_id}: {serials} live device certificate"
        f"{'' if serials == 1 else 's'} on the revocation feed{feed}"
    )


# --- scripts ---------------------------------------------------------------------------------


def _time_json(value: datetime.datetime | None) -> str | None:
    return value.astimezone(datetime.UTC).isoformat() if value is not None else None


def _finding_json(f: FindingView) -> dict[str, str]:
    return {
        "id": f.id,
        "severity": f.severity,
        "claim": f.claim,
        "subject": f.subject,
        "message": f.message,
        "expected": f.expected,
        "found": f.found,
    }


def trust_json(trust: TrustView) -> dict[str, Any]:
    return {
        "device_id": trust.device_id,
        "tier": trust.tier.label,
        "score": trust.score,
        "appraised_at": _time_json(trust.appraised_at),
        "expires_at": _time_json(trust.expires_at),
        "policy_id": trust.policy_id,
        "evidence_digest": trust.evidence_digest,
        "claims": dict(trust.claims),
        "findings": [_finding_json(f) for f in trust.findings],
        "submods": [
            {
                "name": s.name,
                "tier": s.tier.label,
                "claims": dict(s.claims),
                "findings": [_finding_json(f) for f in s.findings],
            }
            for s in trust.submods
        ],
    }


def device_json(device: DeviceView) -> dict[str, Any]:
    return {
        "device_id": device.device_id,
        "state": device.state.value,
        "zone": device.zone,
        "labels": dict(device.labels),
        "host": dict(device.host),
        "enrolled_at": _time_json(device.enrolled_at),
        "last_seen": _time_json(device.last_seen),
        "ek_certificate_sha256": device.ek_certificate_sha256,
        "ak_name": device.ak_name,
        "trust": trust_json(device.trust) if device.trust is not None else None,
    }


def history_json(entry: HistoryView) -> dict[str, Any]:
    return {
        "at": _time_json(entry.at),
        "event": entry.event,
        "actor": entry.actor,
        "trust": trust_json(entry.trust) if entry.trust is not None else None,
        "detail": dict(entry.detail) if entry.detail is not None else None,
    }


def change_json(change: ChangeView, *, initial: bool) -> dict[str, Any]:
    previous = change.previous_tier
    return {
        "device_id": change.device_id,
        "zone": change.zone,
        "initial": initial,
        "previous_tier": previous.label if previous is not None else None,
        "trust": trust_json(change.trust) if change.trust is not None else None,
    }


def revoked_json(revoked: RevokedView) -> dict[str, Any]:
    return {"device": device_json(revoked.device), "revoked_serials": list(revoked.serials)}


def token_note(made: TokenView) -> str:
    assigns = f"zone {made.zone or '(unassigned)'}, labels {dict(made.labels)}"
    return f"valid once, until {when(made.expires_at)}; assigns {assigns}"


def token_json(made: TokenView) -> dict[str, Any]:
    return {
        "token": made.token,
        "expires_at": _time_json(made.expires_at),
        "zone": made.zone,
        "labels": dict(made.labels),
    }


def role_line(done: RoleView) -> str:
    return (
        f"operator {done.name}: role {done.role or 'none'} (was {done.previous_role or 'none'}), "
        "in force at its next call"
    )


def role_json(done: RoleView) -> dict[str, Any]:
    was = done.previous_role or None
    return {"name": done.name, "role": done.role or None, "previous_role": was}


def ear_lines(made: EarView, *, signed: bool) -> list[str]:
    """`score --ear`: the claims set, indented JSON (keys as the verifier sent them);
    with ``signed``, the JWT alone on one line (for a relying party or a file)."""
    if signed:
        return [made.jwt]
    return json.dumps(made.claims, indent=2, ensure_ascii=True).splitlines()
