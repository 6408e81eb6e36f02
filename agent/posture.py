"""OS posture, read from a root directory (``/`` on hosts, a prepared tree in tests).

Every source that is missing or unreadable is reported in ``unavailable`` as unknown, never
as "off": a host without /sys/fs/selinux has an unknown SELinux mode, not a disabled one.

Change detection (PostureChanged) watches a few cheap signals (``WATCHED``, in
agent/signals.py, with their fingerprints and ``Debouncer``) and follows two
rules, so that a busy GPU host does not turn every poll into a full attestation:

- **Ephemeral listeners do not count as a change.** A TCP listener whose local port lies in
  the host's ephemeral port range (``/proc/sys/net/ipv4/ip_local_port_range``, which the
  kernel applies to IPv4 and IPv6 alike; "32768 60999", the kernel default, when unreadable)
  and is not in ``/proc/sys/net/ipv4/ip_local_reserved_ports`` is left out of the
  ``listening_sockets`` fingerprint. The kernel hands those ports out to port-0 binds: NCCL,
  torch.distributed workers and gloo open and close such listeners all the time. A listener
  on a service port (outside the range, or reserved) is a change, and so is a change of the
  range itself (the ``ephemeral_ports`` signal), so widening the range to hide a service is
  itself seen. Ephemeral listeners are still reported in every evidence body
  (``collect_posture``), so policy sees them at the next challenge; only the watch ignores
  them.
- **Changes are debounced** (``Debouncer``): the first change after a quiet window is sent at
  once, later ones within ``posture_debounce_s`` are coalesced into one note sent when the
  window closes, carrying the union of the signals.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from devtrust.agent.netlink import SockDiag
from devtrust.agent.signals import (  # the watched signals live there; named here too
    DEFAULT_EPHEMERAL,
    PORT_RANGE,
    RESERVED_PORTS,
    WATCHED,
    Debouncer,
    EphemeralPorts,
    ephemeral_ports,
    fingerprint,
)
from devtrust.v1 import attestation_pb2

__all__ = [
    "DEFAULT_EPHEMERAL",
    "PORT_RANGE",
    "RESERVED_PORTS",
    "WATCHED",
    "Debouncer",
    "EphemeralPorts",
    "SshdConfigError",
    "collect_posture",
    "ephemeral_ports",
    "fingerprint",
    "sshd_settings",
    "sshd_words",
]

EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"


class _Reader:
    def __init__(self, root: Path, posture: attestation_pb2.OsPosture) -> None:
        self.root = root
        self.posture = posture

    def read(self, rel: str, field: str) -> str | None:
        try:
            return (self.root / rel).read_text(errors="replace")
        except OSError as exc:
            self.unknown(field, f"/{rel}: {exc.strerror or exc}")
            return None

    def read_bytes(self, rel: str, field: str) -> bytes | None:
        try:
            return (self.root / rel).read_bytes()
        except OSError as exc:
            self.unknown(field, f"/{rel}: {exc.strerror or exc}")
            return None

    def unknown(self, field: str, detail: str) -> None:
        self.posture.unavailable.append(
            attestation_pb2.Unavailable(field=field, reason="unknown", detail=detail)
        )


def _efivar(r: _Reader, name: str, field: str) -> bool | None:
    # efivarfs: 4 bytes of attributes, then the variable's data (UEFI 2.10, 8.2).
    data = r.read_bytes(f"sys/firmware/efi/efivars/{name}-{EFI_GLOBAL}", field)
    if data is None:
        return None
    if len(data) < 5:
        r.unknown(field, f"{name} efivar has {len(data)} bytes")
        return None
    return data[4] == 1


def _sshd(r: _Reader, p: attestation_pb2.OsPosture) -> None:
    """Effective PermitRootLogin and PasswordAuthentication, as ``sshd -T`` reports them; a
    configuration sshd would refuse to start with reads as unknown, with its file and line."""
    text = r.read("etc/ssh/sshd_config", "sshd")
    if text is None:
        return
    try:
        settings = sshd_settings(text, name="/etc/ssh/sshd_config", root=r.root)
    except SshdConfigError as exc:
        r.unknown("sshd", str(exc))
        return
    p.sshd.permit_root_login = settings["permitrootlogin"]
    p.sshd.password_authentication = settings["passwordauthentication"] == "yes"


# sshd_config, read as OpenSSH's sshd reads it (servconf.c process_server_config_line_depth,
# misc.c strdelim and argv_split; checked against `sshd -T` in tests/test_sshd_config.py).
# The settings read, their compiled-in defaults and the values sshd accepts (any case).
SSHD_DEFAULTS = {"permitrootlogin": "prohibit-password", "passwordauthentication": "yes"}
_SSHD_VALUES = {
    "permitrootlogin": {
        "yes",
        "no",
        "prohibit-password",
        "without-password",  # the old name of prohibit-password
        "forced-commands-only",
    },
    "passwordauthentication": {"yes", "no"},
}
_SSHD_WS = " \t\r\n"
_SSHD_DELIM = re.compile(r'[ \t\r\n"=]')
SSHD_DIR = "etc/ssh"  # relative Include paths are relative to /etc/ssh
SSHD_MAX_DEPTH = 16  # servconf.c SERVCONF_MAX_DEPTH


class SshdConfigError(ValueError):
    """A configuration sshd would refuse to start with; the message names file and line."""


def _strdelim(s: str) -> tuple[str, str | None] | None:
    """misc.c strdelim(): the next token (split at whitespace, a quote or one "=") and the
    rest (None at the end of the line); None for an unmatched quote."""
    m = _SSHD_DELIM.search(s)
    if m is None:
        return s, None
    i = m.start()
    if s[i] == '"':
        end = s.find('"', i + 1)
        if end < 0:
            return None
        return s[:i] + s[i + 1 : end], s[end + 1 :].lstrip(_SSHD_WS)
    rest = s[i + 1 :].lstrip(_SSHD_WS)
    if s[i] != "=" and rest.startswith("="):
        rest = rest[1:].lstrip(_SSHD_WS)
    return s[:i], rest


def _argv_split(s: str) -> list[str] | None:
    """misc.c argv_split() with comments: words split at blanks, quotes ("" or '') and
    backslash escapes removed, a word starting with # ends the line; None for open quotes."""
    words: list[str] = []
    i, n = 0, len(s)
    while i < n:
        if s[i] in " \t":
            i += 1
            continue
        if s[i] == "#":
            break
        word: list[str] = []
        quote = ""
        while i < n:
            c = s[i]
            if c == "\\" and i + 1 < n and (s[i + 1] in "'\"\\" or (not quote and s[i + 1] == " ")):
                i += 1
                word.append(s[i])
            elif not quote and c in " \t":
                break
            elif not quote and c in "\"'":
                quote = c
            elif quote and c == quote:
                quote = ""
            else:
                word.append(c)
            i += 1
        if quote:
            return None
        words.append("".join(word))
    return words


def sshd_words(line: str, where: str) -> list[str] | None:
    """One line of sshd_config as keyword and arguments; None for a blank or comment line."""
    line = line.lstrip(" \t\r").rstrip(_SSHD_WS + "\f")
    first = _strdelim(line)
    if first is not None and first[0] == "" and first[1] is not None:
        first = _strdelim(first[1])  # leading whitespace
    if first is None or not first[0] or first[0].startswith("#"):
        return None
    keyword, rest = first
    if not rest:
        raise SshdConfigError(f"{where}: no argument after keyword {keyword!r}")
    args = _argv_split(rest)
    if args is None:
        raise SshdConfigError(f"{where}: invalid quotes")
    return [keyword, *args]


def _match_all(args: list[str], where: str) -> bool:
    """Whether a Match line's criteria hold for every connection ("Match all"); the others
    apply to some connections only, never to the global settings."""
    if not args:
        raise SshdConfigError(f"{where}: Match needs one or more criteria")
    i = 0
    while i < len(args):
        criterion = args[i].lower()
        if criterion == "all":
            if len(args) > 1:
                raise SshdConfigError(f"{where}: 'Match all' cannot be combined")
            return True
        needs_value = criterion != "invalid-user" and "=" not in criterion
        if needs_value and (i + 1 >= len(args) or args[i + 1].startswith("#")):
            raise SshdConfigError(f"{where}: Match {args[i]} needs a value")
        i += 2 if needs_value else 1
    return False


@dataclass
class _SshdScan:
    """First value wins in each context: "global" (outside Match) and "all" (Match all,
    which sshd applies to every connection after the global ones, so it overrides them)."""

    root: Path
    found: dict[tuple[str, str], str]

    def file(self, text: str, name: str, context: str, depth: int, nevermatch: bool) -> None:
        """Scan one file; ``nevermatch``: it is included from a conditional Match block,
        so no Match inside it applies (servconf.c SSHCFG_NEVERMATCH)."""
        if depth > SSHD_MAX_DEPTH:
            raise SshdConfigError(f"{name}: Include nested deeper than {SSHD_MAX_DEPTH}")
        for number, raw in enumerate(text.split("\n"), 1):
            where = f"{name} line {number}"
            if "\0" in raw:
                # sshd reads lines as C strings: a NUL ends this one and joins the next to it
                # (servconf.c load_server_config_depth); no guess at what that makes.
                raise SshdConfigError(f"{where}: a NUL byte")
            words = sshd_words(raw, where)
            if words is None:
                continue
            keyword, args = words[0].lower(), words[1:]
            if keyword == "match":
                context = "all" if _match_all(args, where) and not nevermatch else "conditional"
            elif keyword == "include":
                self._include(args, where, context, depth)
            elif keyword in SSHD_DEFAULTS:
                if len(args) != 1 or args[0].lower() not in _SSHD_VALUES[keyword]:
                    raise SshdConfigError(
                        f"{where}: {words[0]} {' '.join(args) or '(nothing)'}: expected one of "
                        f"{', '.join(sorted(_SSHD_VALUES[keyword]))}"
                    )
                value = args[0].lower().replace("without-password", "prohibit-password")
                if context != "conditional":
                    self.found.setdefault((context, keyword), value)

    def _include(self, patterns: list[str], where: str, context: str, depth: int) -> None:
        if not patterns or "" in patterns:
            raise SshdConfigError(f"{where}: Include needs file names")
        for pattern in patterns:
            if pattern.startswith("~"):
                continue  # sshd does not expand ~ here: no such file
            rel = pattern.lstrip("/") if pattern.startswith("/") else f"{SSHD_DIR}/{pattern}"
            for path in sorted(glob.glob(os.path.join(glob.escape(str(self.root)), rel))):
                try:
                    text = Path(path).read_text(errors="replace")
                except OSError as exc:
                    raise SshdConfigError(
                        f"{where}: Include {pattern}: {exc.strerror or exc}"
                    ) from exc
                shown = "/" + os.path.relpath(path, self.root)
                self.file(text, shown, context, depth + 1, context == "conditional")


def sshd_settings(text: str, *, name: str, root: Path) -> dict[str, str]:
    """The global values of ``SSHD_DEFAULTS``'s settings in sshd_config ``text`` (found at
    ``name``), Include files read under ``root``. As sshd: keyword and argument separated by
    blanks or one "=", keywords in any case, quotes and escapes as sshd takes them, the first
    value wins, Include globs expanded in place (sorted; relative to /etc/ssh), and a Match
    block counts only when it is "Match all", whose values then win. Raises
    ``SshdConfigError`` for what sshd would refuse: a bad value or quote, a lone keyword, a
    malformed Match or Include. Other keywords are not checked."""
    scan = _SshdScan(root, {})
    scan.file(text, name, "global", 0, nevermatch=False)
    return {
        key: scan.found.get(("all", key), scan.found.get(("global", key), default))
        for key, default in SSHD_DEFAULTS.items()
    }


def _listening(r: _Reader, p: attestation_pb2.OsPosture) -> None:
    """TCP listeners. On the host itself (root /) from sock_diag where the kernel offers it
    (``netlink.SockDiag``: the same rows as /proc/net/tcp{,6}, without the kernel printing
    every connection), else from /proc/net/tcp{,6}."""
    diag = None
    if os.path.realpath(r.root) == "/":
        with contextlib.suppress(OSError):
            diag = SockDiag()
    try:
        for proto, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
            for row in _listen_rows(r, proto, family, diag):
                addr_hex, port_hex = row.split(":")
                if family == socket.AF_INET:
                    addr = socket.inet_ntop(family, struct.pack("<I", int(addr_hex, 16)))
                else:
                    words = struct.unpack("<4I", bytes.fromhex(addr_hex))
                    addr = socket.inet_ntop(family, struct.pack(">4I", *words))
                p.listening.append(
                    attestation_pb2.ListeningSocket(
                        protocol=proto, address=addr, port=int(port_hex, 16)
                    )
                )
    finally:
        if diag is not None:
            diag.close()


def _listen_rows(r: _Reader, proto: str, family: int, diag: SockDiag | None) -> list[str]:
    """The ``local_address`` of each LISTEN row of /proc/net/``proto``."""
    if diag is not None:
        with contextlib.suppress(OSError):
            return [row.decode() for row in diag.listening(family)]
    text = r.read(f"proc/net/{proto}", f"listening.{proto}")
    rows = []
    for line in (text or "").splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 4 and parts[3] == "0A":  # TCP_LISTEN
            rows.append(parts[1])
    return rows


def _modules(r: _Reader, p: attestation_pb2.OsPosture) -> None:
    text = r.read("proc/modules", "modules")
    for line in (text or "").splitlines():
        parts = line.split()
        if not parts:
            continue
        taint = parts[-1][1:-1] if parts[-1].startswith("(") else ""
        p.modules.append(attestation_pb2.KernelModule(name=parts[0], taint=taint))
    tainted = r.read("proc/sys/kernel/tainted", "kernel_taint")
    if tainted is not None and tainted.strip().isdigit():
        p.kernel_taint = int(tainted.strip())


def _firewall(r: _Reader, p: attestation_pb2.OsPosture) -> None:
    """``firewall_active``: iptables tables (legacy x_tables) or nf_tables loaded (nft, and
    iptables-nft). /proc/net/ip_tables_names is 0440 root: the agent as devtrust-agent may
    not read it, and then nf_tables alone answers (active when loaded, else unknown: legacy
    tables may be there unseen). A file that is absent stays unknown, as before."""
    nf_tables = any(m.name == "nf_tables" for m in p.modules)
    rel = "proc/net/ip_tables_names"
    try:
        tables = (r.root / rel).read_text(errors="replace")
    except PermissionError as exc:
        if nf_tables:
            p.firewall_active = True
        else:
            r.unknown("firewall_active", f"/{rel}: {exc.strerror}, and nf_tables not loaded")
        return
    except OSError as exc:
        r.unknown("firewall_active", f"/{rel}: {exc.strerror or exc}")
        return
    p.firewall_active = bool(tables.strip()) or nf_tables


def _encryption(r: _Reader, p: attestation_pb2.OsPosture, mounts: list[str]) -> None:
    text = r.read("proc/mounts", "mounts")
    if text is None:
        return
    devices = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            devices[parts[1]] = parts[0]
    dm_names: dict[str, Path] = {}
    for block in (r.root / "sys/block").glob("dm-*"):
        try:
            dm_names[(block / "dm/name").read_text().strip()] = block
        except OSError:
            continue
    for mount in mounts:
        device = devices.get(mount)
        if device is None:
            r.unknown(f"mounts.{mount}", "not mounted")
            continue
        dm = dm_names.get(device.removeprefix("/dev/mapper/")) or (
            r.root / "sys/block" / Path(device).name
            if Path(device).name.startswith("dm-")
            else None
        )
        encrypted, cipher = False, ""
        if dm is not None:
            try:
                encrypted = (dm / "dm/uuid").read_text().startswith("CRYPT-")
                cipher = (dm / "dm/uuid").read_text().split("-")[1] if encrypted else ""
            except (OSError, IndexError):
                r.unknown(f"mounts.{mount}", f"{dm}/dm/uuid unreadable")
                continue
        p.mounts.append(
            attestation_pb2.EncryptedMount(
                mount_point=mount, device=device, encrypted=encrypted, cipher=cipher
            )
        )


def collect_posture(
    root: Path = Path("/"),
    *,
    mounts: list[str] | None = None,
) -> attestation_pb2.OsPosture:
    p = attestation_pb2.OsPosture()
    r = _Reader(root, p)
    os_release = r.read("etc/os-release", "os_release") or ""
    fields = dict(line.split("=", 1) for line in os_release.splitlines() if "=" in line)
    p.os_id = fields.get("ID", "").strip('"')
    p.os_version = fields.get("VERSION_ID", "").strip('"')
    p.kernel_release = (r.read("proc/sys/kernel/osrelease", "kernel_release") or "").strip()
    p.kernel_cmdline = (r.read("proc/cmdline", "kernel_cmdline") or "").strip()
    for attr, name in (("secure_boot", "SecureBoot"), ("setup_mode", "SetupMode")):
        value = _efivar(r, name, attr)
        if value is not None:
            setattr(p, attr, value)
    lockdown = r.read("sys/kernel/security/lockdown", "lockdown")
    if lockdown is not None:
        match = re.search(r"\[(\w+)\]", lockdown)
        p.lockdown = match.group(1) if match else lockdown.strip()
    ima = r.read("sys/kernel/security/ima/runtime_measurements_count", "ima_active")
    if ima is not None:
        p.ima_active = ima.strip().isdigit() and int(ima.strip()) > 0
    enforce = r.read("sys/fs/selinux/enforce", "selinux_mode")
    if enforce is not None:
        p.selinux_mode = "enforcing" if enforce.strip() == "1" else "permissive"
    apparmor = r.read("sys/module/apparmor/parameters/enabled", "apparmor_mode")
    if apparmor is not None:
        p.apparmor_mode = "enabled" if apparmor.strip().upper() == "Y" else "disabled"
    _modules(r, p)
    _encryption(r, p, mounts or ["/"])
    _firewall(r, p)
    _listening(r, p)
    _sshd(r, p)
    if (r.root / "run").is_dir():
        p.time_synchronized = (r.root / "run/systemd/timesync/synchronized").exists()
        p.reboot_required = (r.root / "run/reboot-required").exists()
    else:
        r.unknown("time_synchronized", "/run is absent")
        r.unknown("reboot_required", "/run is absent")
    updates = r.read("var/lib/update-notifier/updates-available", "pending_security_updates")
    if updates is not None:
        match = re.search(r"(\d+) (?:of these )?updates? (?:are|is) (?:a )?security", updates)
        p.pending_security_updates = int(match.group(1)) if match else 0
    return p
