"""Simulated hosts for ``devtrust simulate``: recorded GPU state, a well-kept OS, faults.

Each simulated device reports one of the recorded hosts in the repository's test data
(``tests/data/corpus/gpu``: nvidia-smi captures of H100, A100, B200 and GB200 hosts), parsed
once by the agent's own parser and shared by every device of that model. The recorded
drivers are older than NVIDIA's latest security bulletins, so the fleet's hosts run them
patched to the latest fixed release of their branch (the verifier's bulletin list), GSP
firmware alike; the driver fault puts the recorded driver back. The OS posture is the
agent's own collector run once over swtpm/hosttree.py's well-configured host tree.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devtrust.agent.collect import RecordedHost
from devtrust.agent.config import AgentConfig
from devtrust.agent.gpu.smi_xml import parse_smi_xml
from devtrust.agent.main import make_host
from devtrust.core.errors import DevtrustError
from devtrust.swtpm.hosttree import write_host_tree
from devtrust.v1 import attestation_pb2, common_pb2
from devtrust.verifier.config import DEFAULT_POLICY
from devtrust.verifier.document import Bulletins, version_tuple

# The recorded hosts: capture file, model name.
CAPTURES = (
    ("qx-h100.xml", "H100"),
    ("qx-a100.xml", "A100"),
    ("qx-b200.xml", "B200"),
    ("qx-gb200-healthy.xml", "GB200"),
)
CAPTURE_DIR = "tests/data/corpus/gpu/nvidia_k8s-test-infra"
UNCORRECTED_ECC = 3


def default_capture_dir() -> Path:
    """The captures in a clone of the repository (swtpm/ is beside tests/)."""
    return Path(__file__).resolve().parent.parent / CAPTURE_DIR


@dataclass(frozen=True)
class HostModel:
    """A recorded GPU host: its GPU state as the fleet runs it (``gpu``, driver patched), as
    recorded (``recorded``, the driver fault's), and with uncorrected ECC errors on GPU 0."""

    name: str
    gpu: attestation_pb2.GpuState
    recorded: attestation_pb2.GpuState
    ecc: attestation_pb2.GpuState


def latest_fixed() -> dict[str, str]:
    """Per driver branch ("R580"), the latest fixed release in the verifier's bulletin list,
    read and compared as the verifier's policy does (``devtrust.verifier.document``)."""
    bulletins = Bulletins.load(DEFAULT_POLICY.parent / "nvidia-driver-bulletins.csv")
    best: dict[str, str] = {}
    for entry in bulletins.entries:
        if version_tuple(entry.fixed) > version_tuple(best.get(entry.branch, "0")):
            best[entry.branch] = entry.fixed
    return best


def _with_driver(state: attestation_pb2.GpuState, version: str) -> attestation_pb2.GpuState:
    out = copy.deepcopy(state)
    old = out.driver_version
    out.driver_version = version
    for gpu in out.gpus:
        if gpu.gsp_firmware_version == old:
            gpu.gsp_firmware_version = version
    return out


def load_models(directory: Path | None = None) -> list[HostModel]:
    """The recorded hosts, parsed by the agent's nvidia-smi parser."""
    directory = directory or default_capture_dir()
    fixed = latest_fixed()
    models = []
    for file_name, name in CAPTURES:
        path = directory / file_name
        try:
            recorded = parse_smi_xml(path.read_bytes())
        except OSError as exc:
            raise DevtrustError(
                f"cannot read the recorded host {path}: {exc.strerror}: run from a clone of "
                "the repository, or give --captures DIR with the nvidia-smi captures"
            ) from exc
        branch = f"R{recorded.driver_version.partition('.')[0]}"
        patched = fixed.get(branch, recorded.driver_version)
        if version_tuple(patched) < version_tuple(recorded.driver_version):
            patched = recorded.driver_version
        gpu = _with_driver(recorded, patched)
        ecc = copy.deepcopy(gpu)
        if ecc.gpus:
            ecc.gpus[0].ecc_uncorrected_volatile = UNCORRECTED_ECC
        models.append(HostModel(name, gpu, _with_driver(recorded, recorded.driver_version), ecc))
    return models


@dataclass(frozen=True)
class HostBase:
    """What every simulated host reports alike: facts and OS posture."""

    facts: common_pb2.HostFacts
    posture: attestation_pb2.OsPosture


async def collect_base(work: Path) -> HostBase:
    """Facts and posture of the well-configured host tree, by the agent's own collectors."""
    cfg = AgentConfig(posture_root=write_host_tree(work / "host"), gpu_source="none")
    probe = make_host(cfg)
    facts = await probe.facts()
    posture = await probe.posture()
    return HostBase(facts, posture)


class SimHost(RecordedHost):
    """A simulated host: a recorded model's GPU state, its own hostname, and the event log of
    its TPM as it is now (``event_log_source``)."""

    def __init__(
        self,
        base: HostBase,
        model: HostModel,
        *,
        hostname: str,
        event_log_source: Callable[[], bytes | None],
    ) -> None:
        facts = common_pb2.HostFacts()
        facts.CopyFrom(base.facts)
        facts.hostname = hostname
        super().__init__(facts=facts, posture=base.posture, gpu=model.gpu)
        self.model = model
        self._event_log_source = event_log_source
        self.created = datetime.datetime.now(datetime.UTC)

    async def event_log(self) -> bytes | None:
        return self._event_log_source()
