"""The Query service (DESIGN.md flow 3) for operators, over mTLS."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import Any

import grpc

from devtrust.v1 import common_pb2, query_pb2, query_pb2_grpc
from devtrust.verifier import wire
from devtrust.verifier.config import VerifierConfig
from devtrust.verifier.errors import FailedPrecondition, MalformedInput, NotFound
from devtrust.verifier.identity import peer_identity
from devtrust.verifier.policy import PolicyError, PolicyHolder
from devtrust.verifier.store import Store
from devtrust.verifier.trust import Tier

logger = logging.getLogger(__name__)
Clock = Callable[[], datetime.datetime]
MAX_PAGE = 500


class QueryService(query_pb2_grpc.QueryServicer):
    def __init__(
        self,
        *,
        store: Store,
        config: VerifierConfig,
        clock: Clock,
        policy: PolicyHolder | None = None,
    ) -> None:
        self._policy = policy or PolicyHolder(None)
        self._store = store
        self._config = config
        self._clock = clock

    def _operator(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        return peer_identity(context, trust_domain=self._config.trust_domain, kind="operator")

    async def GetDevice(
        self,
        request: query_pb2.GetDeviceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> common_pb2.Device:
        self._operator(context)
        rec = self._store.get_device(request.device_id)
        if rec is None:
            raise NotFound(f"no device {request.device_id!r}")
        result = self._store.latest_result(rec.device_id)
        return wire.device_to_wire(rec, result.at(self._clock()) if result else None)

    async def GetTrustScore(
        self,
        request: query_pb2.GetTrustScoreRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> common_pb2.TrustResult:
        self._operator(context)
        if self._store.get_device(request.device_id) is None:
            raise NotFound(f"no device {request.device_id!r}")
        result = self._store.latest_result(request.device_id)
        if result is None:
            return common_pb2.TrustResult(device_id=request.device_id, tier=common_pb2.TIER_NONE)
        return wire.result_to_wire(result.at(self._clock()))

    async def ListDevices(
        self,
        request: query_pb2.ListDevicesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> query_pb2.ListDevicesResponse:
        self._operator(context)
        now = self._clock()
        size = min(request.page_size or 100, MAX_PAGE)
        want_tier = wire.TIERS_FROM_WIRE.get(request.tier) if request.tier else None
        if request.tier and want_tier is None:
            raise MalformedInput(f"ListDevicesRequest.tier: unknown value {request.tier}")
        out = query_pb2.ListDevicesResponse()
        after = request.page_token
        while len(out.devices) < size:
            batch = self._store.list_devices(zone=request.zone, after=after, limit=size)
            if not batch:
                break
            for rec in batch:
                after = rec.device_id
                if any(rec.labels.get(k) != v for k, v in request.labels.items()):
                    continue
                stored = self._store.latest_result(rec.device_id)
                result = stored.at(now) if stored else None
                tier = result.tier if result else Tier.NONE
                if want_tier is not None and tier is not want_tier:
                    continue
                if request.stale_only and not (stored is None or now >= stored.expires_at):
                    continue
                out.devices.append(wire.device_to_wire(rec, result))
                if len(out.devices) == size:
                    out.next_page_token = rec.device_id
                    break
        return out

    async def ReloadPolicy(
        self,
        request: query_pb2.ReloadPolicyRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> query_pb2.ReloadPolicyResponse:
        operator = self._operator(context)
        try:
            policy = self._policy.reload()
        except PolicyError as exc:
            raise FailedPrecondition(f"policy refused, the old one stays: {exc}") from exc
        if policy is None:
            raise FailedPrecondition("this verifier has no policy file configured")
        logger.info("policy %s reloaded by operator %s", policy.policy_id, operator)
        return query_pb2.ReloadPolicyResponse(
            policy_id=policy.policy_id, rules=len(policy.rules), source=policy.source
        )
