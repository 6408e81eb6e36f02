"""Who may call what (issue 10, item 4): one table for every method the verifier serves
(verifier/authz.py), enforced by one interceptor, over real mTLS on a real verifier.

- the table covers every method of every service the verifier registers, read from the
  service descriptors, and no row names a method nobody serves;
- each role against each method: the least role that may call it, and every role below
  refused; an operator without a role, an agent's channel certificate and a device
  certificate refused on every Query and Revocations method;
- a viewer cannot Revoke, and nothing changes when it tries;
- a method without a row is refused (PERMISSION_DENIED) even when a service registered it,
  an unknown one answered UNIMPLEMENTED, a synchronous handler refused rather than served
  unchecked, and a handler served without the interceptor acts for nobody;
- a role taken away is refused at the next call (and by a stream at its next message); the
  configuration's roles win over the database's.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import descriptor_pool
from google.protobuf.wrappers_pb2 import StringValue
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtrust.core.claims import DeviceClaims
from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import attestation_pb2, attestation_pb2_grpc, query_pb2, query_pb2_grpc
from devtrust.verifier import authz, server
from devtrust.verifier.authz import REQUIREMENTS, Authorization, Authorizer, current_caller
from devtrust.verifier.ca import CertificateAuthority, pem
from devtrust.verifier.interceptor import ErrorMapping
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.records import DeviceState
from devtrust.verifier.roles import Role
from devtrust.verifier.server import RunningVerifier
from devtrust.verifier.storage import SqliteRepositories, open_sqlite
from tests.db import device
from tests.env import channel_credentials, running, verifier_config
from tests.test_reflection import describe

DOMAIN = "devtrust.local"
OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
# Operators and the roles the configuration gives them; nora has none.
OPERATORS = {"ada": "admin", "otto": "operator", "vera": "viewer", "rita": "relying-party"}
NO_SUCH_DEVICE = "ab" * 32


def credentials(pki: PkiFiles, kind: str, name: str) -> grpc.ChannelCredentials:
    """A client identity spiffe://devtrust.local/KIND/NAME signed by the verifier's own CA
    (so TLS accepts it: what it may call is the interceptor's to decide)."""
    ca = CertificateAuthority.load(pki.ca_cert, pki.ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    common: dict[str, Any] = {
        "trust_domain": DOMAIN,
        "public_key": key.public_key(),
        "now": now,
        "lifetime": datetime.timedelta(hours=1),
    }
    if kind == "device":
        claims = DeviceClaims(Tier.AFFIRMING, "production-inference")
        cert = ca.issue_device(device_id=DeviceId(name), claims=claims, **common)
    else:
        cert = ca.issue_client(kind=kind, name=name, **common)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return channel_credentials(pki, key_pem=key_pem, cert_pem=pem(cert))


def config_with_roles(workdir: Path, pki: PkiFiles, ek_ca: EndorsementCA, **operators: str) -> Any:
    return replace(verifier_config(workdir, pki, ek_ca), operators=operators)


# --- the table covers every method -----------------------------------------------------------


def served_methods(verifier: RunningVerifier) -> dict[str, list[str]]:
    """port -> every full method name of every service registered there, from the
    service descriptors (the generated modules put them in the default pool)."""
    pool = descriptor_pool.Default()
    return {
        port: [f"/{name}/{m.name}" for name in names for m in pool.FindServiceByName(name).methods]
        for port, names in verifier.services.items()
    }


def test_the_table_covers_every_method_of_every_registered_service(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> dict[str, list[str]]:
        async with running(config) as verifier:
            address = f"127.0.0.1:{verifier.attestation_port}"
            creds = credentials(pki, "operator", "nora")  # reflection: anyone
            listed = await asyncio.to_thread(describe, address, creds)
            assert set(listed) == set(verifier.services["attestation"])
            return served_methods(verifier)

    served = asyncio.run(scenario())
    assert set(served) == {"enrollment", "attestation"}
    every = [m for methods in served.values() for m in methods]
    assert len(every) > 15  # all of Query, Revocations, Enrollment, Attestation, health...
    missing = [m for m in every if m not in REQUIREMENTS]
    assert missing == [], f"methods served without a row in verifier/authz.py: {missing}"
    # And no row for a method nobody serves (a renamed method would keep a dead row).
    assert set(REQUIREMENTS) == set(every)
    assert "/devtrust.v1.Enrollment/Enroll" in served["enrollment"]
    assert "/devtrust.v1.Query/Revoke" not in served["enrollment"]


def test_a_method_without_a_row_is_found_and_stops_the_verifier_starting() -> None:
    query = query_pb2.DESCRIPTOR.services_by_name["Query"]
    short = {k: v for k, v in REQUIREMENTS.items() if k != "/devtrust.v1.Query/Revoke"}
    assert authz.uncovered([query], short) == ["/devtrust.v1.Query/Revoke"]
    assert authz.uncovered([query]) == []
    with pytest.raises(RuntimeError, match=r"without a row in verifier/authz.py: test.Nope"):
        server._check_covered({"attestation": ("devtrust.v1.Query", "test.Nope")})
    with pytest.raises(ValueError, match="role is required of operators"):
        authz.Requirement(authz.Who.OPERATOR)
    with pytest.raises(ValueError, match="role is required of operators"):
        authz.Requirement(authz.Who.AGENT, Role.VIEWER)


# --- each role against each method -----------------------------------------------------------

# The least role each method needs (issue 10, item 4): written out here, not read from the
# table it checks.
LEAST_ROLE = {
    "GetDevice": Role.VIEWER,
    "ListDevices": Role.VIEWER,
    "GetTrustScore": Role.VIEWER,
    "GetEar": Role.VIEWER,
    "WatchTrust": Role.VIEWER,
    "History": Role.VIEWER,
    "Approve": Role.OPERATOR,
    "Revoke": Role.OPERATOR,
    "SetZone": Role.OPERATOR,
    "ReloadPolicy": Role.ADMIN,
    "GetStoredEvidence": Role.VIEWER,
    "CreateBootstrapToken": Role.OPERATOR,
    "SetRole": Role.ADMIN,
    "IssueOperatorCertificate": Role.ADMIN,
    "WatchRevocations": Role.RELYING_PARTY,
    "GetCrl": Role.RELYING_PARTY,
}


async def _status(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, ""


async def _first(stream: Any) -> None:
    """Read a streaming call's first message, then end it."""
    try:
        await stream.read()
    finally:
        stream.cancel()


def calls(channel: grpc.aio.Channel) -> dict[str, Callable[[], Awaitable[Any]]]:
    """One call of each method, on a device that does not exist: an allowed call answers
    NOT_FOUND or the like, and changes nothing."""
    q = query_pb2_grpc.QueryStub(channel)
    r = query_pb2_grpc.RevocationsStub(channel)
    dev, t = NO_SUCH_DEVICE, 5
    return {
        "GetDevice": lambda: q.GetDevice(query_pb2.GetDeviceRequest(device_id=dev), timeout=t),
        "ListDevices": lambda: q.ListDevices(query_pb2.ListDevicesRequest(), timeout=t),
        "GetTrustScore": lambda: q.GetTrustScore(
            query_pb2.GetTrustScoreRequest(device_id=dev), timeout=t
        ),
        "GetEar": lambda: q.GetEar(query_pb2.GetEarRequest(device_id=dev), timeout=t),
        "WatchTrust": lambda: _first(
            q.WatchTrust(query_pb2.WatchTrustRequest(initial=True), timeout=t)
        ),
        "History": lambda: q.History(query_pb2.HistoryRequest(device_id=dev), timeout=t),
        "Approve": lambda: q.Approve(query_pb2.ApproveRequest(device_id=dev), timeout=t),
        "Revoke": lambda: q.Revoke(query_pb2.RevokeRequest(device_id=dev, reason="x"), timeout=t),
        "SetZone": lambda: q.SetZone(query_pb2.SetZoneRequest(device_id=dev, zone="z"), timeout=t),
        "ReloadPolicy": lambda: q.ReloadPolicy(query_pb2.ReloadPolicyRequest(), timeout=t),
        "GetStoredEvidence": lambda: q.GetStoredEvidence(
            query_pb2.GetStoredEvidenceRequest(device_id=dev), timeout=t
        ),
        # Refused before the database: a lifetime out of range, a name the file lists.
        "CreateBootstrapToken": lambda: q.CreateBootstrapToken(
            query_pb2.CreateBootstrapTokenRequest(ttl_s=1), timeout=t
        ),
        "SetRole": lambda: q.SetRole(query_pb2.SetRoleRequest(name="ada", role="admin"), timeout=t),
        "IssueOperatorCertificate": lambda: q.IssueOperatorCertificate(
            query_pb2.IssueOperatorCertificateRequest(name="zed", role="viewer"), timeout=t
        ),
        "WatchRevocations": lambda: _first(
            r.WatchRevocations(query_pb2.WatchRevocationsRequest(), timeout=t)
        ),
        "GetCrl": lambda: r.GetCrl(query_pb2.GetCrlRequest(), timeout=t),
    }


# Who calls: (kind, name) -> the role it holds (None: none, or not an operator).
CALLERS: dict[str, tuple[str, str, Role | None]] = {
    "admin": ("operator", "ada", Role.ADMIN),
    "operator": ("operator", "otto", Role.OPERATOR),
    "viewer": ("operator", "vera", Role.VIEWER),
    "relying-party": ("operator", "rita", Role.RELYING_PARTY),
    "operator without a role": ("operator", "nora", None),
    "agent channel certificate": ("agent", NO_SUCH_DEVICE, None),
    "device certificate": ("device", NO_SUCH_DEVICE, None),
}


def test_each_role_against_each_method(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    config = config_with_roles(workdir, pki, endorsement_ca, **OPERATORS)
    assert set(LEAST_ROLE) == {
        m.rsplit("/", 1)[1] for m in REQUIREMENTS if "/devtrust.v1.Query/" in m
    } | {"WatchRevocations", "GetCrl"}

    async def scenario() -> dict[tuple[str, str], tuple[grpc.StatusCode, str]]:
        seen: dict[tuple[str, str], tuple[grpc.StatusCode, str]] = {}
        async with running(config) as verifier:
            address = f"127.0.0.1:{verifier.attestation_port}"
            for who, (kind, name, _) in CALLERS.items():
                creds = credentials(pki, kind, name)
                async with grpc.aio.secure_channel(address, creds) as channel:
                    for method, call in calls(channel).items():
                        seen[who, method] = await _status(call())
        return seen

    seen = asyncio.run(scenario())
    for who, (kind, name, held) in CALLERS.items():
        for method, least in LEAST_ROLE.items():
            code, details = seen[who, method]
            where = f"{who} calling {method}: {code.name} {details}"
            if held is not None and held >= least:
                assert code not in (DENIED, UNAUTHENTICATED), where
            elif kind != "operator":  # not an operator identity at all
                assert code == UNAUTHENTICATED, where
                assert f"is not a operator identity of {DOMAIN}" in details, where
            elif held is None:
                assert code == DENIED, where
                assert f"operator {name} has no role on this verifier" in details, where
            else:
                assert code == DENIED, where
                assert f"operator {name} has role {held.label}" in details, where
                assert f"needs role {least.label} or above" in details, where
    # What the allowed calls answered: they reached the service.
    assert seen["viewer", "GetDevice"][0] == grpc.StatusCode.NOT_FOUND
    assert seen["operator", "Revoke"][0] == grpc.StatusCode.NOT_FOUND
    assert seen["admin", "ReloadPolicy"][0] == grpc.StatusCode.FAILED_PRECONDITION
    assert seen["relying-party", "GetCrl"][0] == OK
    assert seen["viewer", "WatchTrust"][0] == OK


def test_a_viewer_cannot_revoke_and_an_operator_can(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    config = config_with_roles(workdir, pki, endorsement_ca, vera="viewer", otto="operator")
    target = device(7)

    async def scenario() -> tuple[tuple[grpc.StatusCode, str], DeviceState, DeviceState]:
        async with running(config) as verifier:
            now = datetime.datetime.now(datetime.UTC)
            await verifier.repos.devices.save(target, now=now, event="enrolled:enrolled")
            address = f"127.0.0.1:{verifier.attestation_port}"
            request = query_pb2.RevokeRequest(device_id=target.device_id, reason="stolen")
            async with grpc.aio.secure_channel(
                address, credentials(pki, "operator", "vera")
            ) as channel:
                refused = await _status(
                    query_pb2_grpc.QueryStub(channel).Revoke(request, timeout=5)
                )
            after_viewer = await verifier.repos.devices.get(target.device_id)
            async with grpc.aio.secure_channel(
                address, credentials(pki, "operator", "otto")
            ) as channel:
                await query_pb2_grpc.QueryStub(channel).Revoke(request, timeout=5)
            after_operator = await verifier.repos.devices.get(target.device_id)
            assert after_viewer is not None
            assert after_operator is not None
            return refused, after_viewer.state, after_operator.state

    refused, after_viewer, after_operator = asyncio.run(scenario())
    assert refused == (
        DENIED,
        "operator vera has role viewer; /devtrust.v1.Query/Revoke needs role operator or above",
    )
    assert after_viewer is DeviceState.ENROLLED  # nothing changed
    assert after_operator is DeviceState.REVOKED


async def _health(channel: grpc.aio.Channel, *services: str) -> list[int]:
    stub = health_pb2_grpc.HealthStub(channel)
    return [
        (await stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=5)).status
        for s in services
    ]


def test_unknown_methods_are_refused_and_anyone_reads_health_on_both_ports(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    config = verifier_config(workdir, pki, endorsement_ca)
    Status = health_pb2.HealthCheckResponse

    async def scenario() -> tuple[tuple[grpc.StatusCode, str], list[int], list[int], str]:
        async with running(config) as verifier:
            mtls = f"127.0.0.1:{verifier.attestation_port}"
            async with grpc.aio.secure_channel(mtls, credentials(pki, "operator", "ada")) as ch:
                nope: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(
                    "/devtrust.v1.Query/Nope"
                )
                unknown = await _status(nope(b"", timeout=5))
                on_mtls = await _health(ch, "", "devtrust.v1.Query")
            # The TLS port: no client certificate, as a load balancer probes.
            tls = f"127.0.0.1:{verifier.enrollment_port}"
            async with grpc.aio.secure_channel(tls, channel_credentials(pki)) as ch:
                on_tls = await _health(ch, "", "devtrust.v1.Enrollment")
                # Query is not served there: no client certificate, and no such method.
                query = query_pb2_grpc.QueryStub(ch)
                code, _ = await _status(
                    query.ListDevices(query_pb2.ListDevicesRequest(), timeout=5)
                )
            return unknown, on_mtls, on_tls, code.name

    unknown, on_mtls, on_tls, query_on_tls = asyncio.run(scenario())
    assert unknown[0] == grpc.StatusCode.UNIMPLEMENTED
    assert "/devtrust.v1.Query/Nope: no such method on this verifier" in unknown[1]
    assert on_mtls == [Status.SERVING, Status.SERVING]
    assert on_tls == [Status.SERVING, Status.SERVING]
    assert query_on_tls == "UNIMPLEMENTED"


def test_operator_certificate_cannot_attest(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    """Attest needs the agent of an enrolled device, checked before the stream opens: an
    operator (even admin) is refused, and so is the agent of a device never enrolled."""
    config = verifier_config(workdir, pki, endorsement_ca)

    async def attest(address: str, creds: grpc.ChannelCredentials) -> tuple[grpc.StatusCode, str]:
        async with grpc.aio.secure_channel(address, creds) as channel:
            call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=5)
            try:
                await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
                await call.read()
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details() or ""
            return await call.code(), await call.details()

    async def scenario() -> list[tuple[grpc.StatusCode, str]]:
        async with running(config) as verifier:
            address = f"127.0.0.1:{verifier.attestation_port}"
            return [
                await attest(address, credentials(pki, "operator", "alice")),
                await attest(address, credentials(pki, "agent", NO_SUCH_DEVICE)),
            ]

    as_operator, as_stranger = asyncio.run(scenario())
    assert as_operator[0] == UNAUTHENTICATED
    assert "not a agent identity" in as_operator[1]
    assert as_stranger == (DENIED, f"device {NO_SUCH_DEVICE} is not enrolled")


# --- the interceptor on its own server (real mTLS) ------------------------------------------


def _handler(behavior: Callable[..., Any], kind: str = "unary_unary") -> Any:
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(
        behavior,
        request_deserializer=StringValue.FromString,
        response_serializer=StringValue.SerializeToString,
    )


async def who_calls(request: StringValue, context: Any) -> StringValue:
    return StringValue(value=current_caller().actor)


def who_calls_sync(request: StringValue, context: Any) -> StringValue:
    return StringValue(value="served unchecked")


@asynccontextmanager
async def guarded_server(
    pki: PkiFiles,
    handlers: dict[str, Any],
    interceptors: list[grpc.aio.ServerInterceptor],
) -> AsyncIterator[str]:
    srv = grpc.aio.server(interceptors=interceptors)
    services: dict[str, dict[str, Any]] = {}
    for path, handler in handlers.items():
        service, method = path.strip("/").split("/")
        services.setdefault(service, {})[method] = handler
    srv.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(s, m) for s, m in services.items()]
    )
    creds = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = srv.add_secure_port("127.0.0.1:0", creds)
    await srv.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await srv.stop(None)


async def _unary(address: str, creds: grpc.ChannelCredentials, path: str) -> tuple[str, str]:
    async with grpc.aio.secure_channel(address, creds) as channel:
        call = channel.unary_unary(
            path,
            request_serializer=StringValue.SerializeToString,
            response_deserializer=StringValue.FromString,
        )
        try:
            return "OK", (await call(StringValue(value="x"), timeout=5)).value
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details() or ""


def _authorizer(repos: SqliteRepositories, table: dict[str, authz.Requirement]) -> Authorizer:
    return Authorizer(
        trust_domain=DOMAIN,
        configured={"ada": Role.ADMIN},
        roles=repos.roles,
        devices=repos.devices,
        table=table,
        recheck_s=0.0,
    )


def test_the_interceptor_refuses_rowless_and_synchronous_methods(
    tmp_path: Path, pki: PkiFiles
) -> None:
    table = {
        "/test.Open/Who": authz.role(Role.VIEWER),
        "/test.Open/Sync": authz.ANYONE,
    }
    handlers = {
        "/test.Open/Who": _handler(who_calls),
        "/test.Open/Sync": _handler(who_calls_sync),
        "/test.Hidden/Peek": _handler(who_calls),  # registered, but no row
    }

    async def scenario() -> dict[str, tuple[str, str]]:
        repos = await open_sqlite(tmp_path / "v.db")
        try:
            interceptors = [ErrorMapping(), Authorization(_authorizer(repos, table))]
            async with guarded_server(pki, handlers, interceptors) as address:
                creds = credentials(pki, "operator", "ada")
                out = {p: await _unary(address, creds, p) for p in handlers}
            # The same handler served without the interceptor acts for nobody.
            async with guarded_server(pki, handlers, [ErrorMapping()]) as address:
                out["unguarded"] = await _unary(address, creds, "/test.Open/Who")
            return out
        finally:
            await repos.close()

    out = asyncio.run(scenario())
    assert out["/test.Open/Who"] == ("OK", "operator/ada")
    assert out["/test.Hidden/Peek"] == (
        "PERMISSION_DENIED",
        "/test.Hidden/Peek: has no row in the verifier's authorization table "
        "(verifier/authz.py): refused",
    )
    assert out["/test.Open/Sync"][0] == "PERMISSION_DENIED"
    assert "its handler is synchronous" in out["/test.Open/Sync"][1]
    assert out["unguarded"] == (
        "UNAUTHENTICATED",
        "this call was not authorized (no authorization interceptor)",
    )


def test_a_role_taken_away_ends_a_stream_at_its_next_message(tmp_path: Path, pki: PkiFiles) -> None:
    table = {"/test.Open/Stream": authz.role(Role.VIEWER)}
    go_on = asyncio.Event()

    async def stream(request: StringValue, context: Any) -> AsyncIterator[StringValue]:
        yield StringValue(value="first")
        await go_on.wait()
        yield StringValue(value="second")

    handlers = {"/test.Open/Stream": _handler(stream, "unary_stream")}

    async def scenario() -> tuple[str, grpc.StatusCode, str]:
        repos = await open_sqlite(tmp_path / "v.db")
        now = datetime.datetime.now(datetime.UTC)
        await repos.roles.set("bob", "viewer", now=now, actor="local/test")
        try:
            interceptors = [ErrorMapping(), Authorization(_authorizer(repos, table))]
            async with (
                guarded_server(pki, handlers, interceptors) as address,
                grpc.aio.secure_channel(address, credentials(pki, "operator", "bob")) as ch,
            ):
                call = ch.unary_stream(
                    "/test.Open/Stream",
                    request_serializer=StringValue.SerializeToString,
                    response_deserializer=StringValue.FromString,
                )(StringValue(), timeout=5)
                first = await call.read()
                assert isinstance(first, StringValue)
                await repos.roles.set("bob", None, now=now, actor="local/test")
                go_on.set()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                return first.value, err.value.code(), err.value.details() or ""
        finally:
            await repos.close()

    first, code, details = asyncio.run(scenario())
    assert first == "first"
    assert code == DENIED
    assert "operator bob has no role" in details


# --- roles taken away, and where roles come from ---------------------------------------------


def test_a_role_taken_away_is_refused_at_the_next_call(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    """Roles recorded by an admin (the SetRole RPC, as `devtrust role` sends it), read at
    every call: `role NAME none` takes a role away while the operator's channel stays open,
    and the configuration's roles cannot be changed from the database."""
    config = config_with_roles(workdir, pki, endorsement_ca, ada="admin")

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with running(config) as verifier:
            address = f"127.0.0.1:{verifier.attestation_port}"
            async with (
                grpc.aio.secure_channel(address, credentials(pki, "operator", "ada")) as admin,
                grpc.aio.secure_channel(address, credentials(pki, "operator", "carol")) as channel,
            ):
                roles = query_pb2_grpc.QueryStub(admin)

                async def set_role(name: str, role: str) -> tuple[grpc.StatusCode, str]:
                    request = query_pb2.SetRoleRequest(name=name, role=role)
                    return await _status(roles.SetRole(request, timeout=5))

                assert await set_role("carol", "viewer") == (OK, "")
                query = query_pb2_grpc.QueryStub(channel)
                listing = query_pb2.ListDevicesRequest()
                out["viewer lists"] = await _status(query.ListDevices(listing, timeout=5))
                out["viewer approves"] = await _status(
                    query.Approve(query_pb2.ApproveRequest(device_id=NO_SUCH_DEVICE), timeout=5)
                )
                assert await set_role("carol", "operator") == (OK, "")
                out["operator approves"] = await _status(
                    query.Approve(query_pb2.ApproveRequest(device_id=NO_SUCH_DEVICE), timeout=5)
                )
                assert await set_role("carol", "") == (OK, "")
                out["removed lists"] = await _status(query.ListDevices(listing, timeout=5))
                out["config wins"] = await set_role("ada", "viewer")
            out["recorded"] = await verifier.repos.roles.all()
        return out

    out = asyncio.run(scenario())
    assert out["viewer lists"] == (OK, "")
    assert out["viewer approves"][0] == DENIED
    assert out["operator approves"][0] == grpc.StatusCode.NOT_FOUND
    assert out["removed lists"][0] == DENIED
    assert "operator carol has no role on this verifier" in out["removed lists"][1]
    assert out["config wins"][0] == grpc.StatusCode.FAILED_PRECONDITION
    assert out["recorded"] == {}  # carol's taken away; ada's is the configuration's
