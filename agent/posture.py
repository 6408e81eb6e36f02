"""OS posture, read from a root directory (``/`` on hosts, a prepared tree in tests).

Every source that is missing or unreadable is reported in ``unavailable`` as unknown, never
as "off": a host without /sys/fs/selinux has an unknown SELinux mode, not a disabled one.
"""

from __future__ import annotations

import hashlib
import re
import socket
import struct
from pathlib import Path

from protos.devtrust.v1 import attestation_pb2

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
    """Effective PermitRootLogin and PasswordAuthentication: sshd takes the first value it
    reads, Include files in place; without a line the compiled-in defaults apply."""
    text = r.read("etc/ssh/sshd_config", "sshd")
    if text is None:
        return
    values: dict[str, str] = {}

    def scan(content: str) -> None:
        for raw in content.splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            key, _, value = line.partition(" ")
            key = key.lower()
            if key == "match":
                return  # conditional blocks apply per connection, not globally
            if key == "include":
                for pattern in value.split():
                    rel = pattern.lstrip("/") if pattern.startswith("/") else f"etc/ssh/{pattern}"
                    for inc in sorted(r.root.glob(rel)):
                        scan(inc.read_text(errors="replace"))
                continue
            values.setdefault(key, value.strip().lower())

    scan(text)
    p.sshd.permit_root_login = values.get("permitrootlogin", "prohibit-password")
    p.sshd.password_authentication = values.get("passwordauthentication", "yes") == "yes"


def _listening(r: _Reader, p: attestation_pb2.OsPosture) -> None:
    for proto, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        text = r.read(f"proc/net/{proto}", f"listening.{proto}")
        for line in (text or "").splitlines()[1:]:
            parts = line.split()
            if len(parts) < 4 or parts[3] != "0A":  # TCP_LISTEN
                continue
            addr_hex, port_hex = parts[1].split(":")
            raw = bytes.fromhex(addr_hex)
            if family == socket.AF_INET:
                addr = socket.inet_ntop(family, struct.pack("<I", int(addr_hex, 16)))
            else:
                words = struct.unpack("<4I", raw)
                addr = socket.inet_ntop(family, struct.pack(">4I", *words))
            p.listening.append(
                attestation_pb2.ListeningSocket(
                    protocol=proto, address=addr, port=int(port_hex, 16)
                )
            )


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
    tables = r.read("proc/net/ip_tables_names", "firewall_active")
    if tables is not None:
        p.firewall_active = bool(tables.strip()) or any(m.name == "nf_tables" for m in p.modules)
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


# Cheap signals watched for changes (DESIGN.md flow 2: PostureChanged). Each is a small
# read; the agent polls them every quarter second. Expensive ones (the whole posture, GPU
# state) are collected for each challenge.
WATCHED = {
    "kernel_modules": ["proc/modules"],
    "gpu_driver": ["proc/driver/nvidia/version"],
    "sshd_config": ["etc/ssh/sshd_config", "etc/ssh/sshd_config.d"],
    "listening_sockets": ["proc/net/tcp", "proc/net/tcp6"],
    "selinux_mode": ["sys/fs/selinux/enforce"],
    "lockdown": ["sys/kernel/security/lockdown"],
}


def _digest(path: Path, *, listening: bool) -> bytes:
    if path.is_dir():
        return b"".join(_digest(p, listening=False) for p in sorted(path.iterdir()))
    try:
        data = path.read_bytes()
    except OSError:
        return b"-"
    if listening:  # only LISTEN rows: queues and timers change all the time
        data = b"\n".join(
            sorted(
                line.split()[1]
                for line in data.splitlines()[1:]
                if len(line.split()) > 3 and line.split()[3] == b"0A"
            )
        )
    return hashlib.sha256(data).digest()


def fingerprint(root: Path) -> dict[str, bytes]:
    return {
        signal: b"".join(
            _digest(root / rel, listening=signal == "listening_sockets") for rel in rels
        )
        for signal, rels in WATCHED.items()
    }
