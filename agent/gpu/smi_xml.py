"""Parse ``nvidia-smi -q -x`` (nvsmi_device_v11..v13 DTDs) into a GpuState. Pure."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable

from devtrust.v1 import attestation_pb2

# nvidia-smi's words for "no value", and the reason recorded for each.
_REASONS = {
    "n/a": "not_supported",
    "[n/a]": "not_supported",
    "not supported": "not_supported",
    "[not supported]": "not_supported",
    "requested functionality has been deprecated": "not_supported",
    "insufficient permissions": "no_permission",
    "[insufficient permissions]": "no_permission",
    "gpu is lost": "gpu_lost",
    "[gpu is lost]": "gpu_lost",
    "unknown error": "error",
    "[unknown error]": "error",
}
UNCORRECTABLE = (
    "dram_uncorrectable",
    "sram_uncorrectable",
    "sram_uncorrectable_parity",
    "sram_uncorrectable_secded",
    "double_bit",
    "device_memory",
)


class SmiXmlError(ValueError):
    """Not nvidia-smi -q -x output."""


_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1


def _number(raw: str) -> int | None:
    """A count as nvidia-smi prints it: ASCII decimal digits (str.isdigit also takes "²"),
    at most 20 of them (a uint64); None for anything else."""
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 20 else None


def _instance_id(mig: ET.Element, tag: str) -> int:
    raw = (mig.findtext(tag, "0") or "0").strip()
    value = _number(raw)
    if value is None or value > _UINT32_MAX:
        raise SmiXmlError(f"<mig_device> <{tag}> is {raw[:40]!r}, not a number")
    return value


def _reason(text: str | None) -> str | None:
    if text is None:
        return "unknown"
    return _REASONS.get(text.strip().lower())


class _Fields:
    """Reads one <gpu> element; records why a value is missing."""

    def __init__(self, gpu: ET.Element, unavailable: Callable[[str, str, str], None]) -> None:
        self.gpu = gpu
        self.unavailable = unavailable

    def text(self, path: str, field: str | None = None) -> str | None:
        node = self.gpu.find(path)
        raw = None if node is None else (node.text or "").strip()
        reason = "unknown" if node is None else _reason(raw)
        if reason is not None or not raw:
            self.unavailable(field or path, reason or "unknown", raw or "")
            return None
        return raw

    def flag(self, path: str, field: str, yes: tuple[str, ...] = ("enabled", "yes")) -> bool | None:
        value = self.text(path, field)
        return None if value is None else value.lower() in yes

    def count(self, paths: tuple[str, ...], field: str) -> int | None:
        total, seen = 0, False
        for path in paths:
            node = self.gpu.find(path)
            if node is None:
                continue
            raw = (node.text or "").strip()
            why = _reason(raw)
            number = _number(raw)
            if number is not None:
                total, seen = min(total + number, _UINT64_MAX), True
            elif why == "not_supported":
                continue  # a counter this GPU does not have; the others still count
            elif why is not None:
                self.unavailable(field, why, raw)
                return None
        if not seen:
            self.unavailable(field, "not_supported", "")
            return None
        return total


def _gpu(index: int, node: ET.Element) -> attestation_pb2.Gpu:
    gpu = attestation_pb2.Gpu(index=index)

    def unavailable(field: str, reason: str, detail: str) -> None:
        gpu.unavailable.append(
            attestation_pb2.Unavailable(field=field, reason=reason, detail=detail)
        )

    f = _Fields(node, unavailable)
    gpu.name = f.text("product_name", "name") or ""
    gpu.architecture = f.text("product_architecture", "architecture") or ""
    gpu.uuid = f.text("uuid") or ""
    gpu.serial = f.text("serial") or ""
    gpu.pci_bus_id = f.text("pci/pci_bus_id", "pci_bus_id") or node.get("id") or ""
    gpu.board_id = f.text("board_id") or ""
    gpu.vbios_version = f.text("vbios_version") or ""
    gpu.inforom_image = f.text("inforom_version/img_version", "inforom_image") or ""
    gpu.inforom_oem = f.text("inforom_version/oem_object", "inforom_oem") or ""
    gpu.inforom_ecc = f.text("inforom_version/ecc_object", "inforom_ecc") or ""
    gpu.gsp_firmware_version = f.text("gsp_firmware_version") or ""
    unavailable("gsp_firmware_mode", "not_supported", "not in nvidia-smi -q -x")
    for attr, path, field in (
        ("ecc_enabled", "ecc_mode/current_ecc", "ecc_mode"),
        ("mig_enabled", "mig_mode/current_mig", "mig_mode"),
        ("persistence_mode", "persistence_mode", "persistence_mode"),
    ):
        value = f.flag(path, field)
        if value is not None:
            setattr(gpu, attr, value)
    unavailable("cc_state", "not_supported", "nvidia-smi -q -x does not report it")
    for attr, path in (
        ("retired_pages_pending", "retired_pages/pending_retirement"),
        ("remapped_rows_pending", "remapped_rows/remapped_row_pending"),
        ("remapped_rows_failed", "remapped_rows/remapped_row_failure"),
    ):
        value = f.flag(path, attr, yes=("yes",))
        if value is not None:
            setattr(gpu, attr, int(value))
    volatile = f.count(
        tuple(f"ecc_errors/volatile/{n}" for n in UNCORRECTABLE), "ecc_uncorrected_volatile"
    )
    if volatile is not None:
        gpu.ecc_uncorrected_volatile = volatile
    aggregate = f.count(
        tuple(f"ecc_errors/aggregate/{n}" for n in UNCORRECTABLE), "ecc_uncorrected_aggregate"
    )
    if aggregate is not None:
        gpu.ecc_uncorrected_aggregate = aggregate
    gpu.fabric_state = f.text("fabric/state", "fabric_state") or ""
    gpu.fabric_status = f.text("fabric/status", "fabric_status") or ""
    health = node.find("fabric/health")
    for item in health if health is not None else []:
        reported = (item.text or "").strip()
        if reported and _reason(reported) is None:
            gpu.fabric_health[item.tag] = reported
    for mig in node.findall("mig_devices/mig_device"):
        gpu.mig_devices.append(
            attestation_pb2.MigDevice(
                gpu_instance_id=_instance_id(mig, "gpu_instance_id"),
                compute_instance_id=_instance_id(mig, "compute_instance_id"),
                profile=f"{mig.findtext('device_attributes/shared/multiprocessor_count', '?')}sm",
            )
        )
    return gpu


def parse_smi_xml(data: bytes) -> attestation_pb2.GpuState:
    try:
        root = ET.fromstring(data)  # noqa: S314 - see import
    # LookupError: an unknown encoding="..."; ValueError: a multi-byte one (UTF-16) that
    # expat cannot switch to inside a byte string.
    except (ET.ParseError, LookupError, ValueError) as exc:
        raise SmiXmlError(f"not nvidia-smi XML: {exc}") from exc
    if root.tag != "nvidia_smi_log":
        raise SmiXmlError(f"not nvidia-smi -q -x output: root element <{root.tag}>")
    state = attestation_pb2.GpuState(source="nvidia-smi-xml")
    state.driver_version = (root.findtext("driver_version") or "").strip()
    state.cuda_driver_version = (root.findtext("cuda_version") or "").strip()
    state.unavailable.append(
        attestation_pb2.Unavailable(
            field="nvml_version", reason="not_supported", detail="not in nvidia-smi -q -x"
        )
    )
    for index, node in enumerate(root.findall("gpu")):
        state.gpus.append(_gpu(index, node))
    return state
