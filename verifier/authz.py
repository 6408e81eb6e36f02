"""Who may call what: one table for every gRPC method the verifier serves, enforced by one
server interceptor on both ports.

``REQUIREMENTS`` maps each full method name ("/devtrust.v1.Query/Revoke") to what its
caller must be:

- anyone: enrollment (devices have no certificate yet), health probes, reflection;
- an agent: the agent certificate of an enrolled device that is not revoked (Attest);
- an operator identity with a role (verifier/roles.py) at least the one named.

A method that forgets its check cannot be served: the interceptor refuses every method not
in the table (PERMISSION_DENIED when a service registered it, UNIMPLEMENTED when nothing
did), the verifier refuses to start when a registered service has a method without a row
(``uncovered``), and tests/test_authz.py enumerates every method of every service the
verifier registers from the service descriptors.

Roles belong to operator names, not certificates: the configuration's ``operators:`` first,
then the database's ``roles`` table (``devtrust role``, the Query API's SetRole). The
configuration wins for the names it lists, as the inventory wins over approval: what is
written in the reviewed file is not undone by a command on one host. Roles are looked up at
every call, so a role taken away in the database is refused at the operator's next call,
not when the certificate expires; a stream (WatchTrust) looks again before it sends once
``recheck_s`` has passed since its last look.

The caller found is handed to the handler through ``current_caller`` (a context variable
of the call's task): the Query service names it in the audit. Handlers must be coroutine or
async generator functions (every service of the verifier is); a synchronous one is refused
rather than served unchecked.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import aclosing
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, TypeAlias, cast

import grpc
from cryptography import x509

from devtrust.core.ids import parse_device_id
from devtrust.core.spiffe import AGENT, OPERATOR, spiffe_ids
from devtrust.verifier.attestor import may_attest
from devtrust.verifier.errors import Rejected, Unauthenticated
from devtrust.verifier.identity import peer_identity
from devtrust.verifier.roles import Role
from devtrust.verifier.storage.interfaces import Devices, Roles

logger = logging.getLogger(__name__)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Behavior = Callable[..., Any]


class Who(StrEnum):
    ANYONE = "anyone"
    AGENT = "agent"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Requirement:
    who: Who
    # For Who.OPERATOR: the least role that may call.
    role: Role | None = None

    def __post_init__(self) -> None:
        if (self.who is Who.OPERATOR) != (self.role is not None):
            raise ValueError("a role is required of operators, and of nobody else")

    def __str__(self) -> str:
        if self.role is not None:
            return f"an operator identity with role {self.role.label} or above"
        return {Who.ANYONE: "anyone", Who.AGENT: "the agent of an enrolled device"}[self.who]


ANYONE = Requirement(Who.ANYONE)
ENROLLED_AGENT = Requirement(Who.AGENT)


def role(needed: Role) -> Requirement:
    return Requirement(Who.OPERATOR, needed)


_QUERY = "/devtrust.v1.Query/"
_HEALTH = "/grpc.health.v1.Health/"

REQUIREMENTS: Mapping[str, Requirement] = {
    # The TLS port: devices without a certificate yet.
    "/devtrust.v1.Enrollment/Enroll": ANYONE,
    "/devtrust.v1.Enrollment/Activate": ANYONE,
    # The mTLS port.
    "/devtrust.v1.Attestation/Attest": ENROLLED_AGENT,
    _QUERY + "GetDevice": role(Role.VIEWER),
    _QUERY + "ListDevices": role(Role.VIEWER),
    _QUERY + "GetTrustScore": role(Role.VIEWER),
    _QUERY + "GetEar": role(Role.VIEWER),
    _QUERY + "WatchTrust": role(Role.VIEWER),
    _QUERY + "History": role(Role.VIEWER),
    _QUERY + "GetStoredEvidence": role(Role.VIEWER),
    _QUERY + "Approve": role(Role.OPERATOR),
    _QUERY + "Revoke": role(Role.OPERATOR),
    _QUERY + "SetZone": role(Role.OPERATOR),
    _QUERY + "CreateBootstrapToken": role(Role.OPERATOR),
    _QUERY + "ReloadPolicy": role(Role.ADMIN),
    _QUERY + "SetRole": role(Role.ADMIN),
    _QUERY + "IssueOperatorCertificate": role(Role.ADMIN),
    "/devtrust.v1.Revocations/WatchRevocations": role(Role.RELYING_PARTY),
    "/devtrust.v1.Revocations/GetCrl": role(Role.RELYING_PARTY),
    # Both ports: load balancers and grpcurl carry no identity of ours.
    _HEALTH + "Check": ANYONE,
    _HEALTH + "List": ANYONE,
    _HEALTH + "Watch": ANYONE,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": ANYONE,
}


class Named(Protocol):
    @property
    def name(self) -> str: ...


class Service(Protocol):
    """A service's descriptor (protobuf's ServiceDescriptor), as far as read here."""

    @property
    def full_name(self) -> str: ...

    @property
    def methods(self) -> Sequence[Named]: ...


def method_names(service: Service) -> list[str]:
    """Every full method name of ``service``, from its descriptor."""
    return [f"/{service.full_name}/{m.name}" for m in service.methods]


def uncovered(
    services: Iterable[Service], table: Mapping[str, Requirement] = REQUIREMENTS
) -> list[str]:
    """The methods of ``services`` without a row in ``table``."""
    return [m for s in services for m in method_names(s) if m not in table]


@dataclass(frozen=True)
class Caller:
    """Who called, as the table requires it: anyone (not looked at), an agent (``name``:
    its device id) or an operator (``name`` and ``role``)."""

    who: Who
    name: str = ""
    role: Role | None = None

    @property
    def actor(self) -> str:
        """The caller as the audit names it."""
        return {Who.OPERATOR: f"operator/{self.name}", Who.AGENT: "device"}.get(self.who, "")


_CALLER: ContextVar[Caller | None] = ContextVar("devtrust_caller", default=None)


def current_caller() -> Caller:
    """The caller the interceptor authorized for this call. Refuses when none did: a
    handler served without the interceptor acts for nobody."""
    caller = _CALLER.get()
    if caller is None:
        raise Unauthenticated("this call was not authorized (no authorization interceptor)")
    return caller


def _certificate(context: Context) -> x509.Certificate | None:
    pems = list(context.auth_context().get("x509_pem_cert") or [])
    return x509.load_pem_x509_certificate(pems[0]) if pems else None


class Authorizer:
    """The checks of ``REQUIREMENTS`` on one call's peer."""

    def __init__(
        self,
        *,
        trust_domain: str,
        configured: Mapping[str, Role],
        roles: Roles,
        devices: Devices,
        table: Mapping[str, Requirement] = REQUIREMENTS,
        recheck_s: float = 10.0,
    ) -> None:
        self._trust_domain = trust_domain
        self._configured = dict(configured)
        self._roles = roles
        self._devices = devices
        self.table = table
        self.recheck_s = recheck_s

    async def role_of(self, name: str) -> Role | None:
        """The operator's role: the configuration's, else the database's, else None."""
        if name in self._configured:
            return self._configured[name]
        label = await self._roles.get(name)
        if label is None:
            return None
        try:
            return Role.parse(label)
        except ValueError:
            logger.warning("operator %s: role %r in the database is no role: refused", name, label)
            return None

    def _name(self, context: Context, kind: str) -> str:
        """NAME of the peer's one SPIFFE ID ``spiffe://TD/kind/NAME``, or refuse."""
        name = peer_identity(context, trust_domain=self._trust_domain, kind=kind)
        cert = _certificate(context)
        ids = spiffe_ids(cert) if cert is not None else []
        if len(ids) != 1:  # an X509-SVID names exactly one identity (SPIFFE X509-SVID 2)
            raise Unauthenticated(
                f"client certificate names {len(ids)} SPIFFE IDs ({', '.join(ids)}): an "
                "identity certificate names exactly one"
            )
        return name

    async def check(self, method: str, context: Context) -> Caller:
        """The caller of ``method``, or a refusal: Rejected (PERMISSION_DENIED) for a
        method not in the table or a role short of the one required, Unauthenticated for a
        peer that is not the kind of identity the method requires."""
        need = self.table.get(method)
        if need is None:
            raise Rejected(
                f"{method} has no row in the verifier's authorization table "
                "(verifier/authz.py): refused"
            )
        if need.who is Who.ANYONE:
            return Caller(Who.ANYONE)
        if need.who is Who.AGENT:
            text = self._name(context, AGENT)
            try:
                device_id = parse_device_id(text)
            except ValueError as exc:
                raise Unauthenticated(f"agent client certificate: {exc}") from None
            may_attest(device_id, await self._devices.get(device_id))
            return Caller(Who.AGENT, device_id)
        assert need.role is not None
        name = self._name(context, OPERATOR)
        held = await self.role_of(name)
        if held is None:
            raise Rejected(
                f"operator {name} has no role on this verifier, and {method} needs "
                f"{need.role.label}: an admin assigns roles (`operators:` in the verifier's "
                f"configuration, or an admin's `devtrust role {name} ROLE`)"
            )
        if not held.grants(need.role):
            raise Rejected(
                f"operator {name} has role {held.label}; {method} needs role "
                f"{need.role.label} or above"
            )
        return Caller(Who.OPERATOR, name, held)


# --- the interceptor ------------------------------------------------------------------------

_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _guard_coroutine(method: str, behavior: Behavior, authorizer: Authorizer) -> Behavior:
    async def guarded(request: Any, context: Context) -> Any:
        _CALLER.set(await authorizer.check(method, context))
        return await behavior(request, context)

    return guarded


def _guard_async_generator(method: str, behavior: Behavior, authorizer: Authorizer) -> Behavior:
    async def guarded(request: Any, context: Context) -> AsyncIterator[Any]:
        caller = await authorizer.check(method, context)
        _CALLER.set(caller)
        looked = time.monotonic()
        stream = cast(AsyncGenerator[Any], behavior(request, context))
        async with aclosing(stream):
            async for response in stream:
                # A long stream looks at the role again: one taken away ends it.
                if caller.who is Who.OPERATOR and time.monotonic() - looked >= authorizer.recheck_s:
                    await authorizer.check(method, context)
                    looked = time.monotonic()
                yield response

    return guarded


def _refusal(method: str, why: str) -> Behavior:
    async def refused(request: Any, context: Context) -> None:
        raise Rejected(f"{method}: {why}")

    return refused


def _absent(method: str) -> Behavior:
    async def absent(request: Any, context: Context) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method}: no such method on this verifier (and none in its authorization table)",
        )

    return absent


def guard(method: str, handler: Handler | None, authorizer: Authorizer) -> Handler | None:
    """``handler`` with its behavior checked against the table before it runs. A method not
    in the table gets a handler that refuses it; a synchronous behavior is refused too."""
    if method not in authorizer.table:
        if handler is None:
            return grpc.stream_stream_rpc_method_handler(_absent(method))
        why = "has no row in the verifier's authorization table (verifier/authz.py): refused"
        return grpc.stream_stream_rpc_method_handler(_refusal(method, why))
    if handler is None:
        return None
    kind = next(k for k in _KINDS if getattr(handler, k) is not None)
    behavior = getattr(handler, kind)
    if inspect.iscoroutinefunction(behavior):
        guarded = _guard_coroutine(method, behavior, authorizer)
    elif inspect.isasyncgenfunction(behavior):
        guarded = _guard_async_generator(method, behavior, authorizer)
    else:
        why = "its handler is synchronous, which the authorization interceptor does not serve"
        guarded = _refusal(method, why)
    replace: Callable[..., Handler] = handler._replace  # type: ignore[attr-defined]
    return replace(**{kind: guarded})


class Authorization(grpc.aio.ServerInterceptor):
    """The one interceptor that enforces ``REQUIREMENTS``. Place it after ErrorMapping
    (verifier/interceptor.py), which then maps its refusals to status codes."""

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        return guard(handler_call_details.method, handler, self._authorizer)
