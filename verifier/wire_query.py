"""The Query service's messages at the gRPC edge (STYLE 4), in both directions.

In: a ListDevicesRequest becomes a ``DeviceQuery`` (verifier/storage), whose filters and
paging the database does; the other requests name a device. Out: devices, trust results and
a reloaded policy become their messages (a Device and a TrustResult by verifier/wire.py,
shared with the other services). The servicer builds no message itself.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable

from devtrust.core.ids import DeviceId, parse_device_id
from devtrust.core.tier import Tier
from devtrust.v1 import common_pb2, query_pb2
from devtrust.verifier.errors import MalformedInput, NotFound
from devtrust.verifier.inventory import MAX_LABELS
from devtrust.verifier.policy import Policy
from devtrust.verifier.records import DeviceRecord
from devtrust.verifier.storage import DeviceQuery
from devtrust.verifier.trust import TrustResult
from devtrust.verifier.wire import TIERS_FROM_WIRE, device_to_wire, result_to_wire, tier_to_wire

DEFAULT_PAGE = 100
# Devices per ListDevices page at most, whatever the request asks: a page stays well within
# gRPC's message size (each Device is bounded at the edge, verifier/wire_body.py).
MAX_PAGE = 500


def device_id_from_wire(
    msg: query_pb2.GetDeviceRequest | query_pb2.GetTrustScoreRequest,
) -> DeviceId:
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


def policy_reloaded_to_wire(policy: Policy) -> query_pb2.ReloadPolicyResponse:
    return query_pb2.ReloadPolicyResponse(
        policy_id=policy.policy_id, rules=len(policy.rules), source=policy.source
    )
