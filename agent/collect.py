"""What the agent reports in each evidence body (host facts, OS posture, GPU state, the event
log), and the host probes that report it (``interfaces.HostProbe``):

- ``RootProbe``, the real host: posture read under a root directory (``/`` on hosts, a
  prepared tree in tests), GPU state from the one source chosen at start (``gpu_source``),
  the event log from its file, posture changes from one ``PostureWatcher``;
- ``RecordedHost``: recorded captures, for simulated devices and tests.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from devtrust.agent.config import AgentConfig
from devtrust.agent.evidence import evidence_body, host_facts
from devtrust.agent.gpu.cache import CaptureCache
from devtrust.agent.gpu.nvml import NvmlSource
from devtrust.agent.gpu.procfs import collect_procfs
from devtrust.agent.interfaces import HostProbe, PostureListener, Unsubscribe
from devtrust.agent.posture import collect_posture
from devtrust.agent.watch import PostureWatcher
from devtrust.core.errors import ConfigError
from devtrust.v1 import attestation_pb2, common_pb2

if TYPE_CHECKING:
    from devtrust.agent.gpu.nvml import XidWatcher

logger = logging.getLogger(__name__)
GpuSource = Callable[[], attestation_pb2.GpuState]
"""Collects the GPU state now (blocking)."""


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
    from devtrust.agent.gpu.smi_xml import SmiXmlError, parse_smi_xml  # noqa: PLC0415 - its host only

    remedy = "give the file `nvidia-smi -q -x` wrote"
    try:
        parse_smi_xml(cfg.gpu_xml.read_bytes())
    except OSError as exc:
        raise ConfigError(
            f"{xml_key} {cfg.gpu_xml}: cannot read: {exc.strerror}; {remedy}"
        ) from exc
    except SmiXmlError as exc:
        raise ConfigError(f"{xml_key} {cfg.gpu_xml}: {exc}; {remedy}") from exc


# --- GPU sources: one chosen at start ------------------------------------------------------


def _smi_xml_error(exc: Exception) -> attestation_pb2.GpuState:
    return attestation_pb2.GpuState(
        source="nvidia-smi-xml",
        unavailable=[attestation_pb2.Unavailable(field="gpu", reason="error", detail=str(exc))],
    )


def smi_xml_source(xml: Path) -> CaptureCache:
    """The capture at ``xml``, parsed again only when the file changed (``CaptureCache``):
    re-parsing an unchanged 8-GPU capture was most of an attestation's cost."""
    from devtrust.agent.gpu.smi_xml import SmiXmlError, parse_smi_xml  # noqa: PLC0415 - its host only

    return CaptureCache(xml, parse_smi_xml, _smi_xml_error, (SmiXmlError,))


def _no_gpu() -> attestation_pb2.GpuState:
    return attestation_pb2.GpuState(source="none")


class _NvmlElseProcfs:
    """``auto``: NVML, else /proc/driver/nvidia."""

    def __init__(self, root: Path, nvml: NvmlSource) -> None:
        self._root = root
        self._nvml = nvml

    def __call__(self) -> attestation_pb2.GpuState:
        state = self._nvml()
        if not state.gpus and (self._root / "proc/driver/nvidia").exists():
            return collect_procfs(self._root)
        return state

    def close(self) -> None:
        self._nvml.close()


def gpu_source(cfg: AgentConfig, *, xids: XidWatcher | None = None) -> GpuSource:
    """The GPU source ``cfg.gpu_source`` names; ``auto`` tries NVML, then /proc/driver/nvidia.
    ``xids``: the NVML Xid watcher whose events NVML snapshots carry (started by the caller)."""
    root = cfg.posture_root
    match cfg.gpu_source:
        case "nvidia-smi-xml":
            if cfg.gpu_xml is None:  # AgentConfig refuses this; a caller may not
                raise ValueError("gpu source nvidia-smi-xml needs gpu_xml")
            return smi_xml_source(cfg.gpu_xml)
        case "procfs":
            return functools.partial(collect_procfs, root)
        case "none":
            return _no_gpu
        case "nvml":
            return NvmlSource(xids)
        case _:
            return _NvmlElseProcfs(root, NvmlSource(xids))


# --- host probes ---------------------------------------------------------------------------


class RootProbe:
    """The real host. Each snapshot is read on a worker thread, off the event loop."""

    def __init__(
        self,
        root: Path,
        *,
        mounts: list[str],
        gpu: GpuSource,
        event_log: Path | None,
        watcher: PostureWatcher,
    ) -> None:
        self._root = root
        self._mounts = list(mounts)
        self._gpu = gpu
        self._event_log = event_log
        self._watcher = watcher

    async def facts(self) -> common_pb2.HostFacts:
        return await asyncio.to_thread(host_facts, root=self._root)

    async def posture(self) -> attestation_pb2.OsPosture:
        return await asyncio.to_thread(collect_posture, self._root, mounts=self._mounts)

    async def gpu(self) -> attestation_pb2.GpuState:
        return await asyncio.to_thread(self._gpu)

    async def event_log(self) -> bytes | None:
        path = self._event_log
        if path is None:
            return None
        try:
            return await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            logger.warning("event log %s unreadable: %s", path, exc.strerror)
            return None

    def subscribe(self, listener: PostureListener) -> Unsubscribe:
        return self._watcher.subscribe(listener)

    def close(self) -> None:
        """Let go of what the GPU source holds (NVML, kept initialised between snapshots)."""
        close = getattr(self._gpu, "close", None)
        if close is not None:
            close()


class RecordedHost:
    """A host as recorded: what it reports is given, and ``change`` makes it report something
    else and tells the listeners, as the real watch would after its debounce."""

    def __init__(
        self,
        *,
        facts: common_pb2.HostFacts,
        posture: attestation_pb2.OsPosture,
        gpu: attestation_pb2.GpuState | None = None,
        event_log: bytes | None = None,
    ) -> None:
        self._facts = facts
        self._posture = posture
        self._gpu = gpu or attestation_pb2.GpuState(source="none")
        self._event_log = event_log
        self._listeners: dict[int, PostureListener] = {}
        self._next_id = 0

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    async def facts(self) -> common_pb2.HostFacts:
        return self._facts

    async def posture(self) -> attestation_pb2.OsPosture:
        return self._posture

    async def gpu(self) -> attestation_pb2.GpuState:
        return self._gpu

    async def event_log(self) -> bytes | None:
        return self._event_log

    def subscribe(self, listener: PostureListener) -> Unsubscribe:
        key, self._next_id = self._next_id, self._next_id + 1
        self._listeners[key] = listener

        def unsubscribe() -> None:
            self._listeners.pop(key, None)

        return unsubscribe

    def change(
        self,
        signals: list[str],
        *,
        posture: attestation_pb2.OsPosture | None = None,
        gpu: attestation_pb2.GpuState | None = None,
    ) -> None:
        if posture is not None:
            self._posture = posture
        if gpu is not None:
            self._gpu = gpu
        for listener in list(self._listeners.values()):
            listener(list(signals))


async def collect_body(
    host: HostProbe,
    *,
    now: datetime.datetime,
    certify_key_spki: bytes = b"",
    certify_key_proof: bytes = b"",
) -> bytes:
    """Collect facts, posture and GPU state now (concurrently) and return the serialized
    evidence body."""
    facts, posture, gpu = await asyncio.gather(host.facts(), host.posture(), host.gpu())
    return evidence_body(
        host=facts,
        certify_key_spki=certify_key_spki,
        certify_key_proof=certify_key_proof,
        now=now,
        os=posture,
        gpu=gpu,
    )
