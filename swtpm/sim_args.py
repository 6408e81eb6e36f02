"""``devtrust simulate``'s command line, apart from the simulator so that ``devtrust --help``
loads no agent, TPM or GPU code (tests/test_layers_commands.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from devtrust.core.errors import DevtrustError
from devtrust.swtpm.sim_faults import (
    FAULT_SPEC_FORMS,
    GPU_FAULTS,
    FaultKind,
    FaultSpec,
    parse_faults,
    without_gpu_faults,
)

HELP = "simulate a fleet of devices attesting to a verifier (an embedded one by default)"
DESCRIPTION = """\
Simulate N devices attesting to a verifier: K on real swtpm processes, the rest on an
in-process software TPM whose EK certificates chain to a simulation root (which a verifier
trusts only when its configuration names it: endorsement.trust_simulation_root). Each device
is the agent's own client with a recorded GPU host (H100, A100, B200, GB200 captures).
With --gpu-attest, each Hopper or later GPU of those hosts also attests itself: a simulated
GPU signs SPDM measurement reports with its own key, certified by a test root standing in
for NVIDIA's, and the embedded verifier checks them against driver and VBIOS RIMs signed
by a test RIM root (the gpu-* faults need it).
Without --verifier, a verifier is started for the run (SQLite, in a process of its own), or
--replicas N of them sharing one PostgreSQL (--database URL, or --postgres: a throwaway one
from this machine's binaries); each device lists every replica and moves when its one goes.
Faults are injected at --faults' rate and timed until the verifier's results show them.
Ends with a table (and --json FILE); exit 0 when every fault was detected and no result was
lost or duplicated, 1 otherwise."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds")
    return value


def _database_url(text: str) -> str:
    scheme = text.partition("://")[0].lower()
    if scheme not in ("postgresql", "postgres") or "://" not in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a PostgreSQL URL: give postgresql://USER:PASSWORD@HOST:PORT/DBNAME "
            "(or --postgres for a throwaway one)"
        )
    return text


def _faults(text: str) -> FaultSpec:
    try:
        return parse_faults(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=_positive_int, default=100, help="devices in the fleet")
    p.add_argument(
        "--swtpm",
        type=_count,
        default=0,
        metavar="K",
        help="of those, devices on real swtpm processes (the rest: the in-process TPM)",
    )
    p.add_argument("--duration", type=_seconds, default=60.0, help="seconds of attesting")
    p.add_argument(
        "--interval",
        type=_seconds,
        default=30.0,
        help="the embedded verifier's attestation interval (seconds)",
    )
    p.add_argument(
        "--faults",
        type=_faults,
        default="0",
        metavar="SPEC",
        help=FAULT_SPEC_FORMS.replace("%", "%%"),
    )
    p.add_argument(
        "--reconnect-max",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="the simulated agents' reconnect_max_s: their longest backoff, and the bound a "
        "device of a killed or drained replica must move within (the agent's default is 30)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write the figures here as JSON")
    p.add_argument(
        "--workers", type=_positive_int, default=1, help="the embedded verifier's processes"
    )
    p.add_argument(
        "--replicas",
        type=_positive_int,
        default=1,
        metavar="N",
        help="embedded verifiers (separate processes) sharing one database; more than one "
        "needs --database or --postgres",
    )
    store = p.add_mutually_exclusive_group()
    store.add_argument(
        "--database",
        type=_database_url,
        metavar="URL",
        help="an existing PostgreSQL for the embedded verifiers (its data is kept; this run's "
        "devices are new ones)",
    )
    store.add_argument(
        "--postgres",
        action="store_true",
        help="a throwaway PostgreSQL for the embedded verifiers, started from this machine's "
        "binaries in the work directory (and restarted by the pgrestart fault)",
    )
    p.add_argument(
        "--concurrency", type=_positive_int, default=32, help="enrollments in flight at once"
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the fault plan")
    p.add_argument(
        "--work",
        type=Path,
        metavar="DIR",
        help="keep the run's files here; none: a temporary directory, removed after",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")
    remote = p.add_argument_group(
        "a running verifier instead of the embedded one (it must trust --simulation-root)"
    )
    remote.add_argument("--verifier", metavar="HOST:PORT", help="its attestation address")
    remote.add_argument("--enrollment", metavar="HOST:PORT", help="its enrollment address")
    remote.add_argument("--ca-bundle", type=Path, metavar="FILE", help="the verifier's CA bundle")
    remote.add_argument(
        "--simulation-root",
        type=Path,
        metavar="DIR",
        help="the simulation EK root to use (made there when missing)",
    )
    p.add_argument(
        "--gpu-attest",
        action="store_true",
        help="simulated GPU attestation: the Hopper and later GPUs send signed SPDM reports "
        "(test roots, not NVIDIA's; RIMs and CRLs of this run in the embedded verifier's "
        "configuration); enables the gpu-measurement, gpu-replay and gpu-revoked faults",
    )
    p.add_argument(
        "--captures",
        type=Path,
        metavar="DIR",
        help="nvidia-smi -q -x captures of the recorded hosts; none: the repository's test data",
    )


def check_options(opts: argparse.Namespace) -> None:
    """Options that only make sense together: a usage error (exit 2) before anything starts."""
    if opts.swtpm > opts.devices:
        raise DevtrustError(f"--swtpm {opts.swtpm} is more than --devices {opts.devices}")
    if opts.json is not None and not opts.json.parent.is_dir():
        raise DevtrustError(
            f"--json {opts.json}: no directory {opts.json.parent} to write it in: give a file "
            "in an existing directory"
        )
    remote = [opts.verifier, opts.enrollment, opts.ca_bundle]
    if any(remote) and not all(remote):
        raise DevtrustError(
            "a running verifier needs --verifier, --enrollment and --ca-bundle together "
            "(and --simulation-root, the EK root it trusts)"
        )
    if opts.verifier and opts.simulation_root is None:
        raise DevtrustError(
            "--verifier needs --simulation-root DIR: the simulation EK root that verifier "
            "trusts (endorsement.trust_simulation_root)"
        )
    if opts.verifier and opts.swtpm:
        raise DevtrustError("--swtpm needs the embedded verifier (it trusts this run's swtpm CA)")
    if opts.verifier and (opts.replicas > 1 or opts.database or opts.postgres):
        raise DevtrustError(
            "--replicas, --database and --postgres are for the embedded verifiers, not --verifier"
        )
    _check_gpu_attest(opts)
    if opts.replicas > 1 and not (opts.database or opts.postgres):
        raise DevtrustError(
            f"--replicas {opts.replicas} needs a database the replicas share: --postgres (a "
            "throwaway PostgreSQL) or --database postgresql://..."
        )


def _check_gpu_attest(opts: argparse.Namespace) -> None:
    """GPU faults need --gpu-attest; --gpu-attest needs the embedded verifier (its
    configuration lists this run's GPU test roots, RIM store and CRLs). Without it, a spec
    of every kind ("1%", "1%:all") means every kind but the GPU ones."""
    spec: FaultSpec = opts.faults
    gpu_attest: bool = opts.gpu_attest
    if gpu_attest and opts.verifier:
        raise DevtrustError(
            "--gpu-attest needs the embedded verifier: its configuration lists this run's "
            "GPU test roots, RIMs and CRLs (a running verifier trusts NVIDIA's only)"
        )
    if gpu_attest:
        return
    named = [k.value for k in spec.kinds if k in GPU_FAULTS]
    if named and spec.kinds != tuple(FaultKind):
        raise DevtrustError(
            f"--faults {', '.join(named)}: GPU attestation faults need --gpu-attest "
            "(simulated GPUs that attest themselves)"
        )
    opts.faults = without_gpu_faults(spec)
