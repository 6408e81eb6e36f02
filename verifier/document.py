"""The evidence document: what policy rules see. Pure: plain values in, plain values out.

The evidence body arrives as plain dicts and lists (converted at the gRPC edge,
verifier/wire_body.py ``plain``); every field is present, and a value the host could not read
is ``null`` (proto3 ``optional`` unset), never false. Derived fields are added here, from data
files an operator can update:

- ``gpu.branch`` (``R580``) and ``gpu.missing_bulletins``: the NVIDIA security bulletins
  whose fixed version for that branch is above the running driver;
- per GPU ``lost`` (any field read as "GPU is lost") and ``gsp_matches_driver``;
- ``sent``: whether the body carried each of host, os and gpu (a policy may require them).

Every integer is a CEL ``int``: a uint64 the host sends above 2**63 - 1 reads as 2**63 - 1
(a count that large is "very many" to a policy), since the CEL runtime would make it a
``uint``, and int and uint do not mix in arithmetic (``x + 1`` would fail on one host only).
The declared schema of the document is verifier/schema.py; ``unknown_values`` says which
values a rule read that were null or absent.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Document = dict[str, Any]
# What the host says of its own zone and labels: never part of the document (device.zone and
# device.labels are the operator-assigned ones; a rule naming host.zone is refused at load).
_CLAIMED_BY_HOST = ("zone", "labels")
# A driver version as NVIDIA writes them (580.105.08): digits and dots only.
_VERSION = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        # At most 18 digits: a device-sent "580.999...9" must not reach int()'s digit limit.
        digits = "".join(ch for ch in piece if ch.isdigit())[:18]
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@dataclass(frozen=True)
class Bulletin:
    bulletin: str
    title: str
    branch: str
    fixed: str
    cves: tuple[str, ...]
    max_cvss: float


@dataclass(frozen=True)
class Bulletins:
    """First fixed driver version per bulletin and branch (NVIDIA's security bulletins)."""

    entries: tuple[Bulletin, ...]
    source: str = ""

    @classmethod
    def load(cls, path: Path) -> Bulletins:
        entries = []
        with path.open(newline="") as fh:
            for n, row in enumerate(csv.DictReader(fh), start=2):
                try:
                    entries.append(
                        Bulletin(
                            bulletin=row["bulletin"],
                            title=row["title"],
                            branch=row["branch"],
                            fixed=row["fixed_versions"],
                            cves=tuple(row["cves"].split(";")),
                            max_cvss=float(row["max_cvss"] or 0),
                        )
                    )
                except (KeyError, ValueError) as exc:
                    raise ValueError(f"{path}:{n}: bad bulletin row: {exc}") from exc
        return cls(entries=tuple(entries), source=str(path))

    def missing(self, driver_version: str) -> list[Bulletin]:
        if not driver_version:
            return []
        branch = f"R{driver_version.split('.', 1)[0]}"
        running = version_tuple(driver_version)
        return [b for b in self.entries if b.branch == branch and running < version_tuple(b.fixed)]


def _nulled(part: dict[str, Any]) -> dict[str, Any]:
    """A copy where every field the host listed as unavailable is null: a string field that
    could not be read is unknown, not the empty string."""
    out = dict(part)
    for item in part.get("unavailable") or []:
        if item["field"] in out:
            out[item["field"]] = None
    return out


def build(
    body: Mapping[str, Any],
    *,
    bulletins: Bulletins,
    zone: str = "",
    labels: dict[str, str] | None = None,
) -> Document:
    """The document for policy: the body's host, os and gpu, with derived fields; ``sent``,
    which of them the body carried (an unset message is None in ``plain``: a rule over it
    must not pass vacuously); and the enrolled device's zone and labels. Zone and labels are
    the verifier's record: the host's own claim of them is dropped from ``host``, so no rule
    can read it."""
    gpu = _nulled(body.get("gpu") or {})
    # proto3 cannot tell "" from unset: a version the host did not report is unknown (null),
    # so that a rule on it reads policy.unknown, not a comparison with "".
    for name in ("driver_version", "cuda_driver_version", "nvml_version"):
        if gpu.get(name) == "":
            gpu[name] = None
    driver = gpu.get("driver_version") or ""
    if driver and not _VERSION.fullmatch(driver):
        # Not a version ("580.105.08 (patched)", markup): nothing to compare with the
        # bulletins, so unknown to policy (policy.unknown), never "no bulletin missing".
        gpu["driver_version"] = None
        gpu["branch"] = None
        gpu["missing_bulletins"] = None
        driver = ""
    else:
        gpu["branch"] = f"R{driver.split('.', 1)[0]}" if driver else ""
        gpu["missing_bulletins"] = [
            {
                "bulletin": b.bulletin,
                "title": b.title,
                "fixed": b.fixed,
                "cves": list(b.cves),
                "max_cvss": b.max_cvss,
            }
            for b in bulletins.missing(driver)
        ]
    gpus = []
    for reported in gpu.get("gpus") or []:
        g = _nulled(reported)
        g["lost"] = any(u["reason"] == "gpu_lost" for u in g.get("unavailable") or [])
        gsp = g.get("gsp_firmware_version") or ""
        g["gsp_matches_driver"] = (gsp == driver) if gsp and driver else None
        gpus.append(g)
    gpu["gpus"] = gpus
    host = {k: v for k, v in (body.get("host") or {}).items() if k not in _CLAIMED_BY_HOST}
    return {
        "host": host,
        "os": _nulled(body.get("os") or {}),
        "gpu": gpu,
        "device": {"zone": zone, "labels": dict(labels or {})},
        "sent": {part: body.get(part) is not None for part in ("host", "os", "gpu")},
    }


def unknown_values(values: dict[str, Any], paths: frozenset[tuple[str, ...]]) -> list[str]:
    """Which of the values at ``paths`` (as verifier/celcheck.py gives them: field names,
    ``[]`` for every element of a list, ``["key"]`` for a map key) are null or absent in the
    document ``values``, each named with the reason. The first null along a path is the one
    named (``os.sshd is unknown``, when the rule reads os.sshd.permit_root_login)."""
    out: list[str] = []
    for path in sorted(paths):
        if path[0] in values:  # else a name the rule binds itself: a comprehension variable
            _walk(values[path[0]], path, 1, path[0], out)
    return list(dict.fromkeys(out))


def _walk(
    value: Any,
    path: tuple[str, ...],
    at: int,
    shown: str,
    out: list[str],
    *,
    parent: dict[str, Any] | None = None,
    key: str = "",
) -> None:
    if value is None:
        out.append(f"{shown} is unknown{_reason(parent, key)}")
        return
    if at == len(path):
        return
    step = path[at]
    if step == "[]":
        for i, item in enumerate(value if isinstance(value, list) else ()):
            _walk(item, path, at + 1, f"{shown}[{i}]", out)
        return
    if not isinstance(value, dict):
        return
    is_key = step.startswith("[")
    name = json.loads(step[1:-1]) if is_key else step
    shown = f"{shown}{step}" if is_key else f"{shown}.{step}"
    if name not in value:
        out.append(f"{shown} is absent")
        return
    _walk(value[name], path, at + 1, shown, out, parent=value, key=name)


# The reasons agent collectors give (attestation.proto, Unavailable), in words; "unknown"
# says nothing the message does not.
_REASONS = {
    "unknown": "",
    "not_supported": "not supported",
    "no_permission": "no permission",
    "gpu_lost": "GPU is lost",
}


def _reason(parent: dict[str, Any] | None, key: str) -> str:
    """Why the host could not read a value, as its ``unavailable`` list says."""
    for item in (parent or {}).get("unavailable") or []:
        if item.get("field") == key:
            reason = _REASONS.get(item.get("reason") or "", item.get("reason"))
            why = ": ".join(v for v in (reason, item.get("detail")) if v)
            return f" (the host could not read it: {why})"
    return " (the host could not read it)"
