"""The Query service (DESIGN.md flow 3) for operators, over mTLS.

Messages are converted at the edge (verifier/wire_query.py); ListDevices' filters and paging
are the database's (verifier/storage ``DeviceQuery``), one query per page."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import Any

import grpc

from devtrust.v1 import common_pb2, query_pb2, query_pb2_grpc
from devtrust.verifier import wire, wire_query
from devtrust.verifier.errors import FailedPrecondition, NotFound
from devtrust.verifier.identity import peer_identity
from devtrust.verifier.policy import PolicyError, PolicyHolder
from devtrust.verifier.settings import QuerySettings
from devtrust.verifier.storage import Repositories

logger = logging.getLogger(__name__)
Clock = Callable[[], datetime.datetime]
Context = grpc.aio.ServicerContext[Any, Any]


class QueryService(query_pb2_grpc.QueryServicer):
    def __init__(
        self,
        *,
        repos: Repositories,
        settings: QuerySettings,
        clock: Clock,
        policy: PolicyHolder | None = None,
    ) -> None:
        self._policy = policy or PolicyHolder(None)
        self._repos = repos
        self._settings = settings
        self._clock = clock

    def _operator(self, context: Context) -> str:
        return peer_identity(context, trust_domain=self._settings.trust_domain, kind="operator")

    async def GetDevice(
        self, request: query_pb2.GetDeviceRequest, context: Context
    ) -> common_pb2.Device:
        self._operator(context)
        device_id = wire_query.device_id_from_wire(request)
        rec = await self._repos.devices.get(device_id)
        if rec is None:
            raise NotFound(f"no device {device_id!r}")
        result = await self._repos.trust.latest(rec.device_id)
        return wire.device_to_wire(rec, result.at(self._clock()) if result else None)

    async def GetTrustScore(
        self, request: query_pb2.GetTrustScoreRequest, context: Context
    ) -> common_pb2.TrustResult:
        self._operator(context)
        device_id = wire_query.device_id_from_wire(request)
        if await self._repos.devices.get(device_id) is None:
            raise NotFound(f"no device {device_id!r}")
        result = await self._repos.trust.latest(device_id)
        return wire_query.trust_score_to_wire(
            device_id, result.at(self._clock()) if result else None
        )

    async def ListDevices(
        self, request: query_pb2.ListDevicesRequest, context: Context
    ) -> query_pb2.ListDevicesResponse:
        self._operator(context)
        now = self._clock()
        query = wire_query.device_query_from_wire(request, now=now)
        views = await self._repos.devices.list_with_trust(query)
        full = len(views) == query.limit  # there may be more: the client asks from the last
        return wire_query.devices_page_to_wire(
            [(v.record, v.result.at(now) if v.result else None) for v in views],
            next_page_token=views[-1].record.device_id if full else "",
        )

    async def ReloadPolicy(
        self, request: query_pb2.ReloadPolicyRequest, context: Context
    ) -> query_pb2.ReloadPolicyResponse:
        operator = self._operator(context)
        try:
            policy = self._policy.reload()
        except PolicyError as exc:
            raise FailedPrecondition(f"policy refused, the old one stays: {exc}") from exc
        if policy is None:
            raise FailedPrecondition("this verifier has no policy file configured")
        logger.info("policy %s reloaded by operator %s", policy.policy_id, operator)
        return wire_query.policy_reloaded_to_wire(policy)
