"""The NVML backend's mapping, through a stand-in ``pynvml`` module: this machine has no GPU
and no NVML, the one edge where a stand-in is allowed. It checks what our code does with
NVML's answers and errors; the real driver is checked on a GPU host (see README)."""

from __future__ import annotations

import sys
import time
import types
from typing import Any

import pytest

from devtrust.agent.gpu.nvml import XidWatcher, collect_nvml


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_NoPermission(NVMLError):
    pass


class NVMLError_GpuIsLost(NVMLError):
    pass


class NVMLError_Timeout(NVMLError):
    pass


def _fake_nvml(lost: bool) -> types.ModuleType:
    nv = types.ModuleType("pynvml")
    calls: dict[str, Any] = {
        "NVMLError": NVMLError,
        "NVMLError_Timeout": NVMLError_Timeout,
        "NVML_INFOROM_OEM": 1,
        "NVML_INFOROM_ECC": 2,
        "NVML_VOLATILE_ECC": 0,
        "NVML_AGGREGATE_ECC": 1,
        "NVML_MEMORY_ERROR_TYPE_UNCORRECTED": 1,
        "NVML_NVLINK_MAX_LINKS": 4,
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlSystemGetDriverVersion": lambda: "580.159.03",
        "nvmlSystemGetCudaDriverVersion_v2": lambda: 13000,
        "nvmlSystemGetNVMLVersion": lambda: "13.580.159.03",
        "nvmlSystemGetConfComputeState": lambda: types.SimpleNamespace(
            environment=1, ccFeature=1, devToolsMode=0
        ),
        "nvmlDeviceGetCount": lambda: 2,
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetName": lambda h: b"NVIDIA H100 80GB HBM3",
        "nvmlDeviceGetUUID": lambda h: f"GPU-{h}",
        "nvmlDeviceGetSerial": lambda h: (_ for _ in ()).throw(NVMLError_NoPermission()),
        "nvmlDeviceGetPciInfo": lambda h: types.SimpleNamespace(busId=f"00000000:{h:02x}:00.0"),
        "nvmlDeviceGetBoardId": lambda h: 0x5300,
        "nvmlDeviceGetVbiosVersion": lambda h: "96.00.99.00.01",
        "nvmlDeviceGetInforomImageVersion": lambda h: "G520.0200.00.05",
        "nvmlDeviceGetInforomVersion": lambda h, kind: {1: "2.1", 2: "7.16"}[kind],
        "nvmlDeviceGetGspFirmwareVersion": lambda h: "580.159.03",
        "nvmlDeviceGetGspFirmwareMode": lambda h: (1, 1),
        "nvmlDeviceGetEccMode": lambda h: (1, 1),
        "nvmlDeviceGetMigMode": lambda h: (0, 0),
        "nvmlDeviceGetPersistenceMode": lambda h: 1,
        "nvmlDeviceGetRetiredPagesPendingStatus": lambda h: (_ for _ in ()).throw(
            NVMLError_NotSupported()
        ),
        "nvmlDeviceGetRemappedRows": lambda h: (0, 0, 0, 0),
        "nvmlDeviceGetTotalEccErrors": (
            lambda h, kind, counter: (
                (_ for _ in ()).throw(NVMLError_GpuIsLost()) if lost and h == 1 else 0
            )
        ),
        "nvmlDeviceGetNvLinkState": (
            lambda h, link: 1 if link < 2 else (_ for _ in ()).throw(NVMLError_NotSupported())
        ),
        "nvmlDeviceGetGpuFabricInfo": lambda h: types.SimpleNamespace(state=3, status=0),
    }
    for name, value in calls.items():
        setattr(nv, name, value)
    return nv


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(lost=True))


@pytest.mark.usefixtures("fake")
def test_nvml_snapshot_and_unavailable_reasons() -> None:
    state = collect_nvml()
    assert (state.source, state.driver_version, state.cuda_driver_version) == (
        "nvml",
        "580.159.03",
        "13.0",
    )
    first, second = state.gpus
    assert (first.name, first.uuid, first.pci_bus_id, first.board_id) == (
        "NVIDIA H100 80GB HBM3",
        "GPU-0",
        "00000000:00:00.0",
        "0x5300",
    )
    assert (first.ecc_enabled, first.mig_enabled, first.persistence_mode) == (True, False, True)
    assert (first.cc_state, first.gsp_firmware_mode) == ("on", "enabled")
    assert [link.active for link in first.nvlinks] == [True, True]
    assert first.ecc_uncorrected_volatile == 0
    reasons = {u.field: u.reason for u in first.unavailable}
    assert reasons == {"serial": "no_permission", "retired_pages_pending": "not_supported"}
    lost = {u.field: u.reason for u in second.unavailable}
    assert lost["ecc_uncorrected_volatile"] == "gpu_lost"
    assert not second.HasField("ecc_uncorrected_volatile")


def test_without_nvml_the_snapshot_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = types.ModuleType("pynvml")

    def init() -> None:
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    # A stand-in module: mypy cannot know the attributes set on it here.
    broken.nvmlInit = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    state = collect_nvml()
    assert list(state.gpus) == []
    [why] = state.unavailable
    assert (why.field, why.reason) == ("nvml", "not_supported")
    assert "libnvidia-ml.so.1" in why.detail
    assert XidWatcher().start() is False


def test_xid_events_are_reported_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = _fake_nvml(lost=False)
    queue = [types.SimpleNamespace(device=1, eventData=79)]

    def wait(events: object, ms: int) -> object:
        if queue:
            return queue.pop()
        raise NVMLError_Timeout

    # A stand-in module: mypy cannot know the attributes set on it here.
    nv.nvmlEventSetCreate = object  # type: ignore[attr-defined]
    nv.nvmlEventTypeXidCriticalError = 8  # type: ignore[attr-defined]
    nv.nvmlDeviceRegisterEvents = lambda h, kind, events: None  # type: ignore[attr-defined]
    nv.nvmlEventSetWait_v2 = wait  # type: ignore[attr-defined]
    nv.nvmlEventSetFree = lambda events: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    watcher = XidWatcher(wait_ms=10)
    assert watcher.start() is True
    try:
        for _ in range(200):
            if watcher.recent("GPU-1"):
                break
            time.sleep(0.01)
    finally:
        watcher.stop()
    assert watcher.recent("GPU-1") == [79]
    state = collect_nvml(watcher)
    assert list(state.gpus[1].recent_xids) == [79]
    assert list(state.gpus[0].recent_xids) == []
