"""The Query API's client side, for the operator command (verifier/ops.py), at the gRPC edge
(STYLE 4): requests are built here from plain arguments, and every answer becomes a frozen
view before the command sees it. Nothing past this module sees ``*_pb2``.

The views hold what the verifier said, not what this side would compute: a tier is the tier
the verifier sent, never recomputed from the claims. A value this version does not know (a
tier or state added later) is refused with what was found, rather than shown as something
else.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from devtrust.core.tier import Tier
from devtrust.v1 import common_pb2, query_pb2, query_pb2_grpc
from devtrust.verifier.errors import MalformedInput
from devtrust.verifier.records import DeviceState
from devtrust.verifier.wire import TIERS_FROM_WIRE, tier_to_wire

_STATES = {
    common_pb2.DEVICE_STATE_PENDING_APPROVAL: DeviceState.PENDING_APPROVAL,
    common_pb2.DEVICE_STATE_ENROLLED: DeviceState.ENROLLED,
    common_pb2.DEVICE_STATE_REVOKED: DeviceState.REVOKED,
}
_SEVERITIES = {
    common_pb2.SEVERITY_INFO: "info",
    common_pb2.SEVERITY_WARNING: "warning",
    common_pb2.SEVERITY_CONTRAINDICATED: "contraindicated",
}
_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
HOST_FACTS = ("hostname", "os_release", "kernel", "machine_id", "agent_version")


@dataclass(frozen=True)
class FindingView:
    id: str
    severity: str
    claim: str
    subject: str
    message: str
    expected: str
    found: str


@dataclass(frozen=True)
class SubResultView:
    name: str
    tier: Tier
    claims: Mapping[str, int]
    findings: tuple[FindingView, ...]


@dataclass(frozen=True)
class TrustView:
    """A device's result as the verifier sees it now (past its staleness bound: tier none,
    with a freshness.stale finding). ``appraised_at`` None: never appraised."""

    device_id: str
    tier: Tier
    score: int
    claims: Mapping[str, int]
    findings: tuple[FindingView, ...]
    appraised_at: datetime.datetime | None
    expires_at: datetime.datetime | None
    policy_id: str
    evidence_digest: str
    submods: tuple[SubResultView, ...]


@dataclass(frozen=True)
class DeviceView:
    device_id: str
    state: DeviceState
    zone: str
    labels: Mapping[str, str]
    # HOST_FACTS, as the device last reported them (the device's word, not the verifier's).
    host: Mapping[str, str]
    enrolled_at: datetime.datetime | None
    last_seen: datetime.datetime | None
    ek_certificate_sha256: str
    ak_name: str
    trust: TrustView | None


@dataclass(frozen=True)
class ChangeView:
    """One message of WatchTrust: a device's new result (``previous_tier`` None: its first
    appraisal, or an initial result), or, with no device, the end of empty initial results."""

    device_id: str
    zone: str
    previous_tier: Tier | None
    trust: TrustView | None
    end_of_initial: bool


@dataclass(frozen=True)
class HistoryView:
    at: datetime.datetime | None
    event: str
    actor: str
    # An appraisal's result, or for other events what changed.
    trust: TrustView | None
    detail: Mapping[str, Any] | None


@dataclass(frozen=True)
class RevokedView:
    device: DeviceView
    serials: tuple[str, ...]


@dataclass(frozen=True)
class DeviceFilter:
    """ListDevices' filters; empty: any."""

    tier: Tier | None = None
    zone: str = ""
    labels: Mapping[str, str] | None = None
    stale_only: bool = False


# --- from the wire ---------------------------------------------------------------------------


def _time(msg: Any, name: str) -> datetime.datetime | None:
    if not msg.HasField(name):
        return None
    value: Timestamp = getattr(msg, name)
    return value.ToDatetime(datetime.UTC)


def _tier(value: common_pb2.Tier.ValueType, where: str) -> Tier:
    tier = TIERS_FROM_WIRE.get(value)
    if tier is None:
        raise MalformedInput(
            f"{where}: tier {value} is unknown to this devtrust (is the verifier newer?)"
        )
    return tier


def _previous_tier(value: common_pb2.Tier.ValueType) -> Tier | None:
    return None if value == common_pb2.TIER_UNSPECIFIED else _tier(value, "previous_tier")


def _findings(msgs: Any) -> tuple[FindingView, ...]:
    return tuple(
        FindingView(
            id=f.id,
            severity=_SEVERITIES.get(f.severity, "unspecified"),
            claim=f.claim,
            subject=f.subject,
            message=f.message,
            expected=f.expected,
            found=f.found,
        )
        for f in msgs
    )


def trust_from_wire(msg: common_pb2.TrustResult) -> TrustView:
    return TrustView(
        device_id=msg.device_id,
        tier=_tier(msg.tier, f"result of device {msg.device_id}"),
        score=msg.score,
        claims={c.name: c.value for c in msg.claims},
        findings=_findings(msg.findings),
        appraised_at=_time(msg, "appraised_at"),
        expires_at=_time(msg, "expires_at"),
        policy_id=msg.policy_id,
        evidence_digest=msg.evidence_digest,
        submods=tuple(
            SubResultView(
                name=s.name,
                tier=_tier(s.tier, f"submod {s.name}"),
                claims={c.name: c.value for c in s.claims},
                findings=_findings(s.findings),
            )
            for s in msg.submods
        ),
    )


def device_from_wire(msg: common_pb2.Device) -> DeviceView:
    state = _STATES.get(msg.state)
    if state is None:
        raise MalformedInput(
            f"device {msg.device_id}: state {msg.state} is unknown to this devtrust "
            "(is the verifier newer?)"
        )
    host = msg.host
    return DeviceView(
        device_id=msg.device_id,
        state=state,
        zone=host.zone,
        labels=dict(host.labels),
        host={name: str(getattr(host, name)) for name in HOST_FACTS},
        enrolled_at=_time(msg, "enrolled_at"),
        last_seen=_time(msg, "last_seen"),
        ek_certificate_sha256=msg.ek_certificate_sha256,
        ak_name=msg.ak_name,
        trust=trust_from_wire(msg.last_result) if msg.HasField("last_result") else None,
    )


def change_from_wire(msg: query_pb2.TrustChange) -> ChangeView:
    return ChangeView(
        device_id=msg.device_id,
        zone=msg.zone,
        previous_tier=_previous_tier(msg.previous_tier),
        trust=trust_from_wire(msg.trust) if msg.device_id else None,
        end_of_initial=msg.end_of_initial,
    )


def _detail(text: str) -> Mapping[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return {"text": text}  # shown as sent: the entry is still worth reading
    return value if isinstance(value, dict) else {"value": value}


def history_from_wire(msg: query_pb2.HistoryEntry) -> HistoryView:
    return HistoryView(
        at=_time(msg, "at"),
        event=msg.event,
        actor=msg.actor,
        trust=trust_from_wire(msg.trust) if msg.HasField("trust") else None,
        detail=_detail(msg.detail_json),
    )


@dataclass(frozen=True)
class TokenView:
    """A bootstrap token just created: the token itself is shown this once."""

    token: str
    expires_at: datetime.datetime | None
    zone: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class OperatorCertificateView:
    name: str
    role: str
    previous_role: str  # "" none
    certificate_pem: bytes


@dataclass(frozen=True)
class RoleView:
    name: str
    role: str  # "" none
    previous_role: str  # "" none


@dataclass(frozen=True)
class EarView:
    """GetEar's answer: the claims set (parsed from its JSON) and the JWT ("" unsigned)."""

    claims: Mapping[str, Any]
    jwt: str


def ear_from_wire(msg: query_pb2.Ear, *, signed: bool) -> EarView:
    """The EAR as the verifier sent it; JSON that is not an object, or no JWT when one was
    asked for, is refused with what was found."""
    try:
        claims = json.loads(msg.json)
    except json.JSONDecodeError as exc:
        raise MalformedInput(f"Ear.json: not JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(claims, dict):
        raise MalformedInput(f"Ear.json: expected a JSON object, found {type(claims).__name__}")
    if signed and not msg.jwt:
        raise MalformedInput("Ear.jwt: a signed EAR was asked for, the verifier sent none")
    if msg.jwt and not _JWS.fullmatch(msg.jwt):
        raise MalformedInput("Ear.jwt: not a compact JWS (three base64url parts)")
    return EarView(claims, msg.jwt)


@dataclass(frozen=True)
class StoredEvidenceView:
    """What the verifier stored of a device's last appraised evidence."""

    device_id: str
    zone: str
    labels: Mapping[str, str]
    pcrs: Mapping[str, Mapping[int, str]]  # bank -> PCR -> hex
    event_log: bytes | None  # None: none stored
    event_count: int


def stored_evidence_from_wire(msg: query_pb2.StoredEvidence) -> StoredEvidenceView:
    return StoredEvidenceView(
        device_id=msg.device_id,
        zone=msg.zone,
        labels=dict(msg.labels),
        pcrs={b.hash_alg: {i: v.hex() for i, v in sorted(b.values.items())} for b in msg.pcrs},
        event_log=msg.event_log if msg.has_event_log else None,
        event_count=msg.event_count,
    )


# --- the calls -------------------------------------------------------------------------------


class QueryClient:
    """The Query service over one channel; each unary call has ``timeout`` seconds (STYLE 15).
    gRPC errors (``grpc.aio.AioRpcError``) pass through: the command words them."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float) -> None:
        self._stub = query_pb2_grpc.QueryStub(channel)
        self._timeout = timeout

    async def device(self, device_id: str) -> DeviceView:
        msg = await self._stub.GetDevice(
            query_pb2.GetDeviceRequest(device_id=device_id), timeout=self._timeout
        )
        return device_from_wire(msg)

    async def devices_page(
        self, where: DeviceFilter, *, after: str, limit: int
    ) -> tuple[list[DeviceView], str]:
        """One page of devices with ids after ``after``, in id order, and the token of the
        next page ("" at the end)."""
        request = query_pb2.ListDevicesRequest(
            zone=where.zone,
            labels=dict(where.labels or {}),
            stale_only=where.stale_only,
            page_size=limit,
            page_token=after,
        )
        if where.tier is not None:
            request.tier = tier_to_wire(where.tier)
        msg = await self._stub.ListDevices(request, timeout=self._timeout)
        return [device_from_wire(d) for d in msg.devices], msg.next_page_token

    async def trust_score(self, device_id: str) -> TrustView:
        msg = await self._stub.GetTrustScore(
            query_pb2.GetTrustScoreRequest(device_id=device_id), timeout=self._timeout
        )
        return trust_from_wire(msg)

    async def ear(self, device_id: str, *, signed: bool) -> EarView:
        msg = await self._stub.GetEar(
            query_pb2.GetEarRequest(device_id=device_id, signed=signed), timeout=self._timeout
        )
        return ear_from_wire(msg, signed=signed)

    async def watch(
        self, *, zone: str, device_id: str, initial: bool, deadline_s: float
    ) -> AsyncIterator[ChangeView]:
        """WatchTrust until the stream ends or ``deadline_s`` passes (then
        DEADLINE_EXCEEDED); the call is cancelled when the iteration stops early."""
        call = self._stub.WatchTrust(
            query_pb2.WatchTrustRequest(zone=zone, device_id=device_id, initial=initial),
            timeout=deadline_s,
        )
        try:
            async for msg in call:
                yield change_from_wire(msg)
        finally:
            call.cancel()

    async def history_page(
        self, device_id: str, *, token: str, limit: int
    ) -> tuple[list[HistoryView], str]:
        msg = await self._stub.History(
            query_pb2.HistoryRequest(device_id=device_id, page_size=limit, page_token=token),
            timeout=self._timeout,
        )
        return [history_from_wire(e) for e in msg.entries], msg.next_page_token

    async def approve(
        self, device_id: str, *, zone: str, labels: Mapping[str, str] | None
    ) -> DeviceView:
        """Approve; a zone or labels given are assigned too (labels replace all)."""
        msg = await self._stub.Approve(
            query_pb2.ApproveRequest(device_id=device_id, zone=zone, labels=dict(labels or {})),
            timeout=self._timeout,
        )
        return device_from_wire(msg)

    async def set_zone(self, device_id: str, *, zone: str, labels: Mapping[str, str]) -> DeviceView:
        """The device's whole assignment: ``zone`` ("" none) and exactly ``labels``."""
        msg = await self._stub.SetZone(
            query_pb2.SetZoneRequest(device_id=device_id, zone=zone, labels=dict(labels)),
            timeout=self._timeout,
        )
        return device_from_wire(msg)

    async def revoke(self, device_id: str, *, reason: str) -> RevokedView:
        msg = await self._stub.Revoke(
            query_pb2.RevokeRequest(device_id=device_id, reason=reason), timeout=self._timeout
        )
        return RevokedView(device_from_wire(msg.device), tuple(msg.revoked_serials))

    async def create_token(
        self, *, zone: str, labels: Mapping[str, str], ttl_s: int, note: str
    ) -> TokenView:
        msg = await self._stub.CreateBootstrapToken(
            query_pb2.CreateBootstrapTokenRequest(
                zone=zone, labels=dict(labels), ttl_s=ttl_s, note=note
            ),
            timeout=self._timeout,
        )
        return TokenView(msg.token, _time(msg, "expires_at"), msg.zone, dict(msg.labels))

    async def set_role(self, name: str, role: str) -> RoleView:
        """``role`` "" takes the role away."""
        msg = await self._stub.SetRole(
            query_pb2.SetRoleRequest(name=name, role=role), timeout=self._timeout
        )
        return RoleView(msg.name, msg.role, msg.previous_role)

    async def issue_operator_certificate(
        self, name: str, role: str, public_key_der: bytes
    ) -> OperatorCertificateView:
        """A certificate for ``name`` over ``public_key_der`` (SPKI), with ``role``."""
        msg = await self._stub.IssueOperatorCertificate(
            query_pb2.IssueOperatorCertificateRequest(
                name=name, role=role, public_key=public_key_der
            ),
            timeout=self._timeout,
        )
        if not msg.certificate_pem:
            raise MalformedInput("IssueOperatorCertificateResponse: no certificate")
        return OperatorCertificateView(
            msg.name, msg.role, msg.previous_role, msg.certificate_pem.encode()
        )

    async def stored_evidence(self, device_id: str) -> StoredEvidenceView:
        msg = await self._stub.GetStoredEvidence(
            query_pb2.GetStoredEvidenceRequest(device_id=device_id), timeout=self._timeout
        )
        return stored_evidence_from_wire(msg)
