"""GPU rules see the whole document however they are evaluated: each GPU in a small context of
its own (`this` and what its rules read, without the GPU list), and a rule that may read the
GPU list on the whole document. These cases fail if a rule were given the wrong context."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devtrust.v1 import attestation_pb2
from devtrust.verifier.document import build
from devtrust.verifier.policy import Policy
from devtrust.verifier.wire_body import plain

POLICY = """
rules:
  - id: host.all_ecc
    description: every GPU has ECC on
    claim: hardware
    severity: warning
    expr: gpu.gpus.all(g, g.ecc_enabled == true)
    found: gpu.gpus.filter(g, g.ecc_enabled != true).map(g, g.index)
  - id: gpu.driver_branch
    description: the driver is R580 and ECC is on
    claim: configuration
    severity: warning
    scope: gpu
    expr: gpu.driver_version.startsWith("580") && this.ecc_enabled == true
    found: 'gpu.driver_version + (this.ecc_enabled == true ? " ECC on" : " ECC off")'
  - id: gpu.secure_boot
    description: Secure Boot on and persistence mode on
    claim: configuration
    severity: contraindicated
    scope: gpu
    expr: os.secure_boot == true && this.persistence_mode == true
    found: this.persistence_mode
  - id: gpu.first_four
    description: at most four GPUs, or an index below two
    claim: hardware
    severity: warning
    scope: gpu
    expr: size(gpu.gpus) <= 4 || this.index < 2
    found: string(size(gpu["gpus"])) + " GPUs, index " + string(this.index)
  - id: gpu.setting
    description: the CC setting x is y
    claim: runtime-opaque
    severity: warning
    scope: gpu
    expr: this.cc_settings["x"] == "y"
"""


def _outcome() -> list[tuple[str, str, str]]:
    policy = Policy.parse(POLICY, source="p.yaml", base=Path())
    gpus = [
        attestation_pb2.Gpu(
            index=i,
            uuid=f"GPU-{i}",
            ecc_enabled=i != 1,
            persistence_mode=i != 2,
            cc_settings={"x": "y"} if i != 3 else {},
        )
        for i in range(5)
    ]
    body = attestation_pb2.EvidenceBody(
        os=attestation_pb2.OsPosture(secure_boot=True),
        gpu=attestation_pb2.GpuState(source="nvml", driver_version="580.95.05", gpus=gpus),
    )
    out = policy.evaluate(build(plain(body), bulletins=policy.bulletins), device_id="d1")
    return [(f.id, f.subject, f.found) for f in out.findings]


def test_each_rule_sees_what_it_reads() -> None:
    assert _outcome() == [
        ("host.all_ecc", "", "1"),
        ("gpu.driver_branch", "gpu1:GPU-1", "580.95.05 ECC off"),
        ("gpu.secure_boot", "gpu2:GPU-2", "False"),
        ("gpu.first_four", "gpu2:GPU-2", "5 GPUs, index 2"),
        ("gpu.first_four", "gpu3:GPU-3", "5 GPUs, index 3"),
        ("policy.unknown", "gpu3:GPU-3", "unknown"),
        ("gpu.first_four", "gpu4:GPU-4", "5 GPUs, index 4"),
    ]


@pytest.mark.parametrize(
    ("name", "expr", "reads"),
    [
        ("this only", "this.ecc_enabled == true", False),
        ("driver version", "gpu.driver_version != '' && this.lost == false", False),
        ("bulletins", "size(gpu.missing_bulletins) == 0", False),
        ("the list", "size(gpu.gpus) > 0", True),
        ("spaced selection", "size(gpu . gpus) > 0", True),
        ("index", "size(gpu['gpus']) > 0", True),
        ("whole section", "gpu.all(k, k != 'x')", True),
        ("keys of the map", "gpu.exists(k, k == 'gpus')", True),
        ("size of the map", "gpu.size() == 7", True),
        ("size of the map, spaced", "gpu.size ( ) == 7", True),
        ("presence test", "has(gpu.gpus)", True),
        ("passed on", "dyn(gpu).gpus.size() > 0", True),
        ("a macro variable named gpu", "os.modules.all(gpu, gpu.name != '')", True),
        # A name that contains gpu is not gpu (this case read this.gpu_count until rules were
        # checked against the schema of the document: the Gpu has no field gpu_count).
        ("another name", "os.modules.all(gpu_module, gpu_module.name != '')", False),
    ],
)
def test_which_rules_may_read_the_gpu_list(name: str, expr: str, reads: bool) -> None:
    """Rules that may read gpu.gpus are seen conservatively: a rule judged not to read it
    is evaluated without it, and would be judged wrongly if it did read it."""
    rule = (
        "rules:\n  - id: a\n    description: d\n    claim: hardware\n"
        f"    severity: warning\n    scope: gpu\n    expr: {json.dumps(expr)}\n"
    )
    policy = Policy.parse(rule, source="p.yaml", base=Path())
    assert policy.rules[0].reads_gpu_list is reads, name
