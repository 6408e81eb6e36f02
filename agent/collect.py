"""What the agent reports in each evidence body: host facts, OS posture, GPU state."""

from __future__ import annotations

import datetime
from pathlib import Path

from devtrust.agent.config import AgentConfig
from devtrust.agent.errors import ConfigError
from devtrust.agent.evidence import evidence_body, host_facts
from devtrust.agent.gpu.nvml import XidWatcher, collect_nvml
from devtrust.agent.gpu.procfs import collect_procfs
from devtrust.agent.gpu.smi_xml import SmiXmlError, parse_smi_xml
from devtrust.agent.posture import collect_posture
from devtrust.v1 import attestation_pb2


def check_sources(
    cfg: AgentConfig, *, root_key: str = "posture_root", xml_key: str = "gpu_xml"
) -> None:
    """Refuse, before anything is collected, a posture root that is not a directory and a
    GPU capture that cannot be read or is not nvidia-smi XML: else every value they hold would
    read unknown, or 0 GPUs, as if the host had none. ``root_key`` and ``xml_key`` name where
    the user gave them (a configuration key or an option)."""
    root = cfg.posture_root
    if not root.is_dir():
        found = "is not a directory" if root.exists() else "does not exist"
        raise ConfigError(
            f"{root_key} {root} {found}: give the directory posture is read from (/ on a host)"
        )
    if cfg.gpu_source != "nvidia-smi-xml" or cfg.gpu_xml is None:
        return
    remedy = "give the file `nvidia-smi -q -x` wrote"
    try:
        parse_smi_xml(cfg.gpu_xml.read_bytes())
    except OSError as exc:
        raise ConfigError(
            f"{xml_key} {cfg.gpu_xml}: cannot read: {exc.strerror}; {remedy}"
        ) from exc
    except SmiXmlError as exc:
        raise ConfigError(f"{xml_key} {cfg.gpu_xml}: {exc}; {remedy}") from exc


def collect_gpu(
    source: str, *, root: Path, xml: Path | None, xids: XidWatcher | None = None
) -> attestation_pb2.GpuState:
    """GPU state from the configured source; ``auto`` tries NVML, then /proc/driver/nvidia."""
    if source == "nvidia-smi-xml":
        if xml is None:
            raise ValueError("gpu source nvidia-smi-xml needs gpu_xml")
        try:
            return parse_smi_xml(xml.read_bytes())
        except (OSError, SmiXmlError) as exc:
            return attestation_pb2.GpuState(
                source=source,
                unavailable=[
                    attestation_pb2.Unavailable(field="gpu", reason="error", detail=str(exc))
                ],
            )
    if source == "procfs":
        return collect_procfs(root)
    if source == "none":
        return attestation_pb2.GpuState(source="none")
    state = collect_nvml(xids)
    if source == "auto" and not state.gpus and (root / "proc/driver/nvidia").exists():
        return collect_procfs(root)
    return state


def collect_body(
    cfg: AgentConfig,
    *,
    now: datetime.datetime,
    certify_key_spki: bytes = b"",
    certify_key_proof: bytes = b"",
    xids: XidWatcher | None = None,
) -> bytes:
    """Collect posture and GPU state now (blocking: run it off the event loop) and return the
    serialized evidence body."""
    return evidence_body(
        host=host_facts(root=cfg.posture_root),
        certify_key_spki=certify_key_spki,
        certify_key_proof=certify_key_proof,
        now=now,
        os=collect_posture(cfg.posture_root, mounts=cfg.encrypted_mounts),
        gpu=collect_gpu(cfg.gpu_source, root=cfg.posture_root, xml=cfg.gpu_xml, xids=xids),
    )
