"""A simulated host's posture sources under a root directory, for the demo, tests and fleet
simulation: the files the agent's posture collector reads on a real host (os-release,
efivarfs, securityfs, selinuxfs, /proc, sshd configuration...), describing a well-configured
GPU host. Tests change single files to flip one signal at a time.
"""

from __future__ import annotations

from pathlib import Path

EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
# /proc/net/tcp: one socket listening on 0.0.0.0:22 (state 0A = LISTEN).
_TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
    "   uid  timeout inode\n"
)
_TCP_SSH = (
    "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
    "     0        0 12345 1 0000000000000000 100 0 0 10 0\n"
)


def write_host_tree(root: Path) -> Path:
    files = {
        "etc/os-release": 'ID=ubuntu\nVERSION_ID="24.04"\nPRETTY_NAME="Ubuntu 24.04 LTS"\n',
        "etc/machine-id": "5f1e7c2a9b3d4e6f8a0b1c2d3e4f5a6b\n",
        "proc/sys/kernel/osrelease": "6.8.0-49-generic\n",
        "proc/cmdline": "BOOT_IMAGE=/vmlinuz-6.8.0-49-generic root=/dev/mapper/root ro\n",
        "sys/kernel/security/lockdown": "none [integrity] confidentiality\n",
        "sys/kernel/security/ima/runtime_measurements_count": "1234\n",
        "sys/fs/selinux/enforce": "1\n",
        "sys/module/apparmor/parameters/enabled": "N\n",
        "proc/mounts": "/dev/mapper/root / ext4 rw,relatime 0 0\n",
        "sys/block/dm-0/dm/name": "root\n",
        "sys/block/dm-0/dm/uuid": "CRYPT-LUKS2-0123456789abcdef0123456789abcdef-root\n",
        "proc/net/ip_tables_names": "filter\n",
        "proc/net/tcp": _TCP_HEADER + _TCP_SSH,
        "proc/net/tcp6": _TCP_HEADER,
        "etc/ssh/sshd_config": "Include /etc/ssh/sshd_config.d/*.conf\nPort 22\n",
        "etc/ssh/sshd_config.d/10-hardening.conf": "PermitRootLogin no\n"
        "PasswordAuthentication no\n",
        "run/systemd/timesync/synchronized": "",
        "var/lib/update-notifier/updates-available": "0 updates can be applied immediately.\n",
        "proc/modules": "nvidia_uvm 1859584 0 - Live 0x0000000000000000 (PO)\n"
        "nvidia 104595456 1 nvidia_uvm, Live 0x0000000000000000 (PO)\n"
        "ext4 1011712 1 - Live 0x0000000000000000\n",
        "proc/sys/kernel/tainted": "4097\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    efivars = root / "sys/firmware/efi/efivars"
    efivars.mkdir(parents=True, exist_ok=True)
    # efivarfs: 4 attribute bytes (NV|BS|RT = 0x07), then the data.
    (efivars / f"SecureBoot-{EFI_GLOBAL}").write_bytes(b"\x06\x00\x00\x00\x01")
    (efivars / f"SetupMode-{EFI_GLOBAL}").write_bytes(b"\x06\x00\x00\x00\x00")
    return root
