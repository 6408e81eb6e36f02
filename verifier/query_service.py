"""The Query service (DESIGN.md flow 3) for operators, over mTLS.

Who may call which method is verifier/authz.py's table, enforced by its interceptor before
any method here runs; a method reads the caller it authorized (``current_caller``) to name
it in the audit, and refuses when there is none. Messages are converted at the edge
(verifier/wire_query.py); ListDevices' filters and paging are the database's
(verifier/storage ``DeviceQuery``), one query per page, and so are History's. Approve and
SetZone are verifier/lifecycle.py's transitions, written as a compare-and-set naming the
operator (a change of zone then revokes the device's live certificates through the revoker,
as their claims name the old zone); Revoke is the revoker's (verifier/revocation.py): the
device's state, its live certificates and the feed at once. GetEar is the latest result as
an EAR (verifier/ear.py), signed on request with the key of ``ear.signing_key``, read when
first needed (a verifier set up before EARs existed serves everything else) and again when
its files change.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

import grpc

from devtrust.core.errors import ConfigError
from devtrust.core.ids import DeviceId, Serial
from devtrust.v1 import common_pb2, query_pb2, query_pb2_grpc
from devtrust.verifier import ear, lifecycle, wire, wire_query
from devtrust.verifier.authz import Caller, Who, current_caller
from devtrust.verifier.ca import CertificateAuthority
from devtrust.verifier.config import EarConfig
from devtrust.verifier.errors import FailedPrecondition, NotFound, Unauthenticated
from devtrust.verifier.inventory import Inventory
from devtrust.verifier.pki import load_ear_signer, operator_certificate
from devtrust.verifier.policy import Policy, PolicyError, PolicyHolder
from devtrust.verifier.records import DeviceRecord
from devtrust.verifier.roles import Role
from devtrust.verifier.settings import QuerySettings
from devtrust.verifier.storage import DeviceQuery, Repositories
from devtrust.verifier.watch import TrustChange, TrustWatch, WatchFilter

logger = logging.getLogger(__name__)
Clock = Callable[[], datetime.datetime]
Context = grpc.aio.ServicerContext[Any, Any]
# A change computed from a device that changed meanwhile is computed again, this often.
ATTEMPTS = 3
INITIAL_PAGE = 500


class DeviceRevoker(Protocol):
    """verifier/revocation.py's ``Revoker``, as Revoke uses it."""

    async def revoke(
        self, device_id: DeviceId, *, reason: str, actor: str, now: datetime.datetime
    ) -> list[Serial]: ...

    async def zone_changed(
        self, device_id: DeviceId, *, was: str, zone: str, actor: str, now: datetime.datetime
    ) -> list[Serial]: ...


class QueryService(query_pb2_grpc.QueryServicer):
    def __init__(
        self,
        *,
        repos: Repositories,
        settings: QuerySettings,
        clock: Clock,
        policy: PolicyHolder | None = None,
        watch: TrustWatch | None = None,
        revoker: DeviceRevoker | None = None,
        inventory: Inventory | None = None,
        operators: Mapping[str, Role] | None = None,
        ca: CertificateAuthority | None = None,
        reload: Callable[..., Awaitable[Policy | None]] | None = None,
        ear_keys: EarConfig | None = None,
    ) -> None:
        # GetEar's signing key and certificate (`ear:`); None: signed EARs are refused.
        self._ear_keys = ear_keys
        self._ear_signer: tuple[tuple[int, ...], ear.EarSigner] | None = None
        # Signs IssueOperatorCertificate's certificates; None: that method is refused.
        self._ca = ca
        # ReloadPolicy's reload (keyword ``actor``): this replica's files, published to the
        # database for the other replicas (verifier/policy_store.py); None: the holder's.
        self._reload = reload
        # The configuration's `operators:`: SetRole leaves these names alone.
        self._operators = dict(operators or {})
        self._policy = policy or PolicyHolder(None)
        self._repos = repos
        self._settings = settings
        self._clock = clock
        self._watch = watch or TrustWatch()
        self._revoker = revoker
        self._inventory = inventory

    @staticmethod
    def _operator() -> Caller:
        caller = current_caller()
        if caller.who is not Who.OPERATOR:
            raise Unauthenticated("the Query service answers operator identities only")
        return caller

    async def _device(self, device_id: DeviceId) -> DeviceRecord:
        rec = await self._repos.devices.get(device_id)
        if rec is None:
            raise NotFound(f"no device {device_id!r}")
        return rec

    async def _device_to_wire(self, rec: DeviceRecord) -> common_pb2.Device:
        result = await self._repos.trust.latest(rec.device_id)
        return wire.device_to_wire(rec, result.at(self._clock()) if result else None)

    async def GetDevice(
        self, request: query_pb2.GetDeviceRequest, context: Context
    ) -> common_pb2.Device:
        self._operator()
        return await self._device_to_wire(
            await self._device(wire_query.device_id_from_wire(request))
        )

    async def GetTrustScore(
        self, request: query_pb2.GetTrustScoreRequest, context: Context
    ) -> common_pb2.TrustResult:
        self._operator()
        device_id = wire_query.device_id_from_wire(request)
        await self._device(device_id)
        result = await self._repos.trust.latest(device_id)
        return wire_query.trust_score_to_wire(
            device_id, result.at(self._clock()) if result else None
        )

    async def GetEar(self, request: query_pb2.GetEarRequest, context: Context) -> query_pb2.Ear:
        self._operator()
        device_id, signed = wire_query.ear_request_from_wire(request)
        await self._device(device_id)
        result = await self._repos.trust.latest(device_id)
        now = self._clock()
        verifier_id = ear.VerifierId()
        if result is None:
            claims = ear.unappraised_claims(device_id, verifier_id=verifier_id, now=now)
        else:
            claims = ear.ear_claims(result.at(now), verifier_id=verifier_id, now=now)
        token = ear.sign_ear(claims, self._signer()) if signed else ""
        return wire_query.ear_to_wire(ear.ear_json(claims), token)

    def _signer(self) -> ear.EarSigner:
        """The EAR signing key, read again when either file changed (a key made by a later
        `init`, or replaced); FAILED_PRECONDITION naming the file while it cannot be read."""
        keys = self._ear_keys
        if keys is None:
            raise FailedPrecondition(
                "this verifier has no EAR signing key configured (ear.signing_key, "
                "ear.signing_cert): ask for the EAR unsigned"
            )
        try:
            stamp: tuple[int, ...] | None = tuple(
                n for p in (keys.signing_key, keys.signing_cert) for n in _stamp(p.stat())
            )
        except OSError:
            stamp = None  # load_ear_signer words it
        if stamp is not None and self._ear_signer is not None and self._ear_signer[0] == stamp:
            return self._ear_signer[1]
        try:
            signer = load_ear_signer(
                keys.signing_key, keys.signing_cert, ca=self._ca.cert if self._ca else None
            )
        except ConfigError as exc:
            logger.warning("signed EAR refused: %s", exc)
            raise FailedPrecondition(
                f"cannot sign the EAR with ear.signing_key ({keys.signing_key}) and "
                f"ear.signing_cert ({keys.signing_cert}): {exc}"
            ) from None
        if stamp is not None:
            self._ear_signer = (stamp, signer)
        return signer

    async def ListDevices(
        self, request: query_pb2.ListDevicesRequest, context: Context
    ) -> query_pb2.ListDevicesResponse:
        self._operator()
        now = self._clock()
        query = wire_query.device_query_from_wire(request, now=now)
        views = await self._repos.devices.list_with_trust(query)
        full = len(views) == query.limit  # there may be more: the client asks from the last
        return wire_query.devices_page_to_wire(
            [(v.record, v.result.at(now) if v.result else None) for v in views],
            next_page_token=views[-1].record.device_id if full else "",
        )

    async def WatchTrust(
        self, request: query_pb2.WatchTrustRequest, context: Context
    ) -> AsyncIterator[query_pb2.TrustChange]:
        """Subscribed before the initial results are read, so nothing changed between is
        missed (a device may come twice: its current result, then the change)."""
        caller = self._operator()
        where = wire_query.watch_filter_from_wire(request)
        subscription = self._watch.subscribe(where)
        logger.info("trust watch opened by %s", caller.actor)
        try:
            if where.initial:
                async for first in self._initial(where):
                    yield wire_query.trust_change_to_wire(first)
            while (change := await subscription.next()) is not None:
                yield wire_query.trust_change_to_wire(change)
        finally:
            subscription.close()

    async def _initial(self, where: WatchFilter) -> AsyncIterator[TrustChange]:
        """The current result of each device the filter matches, the last one marked (a
        marker alone when none matches), read a page at a time."""
        now = self._clock()
        held: TrustChange | None = None
        after = ""
        while True:
            if where.device_id is not None:
                rec = await self._repos.devices.get(where.device_id)
                found = [rec] if rec is not None and where.matches(rec.device_id, rec.zone) else []
                views = [(r, await self._repos.trust.latest(r.device_id)) for r in found]
            else:
                query = DeviceQuery(zone=where.zone, after=after, limit=INITIAL_PAGE)
                views = [
                    (v.record, v.result) for v in await self._repos.devices.list_with_trust(query)
                ]
            for rec, result in views:
                if held is not None:
                    yield held
                current = result.at(now) if result else None
                tier = current.tier if current else None
                held = TrustChange(rec.device_id, rec.zone, tier, current)
            if where.device_id is not None or len(views) < INITIAL_PAGE:
                break
            after = views[-1][0].device_id
        if held is None:
            yield TrustChange(None, where.zone, None, None, end_of_initial=True)
        else:
            yield TrustChange(held.device_id, held.zone, held.previous_tier, held.result, True)

    async def History(
        self, request: query_pb2.HistoryRequest, context: Context
    ) -> query_pb2.HistoryResponse:
        self._operator()
        page = wire_query.history_from_wire(request)
        await self._device(page.device_id)
        items = await self._repos.operations.history(
            page.device_id, before_seq=page.before_seq, limit=page.limit
        )
        return wire_query.history_to_wire(items, full=len(items) == page.limit)

    async def _change(self, device_id: DeviceId, action: lifecycle.Action) -> DeviceRecord:
        """Apply an operator's action: computed from the device as it is, written only if
        it is still so (another change meanwhile: computed again)."""
        caller = self._operator()
        pinned = lifecycle.pinned_by(self._inventory, device_id)
        for _ in range(ATTEMPTS):
            rec = await self._device(device_id)
            change = lifecycle.transition(device_id, lifecycle.standing(rec), action, pinned=pinned)
            if not change.events:
                return rec
            if change.zone_changed and self._revoker is None:
                raise FailedPrecondition(
                    "this verifier has no revoker configured to revoke the certificates "
                    "naming the old zone"
                )
            if await self._repos.operations.apply(
                device_id,
                before=change.before,
                after=change.after,
                events=change.events,
                actor=caller.actor,
                now=self._clock(),
            ):
                logger.info(
                    "device %s: %s by %s",
                    device_id,
                    ", ".join(e.event for e in change.events),
                    caller.actor,
                )
                if change.zone_changed and self._revoker is not None:
                    serials = await self._revoker.zone_changed(
                        device_id,
                        was=change.before.zone,
                        zone=change.after.zone,
                        actor=caller.actor,
                        now=self._clock(),
                    )
                    logger.info(
                        "device %s moved by %s: %d live certificates revoked",
                        device_id,
                        caller.actor,
                        len(serials),
                    )
                return await self._device(device_id)
        raise FailedPrecondition(
            f"device {device_id} changed {ATTEMPTS} times while this change was made: retry"
        )

    async def Approve(
        self, request: query_pb2.ApproveRequest, context: Context
    ) -> common_pb2.Device:
        device_id, action = wire_query.approve_from_wire(request)
        return await self._device_to_wire(await self._change(device_id, action))

    async def SetZone(
        self, request: query_pb2.SetZoneRequest, context: Context
    ) -> common_pb2.Device:
        device_id, action = wire_query.set_zone_from_wire(request)
        return await self._device_to_wire(await self._change(device_id, action))

    async def Revoke(
        self, request: query_pb2.RevokeRequest, context: Context
    ) -> query_pb2.RevokeResponse:
        caller = self._operator()
        device_id, action = wire_query.revoke_from_wire(request)
        rec = await self._device(device_id)
        # Refused here as the lifecycle refuses it (revoked already), before the revoker.
        lifecycle.transition(device_id, lifecycle.standing(rec), action)
        if self._revoker is None:
            raise FailedPrecondition("this verifier has no revoker configured")
        serials = await self._revoker.revoke(
            device_id, reason=action.reason, actor=caller.actor, now=self._clock()
        )
        logger.info(
            "device %s revoked by %s: %d live certificates", device_id, caller.actor, len(serials)
        )
        rec = await self._device(device_id)
        result = await self._repos.trust.latest(device_id)
        return wire_query.revoked_to_wire(
            rec, result.at(self._clock()) if result else None, serials
        )

    async def ReloadPolicy(
        self, request: query_pb2.ReloadPolicyRequest, context: Context
    ) -> query_pb2.ReloadPolicyResponse:
        caller = self._operator()
        try:
            if self._reload is not None:
                policy = await self._reload(actor=caller.actor)
            else:
                policy = self._policy.reload()
        except PolicyError as exc:
            raise FailedPrecondition(f"policy refused, the old one stays: {exc}") from exc
        if policy is None:
            raise FailedPrecondition("this verifier has no policy file configured")
        logger.info("policy %s reloaded by %s", policy.policy_id, caller.actor)
        return wire_query.policy_reloaded_to_wire(policy)

    async def GetStoredEvidence(
        self, request: query_pb2.GetStoredEvidenceRequest, context: Context
    ) -> query_pb2.StoredEvidence:
        self._operator()
        device_id = wire_query.device_id_from_wire(request)
        rec = await self._device(device_id)
        state = await self._repos.trust.tpm_state(device_id)
        if state is None:
            raise NotFound(f"no appraised evidence for device {device_id}")
        log, count = None, 0
        if state.log is not None:  # the stored parts make up the log it replayed
            log, count = await self._repos.trust.event_log(device_id), state.log.event_count
        return wire_query.stored_evidence_to_wire(rec, state.pcrs, log, count)

    async def CreateBootstrapToken(
        self, request: query_pb2.CreateBootstrapTokenRequest, context: Context
    ) -> query_pb2.BootstrapToken:
        caller = self._operator()
        wanted = wire_query.token_request_from_wire(request)
        token = secrets.token_urlsafe(32)
        now = self._clock()
        expires = now + wanted.ttl
        await self._repos.tokens.add(
            hashlib.sha256(token.encode()).hexdigest(),
            now=now,
            expires_at=expires,
            note=wanted.note,
            zone=wanted.zone,
            labels=wanted.labels,
        )
        logger.info(
            "bootstrap token created by %s: zone %s, until %s",
            caller.actor,
            wanted.zone or "(unassigned)",
            expires.isoformat(),
        )
        return wire_query.token_to_wire(token, expires_at=expires, request=wanted)

    async def SetRole(
        self, request: query_pb2.SetRoleRequest, context: Context
    ) -> query_pb2.SetRoleResponse:
        caller = self._operator()
        name, role = wire_query.role_from_wire(request)
        listed = self._operators.get(name)
        if listed is not None:
            if role is not None and role == listed:
                return wire_query.role_set_to_wire(name, role, listed.label)
            raise FailedPrecondition(
                f"operator {name}'s role is set in the verifier's configuration (operators: "
                f"{name}: {listed.label}), which wins over the database: change it there and "
                "restart the verifier"
            )
        was = await self._repos.roles.set(
            name, role.label if role else None, now=self._clock(), actor=caller.actor
        )
        shown = role.label if role else "none"
        logger.info("operator %s: role %s by %s", name, shown, caller.actor)
        return wire_query.role_set_to_wire(name, role, was)

    async def IssueOperatorCertificate(
        self, request: query_pb2.IssueOperatorCertificateRequest, context: Context
    ) -> query_pb2.IssueOperatorCertificateResponse:
        caller = self._operator()
        wanted = wire_query.operator_request_from_wire(request)
        if wanted.name in self._operators:
            listed = self._operators[wanted.name]
            raise FailedPrecondition(
                f"operator {wanted.name} is listed in the verifier's configuration (operators: "
                f"{wanted.name}: {listed.label}): its certificate comes from "
                "`devtrust-verifier operator` on the verifier's host"
            )
        if self._ca is None:
            raise FailedPrecondition("this verifier issues no operator certificates")
        now = self._clock()
        cert = operator_certificate(
            self._ca,
            name=wanted.name,
            trust_domain=self._settings.trust_domain,
            public_key=wanted.public_key,
            now=now,
        )
        was = await self._repos.roles.set(
            wanted.name, wanted.role.label, now=now, actor=caller.actor
        )
        logger.info(
            "operator %s: certificate serial %x, role %s, by %s",
            wanted.name,
            cert.serial_number,
            wanted.role.label,
            caller.actor,
        )
        return wire_query.operator_certificate_to_wire(wanted, cert, was)


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns
