"""An example relying party: a model registry that serves model files only to devices of the
zones and tier it allows, and stops serving a device the moment the verifier revokes it.

This is what devtrust's zones mean in practice: micro-segmentation by device trust. The
verifier writes each device's zone (assigned by an operator or its bootstrap token, never
claimed by the device) and appraised tier into its short-lived device certificate; a service
such as this one accepts a connection only with such a certificate, and serves only the
zones it names at the tier it requires. A production-inference host fetches the production
models; a model-development host, although enrolled and trusted, is refused, and so is any
host whose trust falls: at once when the registry follows the verifier's revocation feed
(``--revocations``), at the latest when its certificate expires (minutes) when it does not.

    python -m devtrust.example.registry --models DIR --listen 0.0.0.0:8443 \\
        --cert registry.pem --key registry.key --ca-bundle device-bundle.pem \\
        --min-tier affirming --zone production-inference \\
        [--revocations VERIFIER:8444 --client-cert rp.pem --client-key rp.key \\
         --verifier-ca ca.pem]

The server is grpc.aio with mTLS requiring a client certificate of the device bundle (the
verifier's relying-party bundle, ``device-bundle.pem``); every method is gated by
``devtrust.gate``'s interceptor, and a refused call ends with PERMISSION_DENIED and the
gate's reason (``gate.zone: device ... zone 'model-development' is not allowed``). The feed
is read with a relying-party identity (``devtrust-verifier operator issue --role
relying-party``). Model names never lead out of DIR (``devtrust.example.models``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from devtrust.core.tier import Tier
from devtrust.example import registry_pb2, registry_pb2_grpc
from devtrust.example.models import ModelNameError, ModelNotFound, ModelStore
from devtrust.gate import CURRENT_DECISION, AioGateInterceptor, Bundle, Gate, GatePolicy
from devtrust.gate.decision import GateDecision
from devtrust.gate.follower import RevocationFollower

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Clock = Callable[[], datetime.datetime]
CHUNK = 64 * 1024
EXIT_USAGE = 2


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class FeedSettings:
    """Where the verifier's Revocations service is, and the identity that reads it."""

    address: str
    client_cert: Path
    client_key: Path
    verifier_ca: Path
    # Without a stream for longer than this, every call is refused (gate.feed_stale).
    max_gap: datetime.timedelta = datetime.timedelta(seconds=60)


@dataclass(frozen=True)
class RegistrySettings:
    models: Path
    listen: str
    cert: Path
    key: Path
    ca_bundle: Path
    min_tier: Tier
    zones: frozenset[str]
    trust_domain: str | None = None
    revocations: FeedSettings | None = None


# --- the service ----------------------------------------------------------------------------


async def _admitted(context: Context) -> GateDecision:
    """The gate's decision on this call. The interceptor refuses before the handler runs;
    a handler reached without it (a server built without the interceptor) refuses too."""
    decision = CURRENT_DECISION.get()
    if decision is None or not decision.allow:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "gate: no decision on this call")
    return decision


class RegistryService(registry_pb2_grpc.ModelRegistryServicer):
    def __init__(self, store: ModelStore) -> None:
        self._store = store

    async def ListModels(
        self, request: registry_pb2.ListModelsRequest, context: Context
    ) -> registry_pb2.ListModelsResponse:
        decision = await _admitted(context)
        models = await asyncio.to_thread(self._store.list)
        logger.info("device %s listed %d models", decision.device_id, len(models))
        return registry_pb2.ListModelsResponse(
            models=[registry_pb2.Model(name=m.name, size=m.size) for m in models],
            device_id=decision.device_id,
        )

    async def FetchModel(
        self, request: registry_pb2.FetchModelRequest, context: Context
    ) -> AsyncIterator[registry_pb2.ModelChunk]:
        decision = await _admitted(context)
        name = request.name
        try:
            file = await asyncio.to_thread(self._store.open, name)
        except ModelNameError as exc:
            logger.warning("device %s: model name refused: %s", decision.device_id, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        digest, offset = hashlib.sha256(), 0
        with file:
            while data := await asyncio.to_thread(file.read, CHUNK):
                digest.update(data)
                yield registry_pb2.ModelChunk(offset=offset, data=data)
                offset += len(data)
        logger.info(
            "device %s (zone %s, tier %s) fetched %s, %d bytes",
            decision.device_id,
            decision.zone,
            decision.tier.label if decision.tier else "?",
            name,
            offset,
        )
        yield registry_pb2.ModelChunk(offset=offset, last=True, sha256=digest.digest())


# --- the server ------------------------------------------------------------------------------


class StartError(Exception):
    """A setting the registry cannot start with: one line, exit status 2."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartError(f"cannot read {what} {path}: {exc.strerror}") from exc


# The verifier accepts pings no closer than 10 s apart (server.py); 15 s keeps clear of it.
_FEED_OPTIONS = (
    ("grpc.keepalive_time_ms", 15_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


def _follower(feed: FeedSettings, clock: Clock) -> RevocationFollower:
    credentials = grpc.ssl_channel_credentials(
        _read(feed.verifier_ca, "--verifier-ca"),
        _read(feed.client_key, "--client-key"),
        _read(feed.client_cert, "--client-cert"),
    )
    return RevocationFollower(
        # Keepalive: the feed is silent while nothing is revoked, so a path that drops
        # packets without closing would otherwise look like a feed in sync until the
        # stream's deadline; with pings it breaks within 25 s and max_gap then denies.
        lambda: grpc.aio.secure_channel(feed.address, credentials, options=_FEED_OPTIONS),
        max_gap=feed.max_gap,
        clock=clock,
    )


@dataclass
class RunningRegistry:
    server: grpc.aio.Server
    port: int
    gate: Gate
    follower: RevocationFollower | None
    following: asyncio.Task[None] | None

    async def stop(self, grace: float | None = 1.0) -> None:
        if self.following is not None:
            self.following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.following
        await self.server.stop(grace)


async def start_registry(settings: RegistrySettings, *, clock: Clock = _utcnow) -> RunningRegistry:
    """Start serving (and following the feed, when configured); ``StartError`` for a file
    that cannot be read or an address that cannot be bound."""
    try:
        store = ModelStore(settings.models)
    except ValueError as exc:
        raise StartError(str(exc)) from None
    bundle_pem = _read(settings.ca_bundle, "--ca-bundle")
    try:
        bundle = Bundle.from_pem(bundle_pem)
    except ValueError as exc:
        raise StartError(f"--ca-bundle {settings.ca_bundle}: {exc}") from None
    policy = GatePolicy(
        bundle=bundle,
        min_tier=settings.min_tier,
        zones=settings.zones,
        trust_domain=settings.trust_domain,
    )
    follower = _follower(settings.revocations, clock) if settings.revocations else None
    gate = (
        Gate(policy, revocations=follower.revocations, clock=clock)
        if follower
        else Gate(policy, clock=clock)
    )
    credentials = grpc.ssl_server_credentials(
        [(_read(settings.key, "--key"), _read(settings.cert, "--cert"))],
        root_certificates=bundle_pem,
        require_client_auth=True,
    )
    server = grpc.aio.server(interceptors=[AioGateInterceptor(gate)])
    registry_pb2_grpc.add_ModelRegistryServicer_to_server(RegistryService(store), server)
    try:
        port = server.add_secure_port(settings.listen, credentials)
    except RuntimeError as exc:
        raise StartError(f"--listen {settings.listen}: cannot listen there ({exc})") from None
    await server.start()
    following = asyncio.create_task(follower.run()) if follower else None
    return RunningRegistry(server, port, gate, follower, following)


# --- the command -------------------------------------------------------------------------------


def _tier(text: str) -> Tier:
    try:
        tier = Tier.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if tier is Tier.NONE:
        raise argparse.ArgumentTypeError("none would admit devices nobody appraised")
    return tier


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m devtrust.example.registry",
        description="A model registry serving model files only to devices of the allowed "
        "zones and tier (devtrust's example relying party).",
    )
    p.add_argument("--models", type=Path, required=True, help="the folder of model files")
    p.add_argument("--listen", required=True, help="HOST:PORT (port 0: any free port)")
    p.add_argument("--cert", type=Path, required=True, help="the registry's server certificate")
    p.add_argument("--key", type=Path, required=True, help="its private key")
    p.add_argument(
        "--ca-bundle",
        type=Path,
        required=True,
        help="the device issuing CAs (the verifier's device-bundle.pem)",
    )
    p.add_argument("--min-tier", type=_tier, required=True, help="affirming, warning, ...")
    p.add_argument(
        "--zone", action="append", required=True, help="a zone served (repeat for several)"
    )
    p.add_argument("--trust-domain", help="the SPIFFE trust domain required (default: any)")
    feed = p.add_argument_group("following the verifier's revocation feed")
    feed.add_argument("--revocations", metavar="VERIFIER_ADDR", help="HOST:PORT of the verifier")
    feed.add_argument("--client-cert", type=Path, help="a relying-party certificate")
    feed.add_argument("--client-key", type=Path, help="its private key")
    feed.add_argument("--verifier-ca", type=Path, help="the CA of the verifier's certificate")
    feed.add_argument(
        "--max-gap-s",
        type=float,
        default=60.0,
        help="refuse every call once the feed is lost this long (default 60)",
    )
    return p


def settings_from_args(args: argparse.Namespace, p: argparse.ArgumentParser) -> RegistrySettings:
    revocations = None
    named = [args.client_cert, args.client_key, args.verifier_ca]
    if args.revocations:
        if not all(named):
            p.error("--revocations needs --client-cert, --client-key and --verifier-ca")
        if not args.max_gap_s > 0:
            p.error(f"--max-gap-s must be positive, got {args.max_gap_s}")
        revocations = FeedSettings(
            address=args.revocations,
            client_cert=args.client_cert,
            client_key=args.client_key,
            verifier_ca=args.verifier_ca,
            max_gap=datetime.timedelta(seconds=args.max_gap_s),
        )
    elif any(named):
        p.error("--client-cert, --client-key and --verifier-ca are for --revocations")
    zones = frozenset(z.strip() for z in args.zone)
    if "" in zones:
        p.error("--zone: a zone name is not empty")
    return RegistrySettings(
        models=args.models,
        listen=args.listen,
        cert=args.cert,
        key=args.key,
        ca_bundle=args.ca_bundle,
        min_tier=args.min_tier,
        zones=zones,
        trust_domain=args.trust_domain,
        revocations=revocations,
    )


async def serve(settings: RegistrySettings) -> None:
    """Serve until SIGINT or SIGTERM."""
    registry = await start_registry(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    host = settings.listen.rpartition(":")[0]
    feed = settings.revocations.address if settings.revocations else "none"
    zones = ", ".join(sorted(settings.zones))
    # The first line on stdout, for scripts (and tests) that start it on port 0.
    print(
        f"model registry listening on {host}:{registry.port}: zones {zones}, minimum tier "
        f"{settings.min_tier.label}, revocation feed {feed}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await registry.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    settings = settings_from_args(p.parse_args(argv), p)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(settings))
    except StartError as exc:
        print(f"registry: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
