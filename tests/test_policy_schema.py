"""Policy mistakes fail at load, not soft at every appraisal (issue 8, item 6): each rule's
expressions are checked against the declared schema of the evidence document
(verifier/schema.py, verifier/celcheck.py); an absent value reads as unknown with a message
that names it (document.unknown_values)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cel
import pytest

from devtrust.agent.posture import collect_posture
from devtrust.swtpm.hosttree import write_host_tree
from devtrust.v1 import attestation_pb2, common_pb2
from devtrust.verifier.celcheck import check
from devtrust.verifier.config import DEFAULT_POLICY
from devtrust.verifier.document import build
from devtrust.verifier.policy import Policy, PolicyError, PolicyHolder
from devtrust.verifier.schema import DOCUMENT, THIS, Type
from devtrust.verifier.wire_body import plain

POLICY = Policy.load(DEFAULT_POLICY)
_GOOD = (
    "policy_id: p\nrules:\n"
    "  - id: good\n    description: d\n    claim: configuration\n    severity: warning\n"
    "    expr: os.secure_boot == true\n"
)  # the bad rule of each case starts on line 8


def _rule(expr: str, *, scope: str = "host", found: str | None = None, extra: str = "") -> str:
    return (
        _GOOD
        + f"  - id: bad\n    description: d\n    claim: hardware\n    severity: contraindicated\n"
        f"    scope: {scope}\n    expr: {json.dumps(expr)}\n"
        + (f"    found: {json.dumps(found)}\n" if found is not None else "")
        + extra
    )


REFUSED = [
    (
        "a typo in a host field",
        _rule("os.secure_bot == true"),
        "p.yaml:8: rule bad: field os.secure_bot does not exist; did you mean os.secure_boot?",
    ),
    (
        "a typo in a GPU field",
        _rule("this.ecc_enabeld == true", scope="gpu"),
        "p.yaml:8: rule bad: field this.ecc_enabeld does not exist; did you mean this.ecc_enabled?",
    ),
    (
        "a field of the GPU state that does not exist",
        _rule("gpu.driver.startsWith('580')"),
        "p.yaml:8: rule bad: field gpu.driver does not exist; did you mean gpu.driver_version?",
    ),
    (
        "a nested field",
        _rule("os.sshd.permit_root_logn == 'no'"),
        "p.yaml:8: rule bad: field os.sshd.permit_root_logn does not exist; "
        "did you mean os.sshd.permit_root_login?",
    ),
    (
        "a field of a comprehension variable",
        _rule("os.modules.all(m, m.tain == '')"),
        "p.yaml:8: rule bad: field m.tain does not exist; did you mean m.taint?",
    ),
    (
        "a field of an element of the GPU list",
        _rule("gpu.gpus.all(g, g.ecc_enable == true)"),
        "p.yaml:8: rule bad: field g.ecc_enable does not exist; did you mean g.ecc_enabled?",
    ),
    (
        "a field by index",
        _rule("this['ecc_enabeld'] == true", scope="gpu"),
        'p.yaml:8: rule bad: field this["ecc_enabeld"] does not exist; '
        "did you mean this.ecc_enabled?",
    ),
    (
        "a field with nothing close lists the fields",
        _rule("os.sshd.banner == ''"),
        "p.yaml:8: rule bad: field os.sshd.banner does not exist; "
        "os.sshd (SshdSettings) has permit_root_login, password_authentication",
    ),
    (
        "a name the document does not have",
        _rule("ps.secure_boot == true"),
        "p.yaml:8: rule bad: unknown name ps; rules read device, gpu, host, os, sent",
    ),
    (
        "this in a host rule",
        _rule("this.ecc_enabled == true"),
        "p.yaml:8: rule bad: this (the GPU in scope) exists only in rules with scope: gpu",
    ),
    (
        "a value that is not a boolean",
        _rule("os.lockdown"),
        "p.yaml:8: rule bad: expr is of type string, not bool: a rule holds when its expr is "
        "true, so it must be a condition (compare it: os.lockdown == ...)",
    ),
    (
        "a list that is not a boolean",
        _rule("os.modules.map(m, m.name)"),
        "p.yaml:8: rule bad: expr is of type list<string>, not bool",
    ),
    (
        "a comparison that never holds",
        _rule("os.secure_boot == 'true'"),
        'p.yaml:8: rule bad: os.secure_boot == "true" compares a bool with a string: CEL '
        "answers without an error and the comparison never holds",
    ),
    (
        "a comparison that always holds",
        _rule("os.lockdown != true"),
        "p.yaml:8: rule bad: os.lockdown != true compares a string with a bool: CEL answers "
        "without an error and the comparison always holds",
    ),
    (
        "a condition that is not a boolean",
        _rule("os.lockdown && true"),
        "p.yaml:8: rule bad: each side of && must be a bool; os.lockdown is of type string",
    ),
    (
        "int and uint in arithmetic",
        _rule("this.ecc_uncorrected_volatile + 1u > 2", scope="gpu"),
        "p.yaml:8: rule bad: this.ecc_uncorrected_volatile + 1u: no + for an int and a uint; "
        "CEL does not mix int, uint and double",
    ),
    (
        "a string and an int",
        _rule("'n=' + this.index == 'n=1'", scope="gpu"),
        'p.yaml:8: rule bad: "n=" + this.index: no + for a string and an int; '
        "convert the other with string()",
    ),
    (
        "a function the runtime lacks",
        _rule("os.lockdown.startswith('i')"),
        "p.yaml:8: rule bad: unknown function startswith(); did you mean startsWith?",
    ),
    (
        "an argument the runtime does not take",
        _rule("string(os.secure_boot) == 'true'"),
        "p.yaml:8: rule bad: string() does not take a bool (os.secure_boot)",
    ),
    (
        "a field of a scalar",
        _rule("os.lockdown.mode == 'integrity'"),
        "p.yaml:8: rule bad: os.lockdown is of type string; it has no field mode",
    ),
    (
        "size of a number",
        _rule("size(os.kernel_taint) == 0"),
        "p.yaml:8: rule bad: size(os.kernel_taint): an int has no size",
    ),
    (
        "in over a list of another type",
        _rule("os.lockdown in [1, 2]"),
        "p.yaml:8: rule bad: os.lockdown is of type string, never an element of int values",
    ),
    (
        "a typo in found",
        _rule("os.secure_boot == true", found="os.secure_bot"),
        "p.yaml:8: rule bad: found: field os.secure_bot does not exist; "
        "did you mean os.secure_boot?",
    ),
    (
        "found that is not an expression",
        _rule("os.secure_boot == true", extra="    found: true\n"),
        "p.yaml:8: rule bad: found is a CEL expression (a string), not True",
    ),
    (
        "a label that YAML reads as a boolean",
        _rule("os.secure_boot == true", extra="    labels: {accelerated: yes}\n"),
        "p.yaml:8: rule bad: labels: the value of accelerated is True, a YAML bool, never "
        "equal to a device's label; quote it in the policy",
    ),
    (
        "a required_evidence label that YAML reads as a number",
        _GOOD + "required_evidence:\n  - evidence: gpu\n    labels: {rack: 12}\n",
        "p.yaml:9: required_evidence gpu: labels: the value of rack is 12, a YAML int",
    ),
    (
        "syntax the checker does not read",
        _rule("Foo{a: 1} == 1"),
        "p.yaml:8: rule bad: the policy checker cannot read it: message construction",
    ),
]


@pytest.mark.parametrize(("name", "text", "message"), REFUSED, ids=[c[0] for c in REFUSED])
def test_a_mistake_in_a_rule_is_refused_at_load(name: str, text: str, message: str) -> None:
    with pytest.raises(PolicyError) as refused:
        Policy.parse(text, source="p.yaml", base=Path())
    assert str(refused.value).startswith(message), name
    assert "\n" not in str(refused.value)


ACCEPTED = [
    ("a comparison", "host", "os.secure_boot == true"),
    ("null", "host", "os.secure_boot != null && os.secure_boot"),
    ("int and uint compare", "gpu", "this.ecc_uncorrected_volatile == 0u"),
    ("int and double compare", "gpu", "this.index < 2.5"),
    (
        "a map key",
        "gpu",
        '!("summary" in this.fabric_health) || this.fabric_health["summary"] != ""',
    ),
    ("a label of the device", "host", "device.labels.team == 'a' || device.zone == ''"),
    ("a comprehension", "host", "os.modules.all(m, m.taint == '' || m.name.startsWith('nv'))"),
    ("filter then map", "host", "size(os.modules.filter(m, m.taint != '').map(m, m.name)) >= 0"),
    ("a nested list", "host", "gpu.gpus.all(g, g.nvlinks.all(l, l.active))"),
    ("exists_one", "host", "!gpu.gpus.exists_one(g, g.lost)"),
    ("keys of a map", "gpu", "this.cc_settings.all(k, k != '')"),
    ("has", "host", "has(os.sshd.permit_root_login)"),
    ("conversions", "gpu", "string(this.index) + string(1u) + string(1.5) != '' && int('1') == 1"),
    ("a double", "host", "gpu.missing_bulletins.all(b, b.max_cvss < 9.0 && size(b.cves) >= 0)"),
    ("regular expression", "host", "os.kernel_release.matches('^6\\\\.')"),
    ("suffix", "host", "os.kernel_release.endsWith('-generic') || true"),
    ("contains", "host", "!os.kernel_cmdline.contains('nokaslr')"),
    ("ternary", "host", "os.secure_boot == true ? true : os.setup_mode == false"),
    ("sent", "host", "sent.os && sent.gpu"),
    ("a list index", "host", "size(os.modules) == 0 || os.modules[0].name != ''"),
    ("dyn", "host", "dyn(os).secure_boot == true"),
    ("type", "host", "type(os.lockdown) == string"),
    ("timestamp", "host", "timestamp('2026-01-01T00:00:00Z').getFullYear() == 2026"),
    ("the host", "host", "host.hostname != '' || host.machine_id == ''"),
]


def _full_body() -> dict[str, Any]:
    """A body with every field of every message set, and one element in every list."""
    gpu = attestation_pb2.Gpu(
        index=0,
        uuid="GPU-0",
        ecc_enabled=True,
        ecc_uncorrected_volatile=0,
        remapped_rows_pending=0,
        remapped_rows_failed=0,
        fabric_health={"summary": "Healthy"},
        cc_settings={"k": "v"},
        nvlinks=[attestation_pb2.NvLink(link=0, active=True)],
        mig_devices=[attestation_pb2.MigDevice(profile="1g.10gb")],
        recent_xids=[13],
        unavailable=[attestation_pb2.Unavailable(field="x", reason="unknown")],
    )
    os = attestation_pb2.OsPosture(kernel_release="6.8.0-49-generic", lockdown="integrity")
    os.secure_boot = True
    os.setup_mode = False
    os.ima_active = True
    os.firewall_active = True
    os.time_synchronized = True
    os.reboot_required = False
    os.pending_security_updates = 0
    os.sshd.permit_root_login = "no"
    os.sshd.password_authentication = False
    os.mounts.append(attestation_pb2.EncryptedMount(mount_point="/", encrypted=True))
    os.listening.append(attestation_pb2.ListeningSocket(protocol="tcp", port=22))
    os.modules.append(attestation_pb2.KernelModule(name="nvidia", taint="PO"))
    body = attestation_pb2.EvidenceBody(
        host=common_pb2.HostFacts(hostname="h"),
        os=os,
        gpu=attestation_pb2.GpuState(source="nvml", driver_version="580.65.06", gpus=[gpu]),
    )
    return plain(body)


@pytest.mark.parametrize(("name", "scope", "expr"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_what_the_checker_accepts_the_runtime_evaluates(name: str, scope: str, expr: str) -> None:
    """The checker refuses nothing the runtime evaluates: each accepted expression, on a
    document with every field set, gives a bool and no error."""
    names = {**DOCUMENT, "this": THIS} if scope == "gpu" else DOCUMENT
    assert check(expr, names, boolean=True).type.kind in ("bool", "dyn"), name
    doc = build(_full_body(), bulletins=POLICY.bulletins, labels={"team": "a"})
    values = {**doc, "this": doc["gpu"]["gpus"][0]} if scope == "gpu" else doc
    assert isinstance(cel.evaluate(expr, values), bool), name


def _fields(t: Type, value: Any, where: str) -> list[str]:
    """Where the document and the schema differ, field by field."""
    if t.kind == "list":
        assert t.elem is not None
        return [d for item in value for d in _fields(t.elem, item, f"{where}[]")]
    if t.kind != "message":
        return []
    differ = [f"{where}.{k}" for k in set(t.fields) ^ set(value)]
    return differ + [
        d for k, ft in t.fields.items() if value.get(k) is not None
        for d in _fields(ft, value[k], f"{where}.{k}")
    ]  # fmt: skip


def test_the_schema_is_the_document_build_makes() -> None:
    """Every field the document has is declared, and every declared field is in it: a
    field added to the protobuf, or derived in document.build, is in the schema."""
    doc = build(_full_body(), bulletins=POLICY.bulletins)
    assert sorted(doc) == sorted(DOCUMENT)
    assert [d for name, t in DOCUMENT.items() for d in _fields(t, doc[name], name)] == []
    assert doc["gpu"]["gpus"][0]["gsp_matches_driver"] is None  # derived, and nullable


def test_the_default_policy_passes_the_checks() -> None:
    assert {r.id for r in POLICY.rules} >= {"os.secure_boot", "gpu.fabric", "os.kernel_taint"}
    [taint] = [r for r in POLICY.rules if r.id == "os.kernel_taint"]
    assert ("os", "modules", "[]", "taint") in taint.paths


def _only(expr: str, *, scope: str = "host") -> Policy:
    """A policy of the one rule ``bad``."""
    text = _rule(expr, scope=scope).replace(_GOOD, "rules:\n")
    return Policy.parse(text, source="p.yaml", base=Path())


def _unknown_messages(body: attestation_pb2.EvidenceBody, policy: Policy = POLICY) -> list[str]:
    out = policy.evaluate(build(plain(body), bulletins=policy.bulletins), device_id="d1")
    assert {f.id for f in out.findings} <= {"policy.unknown"}
    return [f.message for f in out.findings]


def test_a_host_without_sshd_names_the_absent_settings(tmp_path: Path) -> None:
    """Not a CEL overload error about mixing int and uint: the message says os.sshd was
    unknown, and why."""
    root = write_host_tree(tmp_path / "host")
    for path in (root / "etc/ssh").rglob("*"):
        if path.is_file():
            path.unlink()
    messages = _unknown_messages(attestation_pb2.EvidenceBody(os=collect_posture(root)))
    assert messages == [
        f"device d1: rule ssh.{rule}) could not be evaluated: os.sshd is unknown (the host "
        "could not read it: /etc/ssh/sshd_config: No such file or directory)"
        for rule in ("root_login (SSH root login is off", "password_authentication (SSH "
                     "password authentication is off")
    ]  # fmt: skip
    assert not any("overload" in m or "KeyError" in m for m in messages)


def test_a_host_with_nothing_readable_names_each_value(tmp_path: Path) -> None:
    messages = _unknown_messages(attestation_pb2.EvidenceBody(os=collect_posture(tmp_path)))
    named = [m.split("could not be evaluated: ")[1].split(" is unknown")[0] for m in messages]
    assert named == [
        "os.secure_boot",
        "os.lockdown",
        "os.modules",
        "os.sshd",
        "os.sshd",
        "os.time_synchronized",
    ]


def test_an_unreadable_gpu_field_is_named_with_its_reason() -> None:
    gpu = attestation_pb2.Gpu(
        index=0,
        uuid="GPU-0",
        ecc_enabled=True,
        remapped_rows_pending=0,
        remapped_rows_failed=0,
        unavailable=[
            attestation_pb2.Unavailable(
                field="ecc_uncorrected_volatile", reason="not_supported", detail="NVML 3"
            )
        ],
    )
    body = attestation_pb2.EvidenceBody(gpu=attestation_pb2.GpuState(source="nvml", gpus=[gpu]))
    out = POLICY.evaluate(build(plain(body), bulletins=POLICY.bulletins), device_id="d1")
    [unknown] = [f for f in out.findings if f.expected == "this.ecc_uncorrected_volatile == 0"]
    assert unknown.id == "policy.unknown"
    assert unknown.message.endswith(
        "rule gpu.ecc_uncorrected (no uncorrected ECC errors since the driver loaded) could "
        "not be evaluated: this.ecc_uncorrected_volatile is unknown (the host could not read "
        "it: not supported: NVML 3)"
    )


def test_a_rule_on_the_hosts_claim_of_its_zone_is_refused_at_load() -> None:
    with pytest.raises(PolicyError) as refused:
        _only("host.zone == 'management'")
    assert str(refused.value).endswith(
        "host.zone is not in the document: the verifier never takes a host's claim of its "
        "zone or labels; rules read device.zone and device.labels, the operator's assignment"
    )


def test_an_absent_map_key_is_named() -> None:
    policy = _only("this.cc_settings['mode'] == 'on'", scope="gpu")
    gpu = attestation_pb2.Gpu(index=0, uuid="GPU-0")
    body = attestation_pb2.EvidenceBody(gpu=attestation_pb2.GpuState(gpus=[gpu]))
    [message] = _unknown_messages(body, policy)
    assert message.endswith('could not be evaluated: this.cc_settings["mode"] is absent')


def test_a_uint64_above_int64_reads_as_an_int() -> None:
    """The CEL runtime makes a Python int above 2**63 - 1 a uint, which does not mix with the
    int literals of rules: plain() keeps every integer a CEL int."""
    gpu = attestation_pb2.Gpu(index=0, ecc_uncorrected_volatile=2**64 - 1, recent_xids=[79])
    doc = build(
        plain(attestation_pb2.EvidenceBody(gpu=attestation_pb2.GpuState(gpus=[gpu]))),
        bulletins=POLICY.bulletins,
    )
    assert doc["gpu"]["gpus"][0]["ecc_uncorrected_volatile"] == 2**63 - 1
    policy = _only("this.ecc_uncorrected_volatile - 1 > 0", scope="gpu")
    assert policy.evaluate(doc, device_id="d1").findings == ()


def test_a_reload_refuses_a_typo_and_keeps_the_policy(tmp_path: Path) -> None:
    """SIGHUP and ReloadPolicy go through PolicyHolder.reload, start through its
    constructor: a typo is refused there, and the policy in force stays."""
    path = tmp_path / "policy.yaml"
    path.write_text(_GOOD)
    holder = PolicyHolder(path)
    path.write_text(_rule("os.secure_bot == true"))
    with pytest.raises(PolicyError, match=r"policy\.yaml:8: rule bad: field os\.secure_bot"):
        holder.reload()
    assert holder.current is not None
    assert holder.current.policy_id == "p"
    with pytest.raises(PolicyError, match=r"did you mean os\.secure_boot"):
        PolicyHolder(path)


def test_policy_eval_of_a_bad_policy_is_one_line(tmp_path: Path) -> None:
    policy = tmp_path / "bad.yaml"
    policy.write_text(_rule("this.ecc_enabeld == true", scope="gpu"))
    evidence = tmp_path / "evidence.json"
    evidence.write_text("{}")
    result = subprocess.run(
        [sys.executable, "-m", "devtrust.verifier.cli", "policy", "eval", "--policy", str(policy),
         "--evidence", str(evidence)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert (
        f"{policy}:8: rule bad: field this.ecc_enabeld does not exist; "
        "did you mean this.ecc_enabled?"
    ) in lines[0]


def test_a_bulletins_file_without_bulletins_is_refused(tmp_path: Path) -> None:
    """An empty bulletins file would turn the bulletin rule into a silent pass."""
    (tmp_path / "b.csv").write_text("")
    with pytest.raises(PolicyError, match=r"data\.bulletins: .*b\.csv lists no bulletins"):
        Policy.parse(
            "data: {bulletins: b.csv}\nrules:\n  - {id: a, description: d, claim: hardware, "
            "severity: warning, expr: 'true'}\n",
            source="p.yaml",
            base=tmp_path,
        )


def test_a_driver_version_the_host_did_not_report_is_unknown() -> None:
    """proto3 cannot tell "" from unset: an unreported driver version is null, so a rule on it
    reads policy.unknown instead of comparing with ""."""
    policy = _only('gpu.driver_version >= "550"')
    body = attestation_pb2.EvidenceBody(gpu=attestation_pb2.GpuState(source="nvml"))
    [message] = _unknown_messages(body, policy)
    assert "gpu.driver_version is unknown" in message
