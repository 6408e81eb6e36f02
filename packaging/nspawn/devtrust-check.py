"""Inside a booted Debian 12 container (tests/test_systemd_boot.py): the installed packages'
units run under the real systemd 252, started and stopped the way an admin would, and what
systemd and the kernel say about them is written to /var/tmp/devtrust-check.json; then the
container powers off.

Run once at boot by devtrust-check.service (after multi-user.target) with the verifier
package's Python, for its yaml. Never shipped in a package. Every step is recorded whatever
it gives; nothing here decides pass or fail: the test reads the JSON and asserts.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

import yaml

OUT = Path("/var/tmp/devtrust-check.json")  # noqa: S108 - the container's, read by the test
PKI = Path("/etc/devtrust/verifier")
VERIFIER_YAML = Path("/etc/devtrust/verifier.yaml")
AGENT_YAML = Path("/etc/devtrust/agent.yaml")
AGENT_CA = Path("/etc/devtrust/agent/verifier-ca.pem")
# Put there by the test: the swtpm's endorsement CA (its state was provisioned on the host
# with swtpm_setup --create-ek-cert against that CA).
EK_CA = Path("/etc/devtrust-check/ek-ca.pem")
SWTPM_PORT = 2321
SHOW = (
    "ActiveState,SubState,Result,StatusText,MainPID,NRestarts,WatchdogUSec,User,Group,"
    "ExecMainCode,ExecMainStatus,UMask,NotifyAccess,Type,WatchdogTimestampMonotonic"
)
RUN_FILES = (
    "/run/devtrust",
    "/run/devtrust/device.pem",
    "/run/devtrust/ca-bundle.pem",
    "/run/devtrust/device.key",
    "/run/devtrust/workload_api.socket",
    "/run/devtrust-agent",
    "/var/lib/devtrust",
    "/var/lib/devtrust-agent",
)
TIER = re.compile(r"attesting to [^:]+:\d+: (\w+) \(score")

report: dict[str, Any] = {"steps": [], "errors": []}


def log(line: str) -> None:
    print(f"devtrust-check: {line}", flush=True)


def run(name: str, cmd: list[str], timeout: float = 150) -> dict[str, Any]:
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        step = {"rc": proc.returncode, "out": proc.stdout, "err": proc.stderr}
    except subprocess.TimeoutExpired as exc:
        step = {"rc": None, "out": str(exc.stdout), "err": f"timed out after {timeout} s"}
    step.update(name=name, cmd=cmd, seconds=round(time.monotonic() - start, 2))
    report["steps"].append(step)
    log(f"{name}: rc={step['rc']} in {step['seconds']} s")
    return step


def show(unit: str) -> dict[str, str]:
    out = run(f"show {unit}", ["systemctl", "show", unit, "-p", SHOW])["out"]
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def proc_status(pid: str) -> dict[str, str]:
    """The kernel's view of the service's main process: ids, groups, seccomp, NoNewPrivs,
    capabilities and umask (what the unit's User=, SystemCallFilter=, NoNewPrivileges=,
    CapabilityBoundingSet= and UMask= did)."""
    keep = ("Uid", "Gid", "Groups", "Umask", "NoNewPrivs", "Seccomp", "CapEff", "CapBnd")
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as exc:
        return {"error": str(exc)}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {k: fields[k].strip() for k in keep if k in fields}


def sandbox_probe(pid: str, paths: list[str]) -> dict[str, str]:
    """In the service's mount namespace (as root, so only the mounts refuse): can each path
    be written? ProtectSystem=strict makes /usr, /etc, /opt read-only; the state
    directories stay writable."""
    result = {}
    for path in paths:
        probe = f"{path}/.devtrust-check-probe"
        step = run(
            f"write probe {path}",
            ["nsenter", "-t", pid, "-m", "--", "sh", "-c", f"touch {probe} && rm -f {probe}"],
            timeout=20,
        )
        result[path] = "writable" if step["rc"] == 0 else step["err"].strip() or "refused"
    return result


def wait_for(predicate: Any, timeout: float, interval: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def journal(unit: str) -> str:
    step = run(f"journal {unit}", ["journalctl", "-u", unit, "--no-pager", "-o", "cat", "-b"])
    return str(step["out"])


def file_modes() -> dict[str, Any]:
    modes: dict[str, Any] = {}
    for name in RUN_FILES:
        try:
            st = os.lstat(name)
        except OSError as exc:
            modes[name] = {"error": exc.strerror}
            continue
        modes[name] = {
            "mode": f"{stat.S_IMODE(st.st_mode):04o}",
            "type": "dir"
            if stat.S_ISDIR(st.st_mode)
            else "socket"
            if stat.S_ISSOCK(st.st_mode)
            else "file",
            "user": pwd.getpwuid(st.st_uid).pw_name,
            "group": grp.getgrgid(st.st_gid).gr_name,
        }
    return modes


def edit_yaml(path: Path, change: Any) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def verifier() -> None:
    v: dict[str, Any] = report.setdefault("verifier", {})
    v["init"] = run(
        "init",
        [
            "devtrust-verifier",
            "init",
            "--dir",
            str(PKI),
            "--hostname",
            "localhost",
        ],
    )
    v["pki"] = {
        p.name: f"{p.stat().st_mode & 0o777:04o} {p.owner()}:{p.group()}"
        for p in sorted(PKI.iterdir())
    }

    def configure(d: dict[str, Any]) -> None:
        d.setdefault("endorsement", {}).update(trust_swtpm_local_ca=str(EK_CA))
        # A container has no firmware event log, Secure Boot or sshd: its best tier is
        # warning, which must get a certificate for the agent's files to be written.
        d["certificates"]["min_tier"] = "warning"

    edit_yaml(VERIFIER_YAML, configure)
    v["start"] = run("start verifier", ["systemctl", "start", "devtrust-verifier"])
    v["after_start"] = show("devtrust-verifier")
    pid = v["after_start"].get("MainPID", "0")
    v["proc"] = proc_status(pid)
    v["credentials"] = run(
        "credentials", ["ls", "-ln", "/run/credentials/devtrust-verifier.service"]
    )["out"]
    v["writable"] = sandbox_probe(
        pid, ["/usr", "/etc/devtrust", "/opt", "/var/lib/devtrust", "/var/lib/devtrust-crl"]
    )
    v["reload"] = run("reload verifier", ["systemctl", "reload", "devtrust-verifier"])
    # The program answers SIGHUP with RELOADING=1, the reload, then READY=1 and a STATUS=
    # line saying what it loaded: waited for here, it comes after `systemctl reload`.
    wait_for(lambda: show("devtrust-verifier").get("StatusText", "").startswith("reload"), 20)
    v["after_reload"] = show("devtrust-verifier")
    try:
        with urllib.request.urlopen("http://127.0.0.1:9471/metrics", timeout=10) as resp:
            v["metrics"] = resp.read().decode()
    except OSError as exc:
        v["metrics"] = f"ERROR {exc}"


def swtpm_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", SWTPM_PORT), timeout=1):
            return True
    except OSError:
        return False


def agent() -> None:
    a: dict[str, Any] = report.setdefault("agent", {})
    a["swtpm_start"] = run("start swtpm", ["systemctl", "start", "devtrust-check-swtpm"])
    a["swtpm_up"] = wait_for(swtpm_up, 20, 0.5)
    AGENT_CA.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PKI / "ca.pem", AGENT_CA)
    AGENT_CA.chmod(0o644)

    def configure(d: dict[str, Any]) -> None:
        d["verifier"].update(
            enrollment="localhost:7443", attestation="localhost:7444", ca_bundle=str(AGENT_CA)
        )
        d["tpm"]["tcti"] = f"swtpm:host=127.0.0.1,port={SWTPM_PORT}"

    edit_yaml(AGENT_YAML, configure)
    a["start"] = run("start agent", ["systemctl", "start", "devtrust-agent"])
    a["after_start"] = show("devtrust-agent")
    wait_for(lambda: TIER.search(show("devtrust-agent").get("StatusText", "")) is not None, 90)
    a["attesting"] = show("devtrust-agent")
    pid = a["attesting"].get("MainPID", "0")
    a["proc"] = proc_status(pid)
    a["writable"] = sandbox_probe(pid, ["/usr", "/etc/devtrust", "/var/lib/devtrust-agent"])
    report["run_files"] = file_modes()
    a["devices_cgroup"] = run(
        "agent devices cgroup",
        [
            "sh",
            "-c",
            f"cat /proc/{pid}/cgroup; d=$(grep :devices: /proc/{pid}/cgroup | cut -d: -f3);"
            " cat /sys/fs/cgroup/devices$d/devices.list 2>&1 || true",
        ],
    )["out"]


def watchdog() -> None:
    """WATCHDOG=1 seen by systemd: the watchdog's timestamp, set when the service started,
    moves at each ping (every WatchdogSec/2 or sooner); waited for on both units."""
    pings: dict[str, Any] = report.setdefault("watchdog", {})
    for unit, key in (("devtrust-verifier", "verifier"), ("devtrust-agent", "agent")):
        first = report.get(key, {}).get("after_start", {}).get("WatchdogTimestampMonotonic", "0")
        wait_for(
            lambda unit=unit, first=first: (
                show(unit).get("WatchdogTimestampMonotonic", "0") not in ("0", first)
            ),
            45,
        )
        pings[unit] = {"at_start": first, "later": show(unit).get("WatchdogTimestampMonotonic")}


def stop(unit: str) -> dict[str, Any]:
    step = run(f"stop {unit}", ["systemctl", "stop", unit])
    return {"stop": step, "after_stop": show(unit)}


def main() -> None:
    report["systemd"] = run("systemd version", ["systemctl", "--version"])["out"]
    report["virt"] = run("virt", ["systemd-detect-virt"])["out"].strip()
    for name, step in (("verifier", verifier), ("agent", agent), ("watchdog", watchdog)):
        try:
            step()
        except Exception:  # noqa: BLE001 - recorded for the test, which fails on it
            report["errors"].append(f"{name}: {traceback.format_exc()}")
    for unit, key in (("devtrust-agent", "agent"), ("devtrust-verifier", "verifier")):
        try:
            report.setdefault(key, {}).update(stop(unit))
        except Exception:  # noqa: BLE001
            report["errors"].append(f"stop {unit}: {traceback.format_exc()}")
    run("stop swtpm", ["systemctl", "stop", "devtrust-check-swtpm"])
    for unit, key in (("devtrust-agent", "agent"), ("devtrust-verifier", "verifier")):
        report.setdefault(key, {})["journal"] = journal(unit)
    report["security"] = {
        unit: run(f"security {unit}", ["systemd-analyze", "security", "--no-pager", unit])["out"]
        for unit in ("devtrust-verifier.service", "devtrust-agent.service")
    }
    report["failed_units"] = run("failed", ["systemctl", "--failed", "--no-legend"])["out"]


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001
        report["errors"].append(traceback.format_exc())
    finally:
        OUT.write_text(json.dumps(report, indent=1))
        log(f"wrote {OUT}; powering off")
        subprocess.run(["systemctl", "--no-block", "poweroff"], check=False)
