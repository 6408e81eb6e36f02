"""What the agent reports in each evidence body (host facts, OS posture, GPU state, the event
log), and the host probes that report it (``interfaces.HostProbe``):

- ``RootProbe``, the real host: posture read under a root directory (``/`` on hosts, a
  prepared tree in tests), GPU state from the one source chosen at start (``gpu_source``),
  each GPU's own attestation from the attester chosen at start (``gpu_attester``), the event
  log from its file, posture changes from one ``PostureWatcher``;
- ``RecordedHost``: recorded captures, for simulated devices and tests; the attester it is
  given (``attester=``: ``gpu.attest.RecordedAttester``, the simulator's) answers for its GPUs.

GPU attestation is per challenge: ``collect_body`` given the challenge's nonce asks the host
for one GpuReport per GPU of the snapshot it just took (``gpu_reports``), each GPU with
``devtrust.core.binding.gpu_nonce(nonce, index)``, and puts them in the body the quote binds.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from devtrust.agent.config import AgentConfig
from devtrust.agent.evidence import evidence_body, host_facts
from devtrust.agent.gpu.attest import DisabledAttester, GpuAttester, NvmlAttester, collect_reports
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


def gpu_attester(cfg: AgentConfig) -> GpuAttester | None:
    """The attester ``cfg.gpu_attestation`` names: for auto, NVML (loaded at the first
    attestation: where it cannot be, every GPU is reported "unsupported", saying why); for
    off, every GPU "unsupported" ("disabled in agent.yaml"). GPUs listed from a capture or
    from /proc/driver/nvidia are not NVML's to ask: "unsupported", saying so. None where
    the GPU source is none (no GPU is listed, none is asked)."""
    if cfg.gpu_source == "none":
        return None
    if cfg.gpu_attestation == "off":
        return DisabledAttester()
    if cfg.gpu_source in ("nvidia-smi-xml", "procfs"):
        return DisabledAttester(
            f"GPU state read with gpu_source {cfg.gpu_source}, not NVML: GPU attestation "
            "asks the GPUs through NVML (gpu_source auto or nvml)"
        )
    return NvmlAttester()


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
        attester: GpuAttester | None = None,
    ) -> None:
        """``attester``: asks the GPUs for their own attestation (``gpu_attester``); None:
        the bodies carry no GPU report (as from an agent before GPU attestation)."""
        self._root = root
        self._mounts = list(mounts)
        self._gpu = gpu
        self._event_log = event_log
        self._watcher = watcher
        self._attester = attester

    async def facts(self) -> common_pb2.HostFacts:
        return await asyncio.to_thread(host_facts, root=self._root)

    async def posture(self) -> attestation_pb2.OsPosture:
        return await asyncio.to_thread(collect_posture, self._root, mounts=self._mounts)

    async def gpu(self) -> attestation_pb2.GpuState:
        return await asyncio.to_thread(self._gpu)

    async def gpu_reports(
        self, indices: Sequence[int], nonce: bytes
    ) -> list[attestation_pb2.GpuReport]:
        """One report per GPU index, asked for the challenge ``nonce`` (on worker threads)."""
        if self._attester is None:
            return []
        return await collect_reports(self._attester, indices, nonce)

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
        """Let go of what the GPU source and the attester hold (NVML, kept initialised
        between snapshots and between challenges)."""
        close = getattr(self._gpu, "close", None)
        if close is not None:
            close()
        if self._attester is not None:
            self._attester.close()


class RecordedHost:
    """A host as recorded: what it reports is given, and ``change`` makes it report something
    else and tells the listeners, as the real watch would after its debounce.

    ``attester`` answers for its GPUs at each challenge (``gpu.attest.RecordedAttester``, a
    simulated GPU's attester); None: its bodies carry no GPU report (as from an agent before
    GPU attestation)."""

    def __init__(
        self,
        *,
        facts: common_pb2.HostFacts,
        posture: attestation_pb2.OsPosture,
        gpu: attestation_pb2.GpuState | None = None,
        event_log: bytes | None = None,
        attester: GpuAttester | None = None,
    ) -> None:
        self._facts = facts
        self._posture = posture
        self._gpu = gpu or attestation_pb2.GpuState(source="none")
        self._event_log = event_log
        self.attester = attester
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

    async def gpu_reports(
        self, indices: Sequence[int], nonce: bytes
    ) -> list[attestation_pb2.GpuReport]:
        if self.attester is None:
            return []
        return await collect_reports(self.attester, indices, nonce)

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
    nonce: bytes | None = None,
    certify_key_spki: bytes = b"",
    certify_key_proof: bytes = b"",
) -> bytes:
    """Collect facts, posture and GPU state now (concurrently) and return the serialized
    evidence body. Given the challenge's ``nonce``, each GPU of the snapshot is then asked
    to attest (``HostProbe.gpu_reports``): every GPU listed gets exactly one GpuReport, in
    the body the quote binds; without one (no challenge), none is asked."""
    facts, posture, gpu = await asyncio.gather(host.facts(), host.posture(), host.gpu())
    reports: list[attestation_pb2.GpuReport] = []
    if nonce is not None and gpu.gpus:
        reports = await host.gpu_reports([g.index for g in gpu.gpus], nonce)
    return evidence_body(
        host=facts,
        certify_key_spki=certify_key_spki,
        certify_key_proof=certify_key_proof,
        now=now,
        os=posture,
        gpu=gpu,
        gpu_reports=reports,
    )
