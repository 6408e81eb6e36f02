"""The transport's floor: a bare grpc.aio bidirectional-streaming echo over mTLS.

One process, one event loop, as the verifier serves: the same server certificate, client
certificates required and checked against the verifier's CA (the devices' channel
certificates), raw bytes in and out (no protobuf). Each request is answered with one
message: its first ``--reply-bytes`` bytes (the size of the verifier's Result + Challenge
reply, measured in the same run), so the echo sends what the verifier sends. It prints
``ready PORT`` once it serves. bench/verifier_cpu.py starts it and measures its CPU per
round trip:

    .venv/bin/python -m bench.echo --cert S.pem --key S.key --ca CA.pem [--reply-bytes N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc

METHOD = "/bench.Echo/Echo"


def _same(data: bytes) -> bytes:
    return data


async def serve(cert: bytes, key: bytes, ca: bytes, reply_bytes: int, port: int) -> None:
    async def echo(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        async for data in requests:
            await context.write(data[:reply_bytes] if reply_bytes else data)

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.stream_stream_rpc_method_handler(
                echo, request_deserializer=_same, response_serializer=_same
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=ca,
        require_client_auth=True,
    )
    bound = server.add_secure_port(f"127.0.0.1:{port}", creds)
    await server.start()
    print(f"ready {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cert", type=Path, required=True, help="server certificate (PEM)")
    parser.add_argument("--key", type=Path, required=True, help="server key (PEM)")
    parser.add_argument("--ca", type=Path, required=True, help="CA of the client certificates")
    parser.add_argument(
        "--reply-bytes", type=int, default=0, help="answer with this many bytes (0: all)"
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any)")
    args = parser.parse_args(argv)
    asyncio.run(
        serve(
            args.cert.read_bytes(),
            args.key.read_bytes(),
            args.ca.read_bytes(),
            args.reply_bytes,
            args.port,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
