"""GPU state from NVML through nvidia-ml-py (``pynvml``), NVIDIA's own Python binding.

Every query is wrapped: NVML's NotSupported, NoPermission and GpuIsLost become entries in
``unavailable`` with that reason; a missing library or driver makes the whole snapshot
unavailable, never an exception. Xid events are read with ``xid_events`` where the driver
supports event sets. Checked against a real driver only where a GPU is present: on machines
without one, the recorded ``nvidia-smi -q -x`` snapshots go through the same GpuState.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from devtrust.v1 import attestation_pb2

logger = logging.getLogger(__name__)
T = TypeVar("T")


def nvml_reason(exc: Exception) -> str:
    """An NVML error's class as Unavailable.reason names it (also the attester's)."""
    name = type(exc).__name__
    if "NotSupported" in name or "FunctionNotFound" in name:
        return "not_supported"
    if "NoPermission" in name:
        return "no_permission"
    if "GpuIsLost" in name:
        return "gpu_lost"
    return "error"


# Reasons that may not hold next time: an identity read with them is not kept.
_PASSING = ("error", "gpu_lost")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _not_loadable(exc: Exception) -> attestation_pb2.GpuState:
    return attestation_pb2.GpuState(
        source="nvml",
        unavailable=[
            attestation_pb2.Unavailable(
                field="nvml", reason="not_supported", detail=f"{type(exc).__name__}: {exc}"
            )
        ],
    )


def _snapshot(
    nv: Any, xids: XidWatcher | None, known: dict[int, attestation_pb2.Gpu] | None
) -> attestation_pb2.GpuState:
    state = attestation_pb2.GpuState(source="nvml")
    cc = _system(nv, state)
    for index in range(nv.nvmlDeviceGetCount()):
        gpu = _device(nv, index, cc, known)
        if xids is not None:
            gpu.recent_xids.extend(xids.recent(gpu.uuid))
        state.gpus.append(gpu)
    return state


def collect_nvml(xids: XidWatcher | None = None) -> attestation_pb2.GpuState:
    """One snapshot: NVML initialised, read, shut down."""
    try:
        import pynvml  # noqa: PLC0415 - optional at run time: hosts without NVIDIA have none

        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - library missing, driver not loaded, ...
        return _not_loadable(exc)
    try:
        return _snapshot(pynvml, xids, None)
    finally:
        pynvml.nvmlShutdown()


class NvmlSource:
    """Snapshots for an agent's life: NVML stays initialised between challenges (as the Xid
    watcher keeps it anyway), and each GPU's identity (name, UUID, serial, PCI bus id,
    board, VBIOS, InfoROM, GSP firmware), fixed while the driver is loaded, is read once:
    at each snapshot one UUID call per GPU checks that the index still names that GPU.
    Health and modes (ECC, remapped rows, MIG, persistence, NVLink, fabric, CC) are read at
    every snapshot. Where NVML is missing each snapshot tries again; an NVML failure outside
    a single field shuts it down, to start afresh at the next one."""

    def __init__(self, xids: XidWatcher | None = None) -> None:
        self._xids = xids
        self._nv: Any = None
        self._known: dict[int, attestation_pb2.Gpu] = {}
        self._lock = threading.Lock()
        self.inits = 0

    def __call__(self) -> attestation_pb2.GpuState:
        with self._lock:
            if self._nv is None:
                try:
                    import pynvml  # noqa: PLC0415 - optional at run time

                    pynvml.nvmlInit()
                except Exception as exc:  # noqa: BLE001 - library missing, driver not loaded
                    return _not_loadable(exc)
                self._nv, self._known = pynvml, {}
                self.inits += 1
            nv = self._nv
            try:
                return _snapshot(nv, self._xids, self._known)
            except nv.NVMLError as exc:
                self._shutdown()
                state = attestation_pb2.GpuState(source="nvml")
                state.unavailable.append(
                    attestation_pb2.Unavailable(
                        field="nvml", reason=nvml_reason(exc), detail=str(exc)
                    )
                )
                return state

    def close(self) -> None:
        with self._lock:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._nv is not None:
            with contextlib.suppress(Exception):
                self._nv.nvmlShutdown()
        self._nv, self._known = None, {}


def _system(nv: Any, state: attestation_pb2.GpuState) -> Any:
    """Driver, CUDA and NVML versions; returns the system's Confidential Computing state."""

    def read(field: str, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except nv.NVMLError as exc:
            state.unavailable.append(
                attestation_pb2.Unavailable(field=field, reason=nvml_reason(exc), detail=str(exc))
            )
            return None

    state.driver_version = _text(read("driver_version", nv.nvmlSystemGetDriverVersion) or "")
    cuda = read("cuda_driver_version", nv.nvmlSystemGetCudaDriverVersion_v2)
    if cuda:
        state.cuda_driver_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
    state.nvml_version = _text(read("nvml_version", nv.nvmlSystemGetNVMLVersion) or "")
    return read("cc_state", nv.nvmlSystemGetConfComputeState)


def _device(
    nv: Any, index: int, cc: Any, known: dict[int, attestation_pb2.Gpu] | None
) -> attestation_pb2.Gpu:
    """GPU ``index``: its identity from ``known`` when the UUID there is still its UUID
    (read again otherwise, and kept there), its health read now."""
    gpu = attestation_pb2.Gpu(index=index)
    h = nv.nvmlDeviceGetHandleByIndex(index)
    cached = None if known is None else known.get(index)
    if cached is not None and cached.uuid and _uuid(nv, h) == cached.uuid:
        gpu.CopyFrom(cached)
    else:
        _identity(nv, h, gpu)
        if known is not None and not any(u.reason in _PASSING for u in gpu.unavailable):
            known[index] = attestation_pb2.Gpu()
            known[index].CopyFrom(gpu)
    _health(nv, h, gpu, cc)
    return gpu


def _uuid(nv: Any, h: Any) -> str | None:
    try:
        return _text(nv.nvmlDeviceGetUUID(h))
    except nv.NVMLError:
        return None


def _reader(nv: Any, gpu: attestation_pb2.Gpu) -> Callable[..., Any]:
    def read(field: str, fn: Callable[..., T], *args: Any) -> T | None:
        try:
            return fn(*args)
        except nv.NVMLError as exc:
            gpu.unavailable.append(
                attestation_pb2.Unavailable(field=field, reason=nvml_reason(exc), detail=str(exc))
            )
            return None

    return read


def _identity(nv: Any, h: Any, gpu: attestation_pb2.Gpu) -> None:
    """What does not change while the driver is loaded."""
    read = _reader(nv, gpu)
    gpu.name = _text(read("name", nv.nvmlDeviceGetName, h) or "")
    gpu.uuid = _text(read("uuid", nv.nvmlDeviceGetUUID, h) or "")
    gpu.serial = _text(read("serial", nv.nvmlDeviceGetSerial, h) or "")
    pci = read("pci_bus_id", nv.nvmlDeviceGetPciInfo, h)
    gpu.pci_bus_id = _text(pci.busId) if pci is not None else ""
    board = read("board_id", nv.nvmlDeviceGetBoardId, h)
    gpu.board_id = f"0x{board:x}" if board is not None else ""
    gpu.vbios_version = _text(read("vbios_version", nv.nvmlDeviceGetVbiosVersion, h) or "")
    gpu.inforom_image = _text(read("inforom_image", nv.nvmlDeviceGetInforomImageVersion, h) or "")
    gpu.inforom_oem = _text(
        read("inforom_oem", nv.nvmlDeviceGetInforomVersion, h, nv.NVML_INFOROM_OEM) or ""
    )
    gpu.inforom_ecc = _text(
        read("inforom_ecc", nv.nvmlDeviceGetInforomVersion, h, nv.NVML_INFOROM_ECC) or ""
    )
    gpu.gsp_firmware_version = _text(
        read("gsp_firmware_version", nv.nvmlDeviceGetGspFirmwareVersion, h) or ""
    )
    gsp = read("gsp_firmware_mode", nv.nvmlDeviceGetGspFirmwareMode, h)
    if gsp is not None:
        gpu.gsp_firmware_mode = "enabled" if gsp[0] else "disabled"


def _health(nv: Any, h: Any, gpu: attestation_pb2.Gpu, cc: Any) -> None:
    """Modes and health, read at every snapshot."""
    read = _reader(nv, gpu)
    ecc = read("ecc_mode", nv.nvmlDeviceGetEccMode, h)
    if ecc is not None:
        gpu.ecc_enabled = bool(ecc[0])
    mig = read("mig_mode", nv.nvmlDeviceGetMigMode, h)
    if mig is not None:
        gpu.mig_enabled = bool(mig[0])
    persistence = read("persistence_mode", nv.nvmlDeviceGetPersistenceMode, h)
    if persistence is not None:
        gpu.persistence_mode = bool(persistence)
    if cc is not None:
        gpu.cc_state = "on" if getattr(cc, "ccFeature", 0) else "off"
        gpu.cc_settings["environment"] = str(getattr(cc, "environment", ""))
        gpu.cc_settings["dev_tools_mode"] = str(getattr(cc, "devToolsMode", ""))
    pending = read("retired_pages_pending", nv.nvmlDeviceGetRetiredPagesPendingStatus, h)
    if pending is not None:
        gpu.retired_pages_pending = int(bool(pending))
    rows = read("remapped_rows", nv.nvmlDeviceGetRemappedRows, h)
    if rows is not None:
        gpu.remapped_rows_pending = int(bool(rows[2]))
        gpu.remapped_rows_failed = int(bool(rows[3]))
    for attr, counter in (
        ("ecc_uncorrected_volatile", nv.NVML_VOLATILE_ECC),
        ("ecc_uncorrected_aggregate", nv.NVML_AGGREGATE_ECC),
    ):
        value = read(
            attr, nv.nvmlDeviceGetTotalEccErrors, h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, counter
        )
        if value is not None:
            setattr(gpu, attr, int(value))
    for link in range(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            active = nv.nvmlDeviceGetNvLinkState(h, link)
        except nv.NVMLError:
            break  # no more links (or none at all)
        gpu.nvlinks.append(attestation_pb2.NvLink(link=link, active=bool(active)))
    fabric = read("fabric", nv.nvmlDeviceGetGpuFabricInfo, h)
    if fabric is not None:
        gpu.fabric_state = str(fabric.state)
        gpu.fabric_status = str(fabric.status)
    if gpu.HasField("mig_enabled") and gpu.mig_enabled:
        for slot in range(read("mig_devices", nv.nvmlDeviceGetMaxMigDeviceCount, h) or 0):
            try:
                mh = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, slot)
            except nv.NVMLError:
                continue
            gpu.mig_devices.append(
                attestation_pb2.MigDevice(
                    gpu_instance_id=nv.nvmlDeviceGetGpuInstanceId(mh),
                    compute_instance_id=nv.nvmlDeviceGetComputeInstanceId(mh),
                )
            )


class XidWatcher:
    """Critical Xid events (NVML's nvmlEventTypeXidCriticalError) of every GPU, the last few
    per GPU UUID, gathered on a thread of its own (NVML's event wait blocks). Where NVML or
    its events are missing, ``start`` returns False and nothing runs."""

    def __init__(self, keep: int = 16, wait_ms: int = 500) -> None:
        self._keep = keep
        self._wait_ms = wait_ms
        self._xids: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def recent(self, uuid: str) -> list[int]:
        with self._lock:
            return list(self._xids.get(uuid, []))

    def record(self, uuid: str, xid: int) -> None:
        with self._lock:
            events = self._xids.setdefault(uuid, [])
            events.append(xid)
            del events[: -self._keep]

    def start(self) -> bool:
        try:
            import pynvml  # noqa: PLC0415

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - no library, no driver: nothing to watch
            return False
        try:
            events = pynvml.nvmlEventSetCreate()
            registered = 0
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                try:
                    pynvml.nvmlDeviceRegisterEvents(
                        handle, pynvml.nvmlEventTypeXidCriticalError, events
                    )
                    registered += 1
                except pynvml.NVMLError as exc:
                    logger.info("GPU %d: Xid events unavailable: %s", index, exc)
        except pynvml.NVMLError as exc:
            logger.info("Xid events unavailable: %s", exc)
            pynvml.nvmlShutdown()
            return False
        if not registered:
            pynvml.nvmlEventSetFree(events)
            pynvml.nvmlShutdown()
            return False
        self._thread = threading.Thread(
            target=self._run, args=(pynvml, events), name="nvml-xid", daemon=True
        )
        self._thread.start()
        return True

    def _run(self, nv: Any, events: Any) -> None:
        try:
            while not self._stop.is_set():
                try:
                    data = nv.nvmlEventSetWait_v2(events, self._wait_ms)
                except nv.NVMLError_Timeout:
                    continue
                except nv.NVMLError as exc:
                    logger.warning("Xid event wait failed: %s", exc)
                    return
                uuid = _text(nv.nvmlDeviceGetUUID(data.device))
                logger.warning("GPU %s: Xid %d", uuid, data.eventData)
                self.record(uuid, int(data.eventData))
        finally:
            nv.nvmlEventSetFree(events)
            nv.nvmlShutdown()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
