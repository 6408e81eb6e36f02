"""What `devtrust-agent run` and `enroll` refuse at start, before the TPM or the network is
touched: mistakes on this host that a restart would repeat (exit 2; the unit's
RestartPreventExitStatus=2). What comes from elsewhere is retried instead (agent/main.py)."""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path

from devtrust.core.errors import ConfigError


def check_tpm_device(tcti: str, *, where: str) -> None:
    """A TPM device node (``device:PATH``) that is not there or that this user may not open:
    a mistake on this host that a restart repeats (exit 2; the unit orders the agent after
    tpm2.target, so a TPM the host has is there by then). Other TCTIs (swtpm, tabrmd) reach
    another process, which may come later: `run` retries those."""
    kind, _, arg = tcti.partition(":")
    if kind != "device" or not arg.startswith("/"):
        return
    device = Path(arg.split(",", 1)[0])
    if not device.exists():
        raise ConfigError(
            f"{where} {tcti}: {device} does not exist: give the TPM this host has (ls "
            "/dev/tpm*: /dev/tpmrm0 is the kernel's resource manager), or enable the TPM in "
            "the firmware"
        )
    if not os.access(device, os.R_OK | os.W_OK):
        raise ConfigError(
            f"{where} {tcti}: this user ({_user()}) may not open {device}: add it to the "
            "device's group (tss on Debian: the packaged unit has SupplementaryGroups=tss)"
        )


def check_key_group(
    gid: int | None,
    *,
    where: str,
    euid: int | None = None,
    groups: tuple[int, ...] | None = None,
) -> None:
    """workload_api.key_group must be a group this user is in: the agent gives device.key to
    it (fchown) and the kernel refuses a group the owner is not in, at the first renewal,
    after start. Refused at start instead (exit 2). ``euid``/``groups``: this process's."""
    if gid is None:
        return
    euid = os.geteuid() if euid is None else euid
    groups = (os.getegid(), *os.getgroups()) if groups is None else groups
    if euid == 0 or gid in groups:
        return
    try:
        name = grp.getgrgid(gid).gr_name
    except KeyError:
        name = str(gid)
    raise ConfigError(
        f"{where}: this user ({_user()}) is not in group {name} (gid {gid}), so it cannot "
        f"let that group read device.key: add the agent to it (`systemctl edit "
        f"devtrust-agent`: [Service] SupplementaryGroups={name}), or empty key_group"
    )


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"
