"""``devtrust simulate``: a fleet of devices on one event loop against verifier replicas.

The run: make the simulation EK root (and a swtpm endorsement CA when some devices are on
swtpm), start the embedded verifiers unless one is named (``--replicas`` of them on one
database, ``devtrust.swtpm.sim_replicas``; a throwaway PostgreSQL with ``--postgres``), build
the devices (each the agent's own client, ``devtrust.swtpm.sim_fleet``), enroll them
``--concurrency`` at a time, let them attest for ``--duration`` seconds while faults are
injected (``devtrust.swtpm.sim_faults`` plans them), wait for the faults still in flight to be
seen, stop, and check the store against what the devices were told: a result a device
received and the store lacks is lost; evidence stored twice, or more decisions than quotes,
is duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import yaml

from devtrust.agent.config import AgentConfig, TpmConfig, VerifierEndpoint
from devtrust.agent.interfaces import Tpm
from devtrust.core.command import TOOL_ERRORS, run_command
from devtrust.core.errors import DevtrustError
from devtrust.core.logsetup import configure_logging
from devtrust.swtpm import sim_args
from devtrust.swtpm.gpu_sim import GpuFault, SimAttester, SimGpuFleet, attests
from devtrust.swtpm.pgserver import PgServer
from devtrust.swtpm.sim_console import Progress, bar, counted_agent_logs, raise_fd_limit
from devtrust.swtpm.sim_faults import (
    DEVICE_FAULTS,
    GPU_FAULTS,
    FaultKind,
    Figures,
    Injection,
    count_tiers,
    faults_per_kind,
    fleet_faults,
    plan,
)
from devtrust.swtpm.sim_fleet import Fleet, Pending, SimDevice, SimTpm
from devtrust.swtpm.sim_hosts import HostBase, HostModel, SimHost, collect_base, load_models
from devtrust.swtpm.sim_metrics import FleetMetrics, read_fleet
from devtrust.swtpm.sim_replicas import FleetFaults, Replicas, figures_from, store_kind
from devtrust.swtpm.sim_verifier import StoreCheck, read_store
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
# The verifiers' metrics are scraped this often while the fleet attests.
SCRAPE_EVERY_S = 5.0


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
        models = load_models(opts.captures)
        gpus = None
        if opts.gpu_attest:
            progress.show("making the simulated GPUs' roots, RIMs and CRLs", force=True)
            gpus = await asyncio.to_thread(_prepare_gpus, opts, work, models)
        endpoint, replicas, postgres = await _start_verifiers(
            opts,
            work,
            stack,
            root=root,
            swtpm_ca=swtpm_ca,
            progress=progress,
            figures=figures,
            gpus=gpus,
        )
        cfg = AgentConfig(
            verifier=endpoint,
            tpm=TpmConfig(),
            state_dir=work / "agents",
            runtime_dir=work / "agents",
            event_log=None,
            gpu_source="none",
            reconnect_max_s=opts.reconnect_max,
            rpc_timeout_s=60.0,
        )
        ca_pem = endpoint.ca_bundle.read_bytes()
        fleet = Fleet(cfg, ca_pem, figures)
        metrics = (
            FleetMetrics([m.metrics_port for m in replicas.members])
            if replicas is not None
            else None
        )
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
                    gpus=gpus,
                )
                if replicas is not None:
                    for device in fleet.devices:
                        endpoint = replicas.endpoint(device.index)
                        device.cfg = dataclasses.replace(cfg, verifier=endpoint)
                await _enroll_all(fleet, opts, progress, figures)
                faults = None
                if replicas is not None:
                    faults = FleetFaults(
                        fleet, replicas, postgres=postgres, bound_s=cfg.reconnect_max_s
                    )
                await _attest_scraped(
                    fleet,
                    opts,
                    faults=faults,
                    rng=rng,
                    progress=progress,
                    metrics=metrics,
                    gpus=gpus,
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
        fleet.unmoved()
        for device, pending in fleet.missed():
            logger.warning(
                "%s: %s fault injected and not detected", device.name, pending.kind.value
            )
        if replicas is not None:
            assert metrics is not None
            await _check_replicas(fleet, replicas, figures, metrics, opts)
    return figures


async def _attest_scraped(
    fleet: Fleet,
    opts: argparse.Namespace,
    *,
    faults: FleetFaults | None,
    rng: random.Random,
    progress: Progress,
    metrics: FleetMetrics | None,
    gpus: SimGpuFleet | None = None,
) -> None:
    """The attesting part of the run, the verifiers' metrics scraped meanwhile, and open
    streams against the devices attached at its end (before they stop)."""
    scraping = asyncio.Event()
    during = (
        asyncio.create_task(metrics.while_running(SCRAPE_EVERY_S, scraping))
        if metrics is not None
        else None
    )
    try:
        await _attest(fleet, opts, faults=faults, rng=rng, progress=progress, gpus=gpus)
        if faults is not None:
            await faults.wait()
    finally:
        scraping.set()
        if during is not None:
            await during
    if metrics is not None:
        await metrics.before_stop(fleet.attached())


async def _check_replicas(
    fleet: Fleet,
    replicas: Replicas,
    figures: Figures,
    metrics: FleetMetrics,
    opts: argparse.Namespace,
) -> None:
    """The devices stopped: the last scrape, the replicas stopped, the store read and
    checked against what the devices were told and what the metrics say."""
    scrapes, read_at = await metrics.at_end()
    replicas.reap()
    figures.replicas_exited = replicas.exited
    await asyncio.to_thread(replicas.stop)
    figures.forced_stops = replicas.forced_stops
    ids = {d.enrollment.device_id for d in fleet.devices if d.enrollment is not None}
    _check_store(fleet, await read_store(replicas.database, ids), figures)
    # Counters start at 0 in each verifier process: comparable with the store when no
    # replica restarted, each endpoint shows all its workers', and the database is this
    # run's own.
    counters = (
        not any(m.restarts for m in replicas.members)
        and not figures.replicas_exited
        and metrics.whole
        and opts.database is None
    )
    metrics.check(scrapes, await read_fleet(replicas.database, read_at), counters=counters)
    figures.metrics = metrics.figures


async def _start_verifiers(
    opts: argparse.Namespace,
    work: Path,
    stack: AsyncExitStack,
    *,
    root: SimulationRoot,
    swtpm_ca: Path | None,
    progress: Progress,
    figures: Figures,
    gpus: SimGpuFleet | None = None,
) -> tuple[VerifierEndpoint, Replicas | None, PgServer | None]:
    """The verifier the devices attest to: the one named (--verifier), or the embedded
    replicas on their database (a throwaway PostgreSQL with --postgres), stopped by
    ``stack``; the first device's endpoint, the replicas and the PostgreSQL."""
    replicas: Replicas | None = None
    postgres: PgServer | None = None
    if opts.verifier:
        endpoint = VerifierEndpoint(
            enrollment=opts.enrollment, attestation=opts.verifier, ca_bundle=opts.ca_bundle
        )
        figures.verifier = opts.verifier
        figures.database = "the running verifier's"
    else:
        database: str | None = opts.database
        if opts.postgres:
            progress.show("starting PostgreSQL", force=True)
            postgres = await asyncio.to_thread(_start_postgres, work)
            stack.callback(postgres.close)
            database = postgres.url("devtrust")
        replicas = Replicas(
            work,
            count=opts.replicas,
            database=database,
            database_kind=store_kind(opts.database, postgres),
            simulation_root=root.cert_path,
            swtpm_ca=swtpm_ca,
            interval_s=opts.interval,
            workers=opts.workers,
        )
        if gpus is not None:
            _add_config(replicas, {"gpu": gpus.verifier_config()})
        progress.show(f"starting {opts.replicas} verifier process(es)", force=True)
        stack.callback(replicas.stop)
        await asyncio.to_thread(replicas.start)
        endpoint = replicas.endpoint(0)
        figures_from(figures, replicas)
    return endpoint, replicas, postgres


def _prepare_gpus(opts: argparse.Namespace, work: Path, models: list[HostModel]) -> SimGpuFleet:
    """--gpu-attest: the GPU test roots, a RIM store with the driver and VBIOS RIMs of every
    attesting GPU of the recorded hosts, and CRLs revoking as many spare identities as the
    gpu-revoked fault may give out (``plan`` gives each kind ``faults_per_kind`` devices)."""
    versions = {
        (model.gpu.driver_version, gpu.vbios_version)
        for model in models
        for gpu in model.gpu.gpus
        if attests(gpu.name)
    }
    spec = opts.faults
    revoked = (
        faults_per_kind(spec, opts.devices)
        if spec.enabled and FaultKind.GPU_REVOKED in spec.kinds
        else 0
    )
    return SimGpuFleet.prepare(work / "gpu", versions=sorted(versions), revoked=revoked)


def _add_config(replicas: Replicas, sections: dict[str, dict[str, Any]]) -> None:
    """Add ``sections`` to each replica's verifier.yaml before it starts."""
    for member in replicas.members:
        config = yaml.safe_load(member.config_path.read_text())
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        member.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def _start_postgres(work: Path) -> PgServer:
    """The run's throwaway PostgreSQL (in the work directory), with a database for it."""
    server = PgServer(work / "postgres").start()
    try:
        server.create_database("devtrust")
    except Exception:
        server.close()
        raise
    return server


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
    gpus: SimGpuFleet | None = None,
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
        if gpus is not None:
            host.attester = gpus.attester(
                ((g.index, g.name, g.vbios_version) for g in model.gpu.gpus),
                driver_version=model.gpu.driver_version,
            )
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
    faults: FleetFaults | None,
    rng: random.Random,
    progress: Progress,
    gpus: SimGpuFleet | None = None,
) -> None:
    figures = fleet.figures
    duration: float = opts.duration
    soft = [d.index for d in fleet.devices if d.soft is not None]
    possible = fleet_faults(
        embedded=faults is not None,
        replicas=opts.replicas,
        own_database=faults is not None and faults.postgres is not None,
    )
    injections = plan(
        opts.faults,
        devices=len(fleet.devices),
        start=min(WARMUP_S, duration / 4),
        end=max(duration - DRAIN_MARGIN_S, duration * 3 / 4),
        rng=rng,
        fleet=possible,
        gpu=gpus is not None,
    )
    for kind in opts.faults.kinds if opts.faults.enabled else ():
        if kind in DEVICE_FAULTS or kind in possible or (gpus is not None and kind in GPU_FAULTS):
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
            await _inject(fleet, pending.pop(0), faults=faults, spare=spare, now=now, gpus=gpus)
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
    faults: FleetFaults | None,
    spare: list[int],
    now: float,
    gpus: SimGpuFleet | None = None,
) -> None:
    kind = injection.kind
    if kind in DEVICE_FAULTS or kind in GPU_FAULTS:
        candidates = list(injection.devices) + spare
        while candidates:
            index = candidates.pop(0)
            if index in spare:
                spare.remove(index)
            device = fleet.devices[index]
            if kind in GPU_FAULTS:
                if _inject_gpu(fleet, device, kind, now, gpus):
                    return
            elif fleet.inject(device, kind, now):
                return
        logger.warning("no device could take a %s fault", kind.value)
        return
    if kind is FaultKind.STORM:
        devices = [fleet.devices[i] for i in injection.devices if fleet.devices[i].task is not None]
        fleet.kind(kind).injected += len(devices)
        await asyncio.gather(*(fleet.disconnect(d, kind, now) for d in devices))
        return
    if faults is not None:
        await faults.inject(kind)


def _inject_gpu(
    fleet: Fleet, device: SimDevice, kind: FaultKind, now: float, gpus: SimGpuFleet | None
) -> bool:
    """A GPU attestation fault on the device's first attesting GPU, undone once the
    verifier names it (the GPU replaced, its reports fresh again); False when the device
    cannot take it (a fault pending, not enrolled, no attesting GPU, no revoked identity
    left)."""
    attester = device.host.attester
    if (
        device.pending is not None
        or device.enrollment is None
        or not isinstance(attester, SimAttester)
        or not attester.indices
    ):
        return False
    fault = GpuFault(kind.value)
    revoked = None
    if fault is GpuFault.REVOKED:
        revoked = gpus.take_revoked() if gpus is not None else None
        if revoked is None:
            return False
    index = attester.indices[0]
    attester.inject(fault, index, revoked=revoked)
    device.pending = Pending(kind, now, lambda: attester.heal(index))
    fleet.kind(kind).injected += 1
    return True


def _check_store(fleet: Fleet, check: StoreCheck, figures: Figures) -> None:
    """Lost: results devices received that the store lacks; duplicated: evidence stored
    twice, or more decisions than the device sent evidence."""
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
    missed = any(k.injected != k.detected or k.late for k in figures.kinds.values())
    return (
        not missed
        and not figures.replicas_exited
        and not figures.lost
        and not figures.duplicated
        and figures.enrolled == figures.devices
        and figures.silent == 0
        and not (figures.metrics is not None and figures.metrics.mismatches)
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
        sim_args.check_options(opts)
    except DevtrustError as exc:
        parser.error(str(exc))
    configure_logging(logging.INFO if verbose else logging.WARNING)
    return run_command("devtrust simulate", lambda: simulate(opts), TOOL_ERRORS)
