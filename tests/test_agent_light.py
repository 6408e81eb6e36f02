"""Issue 11, item 4: a lighter agent. GPU state kept between challenges and collected again
only when its source changed (an nvidia-smi capture's file stamp; NVML kept initialised,
each GPU's identity read once); listeners from sock_diag; startup memory given back; the
agent importing only what its host needs."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devtrust.agent import memory, posture
from devtrust.agent.collect import gpu_source
from devtrust.agent.config import AgentConfig
from devtrust.agent.gpu.cache import CaptureCache, file_stamp
from devtrust.agent.gpu.nvml import NvmlSource, collect_nvml
from devtrust.agent.gpu.smi_xml import parse_smi_xml
from devtrust.agent.main import make_host
from devtrust.agent.memory import _candidates
from devtrust.agent.netlink import SockDiag
from devtrust.agent.posture import collect_posture
from devtrust.agent.signals import Fingerprinter
from devtrust.v1 import attestation_pb2
from tests.corpus import IN_REPO as CORPUS
from tests.test_nvml import NVMLError, NVMLError_GpuIsLost, _fake_nvml

H100 = CORPUS / "gpu/nvidia_k8s-test-infra/qx-h100.xml"
A100 = CORPUS / "gpu/nvidia_k8s-test-infra/qx-a100.xml"
STAMP_FIELDS = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")


# --- the nvidia-smi capture ------------------------------------------------------------------


class Counting:
    """parse_smi_xml, counted."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, data: bytes) -> attestation_pb2.GpuState:
        self.calls += 1
        return parse_smi_xml(data)


def _error(exc: Exception) -> attestation_pb2.GpuState:
    return attestation_pb2.GpuState(
        source="nvidia-smi-xml",
        unavailable=[attestation_pb2.Unavailable(field="gpu", reason="error", detail=str(exc))],
    )


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    path = tmp_path / "gpu.xml"
    shutil.copyfile(H100, path)
    return path


def test_an_unchanged_capture_is_parsed_once(capture: Path) -> None:
    parse = Counting()
    cache = CaptureCache(capture, parse, _error)
    states = [cache() for _ in range(5)]
    assert parse.calls == 1
    assert len(states[0].gpus) == 8
    assert all(state is states[0] for state in states)
    assert states[0] == parse_smi_xml(H100.read_bytes())


def test_a_changed_capture_is_parsed_again(capture: Path) -> None:
    parse = Counting()
    cache = CaptureCache(capture, parse, _error)
    assert len(cache().gpus) == 8
    shutil.copyfile(A100, capture)  # rewritten in place
    assert [g.name for g in cache().gpus] == [g.name for g in parse_smi_xml(A100.read_bytes()).gpus]
    new = capture.with_name("gpu.xml.new")
    shutil.copyfile(H100, new)
    os.replace(new, capture)  # replaced by rename
    assert len(cache().gpus) == 8
    assert parse.calls == 3


_SEQUENCE = {"st_ino": 1, "st_dev": 2, "st_size": 6}  # their places in a stat_result


def _stat(real: os.stat_result, values: dict[str, int]) -> os.stat_result:
    """``real`` with the stamp's fields set to ``values``."""
    sequence = list(real)[:10]
    extra = {"st_mtime_ns": real.st_mtime_ns, "st_ctime_ns": real.st_ctime_ns}
    for field, value in values.items():
        if field in _SEQUENCE:
            sequence[_SEQUENCE[field]] = value
        else:
            extra[field] = value
    out = os.stat_result(sequence, extra)
    assert all(getattr(out, k) == v for k, v in values.items())
    return out


@pytest.mark.parametrize("field", STAMP_FIELDS)
def test_each_part_of_the_stamp_counts(capture: Path, field: str) -> None:
    """The content changes while the stamp the cache sees holds every part but ``field``
    fixed: it is parsed again exactly when ``field`` differs. A stamp without ``field``
    (size, mtime, inode, device, ctime) fails here."""
    pinned = {"st_dev": 2, "st_ino": 3, "st_size": 4, "st_mtime_ns": 5, "st_ctime_ns": 6}

    def stat(fd: int) -> os.stat_result:
        return _stat(os.fstat(fd), pinned)

    parse = Counting()
    cache = CaptureCache(capture, parse, _error, stat=stat)
    assert len(cache().gpus) == 8
    shutil.copyfile(A100, capture)
    assert len(cache().gpus) == 8  # the stamp did not move: the kept state
    assert parse.calls == 1
    pinned[field] = 99
    assert len(cache().gpus) == len(parse_smi_xml(A100.read_bytes()).gpus)
    assert parse.calls == 2


def test_file_stamp_is_all_five(capture: Path) -> None:
    real = os.stat(capture)
    stamps = {file_stamp(real)}
    for n, field in enumerate(STAMP_FIELDS):
        stamps.add(file_stamp(_stat(real, {field: 1000 + n})))
    assert len(stamps) == 1 + len(STAMP_FIELDS)


def test_a_broken_capture_is_unavailable_and_tried_again(capture: Path) -> None:
    parse = Counting()
    cache = CaptureCache(capture, parse, _error, (ValueError,))
    capture.write_text("<nvidia_smi_log><gpu>")
    broken = cache()
    assert [u.field for u in broken.unavailable] == ["gpu"]
    capture.unlink()
    assert "No such file" in cache().unavailable[0].detail
    shutil.copyfile(H100, capture)
    assert len(cache().gpus) == 8


def test_the_agent_gpu_source_keeps_the_capture(capture: Path) -> None:
    source = gpu_source(AgentConfig(gpu_source="nvidia-smi-xml", gpu_xml=capture))
    assert isinstance(source, CaptureCache)
    first = source()
    assert source() is first
    assert source.parses == 1


# --- NVML ------------------------------------------------------------------------------------


class Calls:
    """Counts the calls made to a stand-in pynvml's functions."""

    def __init__(self, nv: types.ModuleType) -> None:
        self.counts: dict[str, int] = {}
        for name in dir(nv):
            fn = getattr(nv, name)
            if name.startswith("nvml") and callable(fn):
                setattr(nv, name, self._wrap(name, fn))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            self.counts[name] = self.counts.get(name, 0) + 1
            return fn(*args)

        return call


def test_nvml_stays_initialised_and_reads_identity_once(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = _fake_nvml(lost=False)
    calls = Calls(nv)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    source = NvmlSource()
    snapshots = [source() for _ in range(3)]
    assert all(s == collect_nvml() for s in snapshots)  # the same as a one-shot snapshot
    calls.counts.clear()
    source()
    assert calls.counts.get("nvmlInit", 0) == 0
    assert calls.counts.get("nvmlShutdown", 0) == 0
    assert calls.counts.get("nvmlDeviceGetName", 0) == 0  # identity: kept
    assert calls.counts["nvmlDeviceGetUUID"] == 2  # one check per GPU
    assert calls.counts["nvmlDeviceGetEccMode"] == 2  # health: read every time
    assert calls.counts["nvmlDeviceGetTotalEccErrors"] == 4
    source.close()
    assert calls.counts["nvmlShutdown"] == 1


def test_nvml_reads_identity_again_when_the_index_names_another_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nv = _fake_nvml(lost=False)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    source = NvmlSource()
    assert [g.uuid for g in source().gpus] == ["GPU-0", "GPU-1"]
    nv.nvmlDeviceGetUUID = lambda h: f"GPU-new-{h}"  # type: ignore[attr-defined]
    nv.nvmlDeviceGetVbiosVersion = lambda h: "97.00.00.00.01"  # type: ignore[attr-defined]
    state = source()
    assert [g.uuid for g in state.gpus] == ["GPU-new-0", "GPU-new-1"]
    assert {g.vbios_version for g in state.gpus} == {"97.00.00.00.01"}


def test_nvml_does_not_keep_an_identity_read_from_a_lost_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nv = _fake_nvml(lost=False)
    monkeypatch.setitem(sys.modules, "pynvml", nv)

    def lost(h: int) -> str:
        raise NVMLError_GpuIsLost

    real = nv.nvmlDeviceGetVbiosVersion
    nv.nvmlDeviceGetVbiosVersion = lost  # type: ignore[attr-defined]
    source = NvmlSource()
    first = source().gpus
    assert {(u.field, u.reason) for g in first for u in g.unavailable} >= {
        ("vbios_version", "gpu_lost")
    }
    nv.nvmlDeviceGetVbiosVersion = real  # type: ignore[attr-defined]
    assert {g.vbios_version for g in source().gpus} == {"96.00.99.00.01"}


def test_an_nvml_failure_starts_it_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = _fake_nvml(lost=False)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    source = NvmlSource()
    assert len(source().gpus) == 2
    count = nv.nvmlDeviceGetCount

    def gone() -> int:
        raise NVMLError("Driver Not Loaded")

    nv.nvmlDeviceGetCount = gone  # type: ignore[attr-defined]
    failed = source()
    assert (list(failed.gpus), [u.field for u in failed.unavailable]) == ([], ["nvml"])
    nv.nvmlDeviceGetCount = count  # type: ignore[attr-defined]
    assert len(source().gpus) == 2
    assert source.inits == 2


# --- listeners from sock_diag ----------------------------------------------------------------


def _proc_listeners(name: str) -> list[bytes]:
    lines = Path(f"/proc/net/{name}").read_bytes().splitlines()[1:]
    return sorted(line.split()[1] for line in lines if line.split()[3] == b"0A")


@pytest.mark.parametrize(("family", "name"), [(socket.AF_INET, "tcp"), (socket.AF_INET6, "tcp6")])
def test_sock_diag_rows_are_proc_net_tcp_rows(family: int, name: str) -> None:
    diag = SockDiag()
    with socket.socket(family) as listener:
        listener.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        listener.listen()
        port = f":{listener.getsockname()[1]:04X}".encode()
        for _ in range(20):  # other processes open and close listeners meanwhile
            rows, proc = sorted(diag.listening(family)), _proc_listeners(name)
            if rows == proc:
                break
        assert rows == proc
        assert any(row.endswith(port) for row in rows)
    diag.close()


def test_a_dump_left_unread_does_not_end_the_next() -> None:
    """A dump that stopped part-way leaves its messages in the socket, and the kernel refuses
    another dump on it (EBUSY): the next call opens a new socket and lists the listeners."""
    diag = SockDiag()
    with socket.socket(socket.AF_INET) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = f":{listener.getsockname()[1]:04X}".encode()
        real_recv = diag._sock.recv
        calls = 0

        def interrupted(size: int) -> bytes:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise OSError("interrupted")  # the first dump fails before reading anything
            return real_recv(size)

        diag._sock = _Recv(diag._sock, interrupted)  # type: ignore[assignment]
        with pytest.raises(OSError, match="interrupted"):
            diag.listening(socket.AF_INET)
        rows = diag.listening(socket.AF_INET)
        assert any(row.endswith(port) for row in rows)
    diag.close()


class _Recv:
    """A socket whose recv is replaced."""

    def __init__(self, sock: socket.socket, recv: Callable[[int], bytes]) -> None:
        self._sock, self.recv = sock, recv

    def sendto(self, data: bytes, address: tuple[int, int]) -> int:
        return self._sock.sendto(data, address)

    def close(self) -> None:
        self._sock.close()


def test_the_host_fingerprint_is_the_same_from_sock_diag() -> None:
    with_diag = Fingerprinter(Path("/"), ["listening_sockets"])
    assert with_diag.diag is not None
    from_proc = Fingerprinter(Path("/"), ["listening_sockets"])
    from_proc.diag = None
    for _ in range(20):
        if with_diag() == from_proc():
            break
    assert with_diag() == from_proc()
    assert Fingerprinter(Path("/tmp"), ["listening_sockets"]).diag is None


# --- memory ----------------------------------------------------------------------------------

SMAPS = """\
7f0000000000-7f0000001000 r--p 00000000 08:01 1 /usr/lib/libfoo.so.1
Rss:                   4 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000001000-7f0000003000 r-xp 00001000 08:01 1 /usr/lib/libfoo.so.1
Rss:                   8 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000003000-7f0000004000 r--p 00003000 08:01 1 /usr/lib/libfoo.so.1
Rss:                   4 kB
Shared_Dirty:          0 kB
Private_Dirty:         4 kB
Anonymous:             4 kB
7f0000004000-7f0000005000 rw-p 00004000 08:01 1 /usr/lib/libfoo.so.1
Rss:                   4 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000005000-7f0000006000 r--p 00000000 08:01 2 /usr/lib/locale/locale-archive
Rss:                   4 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000006000-7f0000007000 r-xp 00000000 08:01 3 /usr/lib/x86_64-linux-gnu/gconv/UTF-16.so
Rss:                   4 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000007000-7f0000008000 r--s 00000000 08:01 4 /usr/lib/libshared.so
Rss:                   4 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000008000-7f0000009000 r-xp 00000000 08:01 1 /usr/lib/libfoo.so.1
Rss:                   0 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000009000-7f000000a000 r--p 00000000 00:00 0
Rss:                   4 kB
Anonymous:             4 kB
"""


def test_only_clean_read_only_library_pages_are_given_back() -> None:
    """Never a page of the process's own (relocated data, anything writable), never a
    file that is not a loaded library, never glibc's iconv modules (unloaded at run time)."""
    assert _candidates(SMAPS) == [
        (0x7F0000000000, 0x7F0000001000, 4),
        (0x7F0000001000, 0x7F0000003000, 8),
    ]


def test_the_agent_works_after_giving_memory_back(tmp_path: Path) -> None:
    """In a process of its own: what an attestation uses (TLS, signatures, protobuf, the
    TSS, XML) still works after its library pages were unmapped, and resident memory fell."""
    code = """
import asyncio, datetime, hashlib, sys
from pathlib import Path
import psutil
import devtrust.agent.main as main
from devtrust.agent.collect import collect_body
from devtrust.agent.config import AgentConfig
from devtrust.agent.memory import release_startup_memory
from devtrust.agent.state import new_key, spki
from devtrust.core.binding import sign_possession
from devtrust.swtpm.hosttree import write_host_tree
from devtrust.v1 import attestation_pb2
import grpc, tpm2_pytss

root = write_host_tree(Path(sys.argv[1]) / "host")
cfg = AgentConfig(posture_root=root, gpu_source="nvidia-smi-xml", gpu_xml=Path(sys.argv[2]))
host = main.make_host(cfg)
now = datetime.datetime.now(datetime.UTC)
before = asyncio.run(collect_body(host, now=now))
rss = psutil.Process().memory_info().rss
released = release_startup_memory()
assert released > 1000, released
assert psutil.Process().memory_info().rss < rss
assert asyncio.run(collect_body(host, now=now)) == before
key = new_key()
assert len(sign_possession(key, b"n" * 32, "ab" * 32)) > 0 and spki(key)
body = attestation_pb2.EvidenceBody.FromString(before)
assert len(body.gpu.gpus) == 8
grpc.ssl_channel_credentials()
assert tpm2_pytss.TPM2B_DIGEST(b"x" * 32).marshal()
assert hashlib.sha256(b"x").hexdigest()
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(H100)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# --- imports ---------------------------------------------------------------------------------


def test_the_agent_imports_only_what_its_host_needs() -> None:
    """`devtrust-agent` loads neither the verifier nor what only some hosts or commands use:
    pynvml (NVML hosts, when a snapshot is taken), the XML parser (nvidia-smi captures),
    importlib.metadata (--version), json_format (collect --json)."""
    code = (
        "import sys, devtrust.agent.main; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pynvml', 'xml', 'importlib', 'google') or m.startswith('devtrust.verifier'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(done.stdout.split())
    unwanted = {
        "pynvml",
        "xml.etree.ElementTree",
        "importlib.metadata",
        "google.protobuf.json_format",
    }
    assert not loaded & unwanted
    assert not {m for m in loaded if m.startswith("devtrust.verifier")}


@pytest.mark.parametrize("source", ["nvml", "auto"])
def test_the_host_probe_lets_nvml_go(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: str
) -> None:
    """NVML stays initialised between snapshots, until the agent stops (RootProbe.close)."""
    nv = _fake_nvml(lost=False)
    calls = Calls(nv)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    host = make_host(AgentConfig(posture_root=tmp_path, gpu_source=source))
    for _ in range(3):
        assert len(asyncio.run(host.gpu()).gpus) == 2
    assert (calls.counts["nvmlInit"], calls.counts.get("nvmlShutdown", 0)) == (1, 0)
    host.close()
    assert calls.counts["nvmlShutdown"] == 1


def test_the_evidence_lists_the_same_listeners_from_sock_diag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the host itself the evidence's listeners come from sock_diag: the same sockets,
    addresses and ports as /proc/net/tcp{,6} give."""

    def listeners() -> set[tuple[str, str, int]]:
        return {(s.protocol, s.address, s.port) for s in collect_posture(Path("/")).listening}

    with socket.socket() as mine:
        mine.bind(("127.0.0.1", 0))
        mine.listen()
        port = mine.getsockname()[1]
        for _ in range(20):  # other processes open and close listeners meanwhile
            from_diag = listeners()
            with monkeypatch.context() as m:
                m.setattr(posture, "SockDiag", _no_sock_diag)
                from_proc = listeners()
            if from_diag == from_proc:
                break
    assert from_diag == from_proc
    assert ("tcp", "127.0.0.1", port) in from_diag


def _no_sock_diag() -> SockDiag:
    raise OSError(93, "Protocol not supported")


def test_a_library_range_that_changed_since_it_was_listed_is_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DONTNEED on a range that became another mapping would zero live memory: each range is
    checked in /proc/self/maps right before its call, and one that differs is skipped."""
    calls: list[tuple[int, int]] = []
    real = memory._libc()
    assert real is not None

    class Libc:
        def malloc_trim(self, pad: int) -> int:
            return 0

        def madvise(self, start: int, length: int, advice: int) -> int:
            calls.append((start, length))
            return 0

    monkeypatch.setattr(memory, "_libc", Libc)
    monkeypatch.setattr(memory, "_mapping", lambda start, end: "r--p 00000000 00:00 0 /other.so")
    assert memory.release_startup_memory() == 0
    assert calls == []
    monkeypatch.undo()
    monkeypatch.setattr(memory, "_libc", Libc)
    assert memory.release_startup_memory() > 0
    assert calls, "an unchanged range is released"
