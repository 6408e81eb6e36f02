"""The Revocations service for relying parties (issue 10, item 3): the revocation feed and
the device issuing CA's CRL, both as verifier/revocation.py keeps them. Who may call it is
the authorization table's (relying parties and every operator role); its messages are
converted in verifier/wire_revocation.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from devtrust.v1 import query_pb2, query_pb2_grpc
from devtrust.verifier import wire_revocation
from devtrust.verifier.revocation import Revoker

Context = grpc.aio.ServicerContext[Any, Any]


class RevocationService(query_pb2_grpc.RevocationsServicer):
    def __init__(self, revoker: Revoker) -> None:
        self._revoker = revoker

    async def WatchRevocations(
        self, request: query_pb2.WatchRevocationsRequest, context: Context
    ) -> AsyncIterator[query_pb2.RevocationEvent]:
        # A subscriber that falls behind ends with RESOURCE_EXHAUSTED (the interceptor maps
        # the error) and subscribes again for a fresh snapshot.
        async for entry in self._revoker.subscribe():
            yield wire_revocation.revocation_event_to_wire(entry)

    async def GetCrl(self, request: query_pb2.GetCrlRequest, context: Context) -> query_pb2.Crl:
        return wire_revocation.crl_to_wire(self._revoker.crl)
