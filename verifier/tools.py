"""Interop tools on tpm2-tools file formats, for operators checking their own TPMs.

``devtrust eventlog replay`` and ``devtrust quote check``. Exit codes: 0 valid, 1 invalid
(the reason on one line), 2 usage error or unreadable input. No traceback on any input.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from devtrust import __version__
from devtrust.core.command import one_line
from devtrust.verifier import measured_boot
from devtrust.verifier.appraisal import with_findings
from devtrust.verifier.document import build
from devtrust.verifier.errors import MalformedInput
from devtrust.verifier.policy import Policy, PolicyError
from devtrust.verifier.tpm import bootfacts
from devtrust.verifier.tpm import eventlog as ev
from devtrust.verifier.tpm.constants import hash_alg
from devtrust.verifier.tpm.quote import AkKey, QuoteRejected, check_quote
from devtrust.verifier.tpm.structures import parse_attest, parse_public
from devtrust.verifier.trust import finding_json, overall_tier, trust_score
from devtrust.verifier.wire_body import body_from_json
from devtrust.verifier.wire_ops import StoredEvidenceView

EXIT_VALID, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def version_line() -> str:
    """``devtrust X.Y.Z``: the installed package's version (`--version` on every command)."""
    try:
        return f"devtrust {importlib.metadata.version('devtrust')}"
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return f"devtrust {__version__}"


class UsageError(Exception):
    """Unreadable input or bad arguments: exit 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows every option's default ("none" for an empty one), except where the
    option is required."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default is argparse.SUPPRESS or "%(default)" in text:
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        return f"{text} (default: {default_text(action.default)})"


def default_text(value: object) -> str:
    """How help shows a default (escaped for argparse's %-formatting)."""
    if value is None or value in ("", []):
        return "none"
    return str(value).replace("%", "%%")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from exc


def pcrs_to_json(banks: dict[str, dict[int, bytes]]) -> dict[str, dict[str, str]]:
    return {bank: {str(i): v.hex() for i, v in values.items()} for bank, values in banks.items()}


def _event_json(event: ev.Event) -> dict[str, Any]:
    return {
        "number": event.number,
        "offset": event.offset,
        "pcr": event.pcr,
        "type": event.type_name,
        "type_value": f"0x{event.type:08x}",
        "digests": {b: d.hex() for b, d in event.digests.items()},
        "data_size": len(event.data),
    }


def eventlog_replay(args: argparse.Namespace) -> int:
    data = _read(args.file, "event log")
    try:
        log = ev.parse(data)
    except MalformedInput as exc:
        print(f"invalid: {exc}")
        return EXIT_INVALID
    banks = ev.replay_log(log)
    facts = bootfacts.boot_facts(log)
    if args.json:
        out: dict[str, Any] = {"banks": pcrs_to_json(banks)}
        out["format"] = log.format
        out["facts"] = {
            "secure_boot": facts.secure_boot,
            "startup_locality": facts.startup_locality,
            "hcrtm": facts.hcrtm,
            "scrtm_version": facts.scrtm_version,
            "databases": {k: len(v) for k, v in facts.databases.items()},
            "boot_applications": [
                {"pcr": a.pcr, "path": a.path, "digests": a.digests}
                for a in facts.boot_applications
            ],
            "kernel_cmdlines": facts.kernel_cmdlines,
            "grub_commands": facts.grub_commands,
            "separators": {str(k): v for k, v in facts.separators.items()},
            "problems": facts.problems,
        }
        if args.events:
            out["events"] = [_event_json(e) for e in log.events]
        print(json.dumps(out, indent=2))
        return EXIT_VALID
    print(f"{args.file}: {log.format}, banks {', '.join(log.banks)}, {len(log.events)} events")
    if args.events:
        for e in log.events:
            digests = " ".join(f"{b}:{d.hex()[:16]}" for b, d in e.digests.items())
            print(f"  #{e.number:<4} @{e.offset:<7} PCR{e.pcr:<3} {e.type_name:<34} {digests}")
    sb = {True: "on", False: "off", None: "not measured"}[facts.secure_boot]
    print(f"Secure Boot: {sb}")
    for bank, values in banks.items():
        for index, value in values.items():
            print(f"{bank:<8} PCR {index:<2} = {value.hex()}")
    return EXIT_VALID


def _load_ak(data: bytes) -> AkKey:
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise UsageError(f"AK public key: not a PEM public key: {exc}") from exc
        if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
            raise UsageError(f"AK public key: {type(key).__name__} is neither RSA nor ECC")
        return key
    try:
        return parse_public(data).public_key()
    except MalformedInput:
        try:
            return parse_public(data, sized=False).public_key()
        except MalformedInput as exc:
            raise UsageError(f"AK public key: neither PEM nor TPM2B_PUBLIC: {exc}") from exc


def _load_pcrs(data: bytes) -> dict[tuple[int, int], bytes]:
    try:
        doc = json.loads(data)
        banks = doc["banks"]
        return {
            (hash_alg(bank), int(index)): bytes.fromhex(value)
            for bank, values in banks.items()
            for index, value in values.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(
            f'PCR file: expected {{"banks": {{"sha256": {{"0": "<hex>"}}}}}}: {exc}'
        ) from exc


def quote_check(args: argparse.Namespace) -> int:
    try:
        nonce = bytes.fromhex(args.nonce)
    except ValueError as exc:
        raise UsageError(f"--nonce: not hex: {exc}") from exc
    ak = _load_ak(_read(args.ak_pub, "AK public key"))
    message = _read(args.message, "message")
    signature = _read(args.signature, "signature")
    pcrs = _load_pcrs(_read(args.pcrs, "PCR file")) if args.pcrs else None
    try:
        requested = parse_attest(message).pcr_select
        attest = check_quote(
            attest_bytes=message,
            signature_bytes=signature,
            ak_key=ak,
            expected_qualifying_data=nonce,
            requested=requested,
            pcr_values=pcrs,
        )
    except QuoteRejected as rej:
        return _verdict(args, valid=False, reason=f"{rej.finding_id}: {rej.message}")
    except MalformedInput as exc:
        return _verdict(args, valid=False, reason=f"tpm.quote.malformed: {exc}")
    note = "" if pcrs is not None else " (PCR digest not checked: no --pcrs)"
    return _verdict(args, valid=True, reason=f"quote verifies{note}", attest=attest)


def _verdict(args: argparse.Namespace, *, valid: bool, reason: str, attest: Any = None) -> int:
    if args.json:
        out: dict[str, Any] = {"valid": valid, "reason": reason}
        if attest is not None:
            out.update(
                clock=attest.clock,
                reset_count=attest.reset_count,
                restart_count=attest.restart_count,
                safe=attest.safe,
                firmware_version=f"{attest.firmware_version:016x}",
                pcr_digest=attest.pcr_digest.hex(),
            )
        print(json.dumps(out))
    else:
        print(("valid: " if valid else "invalid: ") + reason)
    return EXIT_VALID if valid else EXIT_INVALID


def learn_group(stored: StoredEvidenceView, *, name: str) -> dict[str, Any]:
    """A reference-value group from a device's last good evidence, as the verifier stored it
    (the Query API's GetStoredEvidence), for an operator to review: its quoted PCR values
    and, when it sent an event log, its Secure Boot state and boot application digests."""
    group: dict[str, Any] = {"name": name}
    if stored.zone:
        group["zone"] = stored.zone
    group["pcrs"] = {bank: dict(values) for bank, values in stored.pcrs.items()}
    log = None
    if stored.event_log is not None:
        part = measured_boot.LogPart(0, stored.event_log)
        log = measured_boot.rebuild(
            [part], offset=len(stored.event_log), event_count=stored.event_count
        )
    if log is not None:
        # Facts only from what the last quote vouched for (issue 7, item 1).
        quoted = {
            (hash_alg(bank), index): bytes.fromhex(value)
            for bank, values in stored.pcrs.items()
            for index, value in values.items()
        }
        facts = measured_boot.facts_of(log, measured_boot.verified_pcrs(log, quoted))
        if facts.secure_boot is not None:
            group["secure_boot"] = facts.secure_boot
        apps = sorted(
            {a.digests["sha256"] for a in facts.boot_applications if "sha256" in a.digests}
        )
        if apps:
            group["boot_applications"] = apps
    return group


def learned_text(device_id: str, group: dict[str, Any]) -> list[str]:
    """`refs learn`'s output: the group as YAML under a review warning."""
    return [
        f"# Learned from device {device_id}. Review every value before applying:",
        "# golden PCRs pin this exact firmware and boot chain; prefer the event-based rules.",
        yaml.safe_dump({"groups": [group]}, sort_keys=False).rstrip("\n"),
    ]


def policy_eval(args: argparse.Namespace) -> int:
    """The dry run an operator makes before rolling out a policy: the vector, tier, score and
    findings a policy gives one evidence body (as `devtrust-agent collect --json` prints)."""
    try:
        policy = Policy.load(args.policy)
    except PolicyError as exc:
        raise UsageError(str(exc)) from exc
    try:
        body = body_from_json(_read(args.evidence, "evidence"))
    except MalformedInput as exc:
        raise UsageError(f"evidence {args.evidence}: {exc}") from exc
    if any("=" not in kv for kv in args.label):
        raise UsageError(f"--label takes KEY=VALUE, got {args.label}")
    labels = dict(kv.split("=", 1) for kv in args.label)
    doc = build(body.plain(), bulletins=policy.bulletins, zone=args.zone, labels=labels)
    outcome = policy.evaluate(doc, device_id=args.device, zone=args.zone, labels=labels)
    claims = with_findings(outcome.claims, outcome.findings)
    tier, score = overall_tier(claims), trust_score(claims)
    if args.json:
        print(
            json.dumps(
                {
                    "policy_id": policy.policy_id,
                    "tier": tier.label,
                    "score": score,
                    "claims": {c.value: v for c, v in claims.items()},
                    "findings": [finding_json(f) for f in outcome.findings],
                    "submods": [
                        {
                            "name": s.name,
                            "tier": s.tier.label,
                            "claims": {c.value: v for c, v in s.claims.items()},
                        }
                        for s in outcome.submods
                    ],
                },
                indent=2,
            )
        )
        return EXIT_VALID
    print(f"policy {policy.policy_id}: tier {tier.label}, score {score}/100")
    print("claims " + ", ".join(f"{c.value}={v}" for c, v in claims.items()))
    for sub in outcome.submods:
        print(f"  {sub.name}: {sub.tier.label}")
    for f in outcome.findings:
        print(f"{f.severity.name.lower():<15} {f.id}: {f.message}")
    return EXIT_VALID


def add_parsers(sub: Any) -> Any:
    """Add the tools to the ``devtrust`` subcommand parser ``sub``; the ``refs`` subcommand
    parser, to which verifier/ops.py adds ``learn`` (a Query API client)."""
    log = sub.add_parser("eventlog", help="TCG event log tools").add_subparsers(
        dest="action", required=True
    )
    p = log.add_parser("replay", help="parse and replay a TCG PC Client event log")
    p.add_argument("file", type=Path, help="the event log (binary_bios_measurements)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--events", action="store_true", help="list every event")
    p.set_defaults(tool=eventlog_replay)
    quote = sub.add_parser("quote", help="TPM quote tools").add_subparsers(
        dest="action", required=True
    )
    p = quote.add_parser("check", help="verify a quote made by tpm2_quote")
    p.add_argument("--ak-pub", type=Path, required=True, help="PEM or TPM2B_PUBLIC")
    p.add_argument("--nonce", required=True, help="qualifying data as given to tpm2_quote -q")
    p.add_argument("--message", type=Path, required=True, help="TPMS_ATTEST (tpm2_quote -m)")
    p.add_argument("--signature", type=Path, required=True, help="TPMT_SIGNATURE (tpm2_quote -s)")
    p.add_argument("--pcrs", type=Path, help="PCR values as `eventlog replay --json` prints")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(tool=quote_check)
    refs = sub.add_parser("refs", help="reference values").add_subparsers(
        dest="action", required=True
    )
    pol = sub.add_parser("policy", help="posture and GPU policy").add_subparsers(
        dest="action", required=True
    )
    p = pol.add_parser("eval", help="evaluate a policy on one evidence body (dry run)")
    p.add_argument("--policy", type=Path, required=True, help="the policy file (YAML)")
    p.add_argument(
        "--evidence", type=Path, required=True, help="JSON from `devtrust-agent collect --json`"
    )
    p.add_argument("--zone", default="", help="the device's zone, as the operator assigned")
    p.add_argument("--label", action="append", default=[], help="KEY=VALUE (repeatable)")
    p.add_argument("--device", default="(dry run)", help="device id shown in findings")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(tool=policy_eval)
    return refs


def run_tool(args: argparse.Namespace) -> int:
    try:
        return int(args.tool(args))
    except UsageError as exc:
        print(f"devtrust: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
