"""The Enrollment and Query messages at the gRPC edge (verifier/wire_enroll.py,
verifier/wire_query.py): what a request becomes, what a response carries. The services'
behaviour over real sockets is in tests/test_enrollment.py and tests/test_e2e*.py."""

from __future__ import annotations

import datetime

import pytest

from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.v1 import common_pb2, enrollment_pb2, query_pb2
from devtrust.verifier.config import LimitsConfig
from devtrust.verifier.enrollment import Activated, HostClaims, IssuedChallenge
from devtrust.verifier.errors import LimitExceeded, MalformedInput, NotFound
from devtrust.verifier.records import DeviceState
from devtrust.verifier.wire_enroll import (
    activate_request_from_wire,
    activated_to_wire,
    challenge_to_wire,
    enroll_request_from_wire,
)
from devtrust.verifier.wire_query import (
    MAX_PAGE,
    device_id_from_wire,
    device_query_from_wire,
    trust_score_to_wire,
)

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)


def test_an_enroll_request_becomes_its_values() -> None:
    msg = enrollment_pb2.EnrollRequest(
        ek_certificate=b"cert",
        ek_intermediates=[b"i1", b"i2"],
        ek_public=b"ek",
        ak_public=b"ak",
        host=common_pb2.HostFacts(hostname="h", zone="claimed", labels={"a": "b"}),
        bootstrap_token="t",
        channel_key_spki=b"spki",
    )
    request = enroll_request_from_wire(msg, LimitsConfig())
    assert request.ek_intermediates == (b"i1", b"i2")
    assert request.host == HostClaims(hostname="h", zone="claimed", labels={"a": "b"})
    assert request.host.as_record()["claimed_zone"] == "claimed"
    assert "zone" not in request.host.as_record()  # the host's claim keeps its own name
    assert (request.ek_public, request.ak_public, request.channel_key_spki) == (
        b"ek",
        b"ak",
        b"spki",
    )
    assert request.bootstrap_token == "t"


def test_an_enroll_request_is_checked_before_anything_else() -> None:
    with pytest.raises(MalformedInput, match=r"^EnrollRequest\.ek_public is empty$"):
        enroll_request_from_wire(enrollment_pb2.EnrollRequest(), LimitsConfig())
    long_name = common_pb2.HostFacts(hostname="h" * 254)
    with pytest.raises(LimitExceeded, match=r"EnrollRequest\.host\.hostname: 254 characters"):
        enroll_request_from_wire(
            enrollment_pb2.EnrollRequest(ek_public=b"ek", host=long_name), LimitsConfig()
        )


def test_enrollment_answers_carry_what_they_say() -> None:
    issued = IssuedChallenge(
        enrollment_id="e" * 32,
        device_id=DeviceId("d" * 64),
        credential_blob=b"b",
        encrypted_secret=b"s",
    )
    msg = challenge_to_wire(issued)
    assert (msg.enrollment_id, msg.device_id, msg.credential_blob, msg.encrypted_secret) == (
        "e" * 32,
        "d" * 64,
        b"b",
        b"s",
    )
    pending = activated_to_wire(
        Activated(device_id=DeviceId("d"), state=DeviceState.PENDING_APPROVAL, ca_chain=(b"ca",))
    )
    assert pending.state == common_pb2.DEVICE_STATE_PENDING_APPROVAL
    assert pending.channel_certificate == b""  # no certificate while pending approval
    enrolled = activated_to_wire(
        Activated(
            device_id=DeviceId("d"),
            state=DeviceState.ENROLLED,
            ca_chain=(b"ca",),
            channel_certificate=b"der",
        )
    )
    assert enrolled.state == common_pb2.DEVICE_STATE_ENROLLED
    assert (list(enrolled.ca_chain), enrolled.channel_certificate) == ([b"ca"], b"der")
    answer = activate_request_from_wire(
        enrollment_pb2.ActivateRequest(enrollment_id="x", proof=b"p")
    )
    assert (answer.enrollment_id, answer.proof) == ("x", b"p")


def test_a_device_listing_is_one_database_query() -> None:
    """Every filter reaches the query (the database does them), tiers and staleness as of
    the service's clock."""
    query = device_query_from_wire(
        query_pb2.ListDevicesRequest(
            tier=common_pb2.TIER_WARNING,
            zone="z",
            labels={"rack": "12", "sku": "h100"},
            stale_only=True,
            page_size=7,
            page_token="abc",
        ),
        now=NOW,
    )
    assert query.tier is Tier.WARNING
    assert query.zone == "z"
    assert query.all_labels == (("rack", "12"), ("sku", "h100"))
    assert (query.now, query.stale_at) == (NOW, NOW)
    assert (query.after, query.limit) == ("abc", 7)
    plain = device_query_from_wire(query_pb2.ListDevicesRequest(), now=NOW)
    assert (plain.tier, plain.stale_at, plain.all_labels, plain.limit) == (None, None, (), 100)


def test_a_page_is_bounded_whatever_is_asked() -> None:
    big = device_query_from_wire(query_pb2.ListDevicesRequest(page_size=100_000), now=NOW)
    assert big.limit == MAX_PAGE


def test_an_unknown_tier_is_malformed() -> None:
    with pytest.raises(MalformedInput, match=r"ListDevicesRequest\.tier: unknown value 42"):
        device_query_from_wire(
            # 42 is no Tier value, as mypy says: a peer with another .proto can still send it.
            query_pb2.ListDevicesRequest(tier=42),  # type: ignore[arg-type]
            now=NOW,
        )


def test_a_device_never_appraised_scores_tier_none() -> None:
    msg = trust_score_to_wire(DeviceId("d" * 64), None)
    assert (msg.device_id, msg.tier, list(msg.claims)) == ("d" * 64, common_pb2.TIER_NONE, [])


def test_a_requested_device_id_is_parsed_at_the_edge() -> None:
    """A device id enters the domain as a ``DeviceId`` or not at all: text that is not one
    names no device (NOT_FOUND, as for an unknown device), before the database is asked."""
    for request in (query_pb2.GetDeviceRequest, query_pb2.GetTrustScoreRequest):
        assert device_id_from_wire(request(device_id="ab" * 32)) == "ab" * 32
        for bad in ("nope", "AB" * 32, "ab" * 32 + "'--", ""):
            with pytest.raises(NotFound, match="is not 64 lowercase hex digits"):
                device_id_from_wire(request(device_id=bad))
