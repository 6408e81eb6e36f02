"""The verifier addresses an agent tries, one at a time (issue 12, contract C6).

The configuration names one address or a list (``verifier.enrollment``,
``verifier.attestation``); a DNS name with several A/AAAA records counts as several
addresses. ``AddressRing`` hands out the current one and moves to the next when it failed
(unreachable, refused with UNAVAILABLE, or draining): each configured address is resolved
when the ring comes to it, so a change in DNS is seen on the next round, and each of its
records is dialled as an IP address while TLS still checks the configured name (gRPC's
``ssl_target_name_override``): the verifier's certificate names the service, not each
replica's address.

``split_address`` is the configuration's check of one entry; nothing here touches the network
except the resolver, which is a parameter (``loop.getaddrinfo`` by default).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)
# The IP addresses a name resolves to (for a stream socket on ``port``).
Resolver = Callable[[str, int], Awaitable[list[str]]]
_DNS_SCHEME = "dns:///"
# gRPC's own target schemes, dialled as written (gRPC's doc/naming.md).
_SCHEMES = frozenset({"unix", "unix-abstract", "ipv4", "ipv6", "vsock"})


@dataclass(frozen=True)
class Target:
    """One address to dial: ``target`` is what gRPC connects to, ``address`` the entry of the
    configuration it came from (what messages name), ``tls_name`` the name the verifier's
    certificate must hold ("": the host in ``target``, gRPC's default)."""

    target: str
    address: str
    tls_name: str = ""

    def __str__(self) -> str:
        if self.target == self.address:
            return self.address
        return f"{self.address} ({self.target.partition(':')[2]})"


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of ``HOST:PORT``, ``[V6]:PORT`` or ``dns:///HOST:PORT``; None for another
    gRPC target (``unix:PATH``, ``ipv4:...``), dialled as written. ``ValueError`` with a
    message for an empty entry, a missing or bad port."""
    text = address.strip()
    if not text:
        raise ValueError("is empty: give the verifier's HOST:PORT")
    if text.startswith(_DNS_SCHEME):
        text = text[len(_DNS_SCHEME) :]
    elif text.partition(":")[0] in _SCHEMES:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{address}: expected HOST:PORT")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{address}: port {port or '(none)'} is not in 1-65535")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ValueError(f"{address}: expected HOST:PORT")
    return host, int(port)


async def getaddrinfo(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, in the resolver's order, each once."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _ip_target(ip: str, port: int) -> str:
    return f"ipv6:[{ip}]:{port}" if ":" in ip else f"ipv4:{ip}:{port}"


async def expand(address: str, *, server_name: str, resolver: Resolver) -> list[Target]:
    """The targets one configured address stands for: itself for an IP address or another
    gRPC target; one per record for a DNS name (itself when it does not resolve: gRPC then
    reports the failure in its own words, as for any unreachable address)."""
    parts = split_address(address)
    if parts is None:
        return [Target(address, address, server_name)]
    host, port = parts
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [Target(address, address, server_name)]
    try:
        ips = await resolver(host, port)
    except (OSError, UnicodeError) as exc:
        logger.warning("verifier address %s: cannot resolve %s: %s", address, host, exc)
        ips = []
    if not ips:
        return [Target(address, address, server_name)]
    return [Target(_ip_target(ip, port), address, server_name or host) for ip in ips]


class AddressRing:
    """The addresses in the configured order, each DNS name expanded to its records; the
    current one stays current until ``advance``."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        server_name: str = "",
        resolver: Resolver = getaddrinfo,
    ) -> None:
        if not addresses:
            raise ValueError("no verifier address")
        self._addresses = tuple(addresses)
        self._server_name = server_name
        self._resolver = resolver
        self._at = 0
        self._targets: list[Target] | None = None
        self._sub = 0

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._addresses

    async def current(self) -> Target:
        """The address to use now (its entry resolved when the ring comes to it)."""
        if self._targets is None:
            self._targets = await expand(
                self._addresses[self._at], server_name=self._server_name, resolver=self._resolver
            )
            self._sub = 0
        return self._targets[self._sub]

    def advance(self) -> None:
        """The current address failed: the next one (the next record of the same name
        first), back to the first entry after the last, resolved afresh."""
        if self._targets is not None and self._sub + 1 < len(self._targets):
            self._sub += 1
            return
        self._at = (self._at + 1) % len(self._addresses)
        self._targets = None
        self._sub = 0
