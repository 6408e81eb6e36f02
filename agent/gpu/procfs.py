"""GPU state from /proc/driver/nvidia, for hosts where NVML cannot be loaded. Pure over a
root directory (tests point it at a prepared tree)."""

from __future__ import annotations

import re
from pathlib import Path

from devtrust.v1 import attestation_pb2

_VERSION = re.compile(r"Kernel Module\s+(?:for\s+\S+\s+)?(\d+\.\d+(?:\.\d+)?)")


def collect_procfs(root: Path) -> attestation_pb2.GpuState:
    state = attestation_pb2.GpuState(source="procfs")
    base = root / "proc/driver/nvidia"
    try:
        version = (base / "version").read_text()
    except OSError as exc:
        state.unavailable.append(
            attestation_pb2.Unavailable(
                field="driver_version", reason="unknown", detail=f"{base / 'version'}: {exc}"
            )
        )
        return state
    match = _VERSION.search(version)
    if match:
        state.driver_version = match.group(1)
    for n, info in enumerate(sorted((base / "gpus").glob("*/information"))):
        fields = {}
        for line in info.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        gpu = attestation_pb2.Gpu(
            index=n,
            name=fields.get("model", ""),
            uuid=fields.get("gpu uuid", ""),
            vbios_version=fields.get("video bios", ""),
            pci_bus_id=fields.get("bus location", info.parent.name),
            gsp_firmware_version=fields.get("gpu firmware", ""),
        )
        for field in ("ecc_mode", "remapped_rows", "fabric", "cc_state"):
            gpu.unavailable.append(
                attestation_pb2.Unavailable(
                    field=field, reason="not_supported", detail="not in /proc/driver/nvidia"
                )
            )
        state.gpus.append(gpu)
    return state
