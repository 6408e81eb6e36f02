"""One metrics endpoint for a verifier of several worker processes (server.workers > 1).

Each worker is a process of its own with its own counters; a scrape that reached one of
them (were they to share the port as they share the gRPC ones) would see that worker's
share only, a different one at each scrape. So the parent, which serves nothing else, serves
the metrics: before it starts the workers it makes a private directory (mode 0700) and names
it in PROMETHEUS_MULTIPROC_DIR, which the spawned workers inherit; prometheus_client in each
worker then keeps its values in files there (verifier/metrics.py ``open_metrics``: no
endpoint in a worker), and the parent's endpoint reads them all through
``MultiProcessCollector``: counters and histograms summed (a restarted worker's counts are
kept: its files stay), the open-streams gauge summed over live workers (``worker_exited``
drops a dead worker's), the devices gauges the most recent reading. Only worker 0 reads the
fleet (``open_metrics``); when it dies its readings go with it (``worker_exited``), so a
series it last showed cannot stay at a stale value under a worker that never showed it: the
devices gauges are absent until the restarted worker 0 reads again (``metrics.refresh_s``).

Used by verifier/workers.py ``supervise``::

    metrics = WorkerMetrics.open(concrete, count)  # before the first worker starts
    ...
    metrics.worker_exited(pid)  # each time a worker exits
    ...
    await metrics.aclose()  # after the workers stopped
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from devtrust.verifier.config import VerifierConfig
from devtrust.verifier.metrics import MULTIPROC_ENV, Endpoint, serve

logger = logging.getLogger(__name__)


class WorkerMetrics:
    """The parent's endpoint over its workers' metrics files."""

    def __init__(self, directory: Path, endpoint: Endpoint) -> None:
        self.directory = directory
        self.endpoint = endpoint

    @property
    def port(self) -> int:
        return self.endpoint.port

    @classmethod
    def open(cls, config: VerifierConfig, workers: int) -> WorkerMetrics | None:
        """The directory made and named for the workers, the endpoint listening (ConfigError
        naming metrics.listen when it cannot); None when metrics are off or one process
        serves (it serves its own)."""
        if not config.metrics.listen or workers <= 1:
            return None
        directory = Path(tempfile.mkdtemp(prefix="devtrust-metrics-"))
        try:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
            # Says that this endpoint sums every worker's (the simulator's check relies on it).
            Gauge(
                "devtrust_metrics_workers",
                "Worker processes whose metrics this endpoint sums",
                registry=registry,
            ).set(workers)
            endpoint = serve(config.metrics.listen, registry)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        os.environ[MULTIPROC_ENV] = str(directory)
        logger.info(
            "metrics of %d workers on port %d (files in %s)", workers, endpoint.port, directory
        )
        return cls(directory, endpoint)

    def worker_exited(self, pid: int) -> None:
        """A worker is gone: its share of the live gauges (open streams) goes with it, and
        so do its fleet readings (the ``mostrecent`` gauges): "most recent" would otherwise
        keep a series the dead worker showed and its successor never sets at the old value
        (review 13a, L2)."""
        mark_process_dead(pid, str(self.directory))  # type: ignore[no-untyped-call]
        for path in self.directory.glob(f"gauge_*mostrecent_{int(pid)}.db"):
            path.unlink(missing_ok=True)

    async def aclose(self) -> None:
        await self.endpoint.aclose()
        if os.environ.get(MULTIPROC_ENV) == str(self.directory):
            del os.environ[MULTIPROC_ENV]
        shutil.rmtree(self.directory, ignore_errors=True)


__all__ = ["WorkerMetrics"]
