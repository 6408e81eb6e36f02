"""The gate where a relying party's server meets its peer: read the presented certificate,
take the time and the revocations known now, decide (``devtrust.gate.decision``), refuse.

- gRPC (``grpc`` and ``grpc.aio``): the peer's certificate is in the call's auth context
  (``x509_pem_cert``). gRPC gives only the leaf, so the bundle must hold the device issuing
  CA itself (the verifier's relying-party bundle does). ``GateInterceptor`` and
  ``AioGateInterceptor`` gate every method of a server but those named exempt (a health
  check); ``require_device`` and ``require_device_aio`` gate one handler. A denied call ends
  with PERMISSION_DENIED and the decision as details (``gate.tier: device ...``).
- Any TLS server in Python (``ssl``, asyncio streams): ``Gate.check_tls`` on the
  ``ssl.SSLSocket`` or ``ssl.SSLObject`` (``writer.get_extra_info("ssl_object")``). The
  server's context must ask for the client's certificate (``verify_mode`` CERT_REQUIRED, the
  bundle as its CA file); the gate verifies again, as a device certificate.

The server's own mTLS (its ``root_certificates`` or CA file) decides who may connect; the gate
decides who gets served, and says why not.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from cryptography import x509

from devtrust.core.tier import Tier
from devtrust.gate.decision import Bundle, GateDecision, Reason, RevocationList, decide

logger = logging.getLogger(__name__)

AioContext: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Behavior = Callable[..., Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

# The decision that let the current call in, for the handler (the device it serves).
CURRENT_DECISION: ContextVar[GateDecision | None] = ContextVar("gate_decision", default=None)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _no_revocations(now: datetime.datetime) -> RevocationList | None:
    return None


@dataclass(frozen=True)
class GatePolicy:
    """What a relying party requires: device certificates of ``bundle`` at ``min_tier`` or
    better, in one of ``zones`` (None: any), of ``trust_domain`` (None: any the bundle
    signs for)."""

    bundle: Bundle
    min_tier: Tier
    zones: frozenset[str] | None = None
    trust_domain: str | None = None


class Gate:
    """A policy with a clock and a source of revocations: ``RevocationFollower.revocations``,
    a fixed ``RevocationList`` (a CRL read at start), or none."""

    def __init__(
        self,
        policy: GatePolicy,
        *,
        revocations: Callable[[datetime.datetime], RevocationList | None] = _no_revocations,
        clock: Callable[[], datetime.datetime] = _utcnow,
    ) -> None:
        self.policy = policy
        self._revocations = revocations
        self._clock = clock

    def check(self, chain: Sequence[x509.Certificate]) -> GateDecision:
        """Decide on ``chain`` now; one log line per decision (denials at INFO)."""
        now = self._clock()
        p = self.policy
        decision = decide(
            chain,
            bundle=p.bundle,
            now=now,
            min_tier=p.min_tier,
            zones=p.zones,
            revoked=self._revocations(now),
            trust_domain=p.trust_domain,
        )
        logger.log(logging.DEBUG if decision.allow else logging.INFO, "gate: %s", decision)
        return decision

    def check_pem(self, pems: Iterable[bytes]) -> GateDecision:
        try:
            chain = [x509.load_pem_x509_certificate(p) for p in pems]
        except ValueError as exc:
            return _unreadable(exc)
        return self.check(chain)

    def check_auth_context(
        self, auth: Mapping[str, Iterable[bytes]] | Mapping[str, bytes]
    ) -> GateDecision:
        """On a gRPC call's ``context.auth_context()``: each key holds a list of values
        (types-grpcio says one ``bytes``; either is read)."""
        pems = auth.get("x509_pem_cert", ())
        return self.check_pem([pems] if isinstance(pems, bytes) else pems)

    def check_tls(self, conn: ssl.SSLSocket | ssl.SSLObject) -> GateDecision:
        """On a Python TLS connection, after its handshake."""
        try:
            return self.check(tls_peer_chain(conn))
        except ValueError as exc:
            return _unreadable(exc)


def _unreadable(exc: ValueError) -> GateDecision:
    return GateDecision(
        allow=False, reason=Reason.MALFORMED, message=f"the certificate cannot be read: {exc}"
    )


def tls_peer_chain(conn: ssl.SSLSocket | ssl.SSLObject) -> list[x509.Certificate]:
    """The peer's certificate (and the chain it sent, where Python can say: 3.13's
    ``get_unverified_chain``); empty when it sent none."""
    der = conn.getpeercert(binary_form=True)
    if not der:
        return []
    sent: Callable[[], list[bytes] | None] | None = getattr(conn, "get_unverified_chain", None)
    chain = (sent() if sent else None) or [der]
    if chain[0] != der:
        chain = [der]
    return [x509.load_der_x509_certificate(c) for c in chain]


# --- gRPC ---------------------------------------------------------------------------------


def require_device(gate: Gate, context: grpc.ServicerContext) -> GateDecision:
    """Gate one call of a ``grpc`` server: the decision when allowed; ``context.abort``
    (which raises) with PERMISSION_DENIED otherwise."""
    decision = gate.check_auth_context(context.auth_context())
    if not decision.allow:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, str(decision))
    return decision


async def require_device_aio(gate: Gate, context: AioContext) -> GateDecision:
    """Gate one call of a ``grpc.aio`` server, as ``require_device``."""
    decision = gate.check_auth_context(context.auth_context())
    if not decision.allow:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(decision))
    return decision


def _replace_behavior(handler: Handler, wrap: Callable[[Behavior, bool], Behavior]) -> Handler:
    """The handler with its one behavior wrapped; ``wrap(behavior, streaming)``."""
    # The handlers are namedtuples (grpc._utilities.RpcMethodHandler) with one behavior set.
    replace: Callable[..., Handler] = handler._replace  # type: ignore[attr-defined]
    if handler.unary_unary is not None:
        return replace(unary_unary=wrap(handler.unary_unary, False))
    if handler.stream_unary is not None:
        return replace(stream_unary=wrap(handler.stream_unary, False))
    if handler.unary_stream is not None:
        return replace(unary_stream=wrap(handler.unary_stream, True))
    if handler.stream_stream is not None:
        return replace(stream_stream=wrap(handler.stream_stream, True))
    return handler


class GateInterceptor(grpc.ServerInterceptor):
    """Gates every method of a ``grpc`` server but the ``exempt`` ones (full method names,
    "/grpc.health.v1.Health/Check")."""

    def __init__(self, gate: Gate, *, exempt: Iterable[str] = ()) -> None:
        self._gate = gate
        self._exempt = frozenset(exempt)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._exempt:
            return handler
        gate = self._gate

        def wrap(behavior: Behavior, streaming: bool) -> Behavior:
            # A synchronous server runs every behavior in a thread, and its abort raises.
            def gated(request: Any, context: grpc.ServicerContext) -> Any:
                CURRENT_DECISION.set(require_device(gate, context))
                return behavior(request, context)

            return gated

        return _replace_behavior(handler, wrap)


class AioGateInterceptor(grpc.aio.ServerInterceptor):
    """Gates every method of a ``grpc.aio`` server but the ``exempt`` ones. Each wrapper is
    of its behavior's kind (coroutine function, async generator function, plain function),
    since grpc.aio runs a handler according to what it is (see verifier/interceptor.py)."""

    def __init__(self, gate: Gate, *, exempt: Iterable[str] = ()) -> None:
        self._gate = gate
        self._exempt = frozenset(exempt)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._exempt:
            return handler
        return _replace_behavior(handler, self._wrap)

    def _wrap(self, behavior: Behavior, streaming: bool) -> Behavior:
        gate = self._gate
        if inspect.iscoroutinefunction(behavior):

            async def coroutine(request: Any, context: AioContext) -> Any:
                CURRENT_DECISION.set(await require_device_aio(gate, context))
                return await behavior(request, context)

            return coroutine
        if inspect.isasyncgenfunction(behavior):

            async def generator(request: Any, context: AioContext) -> AsyncIterator[Any]:
                CURRENT_DECISION.set(await require_device_aio(gate, context))
                # Closed with the wrapper when the call ends early (cancelled, deadline).
                async with aclosing(behavior(request, context)) as stream:
                    async for response in stream:
                        yield response

            return generator

        def function(request: Any, context: grpc.ServicerContext) -> Any:
            # Run in a thread with a synchronous context. A streaming one ends with the
            # status set, as verifier/interceptor.py explains, rather than aborting.
            decision = gate.check_auth_context(context.auth_context())
            if decision.allow:
                CURRENT_DECISION.set(decision)
                return behavior(request, context)
            if not streaming:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, str(decision))
            context.set_code(grpc.StatusCode.PERMISSION_DENIED)
            context.set_details(str(decision))
            return iter(())

        return function
