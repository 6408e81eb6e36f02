"""The error interceptor and the services it wraps that are not ours (issue 8, item 8).

grpc.aio runs a handler according to what it is: a coroutine function, an async generator
function, or a plain function (a generator, or one returning an iterator, when it streams).
The interceptor once wrapped every streaming handler as a coroutine, so server reflection, an
async generator, answered INTERNAL to ``grpcurl list``. Here every handler kind in every style
runs through the interceptor on a real loopback server, and reflection and health run against
a real verifier over mTLS.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.wrappers_pb2 import StringValue
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from devtrust.swtpm import EndorsementCA
from devtrust.v1 import attestation_pb2, query_pb2
from devtrust.verifier.ca import CertificateAuthority
from devtrust.verifier.errors import NotFound
from devtrust.verifier.interceptor import ErrorMapping, with_error_mapping
from devtrust.verifier.pki import PkiFiles, issue_operator
from devtrust.verifier.server import RunningVerifier
from tests.env import channel_credentials, running, verifier_config

SERVICE = "test.Kinds"
SECRET = "secret detail of /var/lib/devtrust"

# --- handlers of every kind and style ---------------------------------------------------
# Each request's value says what the handler does with it: "ok" answers, "refuse" raises a
# domain error, "boom" raises an unexpected error, "abort" aborts through the context itself.
# A streaming handler answers "<value>:1" before acting and "<value>:2" after, so a failure
# arrives after a response already sent.


def fail(value: str) -> None:
    if value == "refuse":
        raise NotFound(f"no record named {value}")
    if value == "boom":
        raise RuntimeError(SECRET)


def act(value: str, context: grpc.ServicerContext) -> None:
    fail(value)
    if value == "abort":
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "aborted by the handler")


async def act_async(value: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if value == "abort":
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "aborted by the handler")
    fail(value)


def answer(value: str) -> StringValue:
    return StringValue(value=value)


async def unary_coroutine(request: StringValue, context: Any) -> StringValue:
    await act_async(request.value, context)
    return answer(request.value)


def unary_function(request: StringValue, context: Any) -> StringValue:
    act(request.value, context)
    return answer(request.value)


async def server_writes(request: StringValue, context: Any) -> None:
    await context.write(answer(f"{request.value}:1"))
    await act_async(request.value, context)
    await context.write(answer(f"{request.value}:2"))


async def server_async_generator(request: StringValue, context: Any) -> AsyncIterator[StringValue]:
    yield answer(f"{request.value}:1")
    await act_async(request.value, context)
    yield answer(f"{request.value}:2")


def server_generator(request: StringValue, context: Any) -> Iterator[StringValue]:
    yield answer(f"{request.value}:1")
    act(request.value, context)
    yield answer(f"{request.value}:2")


def server_iterator(request: StringValue, context: Any) -> Iterator[StringValue]:
    """Not a generator function: returns an iterator that acts when the second is drawn."""

    def step(n: int) -> StringValue:
        if n == 2:
            act(request.value, context)
        return answer(f"{request.value}:{n}")

    return map(step, (1, 2))


async def client_coroutine(requests: AsyncIterator[StringValue], context: Any) -> StringValue:
    values = []
    async for request in requests:
        await act_async(request.value, context)
        values.append(request.value)
    return answer("+".join(values))


def client_function(requests: Iterator[StringValue], context: Any) -> StringValue:
    values = []
    for request in requests:
        act(request.value, context)
        values.append(request.value)
    return answer("+".join(values))


async def bidi_writes(requests: AsyncIterator[StringValue], context: Any) -> None:
    async for request in requests:
        await server_writes(request, context)


async def bidi_async_generator(
    requests: AsyncIterator[StringValue], context: Any
) -> AsyncIterator[StringValue]:
    async for request in requests:
        async for response in server_async_generator(request, context):
            yield response


def bidi_generator(requests: Iterator[StringValue], context: Any) -> Iterator[StringValue]:
    for request in requests:
        yield from server_generator(request, context)


def bidi_iterator(requests: Iterator[StringValue], context: Any) -> Iterator[StringValue]:
    return itertools.chain.from_iterable(server_iterator(r, context) for r in requests)


MAKERS: dict[str, Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # one of MAKERS
    behavior: Callable[..., Any]

    def handler(self) -> grpc.RpcMethodHandler[Any, Any]:
        return MAKERS[self.kind](
            self.behavior,
            request_deserializer=StringValue.FromString,
            response_serializer=StringValue.SerializeToString,
        )


METHODS = [
    Method("UnaryCoroutine", "unary_unary", unary_coroutine),
    Method("UnaryFunction", "unary_unary", unary_function),
    Method("ServerWrites", "unary_stream", server_writes),
    Method("ServerAsyncGenerator", "unary_stream", server_async_generator),
    Method("ServerGenerator", "unary_stream", server_generator),
    Method("ServerIterator", "unary_stream", server_iterator),
    Method("ClientCoroutine", "stream_unary", client_coroutine),
    Method("ClientFunction", "stream_unary", client_function),
    Method("BidiWrites", "stream_stream", bidi_writes),
    Method("BidiAsyncGenerator", "stream_stream", bidi_async_generator),
    Method("BidiGenerator", "stream_stream", bidi_generator),
    Method("BidiIterator", "stream_stream", bidi_iterator),
]


def test_every_kind_is_covered() -> None:
    assert {m.kind for m in METHODS} == set(MAKERS)
    streaming = [m for m in METHODS if m.kind.endswith("_stream")]
    assert {style(m.behavior) for m in streaming} == {"coroutine", "async generator", "sync"}
    assert any(not inspect.isgeneratorfunction(m.behavior) for m in streaming)


def style(behavior: Callable[..., Any]) -> str:
    """How grpc.aio runs a behavior (its server's own test)."""
    if inspect.iscoroutinefunction(behavior):
        return "coroutine"
    if inspect.isasyncgenfunction(behavior):
        return "async generator"
    return "sync"


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_wrapper_keeps_the_style(method: Method) -> None:
    wrapped = with_error_mapping(f"/{SERVICE}/{method.name}", method.handler())
    behavior = getattr(wrapped, method.kind)
    assert behavior is not method.behavior
    assert style(behavior) == style(method.behavior)
    for other in set(MAKERS) - {method.kind}:
        assert getattr(wrapped, other) is None


# --- calling them through the interceptor -------------------------------------------------


@dataclass
class Outcome:
    responses: list[str]
    code: grpc.StatusCode
    details: str


async def invoke(channel: grpc.aio.Channel, method: Method, values: list[str]) -> Outcome:
    path = f"/{SERVICE}/{method.name}"
    make = getattr(channel, method.kind)
    call = make(
        path,
        request_serializer=StringValue.SerializeToString,
        response_deserializer=StringValue.FromString,
    )
    requests = [answer(v) for v in values]
    responses: list[str] = []
    try:
        if method.kind.startswith("unary_"):
            assert len(requests) == 1
            pending = call(requests[0], timeout=10)
        else:
            pending = call(iter(requests), timeout=10)
        if method.kind.endswith("_stream"):
            async for response in pending:
                responses.append(response.value)
        else:
            responses.append((await pending).value)
    except grpc.aio.AioRpcError as exc:
        return Outcome(responses, exc.code(), exc.details() or "")
    return Outcome(responses, grpc.StatusCode.OK, "")


async def serve_and_invoke(method: Method, values: list[str]) -> Outcome:
    server = grpc.aio.server(interceptors=[ErrorMapping()])
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {method.name: method.handler()}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await invoke(channel, method, values)
    finally:
        await server.stop(None)


def expected_responses(method: Method, values: list[str], ok: bool) -> list[str]:
    """What reaches the client before the last request's outcome."""
    if method.kind.endswith("_stream"):
        sent = [f"{v}:{n}" for v in values for n in (1, 2)]
        return sent if ok else sent[:-1]
    return ["+".join(values)] if ok else []


@dataclass(frozen=True)
class Case:
    name: str
    value: str
    code: grpc.StatusCode
    details: str


CASES = [
    Case("answers", "ok", grpc.StatusCode.OK, ""),
    Case(
        "domain error maps to its code",
        "refuse",
        grpc.StatusCode.NOT_FOUND,
        "no record named refuse",
    ),
    Case("unknown error is internal", "boom", grpc.StatusCode.INTERNAL, "internal error"),
    Case(
        "handler's own abort passes",
        "abort",
        grpc.StatusCode.FAILED_PRECONDITION,
        "aborted by the handler",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_interceptor_maps_errors_in_every_kind(
    method: Method, case: Case, caplog: pytest.LogCaptureFixture
) -> None:
    # Client-streaming calls send a good request first: the failure comes mid-call.
    values = [case.value] if method.kind.startswith("unary_") else ["first", case.value]
    with caplog.at_level(logging.INFO, logger="devtrust.verifier.interceptor"):
        outcome = asyncio.run(serve_and_invoke(method, values))

    ok = case.code == grpc.StatusCode.OK
    assert outcome.responses == expected_responses(method, values, ok)
    assert (outcome.code, outcome.details) == (case.code, case.details)

    path = f"/{SERVICE}/{method.name}"
    logged = [r for r in caplog.records if r.name == "devtrust.verifier.interceptor"]
    if case.value == "boom":
        # The details go to the log with the traceback, never to the client.
        (record,) = logged
        assert record.getMessage() == f"{path} failed"
        assert record.levelno == logging.ERROR
        assert record.exc_info is not None
        assert str(record.exc_info[1]) == SECRET
        assert SECRET not in outcome.details
    elif case.value == "refuse":
        (record,) = logged
        assert record.getMessage() == f"{path} refused: NOT_FOUND: no record named refuse"
    else:
        assert logged == []


# --- reflection and health on a real verifier ----------------------------------------------

LISTED = {
    "devtrust.v1.Attestation": attestation_pb2.DESCRIPTOR.services_by_name["Attestation"],
    "devtrust.v1.Query": query_pb2.DESCRIPTOR.services_by_name["Query"],
    "devtrust.v1.Revocations": query_pb2.DESCRIPTOR.services_by_name["Revocations"],
    "grpc.health.v1.Health": health_pb2.DESCRIPTOR.services_by_name["Health"],
    "grpc.reflection.v1alpha.ServerReflection": reflection_pb2.DESCRIPTOR.services_by_name[
        "ServerReflection"
    ],
}


def operator_credentials(pki: PkiFiles, workdir: Path) -> grpc.ChannelCredentials:
    """An operator's mTLS identity, as ``tests.env.operator_stub`` issues it."""
    ca = CertificateAuthority.load(pki.ca_cert, pki.ca_key)
    cert, key = issue_operator(
        ca,
        workdir,
        name="reflector",
        trust_domain="devtrust.local",
        now=datetime.datetime.now(datetime.UTC),
    )
    return channel_credentials(pki, key_pem=key.read_bytes(), cert_pem=cert.read_bytes())


def signatures(service: Any) -> list[str]:
    return [
        f"{m.name}({'stream ' if m.client_streaming else ''}{m.input_type.full_name}) -> "
        f"{'stream ' if m.server_streaming else ''}{m.output_type.full_name}"
        for m in service.methods
    ]


def describe(address: str, credentials: grpc.ChannelCredentials) -> dict[str, list[str]]:
    """What ``grpcurl list`` then ``grpcurl describe SERVICE`` show, through grpc_reflection's
    own client (a blocking one: run it off the verifier's event loop)."""
    with grpc.secure_channel(address, credentials) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = list(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        shown: dict[str, list[str]] = {}
        for name in services:
            proto = database.FindFileContainingSymbol(name)
            assert name.rsplit(".", 1)[-1] in [s.name for s in proto.service]
            shown[name] = signatures(pool.FindServiceByName(name))
    return shown


def test_reflection_lists_and_describes_every_service(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    config = verifier_config(workdir, pki, endorsement_ca)
    credentials = operator_credentials(pki, workdir)

    async def scenario() -> dict[str, list[str]]:
        async with running(config) as verifier:
            address = f"127.0.0.1:{verifier.attestation_port}"
            return await asyncio.to_thread(describe, address, credentials)

    shown = asyncio.run(scenario())
    assert set(shown) == set(LISTED)
    for name, local in LISTED.items():
        assert shown[name] == signatures(local), name
        assert shown[name]  # every service has methods; an empty one would pass above


async def one_stream_session(verifier: RunningVerifier, credentials: Any) -> list[Any]:
    """As grpcurl does: one reflection stream, a request answered before the next is sent."""
    address = f"127.0.0.1:{verifier.attestation_port}"
    async with grpc.aio.secure_channel(address, credentials) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(timeout=10)
        Request = reflection_pb2.ServerReflectionRequest
        await call.write(Request(list_services=""))
        answers = [await call.read()]
        for service in answers[0].list_services_response.service:
            await call.write(Request(file_containing_symbol=service.name))
            answers.append(await call.read())
        await call.write(Request(file_by_filename="no/such/file.proto"))
        answers.append(await call.read())
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        return answers


def test_reflection_answers_many_requests_on_one_stream(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    config = verifier_config(workdir, pki, endorsement_ca)
    credentials = operator_credentials(pki, workdir)

    async def scenario() -> list[Any]:
        async with running(config) as verifier:
            return await one_stream_session(verifier, credentials)

    listing, *files, missing = asyncio.run(scenario())
    names = [s.name for s in listing.list_services_response.service]
    assert sorted(names) == sorted(LISTED)
    for name, answer_ in zip(names, files, strict=True):
        assert answer_.file_descriptor_response.file_descriptor_proto, name
    # A request reflection cannot answer is an error in the stream, not the end of it.
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_health_watch_through_the_verifier(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    config = verifier_config(workdir, pki, endorsement_ca)
    credentials = operator_credentials(pki, workdir)
    Status = health_pb2.HealthCheckResponse

    async def watch(stub: health_pb2_grpc.HealthStub, service: str) -> int:
        call = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=10)
        first = await call.read()
        call.cancel()
        return int(first.status)

    async def scenario() -> dict[str, int]:
        async with running(config) as verifier:
            address = f"127.0.0.1:{verifier.attestation_port}"
            async with grpc.aio.secure_channel(address, credentials) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                names = ["", "devtrust.v1.Attestation", "devtrust.v1.Query", "no.such.Service"]
                return {name: await watch(stub, name) for name in names}

    assert asyncio.run(scenario()) == {
        "": Status.SERVING,
        "devtrust.v1.Attestation": Status.SERVING,
        "devtrust.v1.Query": Status.SERVING,
        "no.such.Service": Status.SERVICE_UNKNOWN,
    }


def test_health_watch_follows_changes_through_the_interceptor() -> None:
    """Watch is a long-lived stream written with context.write: each change arrives."""
    Status = health_pb2.HealthCheckResponse

    async def scenario() -> list[int]:
        servicer = health.aio.HealthServicer()
        server = grpc.aio.server(interceptors=[ErrorMapping()])
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.set("svc", Status.SERVING)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                call = stub.Watch(health_pb2.HealthCheckRequest(service="svc"), timeout=10)
                seen = [(await call.read()).status]
                await servicer.set("svc", Status.NOT_SERVING)
                seen.append((await call.read()).status)
                await servicer.set("svc", Status.SERVING)
                seen.append((await call.read()).status)
                call.cancel()
                return seen
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == [Status.SERVING, Status.NOT_SERVING, Status.SERVING]
