"""Listening: the gRPC server options every port of the verifier gets (message limits,
HTTP/2 keepalive and ping policy, SO_REUSEPORT among one verifier's own workers), and binding
an address with an error that says why it failed and what to change.
"""

from __future__ import annotations

import errno
import socket

import grpc

from devtrust.core.errors import ConfigError
from devtrust.verifier.config import VerifierConfig, parse_address


def server_options(config: VerifierConfig, *, reuse_port: bool = False) -> list[tuple[str, int]]:
    limit = config.limits.max_message_bytes
    server = config.server
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # A ping after keepalive_s without traffic; a peer that does not answer within
        # keepalive_timeout_s is gone (a dead host, a dropped route): its connection and its
        # streams end, rather than a stream held open until the next challenge.
        ("grpc.keepalive_time_ms", round(server.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(server.keepalive_timeout_s * 1000)),
        # Any ping's ack, not only keepalive's: a flow-control ping sent just before the
        # peer went silent would otherwise hold the keepalive for gRPC's default minute.
        ("grpc.http2.ping_timeout_ms", round(server.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Keep pinging a connection whose stream is quiet between challenges (gRPC stops
        # after two pings without data otherwise).
        ("grpc.http2.max_pings_without_data", 0),
        # Clients' own pings: at most one per 10 s, or their connection is closed (too many
        # pings); agents ping less often.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # gRPC sets SO_REUSEPORT by default: a second verifier would bind the same port and
        # the kernel would split connections between the two (issue 8). Set only among one
        # verifier's own workers, whose parent checked that nothing else holds the port.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]


def bind_problem(address: str, key: str) -> str | None:
    """Why ``address`` cannot be listened on and what to do, or None. Tried with a plain
    socket before gRPC, whose own failure says neither why nor what to do (it stays as the
    backstop)."""
    host, port = parse_address(address)
    change = f"change `{key}:` in the configuration"
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}: {change}"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return (
                        "address already in use (is another devtrust-verifier running?): "
                        f"stop what holds it, or {change}"
                    )
                if exc.errno == errno.EACCES and port < 1024:
                    return (
                        f"port {port} is privileged: {change} to a port above 1023, or give "
                        "the verifier CAP_NET_BIND_SERVICE"
                    )
                return f"{exc.strerror or exc}: {change} to an address of this host"
    return None


def listen(
    server: grpc.aio.Server,
    address: str,
    creds: grpc.ServerCredentials,
    key: str,
    *,
    probe: bool = True,
) -> int:
    problem = bind_problem(address, key) if probe else None
    if problem is None:
        try:
            return server.add_secure_port(address, creds)
        except RuntimeError:
            problem = f"gRPC could not bind it: change `{key}:` in the configuration"
    raise ConfigError(f"cannot listen on {address} ({key}): {problem}")
