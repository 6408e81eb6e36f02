"""The agent's Prometheus metrics (issue 13, item 3): its last result (tier and time), its
device certificate's expiry, how long evidence takes to collect, and its reconnections.

Imported only when ``metrics.listen`` is set (agent/attest.py ``AttestationClient.run``):
the agent stays small without it (bench/agent_footprint.py), since prometheus_client is not
even loaded then. Its own registry, not the library's global one: the process's other
collectors (gc, platform) are not what an operator of a device fleet asks for.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from time import perf_counter

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from devtrust.agent.config import MetricsConfig, metrics_address
from devtrust.core.errors import ConfigError
from devtrust.core.tier import Tier

logger = logging.getLogger(__name__)
# No *_created series (as the verifier's).
disable_created_metrics()  # type: ignore[no-untyped-call]
# Evidence collection: host facts, posture and GPU reads, the TPM quote (a few ms on a
# software TPM, 50-500 ms on hardware), the event log when asked for.
COLLECTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AgentMetrics:
    """The agent's metrics in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.tier = Gauge(
            "devtrust_agent_tier",
            "1 for the tier of the last result from the verifier, 0 for the others",
            ["tier"],
            registry=registry,
        )
        self.result_time = Gauge(
            "devtrust_agent_last_result_timestamp_seconds",
            "When the last result arrived (Unix time; 0: none yet)",
            registry=registry,
        )
        self.certificate_expiry = Gauge(
            "devtrust_agent_certificate_expiry_timestamp_seconds",
            "When the device certificate served now expires (Unix time; 0: none)",
            registry=registry,
        )
        self.collection = Histogram(
            "devtrust_agent_collection_seconds",
            "Evidence collection for one challenge (body, quote, event log), seconds",
            buckets=COLLECTION_BUCKETS,
            registry=registry,
        )
        self.reconnects = Counter(
            "devtrust_agent_reconnects",
            "Attestation streams opened again after one ended or failed",
            registry=registry,
        )
        for tier in Tier:
            self.tier.labels(tier.label).set(0)

    def result(self, tier: Tier, at: datetime.datetime) -> None:
        for each in Tier:
            self.tier.labels(each.label).set(1 if each is tier else 0)
        self.result_time.set(at.timestamp())

    def certificate(self, not_after: datetime.datetime | None) -> None:
        self.certificate_expiry.set(not_after.timestamp() if not_after is not None else 0)

    @contextmanager
    def collecting(self) -> Iterator[None]:
        started = perf_counter()
        try:
            yield
        finally:
            self.collection.observe(perf_counter() - started)


class AgentMetricsServer:
    """The metrics and their endpoint; ``aclose`` stops the endpoint."""

    def __init__(self, config: MetricsConfig) -> None:
        host, port = metrics_address(config.listen)
        self.metrics = AgentMetrics(CollectorRegistry())
        try:
            self._server, self._thread = start_http_server(
                port, addr=host, registry=self.metrics.registry
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {config.listen} (metrics.listen): {exc.strerror or exc}: "
                'change `metrics.listen:` in the agent configuration, or "" to turn it off'
            ) from exc
        self.port = int(self._server.server_address[1])
        logger.info("metrics on %s (port %d)", config.listen, self.port)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
