"""``devtrust simulate``: a fleet of devices on one event loop against one verifier.

The run: make the simulation EK root (and a swtpm endorsement CA when some devices are on
swtpm), start the embedded verifier unless one is named, build the devices (each the agent's
own client, ``devtrust.swtpm.sim_fleet``), enroll them ``--concurrency`` at a time, let them
attest for ``--duration`` seconds while faults are injected (``devtrust.swtpm.sim_faults``
plans them), wait for the faults still in flight to be seen, stop, and check the verifier's
store against what the devices were told: a result a device received and the store lacks is
lost; evidence stored twice, or more decisions than quotes, is duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

from devtrust.agent.config import AgentConfig, TpmConfig, VerifierEndpoint
from devtrust.agent.interfaces import Tpm
from devtrust.core.command import TOOL_ERRORS, run_command
from devtrust.core.errors import DevtrustError
from devtrust.core.logsetup import configure_logging
from devtrust.swtpm import sim_args
from devtrust.swtpm.sim_faults import (
    DEVICE_FAULTS,
    FaultKind,
    Figures,
    Injection,
    count_tiers,
    plan,
)
from devtrust.swtpm.sim_fleet import Fleet, SimDevice, SimTpm
from devtrust.swtpm.sim_hosts import HostBase, HostModel, SimHost, collect_base, load_models
from devtrust.swtpm.sim_verifier import EmbeddedVerifier
from devtrust.swtpm.simroot import SimulationRoot
from devtrust.swtpm.soft import SoftTpm

logger = logging.getLogger(__name__)
# Attesting starts this long after the last device enrolled before faults are injected, and
# none is injected in the last DRAIN_MARGIN_S of the run.
WARMUP_S = 5.0
DRAIN_MARGIN_S = 2.0
# After the run, faults still in flight get two attestation intervals plus this to be seen
# (a fault injected just before a challenge waits for the next; a loaded machine is slow).
DRAIN_EXTRA_S = 30.0


class Progress:
    """One line on stderr: rewritten in place on a terminal, else printed every 15 s."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._last_print = 0.0
        self._samples: list[tuple[float, int]] = []

    def show(self, text: str, *, force: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()
        elif force or now - self._last_print >= 15.0:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            self._last_print = now

    def done(self) -> None:
        if not self.quiet and self.tty:
            sys.stderr.write("\n")

    def rate(self, results: int) -> float:
        """Results per second over the last five seconds."""
        now = time.monotonic()
        self._samples.append((now, results))
        while len(self._samples) > 2 and now - self._samples[0][0] > 5.0:
            self._samples.pop(0)
        then, before = self._samples[0]
        return (results - before) / (now - then) if now > then else 0.0


def bar(fraction: float, width: int = 24) -> str:
    filled = int(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


class _Counting(logging.Handler):
    """Counts the agents' warnings and errors by their first words (stream failures,
    reconnects): 10,000 agents would drown a terminal in them."""

    def __init__(self, figures: Figures) -> None:
        super().__init__(logging.WARNING)
        self.figures = figures

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if ("stream" in message and "failed" in message) or "ended while sending" in message:
            # A restart or a storm ends streams: the agents reconnect, counted apart.
            self.figures.reconnects += 1
            return
        if record.levelno >= logging.ERROR:
            key = " ".join(message.split()[:4])
        else:
            # What a device is told follows from its faults (a certificate withheld or
            # revoked): the results say so; not an error of the run.
            return
        self.figures.errors[key] = self.figures.errors.get(key, 0) + 1


@contextlib.contextmanager
def counted_agent_logs(figures: Figures, *, verbose: bool) -> Iterator[None]:
    agent = logging.getLogger("devtrust.agent")
    handler = _Counting(figures)
    agent.addHandler(handler)
    propagate = agent.propagate
    agent.propagate = verbose
    try:
        yield
    finally:
        agent.removeHandler(handler)
        agent.propagate = propagate


def raise_fd_limit(devices: int) -> None:
    """Each device holds a connection, and the verifier one per device: ask for enough."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, devices * 2 + 256))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < devices + 256:
        raise DevtrustError(
            f"--devices {devices} needs about {devices + 256} open files; this process may "
            f"open {hard} (ulimit -n): raise the limit or simulate fewer devices"
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


async def run(opts: argparse.Namespace, work: Path) -> Figures:
    raise_fd_limit(opts.devices)
    figures = Figures(
        devices=opts.devices,
        soft_tpms=opts.devices - opts.swtpm,
        swtpms=opts.swtpm,
        interval_s=opts.interval,
        faults=opts.faults.describe(),
    )
    progress = Progress(opts.quiet)
    rng = random.Random(opts.seed)  # noqa: S311 - a reproducible fault plan, not a secret
    async with AsyncExitStack() as stack:
        root_dir = opts.simulation_root or work / "simulation-root"
        existing = root_dir.is_dir() and any(root_dir.iterdir())
        root = SimulationRoot.load(root_dir) if existing else SimulationRoot.create(root_dir)
        swtpm_ca = None
        swtpm_tpms: list[tuple[Tpm, Path]] = []
        if opts.swtpm:
            progress.show(f"starting {opts.swtpm} swtpm processes", force=True)
            swtpm_ca, swtpm_tpms = await asyncio.to_thread(_start_swtpms, stack, work, opts.swtpm)
        verifier: EmbeddedVerifier | None = None
        if opts.verifier:
            endpoint = VerifierEndpoint(
                enrollment=opts.enrollment, attestation=opts.verifier, ca_bundle=opts.ca_bundle
            )
            figures.verifier = opts.verifier
        else:
            verifier = EmbeddedVerifier(
                work / "verifier",
                simulation_root=root.cert_path,
                swtpm_ca=swtpm_ca,
                interval_s=opts.interval,
                workers=opts.workers,
            )
            await asyncio.to_thread(verifier.start)
            stack.callback(verifier.stop)
            endpoint = VerifierEndpoint(
                enrollment=f"127.0.0.1:{verifier.enrollment_port}",
                attestation=f"127.0.0.1:{verifier.attestation_port}",
                ca_bundle=verifier.ca_bundle,
            )
            figures.verifier = verifier.describe()
        cfg = AgentConfig(
            verifier=endpoint,
            tpm=TpmConfig(),
            state_dir=work / "agents",
            runtime_dir=work / "agents",
            event_log=None,
            gpu_source="none",
            reconnect_max_s=10.0,
            rpc_timeout_s=60.0,
        )
        ca_pem = endpoint.ca_bundle.read_bytes()
        fleet = Fleet(cfg, ca_pem, figures)
        models = load_models(opts.captures)
        base = await collect_base(work)
        with counted_agent_logs(figures, verbose=logging.getLogger().level <= logging.INFO):
            try:
                await _build(
                    fleet,
                    opts,
                    root=root,
                    swtpms=swtpm_tpms,
                    models=models,
                    base=base,
                    progress=progress,
                )
                await _enroll_all(fleet, opts, progress, figures)
                await _attest(
                    fleet, opts, verifier=verifier, rng=rng, progress=progress, figures=figures
                )
            finally:
                await fleet.stop_all()
                progress.done()
        fleet.split_by_service(time.monotonic())
        figures.tiers = count_tiers(d.tier for d in fleet.devices if d.enrollment is not None)
        silent = [d for d in fleet.devices if d.enrollment is not None and d.results == 0]
        figures.silent = len(silent)
        if silent:
            logger.warning(
                "%d enrolled devices got no result (%s...): the run was too short for their "
                "first appraisal, or the verifier too busy: give a longer --duration",
                len(silent),
                ", ".join(d.name for d in silent[:3]),
            )
        figures.evidence_sent = sum(d.tpm.quotes for d in fleet.devices)
        for device, pending in fleet.missed():
            logger.warning(
                "%s: %s fault injected and not detected", device.name, pending.kind.value
            )
        if verifier is not None:
            await asyncio.to_thread(verifier.stop)
            _check_store(fleet, verifier, figures)
    return figures


def _start_swtpms(
    stack: AsyncExitStack, work: Path, count: int
) -> tuple[Path, list[tuple[Tpm, Path]]]:
    """Provision and start ``count`` swtpm processes with an endorsement CA of this run, each
    booted (its event log written); returns the CA's certificate and (tpm, log) pairs."""
    from devtrust.agent.tpm import AsyncTpm, TpmBackend  # noqa: PLC0415 - only with --swtpm
    from devtrust.swtpm import EndorsementCA, Swtpm, provision  # noqa: PLC0415
    from devtrust.swtpm.bootlog import simulate_boot  # noqa: PLC0415

    ca = EndorsementCA.create(work / "ek-ca")
    out: list[tuple[Tpm, Path]] = []
    for i in range(count):
        state = work / f"swtpm-{i}"
        provision(state, ca)
        process = Swtpm(state)
        stack.callback(process.stop)
        process.start()
        tpm = AsyncTpm(TpmBackend(process.tcti))
        stack.callback(tpm.close)
        log = simulate_boot(tpm.backend.esapi, state / "event-log.bin")
        out.append((tpm, log))
    return ca.cert_path, out


async def _build(
    fleet: Fleet,
    opts: argparse.Namespace,
    *,
    root: SimulationRoot,
    swtpms: list[tuple[Tpm, Path]],
    models: list[HostModel],
    base: HostBase,
    progress: Progress,
) -> None:
    soft_count = opts.devices - opts.swtpm
    source: Callable[[], bytes | None]
    for index in range(opts.devices):
        model = models[index % len(models)]
        name = f"sim-{index:05d}"
        if index < soft_count:
            soft = SoftTpm(root)
            tpm = SimTpm(soft)
            source = soft.event_log
        else:
            real, log_path = swtpms[index - soft_count]
            soft = None
            tpm = SimTpm(real)
            source = _file_reader(log_path)
        host = SimHost(base, model, hostname=name, event_log_source=source)
        fleet.devices.append(SimDevice(index=index, tpm=tpm, soft=soft, host=host))
        if index % 200 == 199:
            progress.show(
                f"making devices {bar((index + 1) / opts.devices)} {index + 1:,}/{opts.devices:,}"
            )
            await asyncio.sleep(0)


def _file_reader(path: Path) -> Callable[[], bytes | None]:
    def read() -> bytes | None:
        try:
            return path.read_bytes()
        except OSError:
            return None

    return read


async def _enroll_all(
    fleet: Fleet, opts: argparse.Namespace, progress: Progress, figures: Figures
) -> None:
    """Enroll every device, ``--concurrency`` at a time; each starts attesting once enrolled."""
    started = time.monotonic()
    gate = asyncio.Semaphore(opts.concurrency)
    done = 0

    async def one(device: SimDevice) -> None:
        nonlocal done
        async with gate:
            if await fleet.enroll(device):
                figures.enrolled += 1
                fleet.start(device)
            done += 1

    tasks = [asyncio.create_task(one(d)) for d in fleet.devices]
    while True:
        finished, _ = await asyncio.wait(tasks, timeout=1.0)
        progress.show(
            f"enrolling {bar(done / len(tasks))} {done:,}/{len(tasks):,} "
            f"({figures.enrolled:,} enrolled, {figures.results:,} results)"
        )
        if len(finished) == len(tasks):
            break
    figures.enroll_seconds = time.monotonic() - started
    progress.show(
        f"enrolled {figures.enrolled:,} of {len(tasks):,} devices "
        f"in {figures.enroll_seconds:.1f} s",
        force=True,
    )
    if figures.enrolled == 0:
        raise DevtrustError("no device could enroll: see the errors above")


async def _attest(
    fleet: Fleet,
    opts: argparse.Namespace,
    *,
    verifier: EmbeddedVerifier | None,
    rng: random.Random,
    progress: Progress,
    figures: Figures,
) -> None:
    duration: float = opts.duration
    soft = [d.index for d in fleet.devices if d.soft is not None]
    injections = plan(
        opts.faults,
        devices=len(fleet.devices),
        start=min(WARMUP_S, duration / 4),
        end=max(duration - DRAIN_MARGIN_S, duration * 3 / 4),
        rng=rng,
        restart=verifier is not None,
    )
    for kind in opts.faults.kinds if opts.faults.enabled else ():
        if kind is not FaultKind.RESTART or verifier is not None:
            fleet.kind(kind)
    start = time.monotonic()
    results_at_start = figures.results
    pending = list(injections)
    spare = [i for i in soft if fleet.devices[i].enrollment is not None]
    rng.shuffle(spare)
    while True:
        now = time.monotonic()
        elapsed = now - start
        while pending and pending[0].at <= elapsed:
            await _inject(fleet, pending.pop(0), verifier=verifier, spare=spare, now=now)
        if elapsed >= duration:
            break
        _show(progress, figures, elapsed=elapsed, duration=duration, phase="attesting")
        await asyncio.sleep(min(0.25, max(0.01, (pending[0].at - elapsed) if pending else 0.25)))
    figures.duration_s = time.monotonic() - start
    attest_results = figures.results - results_at_start
    # Faults still in flight get two intervals and DRAIN_EXTRA_S more to be seen (results
    # keep counting; the rate below is the run's own).
    drain_until = time.monotonic() + 2 * opts.interval + DRAIN_EXTRA_S
    while fleet.awaiting() and time.monotonic() < drain_until:
        _show(
            progress, figures, elapsed=time.monotonic() - start, duration=duration, phase="draining"
        )
        await asyncio.sleep(0.25)
    # Attestations per second over the run itself, not the drain.
    figures.window_results = attest_results


def _show(
    progress: Progress, figures: Figures, *, elapsed: float, duration: float, phase: str
) -> None:
    injected = sum(k.injected for k in figures.kinds.values())
    detected = sum(k.detected for k in figures.kinds.values())
    errors = sum(figures.errors.values())
    progress.show(
        f"{phase} {bar(elapsed / duration)} {elapsed:,.0f}/{duration:,.0f} s  "
        f"{figures.results:,} results ({progress.rate(figures.results):,.0f}/s)  "
        f"faults {detected}/{injected} detected  errors {errors}"
    )


async def _inject(
    fleet: Fleet,
    injection: Injection,
    *,
    verifier: EmbeddedVerifier | None,
    spare: list[int],
    now: float,
) -> None:
    kind = injection.kind
    if kind in DEVICE_FAULTS:
        candidates = list(injection.devices) + spare
        while candidates:
            index = candidates.pop(0)
            if index in spare:
                spare.remove(index)
            if fleet.inject(fleet.devices[index], kind, now):
                return
        logger.warning("no device could take a %s fault", kind.value)
        return
    if kind is FaultKind.STORM:
        devices = [fleet.devices[i] for i in injection.devices if fleet.devices[i].task is not None]
        fleet.kind(kind).injected += len(devices)
        await asyncio.gather(*(fleet.disconnect(d, kind, now) for d in devices))
        return
    if kind is FaultKind.RESTART and verifier is not None:
        connected = [d for d in fleet.devices if d.task is not None and d.results > 0]
        fleet.kind(kind).injected += len(connected)
        # Down from when the old process is gone: results it sent while stopping count
        # for the time before the restart, not as a recovery.
        await asyncio.to_thread(verifier.stop)
        stopped = time.monotonic()
        for device in connected:
            fleet.mark_down(device, kind, stopped)
        fleet.restarted(stopped)
        await asyncio.to_thread(verifier.start)
        verifier.restarts += 1


def _check_store(fleet: Fleet, verifier: EmbeddedVerifier, figures: Figures) -> None:
    check = verifier.check_store()
    figures.stored = sum(check.decisions.values())
    duplicated = check.duplicated
    lost = 0
    for device in fleet.devices:
        if device.enrollment is None:
            continue
        stored = check.decisions.get(device.enrollment.device_id, 0)
        if device.results > stored:
            lost += device.results - stored
            logger.error("%s: %d results received, %d stored", device.name, device.results, stored)
        if stored > device.tpm.quotes:
            duplicated += stored - device.tpm.quotes
    figures.lost, figures.duplicated = lost, duplicated


def succeeded(figures: Figures) -> bool:
    """Every device enrolled and attested, every fault detected, nothing lost or doubled."""
    missed = any(k.injected != k.detected for k in figures.kinds.values())
    return (
        not missed
        and not figures.lost
        and not figures.duplicated
        and figures.enrolled == figures.devices
        and figures.silent == 0
    )


def simulate(opts: argparse.Namespace) -> int:
    """Run, print the table, write --json; 0 when every fault was seen and nothing lost."""
    if opts.work is not None:
        opts.work.mkdir(parents=True, exist_ok=True)
        figures = asyncio.run(run(opts, opts.work))
    else:
        with tempfile.TemporaryDirectory(prefix="devtrust-simulate-") as tmp:
            figures = asyncio.run(run(opts, Path(tmp)))
    print(figures.table())
    if opts.json is not None:
        opts.json.write_text(json.dumps(figures.as_dict(), indent=2) + "\n")
    return 0 if succeeded(figures) else 1


os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def build_parser() -> argparse.ArgumentParser:
    from devtrust.verifier.tools import HelpFormatter  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="devtrust simulate", description=sim_args.DESCRIPTION, formatter_class=HelpFormatter
    )
    sim_args.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None, *, verbose: bool = False) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    try:
        check_options(opts)
    except DevtrustError as exc:
        parser.error(str(exc))
    configure_logging(logging.INFO if verbose else logging.WARNING)
    return run_command("devtrust simulate", lambda: simulate(opts), TOOL_ERRORS)
