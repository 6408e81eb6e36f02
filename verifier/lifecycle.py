"""What operators do to a device, as one pure transition: (standing, action) -> (new
standing, audit events). The Query service's Approve, SetZone and Revoke (what ``devtrust
approve``, ``zone`` and ``revoke`` send) compute their change here and only then write it
(``storage.Operations.apply``, a compare-and-set naming the actor), so the rules are the same
whichever way an operator comes in, and testable without a database.

The rules:

- a pending device is approved (state enrolled), optionally with a zone and labels; an
  enrolled device is not approved again, but approve may still assign it a zone or labels;
- a revoked device stays revoked: it is neither approved, nor moved, nor revoked again;
- a device the enrollment inventory lists keeps the inventory's zone and labels
  (verifier/inventory.py: the inventory wins over every other assignment);
- zones and labels are checked as the inventory and bootstrap tokens check them;
- a change of zone (``Transition.zone_changed``) revokes the device's live device
  certificates, whose claims name the old zone (a change of labels alone does not: they are
  not in the certificate); the device keeps its enrollment.

Events keep the names the audit has always had: ``assigned:approval`` (with the zone and
labels the device had) and ``approved`` (its new state); SetZone writes
``assigned:operator``; Revoke ``revoked`` with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from devtrust.core.ids import DeviceId
from devtrust.verifier.errors import FailedPrecondition, MalformedInput
from devtrust.verifier.inventory import Inventory, labels_problem, zone_problem
from devtrust.verifier.logtext import printable
from devtrust.verifier.records import AuditEvent, DeviceRecord, DeviceState, Standing

MAX_REASON = 256


@dataclass(frozen=True)
class Approve:
    """Let a pending device attest; ``zone``/``labels`` None: unchanged (given labels
    replace all of them)."""

    zone: str | None = None
    labels: dict[str, str] | None = None

    @property
    def assigns(self) -> bool:
        return self.zone is not None or self.labels is not None


@dataclass(frozen=True)
class SetZone:
    """Move a device to ``zone`` with exactly ``labels``."""

    zone: str
    labels: dict[str, str]


@dataclass(frozen=True)
class Revoke:
    """The device can no longer attest, enroll again or renew."""

    reason: str


Action: TypeAlias = Approve | SetZone | Revoke


@dataclass(frozen=True)
class Transition:
    before: Standing
    after: Standing
    # In the order they are written; none: nothing to write.
    events: tuple[AuditEvent, ...]

    @property
    def approved(self) -> bool:
        return self.before.state is DeviceState.PENDING_APPROVAL and (
            self.after.state is DeviceState.ENROLLED
        )

    @property
    def assigned(self) -> bool:
        return any(e.event.startswith("assigned:") for e in self.events)

    @property
    def zone_changed(self) -> bool:
        """The device's zone moves: its live device certificates name the old one in
        their claims, so whoever writes this revokes them (labels are not in them)."""
        return self.assigned and self.before.zone != self.after.zone


def standing(record: DeviceRecord) -> Standing:
    return Standing(state=record.state, zone=record.zone, labels=dict(record.labels))


def pinned_by(inventory: Inventory | None, device_id: DeviceId) -> str | None:
    """What pins the device's zone and labels so that no operator change may move them
    (the inventory, when it lists the device), as a message names it; None: nothing."""
    listed = inventory.get(device_id) if inventory is not None else None
    if inventory is None or listed is None:
        return None
    return f"the inventory {inventory.path} (zone {listed.zone})"


def reason_problem(reason: str) -> str | None:
    if not reason.strip():
        return "a revocation needs a reason (it is kept in the audit and on the feed)"
    if len(reason) > MAX_REASON or printable(reason, MAX_REASON + 1) != reason:
        return f"the reason must be up to {MAX_REASON} printable characters"
    return None


def _check_assignment(zone: str, labels: dict[str, str]) -> None:
    problem = zone_problem(zone) or labels_problem(labels)
    if problem is not None:
        raise MalformedInput(problem)


def _assignment(
    device_id: DeviceId,
    before: Standing,
    assigned: tuple[str, dict[str, str]],
    *,
    event: str,
    pinned: str | None,
) -> tuple[Standing, AuditEvent]:  # fmt: skip
    zone, labels = assigned
    _check_assignment(zone, labels)
    if pinned is not None:
        raise FailedPrecondition(
            f"device {device_id} is listed in {pinned}, which wins over approval: change it "
            "there and restart the verifier"
        )
    after = Standing(state=before.state, zone=zone, labels=labels)
    was = {"zone": before.zone, "labels": before.labels}
    return after, AuditEvent(event, {"zone": zone, "labels": labels, "was": was})


def transition(
    device_id: DeviceId, before: Standing, action: Action, *, pinned: str | None = None
) -> Transition:
    """The device's standing after ``action`` and the audit events that record it.
    ``pinned``: what pins its zone and labels (``pinned_by``). Raises FailedPrecondition
    when the device's state does not allow the action, MalformedInput for a zone, labels
    or reason that is not one."""
    match action:
        case Approve():
            pending = before.state is DeviceState.PENDING_APPROVAL
            if before.state is DeviceState.REVOKED or not (pending or action.assigns):
                raise FailedPrecondition(
                    f"device {device_id} is {before.state.value}, not pending approval"
                )
            after, events = before, []
            if action.assigns:
                zone = before.zone if action.zone is None else action.zone
                labels = before.labels if action.labels is None else action.labels
                after, event = _assignment(
                    device_id,
                    before,
                    (zone, dict(labels)),
                    event="assigned:approval",
                    pinned=pinned,
                )
                events.append(event)
            if pending:
                after = Standing(DeviceState.ENROLLED, after.zone, after.labels)
                events.append(AuditEvent("approved", {"state": DeviceState.ENROLLED.value}))
            return Transition(before, after, tuple(events))
        case SetZone():
            if before.state is DeviceState.REVOKED:
                raise FailedPrecondition(f"device {device_id} is revoked: it is not moved")
            if (action.zone, action.labels) == (before.zone, before.labels):
                _check_assignment(action.zone, action.labels)
                return Transition(before, before, ())
            assigned = (action.zone, dict(action.labels))
            after, event = _assignment(
                device_id, before, assigned, event="assigned:operator", pinned=pinned
            )
            return Transition(before, after, (event,))
        case Revoke():
            problem = reason_problem(action.reason)
            if problem is not None:
                raise MalformedInput(problem)
            if before.state is DeviceState.REVOKED:
                raise FailedPrecondition(f"device {device_id} is revoked already")
            after = Standing(DeviceState.REVOKED, before.zone, before.labels)
            detail = {"state": DeviceState.REVOKED.value, "reason": action.reason}
            return Transition(before, after, (AuditEvent("revoked", detail),))
