"""Policy: YAML rules whose conditions are CEL expressions over the evidence document (the
convention of Kubernetes ValidatingAdmissionPolicy and Envoy RBAC), evaluated with the
common-expression-language runtime. Pure apart from loading.

    policy_id: gpu-hosts-2026-11
    data:
      bulletins: nvidia-driver-bulletins.csv     # relative to the policy file
    rules:
      - id: gpu.ecc_enabled
        description: ECC is on
        claim: hardware                 # the AR4SI claim it bears on
        severity: warning               # or contraindicated
        scope: gpu                      # host (default) or gpu: once per GPU, as `this`
        zones: [production-inference]   # optional selector; labels: {k: v} too
        expr: this.ecc_enabled == true
        found: this.ecc_enabled         # optional: what to report as found
    required_evidence:                  # optional: what must have been sent, per zone
      - evidence: os                    # OS posture (the body's os message)
      - evidence: gpu                   # GPU state listing at least one GPU
        zones: [model-development, production-inference]   # labels: {k: v} too
      - evidence: gpu_attestation       # each listed GPU's own report, verified
        zones: [production-inference]

A rule holds when its expression is true. False is a finding of the rule's severity; an
expression that cannot be evaluated (a value the host could not read), or a false one whose
``found`` value is null, is a warning finding ``policy.unknown`` naming the values that were
null or absent (``os.sshd is unknown (the host could not read it: ...)``): unknown is never
taken as compliant, nor as off.
Required evidence that is absent is a contraindicated finding ``policy.evidence_missing``,
never a vacuous pass of the rules over it (GPU rules over an empty GPU list). Zones and labels
are always the verifier's record of the device, never what the host says.
Cost is linear in the number of GPUs: each GPU is converted to CEL once, in a small context of
its own (``this`` and the parts of the document its rules read, without the GPU list); only a
rule that may read ``gpu.gpus`` itself sees the whole document, and pays for it.
A policy is validated whole (YAML, fields, CEL compilation, and each expression's fields and
type against the declared schema of the document, verifier/celcheck.py) before it replaces
another; a bad one raises ``PolicyError`` naming the file, the line and the reason, wherever
it is loaded: ``devtrust policy eval``, verifier start, SIGHUP and ReloadPolicy.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cel
import yaml

from devtrust.core.errors import DevtrustError
from devtrust.verifier.celcheck import CheckError, check
from devtrust.verifier.document import Bulletins, Document, unknown_values
from devtrust.verifier.policy_context import Contexts, may_read_gpu_list, selected_fields
from devtrust.verifier.schema import DOCUMENT, THIS
from devtrust.verifier.trust import Claim, Finding, Severity, SubResult

_PASS_VALUE = 2
_FAIL_VALUE = {Severity.WARNING: 32, Severity.CONTRAINDICATED: 96}
# Characters in one CEL expression. The runtime's parser recurses in native code and
# overflows its stack (a crash of the whole process, not an error) somewhere past 16,000
# nested operators; the longest rule shipped is under 200 characters.
MAX_EXPRESSION = 4096
_RULE_KEYS = {"id", "description", "claim", "severity", "scope", "zones", "labels", "expr", "found"}


class PolicyError(DevtrustError):
    """A policy file that cannot be used; the message names file, line and reason."""


@dataclass(frozen=True)
class Rule:
    id: str
    description: str
    claim: Claim
    severity: Severity
    expr: str
    program: Any
    scope: str = "host"
    zones: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    found: Any = None
    # The names the rule (expr and found) reads, and whether it may read the GPU list
    # gpu.gpus: converting that list to CEL is the one cost that grows with the GPU count.
    names: frozenset[str] = frozenset()
    reads_gpu_list: bool = True
    # Per name the rule reads: the fields it selects (os.lockdown -> "lockdown"), or None
    # when it may read the name whole. Host rules see only those fields: converting a
    # host's 8,192 listening sockets for rules that never read them is cost a device chose.
    fields: tuple[tuple[str, frozenset[str] | None], ...] = ()
    # The document paths expr and found read (verifier/celcheck.py): an unknown finding
    # names those that were null or absent.
    paths: frozenset[tuple[str, ...]] = frozenset()

    def applies(self, zone: str, labels: dict[str, str]) -> bool:
        return _selects(self.zones, self.labels, zone, labels)


EVIDENCE_CLAIMS = {
    "os": Claim.CONFIGURATION,
    "gpu": Claim.HARDWARE,
    "gpu_attestation": Claim.HARDWARE,
}
_EVIDENCE_WHAT = {"os": "OS posture", "gpu": "GPU state listing at least one GPU"}
# Required evidence the appraisal of GPU reports checks (verifier/gpu/appraise.py: every GPU
# listed must have sent a report that verified), not the document's `sent`.
GPU_ATTESTATION = "gpu_attestation"
_REQUIRED_KEYS = {"evidence", "zones", "labels"}


@dataclass(frozen=True)
class RequiredEvidence:
    """Evidence that must have been sent, in the zones (and with the labels) it selects:
    ``os``, the OS posture; ``gpu``, GPU state listing at least one GPU; ``gpu_attestation``,
    each listed GPU's own signed report (verifier/gpu/appraise.py checks it)."""

    evidence: str
    zones: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    def applies(self, zone: str, labels: dict[str, str]) -> bool:
        return _selects(self.zones, self.labels, zone, labels)


def _selects(
    zones: tuple[str, ...], wanted: tuple[tuple[str, str], ...], zone: str, labels: dict[str, str]
) -> bool:
    return (not zones or zone in zones) and all(labels.get(k) == v for k, v in wanted)


@dataclass
class _Sub:
    name: str
    claims: dict[Claim, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)


@dataclass(frozen=True)
class PolicyOutcome:
    policy_id: str
    claims: dict[Claim, int]
    findings: tuple[Finding, ...]
    submods: tuple[SubResult, ...]


def _merge(claims: dict[Claim, int], claim: Claim, value: int) -> None:
    if abs(value) > abs(claims.get(claim, 0)):
        claims[claim] = value


class PolicyEvaluator(Protocol):
    """What appraisal needs of a policy: ``Policy`` itself, or a ``PooledPolicy`` that runs it
    in worker processes (verifier/policy_pool.py)."""

    @property
    def policy_id(self) -> str: ...

    @property
    def bulletins(self) -> Bulletins: ...

    @property
    def digest(self) -> str:
        """What the outcome depends on besides the document: the rules and the bulletins.
        Part of the policy cache's key, so a reloaded policy (even under the same policy_id)
        is evaluated again."""
        ...

    def evaluate(
        self,
        doc: Document,
        *,
        device_id: str,
        zone: str = "",
        labels: dict[str, str] | None = None,
    ) -> PolicyOutcome: ...


@dataclass(frozen=True)
class Policy:
    policy_id: str
    rules: tuple[Rule, ...]
    bulletins: Bulletins
    source: str = ""
    required: tuple[RequiredEvidence, ...] = ()
    # The text it was parsed from and the directory its data files are relative to: a
    # worker process parses the same policy again from them (verifier/policy_pool.py).
    text: str = field(default="", repr=False, compare=False)
    base: Path = field(default=Path(), repr=False, compare=False)

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the policy text (its rules) and of the bulletins it was loaded with,
        computed once. A policy made without its text (in code) is unique: a random id."""
        if not self.text:
            return f"untexted-{secrets.token_hex(16)}"
        text = self.text.encode()
        digest = hashlib.sha256(len(text).to_bytes(8, "big") + text)
        digest.update(repr(self.bulletins.entries).encode())
        return digest.hexdigest()

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise PolicyError(
                f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8"
            ) from exc
        return cls.parse(text, source=str(path), base=path.parent)

    @classmethod
    def parse(cls, text: str, *, source: str, base: Path) -> Policy:
        try:
            node = yaml.compose(text)
            data = yaml.safe_load(text)
        except RecursionError:  # PyYAML composes nested collections recursively
            raise PolicyError(f"{source}: not valid YAML: collections nested too deeply") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise PolicyError(
                f"{source}{line}: not valid YAML: {getattr(exc, 'problem', None) or exc}"
            ) from exc
        if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
            raise PolicyError(f"{source}:1: a policy is a mapping with policy_id and rules")
        lines = _item_lines(node, "rules")
        unknown = set(data) - {"policy_id", "data", "rules", "required_evidence"}
        if unknown:
            raise PolicyError(f"{source}:1: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        files = data.get("data") or {}
        bulletins_file = files.get("bulletins") if isinstance(files, dict) else None
        if not isinstance(files, dict) or not isinstance(bulletins_file, str | None):
            raise PolicyError(f"{source}: data is a mapping, data.bulletins a file name")
        try:
            bulletins = (
                Bulletins.load(base / bulletins_file) if bulletins_file else Bulletins(entries=())
            )
        except (OSError, ValueError) as exc:
            raise PolicyError(f"{source}: data.bulletins: {exc}") from exc
        if bulletins_file and not bulletins.entries:
            # An empty file would silently turn the bulletin rule into a pass.
            raise PolicyError(
                f"{source}: data.bulletins: {base / bulletins_file} lists no bulletins: restore "
                "it (verifier/data/policy/nvidia-driver-bulletins.csv), or remove data.bulletins"
            )
        rules = data.get("rules")
        if not isinstance(rules, list) or not rules:
            raise PolicyError(f"{source}:1: rules must be a non-empty list")
        parsed = [
            _rule(r, f"{source}:{lines[i] if i < len(lines) else 1}") for i, r in enumerate(rules)
        ]
        ids = [r.id for r in parsed]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise PolicyError(f"{source}: duplicate rule id(s) {', '.join(dupes)}")
        required = _required_evidence(
            data.get("required_evidence"), source, _item_lines(node, "required_evidence")
        )
        policy_id = str(data.get("policy_id") or hashlib.sha256(text.encode()).hexdigest()[:12])
        return cls(
            policy_id=policy_id,
            rules=tuple(parsed),
            bulletins=bulletins,
            source=source,
            required=required,
            text=text,
            base=base,
        )

    def evaluate(
        self, doc: Document, *, device_id: str, zone: str = "", labels: dict[str, str] | None = None
    ) -> PolicyOutcome:
        """The claims, findings and per-GPU submods of this policy for one document. ``zone``
        and ``labels`` are the verifier's record of the device (they select rules and
        required evidence); nothing the host says selects anything."""
        labels = labels or {}
        host_claims: dict[Claim, int] = {}
        findings = self._missing_evidence(doc, device_id, zone, labels)
        for missing in findings:
            _merge(host_claims, missing.claim, _FAIL_VALUE[missing.severity])
        applicable = [r for r in self.rules if r.applies(zone, labels)]
        gpu_rules = [r for r in applicable if r.scope == "gpu"]
        contexts = Contexts(doc, gpu_rules)
        host_rules = [r for r in applicable if r.scope == "host"]
        host_context = contexts.host(host_rules)
        for rule in host_rules:
            finding = _check(
                rule, host_context, doc=doc, gpu=None, subject=f"device {device_id}", subject_id=""
            )
            _merge(host_claims, rule.claim, _value(rule, finding))
            if finding:
                findings.append(finding)
        submods: dict[int, _Sub] = {}
        for gpu in contexts.gpus if gpu_rules else ():
            sub = submods.setdefault(gpu["index"], _Sub(name=gpu_name(gpu)))
            subject = (
                f"GPU {gpu['index']} ({gpu.get('name') or '?'}, "
                f"{gpu.get('pci_bus_id') or '?'}) of device {device_id}"
            )
            own = contexts.gpu(gpu)
            for rule in gpu_rules:
                context = contexts.whole_with(gpu) if rule.reads_gpu_list else own
                finding = _check(
                    rule, context, doc=doc, gpu=gpu, subject=subject, subject_id=sub.name
                )
                _merge(sub.claims, rule.claim, _value(rule, finding))
                if finding:
                    sub.findings.append(finding)
        # The host is as trustworthy as its worst GPU, claim by claim (EAR submods).
        for sub in submods.values():
            for claim, value in sub.claims.items():
                _merge(host_claims, claim, value)
            findings.extend(sub.findings)
        return PolicyOutcome(
            policy_id=self.policy_id,
            claims=host_claims,
            findings=tuple(findings),
            submods=tuple(SubResult(s.name, s.claims, tuple(s.findings)) for s in submods.values()),
        )

    def requires(self, evidence: str, zone: str, labels: Mapping[str, str]) -> bool:
        """Whether a required_evidence entry for ``evidence`` selects this zone and labels."""
        wanted = dict(labels)
        return any(r.evidence == evidence and r.applies(zone, wanted) for r in self.required)

    def _missing_evidence(
        self, doc: Document, device_id: str, zone: str, labels: dict[str, str]
    ) -> list[Finding]:
        """A contraindicated finding per kind of required evidence the document lacks: a
        rule over evidence that was not sent is not vacuously true."""
        sent = doc.get("sent") or {}  # a document not made by document.build sent nothing
        gpus = len(doc.get("gpu", {}).get("gpus") or [])
        missing: dict[str, str] = {}
        for req in self.required:
            if req.evidence in missing or req.evidence == GPU_ATTESTATION:
                continue
            if not req.applies(zone, labels):
                continue
            if sent.get(req.evidence) is not True:
                missing[req.evidence] = (
                    f"no {'GPU state' if req.evidence == 'gpu' else 'OS posture'}"
                )
            elif req.evidence == "gpu" and gpus == 0:
                missing[req.evidence] = "GPU state listing no GPU"
        return [
            Finding(
                id="policy.evidence_missing",
                severity=Severity.CONTRAINDICATED,
                claim=EVIDENCE_CLAIMS[evidence],
                message=f"device {device_id} in zone {zone or '(none)'!r}: the policy requires "
                f"{_EVIDENCE_WHAT[evidence]}; the evidence has {found}",
                expected=_EVIDENCE_WHAT[evidence],
                found=found,
                subject=evidence,
            )
            for evidence, found in missing.items()
        ]


def gpu_name(gpu: Mapping[str, Any]) -> str:
    """A GPU's submod name: its index and UUID (else PCI bus id), ``gpu0:GPU-...``."""
    return f"gpu{gpu['index']}:{gpu.get('uuid') or gpu.get('pci_bus_id') or '?'}"


def _value(rule: Rule, finding: Finding | None) -> int:
    if finding is None:
        return _PASS_VALUE
    return _FAIL_VALUE.get(finding.severity, _PASS_VALUE)


def _unknown(
    rule: Rule,
    *,
    doc: Document,
    gpu: dict[str, Any] | None,
    subject: str,
    subject_id: str,
    why: str,
) -> Finding:
    """``policy.unknown``, naming the values the rule read that were null or absent."""
    values = doc if gpu is None else {**doc, "this": gpu}
    absent = unknown_values(values, rule.paths)
    return Finding(
        id="policy.unknown",
        severity=Severity.WARNING,
        claim=rule.claim,
        message=f"{subject}: rule {rule.id} ({rule.description}) could not be evaluated: "
        + ("; ".join(absent) if absent else why),
        expected=rule.expr,
        found="unknown",
        subject=subject_id or rule.id,
    )


def _check(
    rule: Rule,
    context: Any,
    *,
    doc: Document,
    gpu: dict[str, Any] | None,
    subject: str,
    subject_id: str,
) -> Finding | None:
    where: dict[str, Any] = {"doc": doc, "gpu": gpu, "subject": subject, "subject_id": subject_id}
    try:
        ok = rule.program.execute(context)
    except Exception as exc:  # noqa: BLE001 - CEL raises KeyError, RuntimeError, ...
        return _unknown(rule, **where, why=f"{type(exc).__name__}: {exc}")
    if ok is True:
        return None
    found = ""
    if rule.found is not None:
        try:
            value = rule.found.execute(context)
        except Exception:  # noqa: BLE001 - null operands: the values are unknown
            value = None
        if value is None:  # the host could not read it: unknown, not failed
            return _unknown(rule, **where, why="the value is unknown (null)")
        found = _render(value)
    return Finding(
        id=rule.id,
        severity=rule.severity,
        claim=rule.claim,
        message=f"{subject}: {rule.description}" + (f": found {found}" if found else ""),
        expected=rule.expr,
        found=found,
        subject=subject_id,
    )


def _render(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_render(v) for v in value) or "none"
    return "null" if value is None else str(value)


def _item_lines(node: yaml.MappingNode, name: str) -> list[int]:
    for key, value in node.value:
        if key.value == name and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def _required_evidence(data: Any, source: str, lines: list[int]) -> tuple[RequiredEvidence, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise PolicyError(f"{source}:1: required_evidence must be a list")
    out = []
    for i, item in enumerate(data):
        where = f"{source}:{lines[i] if i < len(lines) else 1}"
        if not isinstance(item, dict):
            raise PolicyError(f"{where}: a required_evidence entry is a mapping")
        unknown = set(item) - _REQUIRED_KEYS
        if unknown:
            raise PolicyError(
                f"{where}: unknown required_evidence key(s) {', '.join(sorted(map(str, unknown)))}"
            )
        evidence = item.get("evidence")
        if not isinstance(evidence, str) or evidence not in EVIDENCE_CLAIMS:
            raise PolicyError(
                f"{where}: required_evidence: evidence is one of "
                f"{', '.join(EVIDENCE_CLAIMS)}, got {evidence!r}"
            )
        zones, labels = item.get("zones", []), item.get("labels", {})
        _check_selector(zones, labels, f"{where}: required_evidence {evidence}")
        out.append(
            RequiredEvidence(
                evidence=evidence,
                zones=tuple(zones),
                labels=tuple((str(k), str(v)) for k, v in labels.items()),
            )
        )
    return tuple(out)


def _rule(data: Any, where: str) -> Rule:
    if not isinstance(data, dict):
        raise PolicyError(f"{where}: a rule is a mapping")
    unknown = set(data) - _RULE_KEYS
    if unknown:
        raise PolicyError(f"{where}: unknown rule key(s) {', '.join(sorted(map(str, unknown)))}")
    for key in ("id", "description", "claim", "severity", "expr"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise PolicyError(f"{where}: rule {data.get('id', '?')}: {key} is required")
    try:
        claim = Claim(data["claim"])
    except ValueError:
        raise PolicyError(
            f"{where}: rule {data['id']}: unknown claim {data['claim']!r}; one of "
            f"{', '.join(c.value for c in Claim)}"
        ) from None
    severity = {"warning": Severity.WARNING, "contraindicated": Severity.CONTRAINDICATED}.get(
        data["severity"]
    )
    if severity is None:
        raise PolicyError(f"{where}: rule {data['id']}: severity is warning or contraindicated")
    scope = data.get("scope", "host")
    if scope not in ("host", "gpu"):
        raise PolicyError(f"{where}: rule {data['id']}: scope is host or gpu")
    if not isinstance(data.get("found") or "", str):
        raise PolicyError(
            f"{where}: rule {data['id']}: found is a CEL expression (a string), "
            f"not {data['found']!r}"
        )
    for key in ("expr", "found"):
        if len(data.get(key) or "") > MAX_EXPRESSION:
            raise PolicyError(
                f"{where}: rule {data['id']}: {key} is {len(data[key])} characters, more than "
                f"{MAX_EXPRESSION}"
            )
    try:
        program = cel.compile(data["expr"])
        found = cel.compile(data["found"]) if data.get("found") else None
    except ValueError as exc:
        raise PolicyError(f"{where}: rule {data['id']}: CEL does not compile: {exc}") from exc
    in_scope = {**DOCUMENT, "this": THIS} if scope == "gpu" else DOCUMENT
    try:
        paths = check(data["expr"], in_scope, boolean=True).paths
        if data.get("found"):
            paths |= _checked_found(data["found"], in_scope)
    except CheckError as exc:
        raise PolicyError(f"{where}: rule {data['id']}: {exc}") from None
    except RecursionError:  # the checker walks the tree recursively
        raise PolicyError(f"{where}: rule {data['id']}: expression nested too deeply") from None
    zones = data.get("zones") or []
    labels = data.get("labels") or {}
    _check_selector(zones, labels, f"{where}: rule {data['id']}")
    names = frozenset(program.variables()) | frozenset(found.variables() if found else ())
    return Rule(
        id=data["id"],
        description=data["description"],
        claim=claim,
        severity=severity,
        expr=data["expr"],
        program=program,
        scope=scope,
        zones=tuple(str(z) for z in zones),
        labels=tuple((str(k), str(v)) for k, v in labels.items()),
        found=found,
        names=names,
        fields=tuple(
            (name, selected_fields(data["expr"] + "\n" + (data.get("found") or ""), name))
            for name in sorted(names)
        ),
        reads_gpu_list=may_read_gpu_list(data["expr"])
        or may_read_gpu_list(data.get("found") or ""),
        paths=paths,
    )


def _checked_found(source: str, in_scope: Mapping[str, Any]) -> frozenset[tuple[str, ...]]:
    try:
        return check(source, in_scope, boolean=False).paths
    except CheckError as exc:
        raise CheckError(f"found: {exc}") from None


def _check_selector(zones: Any, labels: Any, where: str) -> None:
    """Zones are names, labels map names to string values: YAML reads ``{gpu: yes}`` as the
    boolean true, which would never equal the device's label "yes"."""
    if not isinstance(zones, list) or not all(isinstance(z, str) and z for z in zones):
        raise PolicyError(f"{where}: zones is a list of zone names, labels a mapping")
    if not isinstance(labels, dict):
        raise PolicyError(f"{where}: zones is a list of zone names, labels a mapping")
    for key, value in labels.items():
        if not isinstance(value, str):
            raise PolicyError(
                f"{where}: labels: the value of {key} is {value!r}, a YAML "
                f"{type(value).__name__}, never equal to a device's label; quote it in the policy"
            )


class PolicyHolder:
    """The policy in force, replaced only by a policy that validated whole (SIGHUP and the
    ReloadPolicy call); a bad file is refused with its reason and the old policy stays."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.current: Policy | None = Policy.load(path) if path is not None else None

    def reload(self) -> Policy | None:
        if self.path is None:
            return None
        self.current = Policy.load(self.path)  # raises PolicyError, keeping the old one
        return self.current
