"""``devtrust-agent``: the host agent (run as a systemd service; see packaging/systemd).

The agent's parts (``interfaces``) are chosen here, once, from the configuration: the TPM
(``make_tpm``), the host probe with its GPU source and its one posture watch (``make_host``),
the identity files; enrollment and the attestation client take them."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import dataclasses
import datetime
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# gRPC core prints INFO lines of its own on stderr (a failed TLS handshake, in its words)
# unless told otherwise, and reads this once, when grpc is first imported: before the
# imports below. The agent's one line says what failed and what to do.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


from devtrust import __version__
from devtrust.agent.attest import AttestationClient
from devtrust.agent.channel import VerifierError, VerifierUnreachable
from devtrust.agent.collect import (
    RootProbe,
    check_sources,
    collect_body,
    gpu_attester,
    gpu_source,
)
from devtrust.agent.config import AgentConfig
from devtrust.agent.enroll import EnrollmentPending, enroll_retrying
from devtrust.agent.errors import TpmError
from devtrust.agent.gpu.nvml import XidWatcher
from devtrust.agent.memory import release_startup_memory
from devtrust.agent.messages import AttestationResult
from devtrust.agent.preflight import check_key_group, check_tpm_device
from devtrust.agent.service_status import ServiceStatus, stopper
from devtrust.agent.state import AgentFiles
from devtrust.agent.tpm import AsyncTpm, TpmBackend
from devtrust.agent.watch import PostureWatcher
from devtrust.agent.workload import WorkloadApi, key_group_id
from devtrust.core.command import ErrorPolicy, Failure, run_command
from devtrust.core.errors import ConfigError, DevtrustError
from devtrust.core.ids import NONCE_SIZE
from devtrust.core.logsetup import FORMATS, configure_logging
from devtrust.core.sdnotify import Notifier, start_watchdog
from devtrust.v1 import attestation_pb2

logger = logging.getLogger("devtrust.agent")
DEFAULT_CONFIG = Path("/etc/devtrust/agent.yaml")
PENDING_RETRY_S = 60.0
# `enroll` (one-shot) keeps retrying an unreachable verifier this long by default.
ENROLL_GIVE_UP_S = 120.0
IO_THREADS = 2  # the event loop's default executor
MALLOC_ARENAS = 2
M_ARENA_MAX = -8  # glibc malloc.h
# Exit statuses (also in --help). The systemd unit's RestartPreventExitStatus= lists 2 alone,
# so `run` exits 2 only for mistakes on this host that a restart repeats: the configuration
# or a file it names (absent, unreadable, invalid), a TPM device node in tpm.tcti that is
# not there or that this user may not open (group tss), a workload_api.key_group this user
# is not in. What comes from elsewhere and can change without this host being touched, a
# verifier that refuses this host or whose certificate does not verify (an expired or
# re-issued server.pem, an impostor on the address), a TPM command that fails after start
# (busy, lockout, a resource manager restarting), an answer that does not parse, `run`
# logs at ERROR with what to fix, shows in STATUS= and retries at the next address, every
# reconnect_max_s growing to 5 minutes (channel.REFUSED_MAX_S). `enroll` (one-shot, by a
# person) exits 2 for those too. 3 and 75 come from `enroll` only; 70 is a bug: restarted.
EXIT_ERROR, EXIT_PENDING, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 2, 3, 75, 130
EPILOG = (
    "exit status: 0 done; 2 an error, its one line says what to fix (`run`: only a mistake "
    "on this host; what the verifier or the TPM refused it logs and retries); 3 enrolled, "
    "awaiting "
    "operator approval (`devtrust approve`); 75 the verifier did not answer "
    "within --give-up-s (`enroll` only: `run` keeps trying); 130 interrupted"
)


def version_line() -> str:
    """``devtrust-agent X.Y.Z``: the installed package's version."""
    import importlib.metadata  # noqa: PLC0415 - 2 MB resident for --version only

    try:
        return f"devtrust-agent {importlib.metadata.version('devtrust')}"
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return f"devtrust-agent {__version__}"


def make_tpm(cfg: AgentConfig) -> AsyncTpm:
    return AsyncTpm(TpmBackend(cfg.tpm.tcti, ek_type=cfg.tpm.ek_type, ak_handle=cfg.tpm.ak_handle))


def make_host(cfg: AgentConfig, *, xids: XidWatcher | None = None) -> RootProbe:
    """This host: posture under ``posture_root``, GPU state from ``gpu_source`` (NVML
    snapshots carry the Xid events ``xids`` gathers), each GPU's own attestation as
    ``gpu_attestation`` says, one posture watch for every client."""
    watcher = PostureWatcher(
        cfg.posture_root, interval_s=cfg.watch_interval_s, debounce_s=cfg.posture_debounce_s
    )
    return RootProbe(
        cfg.posture_root,
        mounts=cfg.encrypted_mounts,
        gpu=gpu_source(cfg, xids=xids),
        event_log=cfg.event_log,
        watcher=watcher,
        attester=gpu_attester(cfg),
    )


def make_xid_watcher(cfg: AgentConfig) -> XidWatcher | None:
    """The NVML Xid watcher where NVML is a GPU source (started by the caller)."""
    return XidWatcher() if cfg.gpu_source in ("auto", "nvml") else None


async def run(
    cfg: AgentConfig,
    *,
    enroll_only: bool = False,
    give_up_s: float | None = None,
    notifier: Notifier | None = None,
) -> bool:
    """Enroll when not enrolled yet (retrying an unreachable verifier; ``enroll_only`` gives
    up after ``give_up_s``), then, for ``run``, attest until SIGTERM or SIGINT. False when
    stopped before enrollment completed.

    ``notifier`` (systemd's, `run` only): READY=1 once the TPM answered (or said it cannot,
    which the STATUS= line tells): not after enrollment, which waits for the verifier and
    perhaps an operator, longer than any start timeout; then STATUS= as it goes (enrolling,
    attesting, the last tier and when, the certificate's expiry), WATCHDOG=1 from this loop,
    STOPPING=1 on SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Host reads, state files and the NVML start share two threads (each thread that
    # allocates can cost a malloc arena of resident memory); the TPM has its own.
    loop.set_default_executor(ThreadPoolExecutor(IO_THREADS, thread_name_prefix="agent-io"))
    status = ServiceStatus(notifier or Notifier(None), cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopper(stop, status))
    files = AgentFiles(cfg.state_dir, cfg.runtime_dir, key_gid=key_group_id(cfg))
    serve_workloads = cfg.workload_api.enabled and not enroll_only
    workload = WorkloadApi.from_config(cfg) if serve_workloads else None
    tpm = make_tpm(cfg)
    xids = None if enroll_only else make_xid_watcher(cfg)
    host = make_host(cfg, xids=xids)
    ping: asyncio.Task[None] | None = None
    try:
        if workload is not None:  # PermissionDenied to workloads until there is an identity
            await workload.start()
        enrollment = await files.load_enrollment()
        if status.enabled:
            await status.started(tpm, enrolled=enrollment is not None)
            ping = start_watchdog(status.notifier)
        if enrollment is None:
            enrollment = await enroll_retrying(
                cfg,
                tpm,
                files,
                host=host,
                stop=stop,
                give_up_s=give_up_s if enroll_only else None,
                pending_retry_s=None if enroll_only else PENDING_RETRY_S,
                retry_refused=not enroll_only,
                on_trouble=status.trouble,
            )
        if enrollment is None:  # stopped while enrolling
            return False
        if enroll_only:
            print(enrollment.device_id)
            return True
        status.enrolled(enrollment.device_id)
        if xids is not None and await asyncio.to_thread(xids.start):
            logger.info("watching NVML Xid events")
        release = _after_first_result(tpm)

        def on_result(result: AttestationResult) -> None:
            release(result)
            status.result(result, client.certificate)

        client = AttestationClient(
            cfg,
            tpm=tpm,
            host=host,
            files=files,
            enrollment=enrollment,
            on_identity=None if workload is None else workload.update,
            on_result=on_result,
            retry_refused=True,
            on_trouble=status.trouble,
        )
        await client.run(stop)
        return True
    finally:
        if ping is not None:
            ping.cancel()
        tpm.close()
        if workload is not None:
            await workload.stop()
        if xids is not None:
            await asyncio.to_thread(xids.stop)
        await asyncio.to_thread(host.close)


def _after_first_result(tpm: AsyncTpm) -> Callable[[AttestationResult], None]:
    """Once attesting, the memory used to start (imports, configuration, enrollment) is
    given back (``memory.release_startup_memory``), on the TPM's thread: the one thread that
    may unload a library (a TCTI) while the release looks at the mappings."""
    done = False
    pending: set[asyncio.Future[int]] = set()

    def on_result(result: AttestationResult) -> None:
        nonlocal done
        if not done:
            done = True
            task = asyncio.ensure_future(tpm.run(release_startup_memory))
            pending.add(task)
            task.add_done_callback(pending.discard)

    return on_result


def load_config(path: Path) -> AgentConfig:
    """The configuration at ``path``; every failure to load it a ``ConfigError`` naming it."""
    try:
        return AgentConfig.load(path)
    except OSError as exc:  # load_yaml says so itself; anything it reads later
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc


def collect(args: argparse.Namespace) -> int:
    """`devtrust-agent collect`: the evidence body as JSON, to feed `devtrust policy eval`."""
    where = f"{args.config}: " if args.config else ""
    cfg = load_config(args.config) if args.config else AgentConfig()
    if args.root:
        cfg = dataclasses.replace(cfg, posture_root=args.root)
    if args.gpu_xml:
        cfg = dataclasses.replace(cfg, gpu_source="nvidia-smi-xml", gpu_xml=args.gpu_xml)
    check_sources(
        cfg,
        root_key="--root" if args.root else f"{where}posture_root",
        xml_key="--gpu-xml" if args.gpu_xml else f"{where}gpu_xml",
    )
    nonce = args.gpu_nonce if args.gpu_nonce is not None else secrets.token_bytes(NONCE_SIZE)
    host = make_host(cfg)
    try:
        data = asyncio.run(collect_body(host, now=datetime.datetime.now(datetime.UTC), nonce=nonce))
    finally:
        host.close()
    body = attestation_pb2.EvidenceBody.FromString(data)
    if args.json:
        from google.protobuf import json_format  # noqa: PLC0415 - `collect --json` only

        print(json_format.MessageToJson(body, preserving_proto_field_name=True))
        return 0
    os_, gpu = body.os, body.gpu
    print(
        f"host      {body.host.hostname} ({os_.os_id} {os_.os_version}, kernel "
        f"{os_.kernel_release})"
    )
    print(
        f"posture   secure_boot={_opt(os_, 'secure_boot')} lockdown={os_.lockdown or '?'} "
        f"selinux={os_.selinux_mode or '?'} sshd root={os_.sshd.permit_root_login or '?'} "
        f"listening={len(os_.listening)} modules={len(os_.modules)}"
    )
    print(f"gpu       {gpu.source}: driver {gpu.driver_version or '?'}, {len(gpu.gpus)} GPUs")
    for r in body.gpu_reports:
        what = r.detail
        if r.report:
            what = f"{len(r.report)} bytes, {len(r.certificates)} certificates"
        print(f"gpu {r.index:<5} attestation {r.status}: {what}")
    if body.gpu_reports:
        print(f"gpu nonce challenge {nonce.hex()} (each GPU's: gpu_nonce(challenge, index))")
    unknown = [u.field for u in (*os_.unavailable, *gpu.unavailable)]
    print(f"unknown   {', '.join(unknown) or 'none'}")
    return 0


def _nonce(text: str) -> bytes:
    """--gpu-nonce: a challenge nonce, NONCE_SIZE bytes in hex."""
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != NONCE_SIZE:
        raise argparse.ArgumentTypeError(
            f"expected {NONCE_SIZE * 2} hex digits (a {NONCE_SIZE}-byte challenge nonce), "
            f"got {text!r}"
        )
    return value


def _opt(msg: attestation_pb2.OsPosture, name: str) -> str:
    return str(getattr(msg, name)) if msg.HasField(name) else "?"  # type: ignore[arg-type]


class _Version(argparse.Action):
    """--version, its line made only when asked (importlib.metadata costs 2 MB resident)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        print(version_line())
        parser.exit()


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default (where there is one to show)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devtrust-agent", description=__doc__, epilog=EPILOG, formatter_class=_Formatter
    )
    parser.add_argument(
        "--version", action=_Version, nargs=0, help="show program's version number and exit"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="log lines for people (text) or one JSON object per line for log shippers",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=text, description=text, epilog=EPILOG, formatter_class=_Formatter
        )

    config_help = "the agent's configuration file (packaging/config/agent.yaml)"
    p = command(
        "run",
        "enroll if needed (retrying until the verifier answers), then attest until stopped",
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
    p.set_defaults(give_up_s=None)
    p = command("enroll", "enroll this host's TPM and print the device id")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
    p.add_argument(
        "--give-up-s",
        type=_seconds,
        default=ENROLL_GIVE_UP_S,
        metavar="SECONDS",
        help="stop retrying an unreachable verifier after this long (exit 75); 0: one attempt",
    )
    p = command("collect", "print the evidence body this host would send (without a quote)")
    p.add_argument("--config", type=Path, help="agent configuration (optional: defaults apply)")
    p.add_argument(
        "--root", type=Path, help="read posture from this root instead of posture_root (/)"
    )
    p.add_argument("--gpu-xml", type=Path, help="take GPU state from nvidia-smi -q -x output")
    p.add_argument(
        "--gpu-nonce",
        type=_nonce,
        metavar="HEX",
        help="ask each GPU to attest as for a challenge with this nonce (64 hex digits; "
        "each GPU signs gpu_nonce(nonce, its index)); unset: a random one",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "collect":
        if args.verbose:  # collect's output is its stdout: no log lines unless asked
            configure_logging(logging.DEBUG, args.log_format)
        return run_command("devtrust-agent", lambda: collect(args), errors(args.config))
    configure_logging(logging.DEBUG if args.verbose else logging.INFO, args.log_format)
    return run_command("devtrust-agent", lambda: _daemon(args), errors(args.config))


def errors(config: Path | None) -> ErrorPolicy:
    """Every error one line on stderr, naming the file where it can and what to do; Ctrl-C
    ends quietly (130)."""

    def explain(exc: Exception) -> Failure | None:
        if isinstance(exc, EnrollmentPending):
            return Failure(
                f"{exc}: approve it on the verifier (`devtrust approve "
                f"{exc.device_id}`), then enroll again",
                EXIT_PENDING,
            )
        if isinstance(exc, VerifierError):
            unreachable = isinstance(exc, VerifierUnreachable)
            return Failure(f"{config}: {exc}", EXIT_UNREACHABLE if unreachable else EXIT_ERROR)
        if isinstance(exc, TpmError):
            return Failure(
                f"{exc}; check tpm.tcti in {config}: the TPM must exist and this user may "
                "open it (group tss)",
                EXIT_ERROR,
            )
        if isinstance(exc, DevtrustError):  # a ConfigError names its file itself
            return Failure(str(exc), EXIT_ERROR)
        return None

    return ErrorPolicy(expected=(), status=EXIT_ERROR, explain=explain, interrupted=None)


def _daemon(args: argparse.Namespace) -> int:
    """`run` and `enroll` (their errors: ``errors``)."""
    # systemd's $NOTIFY_SOCKET, read (and taken out of the environment) before anything can
    # fail: `run` is the unit's command; `enroll` is one-shot and tells systemd nothing.
    notifier = Notifier.from_environ(unset=True)
    cfg = _daemon_config(args.config)
    enroll_only = args.command == "enroll"
    limit_malloc_arenas()
    done = asyncio.run(
        run(
            cfg,
            enroll_only=enroll_only,
            give_up_s=args.give_up_s,
            notifier=None if enroll_only else notifier,
        )
    )
    return 0 if done or not enroll_only else EXIT_INTERRUPTED


def _daemon_config(path: Path) -> AgentConfig:
    """The configuration of `run` and `enroll`, refused before the TPM or the network is
    touched when it cannot work: absent, unreadable, invalid, or naming a posture root or GPU
    capture that is not there."""
    if not path.exists():
        raise ConfigError(
            f"configuration {path} does not exist: copy "
            "packaging/config/agent.yaml there and adapt it, or give --config FILE"
        )
    cfg = load_config(path)
    check_sources(cfg, root_key=f"{path}: posture_root", xml_key=f"{path}: gpu_xml")
    check_tpm_device(cfg.tpm.tcti, where=f"{path}: tpm.tcti")
    check_key_group(key_group_id(cfg), where=f"{path}: workload_api.key_group")
    return cfg


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (M_ARENA_MAX) before threads start: by default each thread
    that allocates may get an arena of its own, resident memory for a daemon that allocates
    little. False where libc is not glibc (nothing changes there)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds, 0 or more")
    return value


if __name__ == "__main__":
    sys.exit(main())
