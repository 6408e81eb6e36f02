"""The Query service's messages at the gRPC edge (STYLE 4), in both directions.

In: a ListDevicesRequest becomes a ``DeviceQuery`` (verifier/storage), whose filters and
paging the database does; a WatchTrustRequest a ``WatchFilter`` (verifier/watch.py); a
HistoryRequest a ``HistoryPage``; Approve, SetZone and Revoke their action of
verifier/lifecycle.py; the other requests name a device. Out: devices, trust results and
changes, audit entries and a reloaded policy become their messages (a Device and a
TrustResult by verifier/wire.py, shared with the other services). The servicer builds no
message itself.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.core.errors import DevtrustError
from devtrust.core.ids import DeviceId, Serial, parse_device_id
from devtrust.core.tier import Tier
from devtrust.v1 import common_pb2, query_pb2
from devtrust.verifier.errors import MalformedInput, NotFound
from devtrust.verifier.inventory import (
    DEFAULT_TOKEN_TTL_S,
    MAX_LABELS,
    TOKEN_TTL_S,
    labels_problem,
    zone_problem,
)
from devtrust.verifier.lifecycle import Approve, Revoke, SetZone, reason_problem
from devtrust.verifier.pki import check_operator_name
from devtrust.verifier.policy import Policy
from devtrust.verifier.records import DeviceRecord
from devtrust.verifier.roles import Role
from devtrust.verifier.storage import DeviceQuery, HistoryItem
from devtrust.verifier.trust import TrustResult
from devtrust.verifier.watch import TrustChange, WatchFilter
from devtrust.verifier.wire import (
    TIERS_FROM_WIRE,
    device_to_wire,
    result_to_wire,
    tier_to_wire,
    timestamp,
)

DEFAULT_PAGE = 100
# Devices per ListDevices page at most, whatever the request asks: a page stays well within
# gRPC's message size (each Device is bounded at the edge, verifier/wire_body.py).
MAX_PAGE = 500


NamesDevice = (
    query_pb2.GetDeviceRequest
    | query_pb2.GetTrustScoreRequest
    | query_pb2.HistoryRequest
    | query_pb2.ApproveRequest
    | query_pb2.SetZoneRequest
    | query_pb2.RevokeRequest
    | query_pb2.GetStoredEvidenceRequest
    | query_pb2.GetEarRequest
)
# Audit entries per History page at most, whatever the request asks.
MAX_HISTORY_PAGE = 500


def device_id_from_wire(msg: NamesDevice) -> DeviceId:
    """The device a request names. Text that is not a device id names no device: NOT_FOUND,
    as for an unknown one, with what is wrong with it (the database is not asked)."""
    try:
        return parse_device_id(msg.device_id)
    except ValueError as exc:
        raise NotFound(f"no device: {exc}") from None


def device_query_from_wire(
    msg: query_pb2.ListDevicesRequest, *, now: datetime.datetime
) -> DeviceQuery:
    """The page a ListDevicesRequest asks for, its tiers and staleness as of ``now`` (a
    result past its staleness bound is tier none). Raises ``MalformedInput`` on an unknown
    tier or more labels than a device carries."""
    if len(msg.labels) > MAX_LABELS:  # one SQL condition each: bounded, like a device's
        raise MalformedInput(
            f"ListDevicesRequest.labels: {len(msg.labels)} labels, more than the {MAX_LABELS} "
            "a device can carry"
        )
    tier: Tier | None = None
    if msg.tier:  # TIER_UNSPECIFIED: any tier
        tier = TIERS_FROM_WIRE.get(msg.tier)
        if tier is None:
            raise MalformedInput(f"ListDevicesRequest.tier: unknown value {msg.tier}")
    return DeviceQuery(
        zone=msg.zone,
        tier=tier,
        labels=tuple(sorted(msg.labels.items())),
        now=now,
        stale_at=now if msg.stale_only else None,
        after=msg.page_token,
        limit=min(msg.page_size or DEFAULT_PAGE, MAX_PAGE),
    )


def devices_page_to_wire(
    devices: Iterable[tuple[DeviceRecord, TrustResult | None]], *, next_page_token: str
) -> query_pb2.ListDevicesResponse:
    """One page: each device with its latest result as of now (None: never appraised)."""
    return query_pb2.ListDevicesResponse(
        devices=[device_to_wire(rec, result) for rec, result in devices],
        next_page_token=next_page_token,
    )


def trust_score_to_wire(device_id: DeviceId, result: TrustResult | None) -> common_pb2.TrustResult:
    """The device's latest result as of now; a device never appraised is tier none."""
    if result is None:
        return common_pb2.TrustResult(device_id=device_id, tier=tier_to_wire(Tier.NONE))
    return result_to_wire(result)


def ear_request_from_wire(msg: query_pb2.GetEarRequest) -> tuple[DeviceId, bool]:
    """The device whose EAR is asked for, and whether it is to be signed too."""
    return device_id_from_wire(msg), msg.signed


def ear_to_wire(claims_json: str, jwt: str) -> query_pb2.Ear:
    """The EAR claims set as JSON (verifier/ear.py ``ear_json``) and, when signed, the same
    claims as a compact JWS ("" otherwise)."""
    return query_pb2.Ear(json=claims_json, jwt=jwt)


def policy_reloaded_to_wire(policy: Policy) -> query_pb2.ReloadPolicyResponse:
    return query_pb2.ReloadPolicyResponse(
        policy_id=policy.policy_id, rules=len(policy.rules), source=policy.source
    )


# --- watching --------------------------------------------------------------------------------


def watch_filter_from_wire(msg: query_pb2.WatchTrustRequest) -> WatchFilter:
    """The devices a watcher follows. A device id or zone that could name no device is
    malformed (a filter matching nothing would watch in silence forever)."""
    device_id = None
    if msg.device_id:
        try:
            device_id = parse_device_id(msg.device_id)
        except ValueError as exc:
            raise MalformedInput(f"WatchTrustRequest.device_id: {exc}") from None
    problem = zone_problem(msg.zone)
    if problem is not None:
        raise MalformedInput(f"WatchTrustRequest.zone: {problem}")
    return WatchFilter(zone=msg.zone, device_id=device_id, initial=msg.initial)


def trust_change_to_wire(change: TrustChange) -> query_pb2.TrustChange:
    """A change; an initial result of a device never appraised is tier none. The marker
    that ends an empty initial set carries no device."""
    msg = query_pb2.TrustChange(zone=change.zone, end_of_initial=change.end_of_initial)
    if change.device_id is None:
        return msg
    msg.device_id = change.device_id
    msg.trust.CopyFrom(trust_score_to_wire(change.device_id, change.result))
    if change.previous_tier is not None:
        msg.previous_tier = tier_to_wire(change.previous_tier)
    return msg


# --- history ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryPage:
    device_id: DeviceId
    # Entries older than this one (the previous page's last); None: from the latest.
    before_seq: int | None
    limit: int


def history_from_wire(msg: query_pb2.HistoryRequest) -> HistoryPage:
    """The page asked for. The page token is the one the previous page returned (a
    position in the audit trail); anything else is malformed."""
    device_id = device_id_from_wire(msg)
    before = None
    if msg.page_token:
        token = msg.page_token
        if not (token.isascii() and token.isdigit() and 0 < len(token) <= 19):
            raise MalformedInput(
                "HistoryRequest.page_token: not a token History returned (give the previous "
                "page's next_page_token, or none for the latest entries)"
            )
        before = int(token)
    return HistoryPage(device_id, before, min(msg.page_size or DEFAULT_PAGE, MAX_HISTORY_PAGE))


def history_to_wire(items: Sequence[HistoryItem], *, full: bool) -> query_pb2.HistoryResponse:
    """One page, newest first; ``full``: the page is as long as asked, so there may be
    more (the next page starts below its last entry)."""
    entries = []
    for item in items:
        entry = item.entry
        out = query_pb2.HistoryEntry(at=timestamp(entry.at), event=entry.event, actor=entry.actor)
        if item.result is not None:
            out.trust.CopyFrom(result_to_wire(item.result))
        else:
            out.detail_json = json.dumps(entry.detail, sort_keys=True)
        entries.append(out)
    token = str(items[-1].entry.seq) if full and items else ""
    return query_pb2.HistoryResponse(entries=entries, next_page_token=token)


# --- operators' changes ----------------------------------------------------------------------


def _labels(msg: query_pb2.ApproveRequest | query_pb2.SetZoneRequest, name: str) -> dict[str, str]:
    if len(msg.labels) > MAX_LABELS:
        raise MalformedInput(f"{name}.labels: {len(msg.labels)} labels, more than {MAX_LABELS}")
    return dict(msg.labels)


def approve_from_wire(msg: query_pb2.ApproveRequest) -> tuple[DeviceId, Approve]:
    """Approve, and with a zone or labels assign them too (empty: unchanged; given labels
    replace all). SetZone unassigns a zone or clears labels."""
    labels = _labels(msg, "ApproveRequest")
    return device_id_from_wire(msg), Approve(zone=msg.zone or None, labels=labels or None)


def set_zone_from_wire(msg: query_pb2.SetZoneRequest) -> tuple[DeviceId, SetZone]:
    """The device's whole assignment: ``zone`` ("" unassigned) and exactly ``labels``."""
    return device_id_from_wire(msg), SetZone(zone=msg.zone, labels=_labels(msg, "SetZoneRequest"))


def revoke_from_wire(msg: query_pb2.RevokeRequest) -> tuple[DeviceId, Revoke]:
    problem = reason_problem(msg.reason)
    if problem is not None:
        raise MalformedInput(f"RevokeRequest.reason: {problem}")
    return device_id_from_wire(msg), Revoke(reason=msg.reason)


def revoked_to_wire(
    rec: DeviceRecord, result: TrustResult | None, serials: Sequence[Serial]
) -> query_pb2.RevokeResponse:
    return query_pb2.RevokeResponse(
        device=device_to_wire(rec, result), revoked_serials=list(serials)
    )


# --- bootstrap tokens, roles, stored evidence --------------------------------------------------

MAX_NOTE = 500


@dataclass(frozen=True)
class TokenRequest:
    zone: str
    labels: dict[str, str]
    ttl: datetime.timedelta
    note: str


def token_request_from_wire(msg: query_pb2.CreateBootstrapTokenRequest) -> TokenRequest:
    """What a new token assigns and how long it lives; refused whole when any is wrong."""
    low, high = TOKEN_TTL_S
    ttl_s = msg.ttl_s or DEFAULT_TOKEN_TTL_S
    if not low <= ttl_s <= high:
        raise MalformedInput(
            f"ttl_s {ttl_s}: a token lives {low} to {high} seconds (30 days); give a lifetime "
            "in that range"
        )
    labels = dict(msg.labels)
    problem = zone_problem(msg.zone) or labels_problem(labels)
    if problem is not None:
        raise MalformedInput(problem)
    if len(msg.note) > MAX_NOTE or not msg.note.isprintable():
        raise MalformedInput(f"note: printable text of at most {MAX_NOTE} characters")
    return TokenRequest(msg.zone, labels, datetime.timedelta(seconds=ttl_s), msg.note)


def token_to_wire(
    token: str, *, expires_at: datetime.datetime, request: TokenRequest
) -> query_pb2.BootstrapToken:
    return query_pb2.BootstrapToken(
        token=token,
        expires_at=timestamp(expires_at),
        zone=request.zone,
        labels=request.labels,
    )


def role_from_wire(msg: query_pb2.SetRoleRequest) -> tuple[str, Role | None]:
    """The operator's name and its role from now on (None: taken away)."""
    try:
        check_operator_name(msg.name, given_as="SetRoleRequest.name")
    except DevtrustError as exc:
        raise MalformedInput(str(exc)) from None
    if not msg.role or msg.role == "none":
        return msg.name, None
    try:
        return msg.name, Role.parse(msg.role)
    except ValueError as exc:
        raise MalformedInput(f"SetRoleRequest.role: {exc}") from None


def role_set_to_wire(
    name: str, role: Role | None, previous: str | None
) -> query_pb2.SetRoleResponse:
    return query_pb2.SetRoleResponse(
        name=name, role=role.label if role else "", previous_role=previous or ""
    )


@dataclass(frozen=True)
class OperatorRequest:
    """IssueOperatorCertificate's request: who, which role, and the key it made."""

    name: str
    role: Role
    public_key: ec.EllipticCurvePublicKey


def operator_request_from_wire(msg: query_pb2.IssueOperatorCertificateRequest) -> OperatorRequest:
    try:
        check_operator_name(msg.name, given_as="IssueOperatorCertificateRequest.name")
    except DevtrustError as exc:
        raise MalformedInput(str(exc)) from None
    try:
        role = Role.parse(msg.role)
    except ValueError as exc:
        raise MalformedInput(f"IssueOperatorCertificateRequest.role: {exc}") from None
    try:
        key = serialization.load_der_public_key(msg.public_key)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise MalformedInput(
            "IssueOperatorCertificateRequest.public_key: not a DER SubjectPublicKeyInfo"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise MalformedInput("IssueOperatorCertificateRequest.public_key: not an ECDSA P-256 key")
    return OperatorRequest(msg.name, role, key)


def operator_certificate_to_wire(
    request: OperatorRequest, cert: x509.Certificate, previous: str | None
) -> query_pb2.IssueOperatorCertificateResponse:
    return query_pb2.IssueOperatorCertificateResponse(
        name=request.name,
        role=request.role.label,
        previous_role=previous or "",
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        certificate_der=cert.public_bytes(serialization.Encoding.DER),
    )


def stored_evidence_to_wire(
    rec: DeviceRecord, pcrs: Mapping[str, Mapping[int, str]], log: bytes | None, event_count: int
) -> query_pb2.StoredEvidence:
    return query_pb2.StoredEvidence(
        device_id=rec.device_id,
        zone=rec.zone,
        labels=dict(rec.labels),
        pcrs=[
            common_pb2.PcrBank(
                hash_alg=bank, values={i: bytes.fromhex(v) for i, v in values.items()}
            )
            for bank, values in pcrs.items()
        ],
        has_event_log=log is not None,
        event_log=log or b"",
        event_count=event_count,
    )
