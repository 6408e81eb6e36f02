"""What the agent reports in each evidence body: host facts, OS posture, GPU state."""

from __future__ import annotations

import datetime
from pathlib import Path

from agent.config import AgentConfig
from agent.evidence import evidence_body, host_facts
from agent.gpu.nvml import XidWatcher, collect_nvml
from agent.gpu.procfs import collect_procfs
from agent.gpu.smi_xml import SmiXmlError, parse_smi_xml
from agent.posture import collect_posture
from protos.devtrust.v1 import attestation_pb2


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
