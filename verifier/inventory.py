"""Zones and labels: assigned by an operator, never claimed by the device (issue 7, item 4).

A device's zone selects policy rules and reference values and is written into its device
certificate, where relying parties gate on it; its labels select rules and reference groups.
So neither comes from the device: the zone and labels in ``EnrollRequest.host`` are kept only
as ``claimed_zone`` and ``claimed_labels`` in the stored host facts, for operators to compare,
and a claim that differs from the assignment is logged at INFO.

Where a device's zone and labels come from, the first that applies wins:

1. the inventory (``enrollment.inventory``), when it lists the device;
2. the zone and labels already pinned on the device record: a re-enrollment keeps them;
3. the bootstrap token of the device's first enrollment (``devtrust token create
   --zone Z --label K=V``);
4. unassigned: zone ``""``, no labels.

Pinned: a re-enrollment of a known device (same EK) never changes its zone or labels, with or
without ``require_approval``. One that presents an unspent bootstrap token naming another zone,
or labels other than the pinned ones, is refused (PERMISSION_DENIED naming the device, the
pinned zone and the token's), not silently ignored, so the operator who made the token learns
that it did not do what it says. Operators change a device's zone and labels with
``devtrust approve DEVICE --zone Z --label K=V`` or in the inventory (applied when the
verifier starts); both are written to the audit table.

The inventory file is a YAML mapping from device id (sha256 of the EK's SubjectPublicKeyInfo,
hex) to ``{zone: Z, labels: {K: V}}``; it is validated whole when the verifier starts, and any
error stops the verifier with one line naming the file, the line and the device.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from devtrust.core.errors import ConfigError
from devtrust.core.ids import DeviceId, parse_device_id
from devtrust.verifier.config import clip
from devtrust.verifier.errors import Rejected
from devtrust.verifier.storage.interfaces import Devices

ZONE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
LABEL_VALUE_RE = re.compile(r"[!-~]{0,128}")  # printable ASCII, no spaces
MAX_LABELS = 64
# A bootstrap token's lifetime: long enough to image a host, short enough to matter.
TOKEN_TTL_S = (60, 30 * 24 * 3600)
DEFAULT_TOKEN_TTL_S = 24 * 3600
_ALNUM = re.compile(r"[A-Za-z0-9]")
_ZONE_CHAR = re.compile(r"[A-Za-z0-9._-]")
_LABEL_KEY_CHAR = re.compile(r"[A-Za-z0-9._/-]")
_LABEL_VALUE_CHAR = re.compile(r"[!-~]")
_ENTRY_KEYS = ("zone", "labels")


def _wrong(value: str, allowed: re.Pattern[str], limit: int) -> str:
    """What is wrong with ``value`` that ``allowed`` (one character) refuses: its length, or
    its first character not allowed."""
    if len(value) > limit:
        return f"it is {len(value)} characters long"
    for n, ch in enumerate(value):
        if not allowed.fullmatch(ch):
            return f"it has {ch!r} at position {n + 1}"
    return "it is empty"


def zone_problem(zone: str) -> str | None:
    if zone == "" or ZONE_RE.fullmatch(zone):
        return None
    wrong = _wrong(zone, _ZONE_CHAR if zone[:1].isalnum() and zone.isascii() else _ALNUM, 63)
    return (
        f"zone {clip(zone)} is not 1-63 of letters, digits, '.', '_', '-' (starting "
        f"alphanumeric): {wrong}"
    )


def labels_problem(labels: Mapping[str, str]) -> str | None:
    if len(labels) > MAX_LABELS:
        return f"{len(labels)} labels, more than {MAX_LABELS}"
    for key, value in labels.items():
        if not LABEL_KEY_RE.fullmatch(key):
            first = key[:1].isascii() and key[:1].isalnum()
            wrong = _wrong(key, _LABEL_KEY_CHAR if first else _ALNUM, 63)
            return (
                f"label key {clip(key)} is not 1-63 of letters, digits, '.', '_', '/', '-' "
                f"(starting alphanumeric): {wrong}"
            )
        if not LABEL_VALUE_RE.fullmatch(value):
            wrong = _wrong(value, _LABEL_VALUE_CHAR, 128)
            return (
                f"label {key}: value {clip(value)} is not up to 128 printable ASCII "
                f"characters other than space: {wrong}"
            )
    return None


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """``["K=V", ...]`` from the command line; ValueError naming the bad one."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--label takes KEY=VALUE, got {clip(item)}")
        labels[key] = value
    problem = labels_problem(labels)
    if problem is not None:
        raise ValueError(problem)
    return labels


def _shown(zone: str) -> str:
    return repr(zone) if zone else "(unassigned)"


@dataclass(frozen=True)
class Assignment:
    """A device's zone and labels, and where they came from."""

    zone: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    source: str = "unassigned"  # inventory, device, token, approval, unassigned

    @property
    def assigns(self) -> bool:
        return bool(self.zone or self.labels)

    def same(self, zone: str, labels: Mapping[str, str]) -> bool:
        return self.zone == zone and dict(self.labels) == dict(labels)


UNASSIGNED = Assignment()


def resolve(
    *,
    device_id: DeviceId,
    listed: Assignment | None,
    pinned: Assignment | None,
    token: Assignment | None,
) -> Assignment:
    """The zone and labels a device enrolls with (precedence in the module docstring).

    ``listed``: the inventory's entry; ``pinned``: the known device's record (None on a first
    enrollment); ``token``: what an unspent bootstrap token assigns (None when there is none,
    or when this device spent it already). Raises Rejected when a re-enrollment's token would
    move a pinned device that the inventory does not list."""
    if listed is not None:
        return listed
    if pinned is not None:
        if token is not None and token.assigns:
            other_zone = token.zone != pinned.zone
            other_labels = bool(token.labels) and dict(token.labels) != dict(pinned.labels)
            if other_zone or other_labels:
                what = (
                    f"zone {_shown(token.zone)}"
                    if other_zone
                    else f"labels {dict(sorted(token.labels.items()))}"
                )
                raise Rejected(
                    f"device {device_id} is pinned to zone {_shown(pinned.zone)} with labels "
                    f"{dict(sorted(pinned.labels.items()))}; its bootstrap token assigns {what}. "
                    "A re-enrollment cannot change a device's zone or labels: an operator "
                    f"changes them with `devtrust approve {device_id} --zone Z "
                    "[--label K=V]` or in the enrollment inventory"
                )
        return pinned
    if token is not None and token.assigns:
        return token
    return UNASSIGNED


@dataclass(frozen=True)
class Inventory:
    path: Path | None
    devices: dict[DeviceId, Assignment]

    def get(self, device_id: DeviceId) -> Assignment | None:
        return self.devices.get(device_id)

    @classmethod
    def load(cls, path: Path) -> Inventory:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"inventory {path}: cannot read: {why}") from exc
        return cls(path=path, devices=parse_inventory(text, where=str(path)))


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _scalar(node: yaml.Node, where: str, what: str) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{where}:{_line(node)}: {what}: expected a plain value")
    if node.tag == "tag:yaml.org,2002:null":
        raise ConfigError(f"{where}:{_line(node)}: {what}: empty")
    return str(node.value)


def _entry(device_id: DeviceId, node: yaml.Node, where: str) -> Assignment:
    at = f"{where}:{_line(node)}: device {device_id}"
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{at}: expected a mapping with keys zone and labels")
    values: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        key = _scalar(key_node, where, f"device {device_id} key")
        if key not in _ENTRY_KEYS:
            raise ConfigError(
                f"{where}:{_line(key_node)}: device {device_id}: unknown key {key!r}; "
                f"known: {', '.join(_ENTRY_KEYS)}"
            )
        if key in values:
            raise ConfigError(f"{where}:{_line(key_node)}: device {device_id}: {key} given twice")
        values[key] = value_node
    if "zone" not in values:
        raise ConfigError(f"{at}: no zone")
    zone = _scalar(values["zone"], where, f"device {device_id} zone")
    problem = zone_problem(zone) if zone else "zone is empty"
    if problem is not None:
        raise ConfigError(f"{where}:{_line(values['zone'])}: device {device_id}: {problem}")
    labels: dict[str, str] = {}
    label_node = values.get("labels")
    if label_node is not None and not (
        isinstance(label_node, yaml.ScalarNode) and label_node.tag == "tag:yaml.org,2002:null"
    ):
        if not isinstance(label_node, yaml.MappingNode):
            raise ConfigError(
                f"{where}:{_line(label_node)}: device {device_id}: labels: expected a mapping"
            )
        for key_node, value_node in label_node.value:
            key = _scalar(key_node, where, f"device {device_id} label key")
            if key in labels:
                raise ConfigError(
                    f"{where}:{_line(key_node)}: device {device_id}: label {key} given twice"
                )
            labels[key] = _scalar(value_node, where, f"device {device_id} label {key}")
        problem = labels_problem(labels)
        if problem is not None:
            raise ConfigError(f"{where}:{_line(label_node)}: device {device_id}: {problem}")
    return Assignment(zone=zone, labels=labels, source="inventory")


def parse_inventory(text: str, *, where: str) -> dict[DeviceId, Assignment]:
    """Validate a whole inventory; ConfigError ``FILE:LINE: device ID: what is wrong``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"{mark.line + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}:{line} not valid YAML: {problem}") from exc
    if root is None or (isinstance(root, yaml.ScalarNode) and root.tag.endswith(":null")):
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(
            f"{where}:{_line(root)}: expected a mapping of device id -> {{zone, labels}}"
        )
    devices: dict[DeviceId, Assignment] = {}
    first_line: dict[DeviceId, int] = {}
    for key_node, value_node in root.value:
        raw = _scalar(key_node, where, "device id")
        try:
            device_id = parse_device_id(raw.lower())
        except ValueError:
            raise ConfigError(
                f"{where}:{_line(key_node)}: {raw!r} is not a device id (64 hex digits: "
                "sha256 of the EK's SubjectPublicKeyInfo)"
            ) from None
        if device_id in devices:
            raise ConfigError(
                f"{where}:{_line(key_node)}: device {device_id} is listed twice (first at line "
                f"{first_line[device_id]})"
            )
        devices[device_id] = _entry(device_id, value_node, where)
        first_line[device_id] = _line(key_node)
    return devices


async def apply_inventory(devices: Devices, inventory: Inventory, *, now: datetime.datetime) -> int:
    """Give every known device the inventory lists its inventory zone and labels (audited);
    the number of devices changed. Run when the verifier starts."""
    changed = 0
    for device_id, assignment in inventory.devices.items():
        record = await devices.get(device_id)
        if record is None or assignment.same(record.zone, record.labels):
            continue
        if await devices.set_assignment(
            device_id,
            zone=assignment.zone,
            labels=assignment.labels,
            now=now,
            event="assigned:inventory",
        ):
            changed += 1
    return changed
