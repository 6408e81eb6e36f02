"""Listening TCP sockets from the kernel's sock_diag netlink interface (what ``ss -lt``
asks), instead of reading /proc/net/tcp{,6}.

Reading /proc/net/tcp makes the kernel walk its whole established-connection hash table
and print every socket: milliseconds on a host with a large table or many connections, for
a handful of LISTEN rows. A sock_diag dump filtered to the LISTEN state walks only the
listening sockets. Rows come back in /proc/net/tcp's own ``local_address`` notation (the
address as the kernel prints it, ``%08X`` per 32-bit word in host order, then ``:%04X``
port), so a fingerprint over them equals one over the file's LISTEN rows.
"""

from __future__ import annotations

import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_LISTEN = 10
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
# struct inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (zero).
_REQUEST = struct.Struct("=BBBBI48x")
# struct inet_diag_msg: family, state, timer, retrans, then inet_diag_sockid: sport, dport
# (big-endian), src[16], dst[16], interface, cookie[2]; then expires, queues, uid, inode.
_MESSAGE = struct.Struct("=BBBB2s2s16s16sI8sIIIII")


class SockDiag:
    """A NETLINK_SOCK_DIAG socket. Raises OSError where the kernel has none (the caller
    reads /proc/net/tcp instead)."""

    def __init__(self) -> None:
        self._sock = _open()
        self._seq = 0

    def listening(self, family: int) -> list[bytes]:
        """The local addresses of TCP sockets listening in ``family`` (AF_INET or AF_INET6),
        as /proc/net/tcp{,6} writes them. After a failure the socket is opened afresh: the
        kernel refuses a new dump (EBUSY) while one it started is still unread."""
        try:
            return self._listening(family)
        except OSError:
            self._sock.close()
            self._sock = _open()
            raise

    def _listening(self, family: int) -> list[bytes]:
        self._seq += 1
        request = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN)
        flags = NLM_F_REQUEST | NLM_F_DUMP
        size = _HEADER.size + len(request)
        header = _HEADER.pack(size, SOCK_DIAG_BY_FAMILY, flags, self._seq, 0)
        self._sock.sendto(header + request, (0, 0))
        rows: list[bytes] = []
        while True:
            data = self._sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _, seq, _ = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise OSError("sock_diag: malformed netlink message")
                body = offset + _HEADER.size
                offset += (length + 3) & ~3
                if seq != self._seq:
                    # The rest of an earlier dump that stopped part-way (an error raised
                    # below): its DONE must not end this one.
                    continue
                if kind == NLMSG_DONE:
                    return rows
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, body)
                    raise OSError(-code, f"sock_diag: error {-code}")
                if kind == SOCK_DIAG_BY_FAMILY:
                    rows.append(_row(family, data, body))

    def close(self) -> None:
        self._sock.close()


def _open() -> socket.socket:
    return socket.socket(
        socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    )


def _row(family: int, data: bytes, offset: int) -> bytes:
    fields = _MESSAGE.unpack_from(data, offset)
    sport, src = fields[4], fields[6]
    words = 1 if family == socket.AF_INET else 4
    address = "".join(f"{w:08X}" for w in struct.unpack(f"={words}I", src[: 4 * words]))
    return f"{address}:{struct.unpack('>H', sport)[0]:04X}".encode()
