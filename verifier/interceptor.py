"""One interceptor maps exceptions to gRPC status codes (STYLE 10). Domain errors carry
messages meant for the caller; anything else becomes INTERNAL with a generic text, and the
details go to the log, never to the client.

grpc.aio runs a handler according to what it is, and the wrapper must be the same kind, or
grpc.aio runs it the wrong way (issue 8: reflection's async generator wrapped as a coroutine
answered INTERNAL to every ``grpcurl list``). A handler is one of:

- a coroutine function: unary handlers return the response; streaming handlers write with
  ``context.write`` (our Attestation servicer, grpc health's Watch);
- an async generator function: streaming handlers that yield responses (grpc_reflection);
- anything else: a plain function, run in the server's thread pool with a synchronous context;
  a streaming one is a generator or returns an iterator.

This is the test grpc.aio itself applies (``_is_async_handler`` and
``_finish_handler_with_stream_responses`` in its server): a coroutine function for the unary
kinds; a coroutine function, then an async generator function, for the streaming kinds. The
request iterator of a client-streaming handler follows the same test (async for an async
handler), so a wrapper of the same kind also receives the right one.

Two more mappings, for faults that pass (issue 12):
- a database that does not answer (verifier/store_health.py ``is_outage``) is UNAVAILABLE,
  not INTERNAL: the caller retries (an agent, maybe on another replica), and health is told;
- every asynchronous unary call ends within ``call_timeout_s`` (server.call_timeout_s),
  DEADLINE_EXCEEDED past it, whatever deadline its client set: a call stuck on a slow
  database does not hold its resources for as long as a careless client waits. Streaming
  calls have their own bounds (the attestation stream's Hello and evidence timeouts, the
  watches' client deadlines) and HTTP/2 keepalive for peers gone silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import aclosing
from typing import Any, TypeAlias, cast

import grpc

from devtrust.core.errors import DevtrustError
from devtrust.verifier.errors import (
    FailedPrecondition,
    MalformedInput,
    NotFound,
    Rejected,
    ResourceExhausted,
    Superseded,
    Unauthenticated,
)
from devtrust.verifier.logtext import printable
from devtrust.verifier.storage.sql import StoreUnavailable
from devtrust.verifier.store_health import OUTAGE_DETAILS, is_outage

logger = logging.getLogger(__name__)

_CODES: list[tuple[type[DevtrustError], grpc.StatusCode]] = [
    (MalformedInput, grpc.StatusCode.INVALID_ARGUMENT),
    (Rejected, grpc.StatusCode.PERMISSION_DENIED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Superseded, grpc.StatusCode.ABORTED),
]

INTERNAL_DETAILS = "internal error"
_INTERNAL = (grpc.StatusCode.INTERNAL, INTERNAL_DETAILS)


def status_for(exc: DevtrustError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _refused(method: str, exc: DevtrustError) -> tuple[grpc.StatusCode, str]:
    """The status a domain error answers with; logs the refusal."""
    code = status_for(exc)
    # A flood of refusals for rate is not a flood of log lines.
    level = logging.DEBUG if isinstance(exc, ResourceExhausted) else logging.INFO
    logger.log(level, "%s refused: %s: %s", method, code.name, printable(str(exc)))
    return code, str(exc)


AioContext: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Behavior = Callable[..., Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# Told of each call that met a database outage (verifier/store_health.py StoreHealth.failed).
OutageHook = Callable[[BaseException], Awaitable[None]]


async def _outage(method: str, exc: BaseException, hook: OutageHook | None) -> tuple[Any, str]:
    """The status of a call that met a database outage; health is told."""
    logger.debug("%s: database unavailable: %s", method, printable(str(exc)))
    if hook is not None:
        await hook(exc)
    return grpc.StatusCode.UNAVAILABLE, OUTAGE_DETAILS


class UnaryCalls:
    """The asynchronous unary calls in flight: a drain lets them finish before it stops the
    servers (whose grace would otherwise wait for every long-lived stream too)."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def settled(self, within_s: float) -> bool:
        """Wait until none is in flight, at most ``within_s``; whether none is."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(0.0, within_s))
        return self.count == 0


def _coroutine(
    method: str,
    behavior: Behavior,
    *,
    limit_s: float | None = None,
    outage: OutageHook | None = None,
    calls: UnaryCalls | None = None,
) -> Behavior:
    """A unary handler returning its response (within ``limit_s`` when given, counted in
    ``calls``), or a streaming one writing with ``context.write``."""

    async def wrapped(request: Any, context: AioContext) -> Any:
        timer = asyncio.timeout(limit_s)
        if calls is not None:
            calls.enter()
        try:
            async with timer:
                return await behavior(request, context)
        except StoreUnavailable as exc:
            await context.abort(*await _outage(method, exc, outage))
        except DevtrustError as exc:
            await context.abort(*_refused(method, exc))
        except grpc.aio.AbortError:
            raise
        except TimeoutError:
            if not timer.expired():
                logger.exception("%s failed", method)
                await context.abort(*_INTERNAL)
            logger.warning("%s: not done within %g s: DEADLINE_EXCEEDED", method, limit_s)
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the verifier did not complete {method} within {limit_s:g} s "
                "(server.call_timeout_s): try again",
            )
        except Exception as exc:
            if is_outage(exc):
                await context.abort(*await _outage(method, exc, outage))
            logger.exception("%s failed", method)
            await context.abort(*_INTERNAL)
        finally:
            if calls is not None:
                calls.leave()

    return wrapped


def _async_generator(method: str, behavior: Behavior, *, outage: OutageHook | None) -> Behavior:
    """A streaming handler that yields its responses."""

    async def wrapped(request: Any, context: AioContext) -> AsyncIterator[Any]:
        try:
            # Closed with the wrapper when the call ends early (cancelled, deadline).
            async with aclosing(cast(AsyncGenerator[Any], behavior(request, context))) as stream:
                async for response in stream:
                    yield response
        except StoreUnavailable as exc:
            await context.abort(*await _outage(method, exc, outage))
        except DevtrustError as exc:
            await context.abort(*_refused(method, exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            if is_outage(exc):
                await context.abort(*await _outage(method, exc, outage))
            logger.exception("%s failed", method)
            await context.abort(*_INTERNAL)

    return wrapped


def _function(method: str, behavior: Behavior) -> Behavior:
    """A synchronous unary handler; grpc.aio runs it in a thread with a synchronous context,
    whose ``abort`` raises."""

    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except DevtrustError as exc:
            context.abort(*_refused(method, exc))
        except grpc.aio.AbortError:
            raise
        except Exception:
            logger.exception("%s failed", method)
            context.abort(*_INTERNAL)

    return wrapped


class _Ended(Exception):
    """Raised by ``abort`` in a synchronous streaming handler: the status is set, the
    handler ends."""


class _StreamContext:
    """The synchronous context of a streaming handler, whose ``abort`` sets the status and
    ends the handler rather than sending the status from the handler's thread (see
    ``_generator``). Everything else is the context grpc.aio gave."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> Any:
        if trailing_metadata:
            self._context.set_trailing_metadata(trailing_metadata)
        self._context.set_code(code)
        if details:
            self._context.set_details(details)
        raise _Ended

    def abort_with_status(self, status: grpc.Status) -> Any:
        self.abort(status.code, status.details, status.trailing_metadata)


def _generator(method: str, behavior: Behavior) -> Behavior:
    """A synchronous streaming handler: a generator, or a function returning an iterator.

    grpc.aio draws it in a thread and hands each response to the event loop, which may still
    be writing the last one when an error comes: sending the status from the thread then
    (``context.abort``) is a second operation on the call, refused by gRPC core
    (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS), and the caller waits for its deadline. So the
    status is set and the stream ends; grpc.aio sends it after the responses drawn so far.
    The handler's own ``abort`` does the same."""

    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from cast(Iterable[Any], behavior(request, _StreamContext(context)))
        except _Ended:
            return
        except DevtrustError as exc:
            code, details = _refused(method, exc)
        except Exception:
            logger.exception("%s failed", method)
            code, details = _INTERNAL
        else:
            return
        context.set_code(code)
        context.set_details(details)

    return wrapped


def wrap_unary(
    method: str,
    behavior: Behavior,
    *,
    limit_s: float | None = None,
    outage: OutageHook | None = None,
    calls: UnaryCalls | None = None,
) -> Behavior:
    """Wrap a unary_unary or stream_unary behavior as the same kind of callable; an
    asynchronous one ends within ``limit_s`` (a synchronous one runs on a thread, which
    cannot be stopped: the verifier serves none)."""
    if inspect.iscoroutinefunction(behavior):
        return _coroutine(method, behavior, limit_s=limit_s, outage=outage, calls=calls)
    return _function(method, behavior)


def wrap_streaming(
    method: str, behavior: Behavior, *, outage: OutageHook | None = None
) -> Behavior:
    """Wrap a unary_stream or stream_stream behavior as the same kind of callable."""
    if inspect.iscoroutinefunction(behavior):
        return _coroutine(method, behavior, outage=outage)
    if inspect.isasyncgenfunction(behavior):
        return _async_generator(method, behavior, outage=outage)
    return _generator(method, behavior)


def with_error_mapping(
    method: str,
    handler: Handler,
    *,
    limit_s: float | None = None,
    outage: OutageHook | None = None,
    calls: UnaryCalls | None = None,
) -> Handler:
    """The handler with its behavior, whichever of the four kinds it is, wrapped."""
    # The handlers are namedtuples (grpc._utilities.RpcMethodHandler) with one behavior set.
    replace: Callable[..., Handler] = handler._replace  # type: ignore[attr-defined]
    unary = handler.unary_unary or handler.stream_unary
    if unary is not None:
        behavior = wrap_unary(method, unary, limit_s=limit_s, outage=outage, calls=calls)
        if handler.unary_unary is not None:
            return replace(unary_unary=behavior)
        return replace(stream_unary=behavior)
    if handler.unary_stream is not None:
        return replace(unary_stream=wrap_streaming(method, handler.unary_stream, outage=outage))
    if handler.stream_stream is not None:
        return replace(stream_stream=wrap_streaming(method, handler.stream_stream, outage=outage))
    return handler


class ErrorMapping(grpc.aio.ServerInterceptor):
    """Exceptions to status codes for every call; with ``call_timeout_s``, every unary call
    bounded; with ``outage``, each database outage a call met told to it. ``calls``: the
    unary calls in flight."""

    def __init__(
        self, *, call_timeout_s: float | None = None, outage: OutageHook | None = None
    ) -> None:
        self._limit_s = call_timeout_s
        self._outage = outage
        self.calls = UnaryCalls()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return with_error_mapping(
            handler_call_details.method,
            handler,
            limit_s=self._limit_s,
            outage=self._outage,
            calls=self.calls,
        )
