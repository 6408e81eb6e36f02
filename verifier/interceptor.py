"""One interceptor maps exceptions to gRPC status codes (STYLE 10). Domain errors carry
messages meant for the caller; anything else becomes INTERNAL with a generic text, and the
details go to the log, never to the client.

Handlers wrapped here are coroutines (streaming handlers write with ``context.write``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc

from verifier.errors import (
    DevtrustError,
    FailedPrecondition,
    MalformedInput,
    NotFound,
    Rejected,
    ResourceExhausted,
    Superseded,
    Unauthenticated,
)
from verifier.logtext import printable

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


def status_for(exc: DevtrustError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def _wrap(method: str, raw: Any) -> Behavior:
    behavior = cast(Behavior, raw)

    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except DevtrustError as exc:
            code = status_for(exc)
            # A flood of refusals for rate is not a flood of log lines.
            level = logging.DEBUG if isinstance(exc, ResourceExhausted) else logging.INFO
            logger.log(level, "%s refused: %s: %s", method, code.name, printable(str(exc)))
            await context.abort(code, str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception:
            logger.exception("%s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return wrapped


class ErrorMapping(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        # The generated handlers are namedtuples (grpc._utilities.RpcMethodHandler).
        replace: Callable[..., Handler] = handler._replace  # type: ignore[attr-defined]
        if handler.unary_unary is not None:
            return replace(unary_unary=_wrap(method, handler.unary_unary))
        if handler.stream_stream is not None:
            return replace(stream_stream=_wrap(method, handler.stream_stream))
        if handler.unary_stream is not None:
            return replace(unary_stream=_wrap(method, handler.unary_stream))
        return handler
