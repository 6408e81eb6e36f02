"""Policy evaluation in worker processes, within a time budget (issue 7, item 7).

The CEL runtime (common-expression-language) is a compiled extension that holds the
interpreter lock for a whole evaluation, and its ``filter`` and ``map`` macros are quadratic in
the list they walk: a rule's ``found`` over 8,192 modules took 25 s. On a thread of the
verifier that would stop its event loop, and every other device with it, for as long. So the
verifier evaluates policies in separate processes:

- started with ``spawn``, not ``fork`` (the verifier runs gRPC's threads), lazily, on the
  first evaluation;
- each keeps the policies it was sent, compiled, keyed by the digest of their text, so a
  reloaded policy (SIGHUP, ReloadPolicy) is compiled once per worker;
- a call that runs past ``budget_s`` is abandoned: the workers are killed and replaced, and the
  device gets ``policy.budget_exceeded`` (contraindicated) instead of a verdict. The cost a
  device can impose is then one budget per evaluation, and evaluations happen only when its
  posture changes (the policy cache), at most once per ``posture_min_interval_s``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import threading
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devtrust.verifier.document import Bulletins, Document
from devtrust.verifier.policy import Policy, PolicyOutcome
from devtrust.verifier.trust import Claim, Finding, Severity

logger = logging.getLogger(__name__)

# In each worker process: the policies it was sent, by the sha256 of their text.
_COMPILED: dict[str, Policy] = {}


@dataclass(frozen=True)
class _Call:
    """One evaluation, as it crosses to a worker process (pickled)."""

    policy_id: str
    digest: str
    text: str
    source: str
    base: str
    doc: Document
    device_id: str
    zone: str
    labels: dict[str, str]


def _evaluate(call: _Call) -> PolicyOutcome:
    """Runs in a worker process."""
    policy = _COMPILED.get(call.digest)
    if policy is None:
        policy = Policy.parse(call.text, source=call.source, base=Path(call.base))
        _COMPILED.clear()  # one policy in force at a time; keep the newest only
        _COMPILED[call.digest] = policy
    return policy.evaluate(call.doc, device_id=call.device_id, zone=call.zone, labels=call.labels)


class PolicyRunner:
    """Evaluates policies in ``workers`` processes, each call within ``budget_s``."""

    def __init__(self, *, workers: int, budget_s: float) -> None:
        self._workers = workers
        self.budget_s = budget_s
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=self._workers,
                    mp_context=multiprocessing.get_context("spawn"),
                )
            return self._pool

    def _replace(self, broken: concurrent.futures.ProcessPoolExecutor) -> None:
        """Kill the workers of ``broken`` (one may be stuck in an evaluation) and start over."""
        with self._lock:
            if self._pool is not broken:
                return  # another thread replaced it already
            self._pool = None
        processes: dict[Any, Any] = getattr(broken, "_processes", None) or {}
        for process in list(processes.values()):
            process.kill()
        broken.shutdown(wait=False, cancel_futures=True)

    def evaluate(
        self,
        policy: Policy,
        doc: Document,
        *,
        device_id: str,
        zone: str,
        labels: dict[str, str],
    ) -> PolicyOutcome:
        call = _Call(
            policy_id=policy.policy_id,
            digest=policy.digest,
            text=policy.text,
            source=policy.source,
            base=str(policy.base),
            doc=doc,
            device_id=device_id,
            zone=zone,
            labels=labels,
        )
        try:
            return self._run(call)
        except BrokenProcessPool:
            # Another device's evaluation ran out of time and the workers were replaced
            # under this one: once more, on the new workers.
            return self._run(call)

    def _run(self, call: _Call) -> PolicyOutcome:
        pool = self._executor()
        try:
            return pool.submit(_evaluate, call).result(timeout=self.budget_s)
        except concurrent.futures.TimeoutError:
            logger.warning(
                "policy evaluation for device %s ran past %.1fs: workers restarted",
                call.device_id,
                self.budget_s,
            )
            self._replace(pool)
            return budget_exceeded(call.policy_id, call.device_id, self.budget_s)
        except BrokenProcessPool:
            self._replace(pool)
            raise

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def budget_exceeded(policy_id: str, device_id: str, budget_s: float) -> PolicyOutcome:
    finding = Finding(
        id="policy.budget_exceeded",
        severity=Severity.CONTRAINDICATED,
        claim=Claim.CONFIGURATION,
        message=f"device {device_id}: the policy did not finish within {budget_s:g}s on this "
        "evidence (attestation.policy_budget_s); its rules were not evaluated",
        expected=f"an evaluation within {budget_s:g}s",
        found="abandoned",
    )
    return PolicyOutcome(policy_id, {Claim.CONFIGURATION: 96}, (finding,), ())


@dataclass(frozen=True)
class PooledPolicy:
    """A policy as ``appraise`` sees it (``policy_id``, ``bulletins``, ``evaluate``), whose
    evaluation runs in the runner's processes."""

    policy: Policy
    runner: PolicyRunner

    @property
    def policy_id(self) -> str:
        return self.policy.policy_id

    @property
    def bulletins(self) -> Bulletins:
        return self.policy.bulletins

    @property
    def digest(self) -> str:
        return self.policy.digest

    def evaluate(
        self,
        doc: Document,
        *,
        device_id: str,
        zone: str = "",
        labels: dict[str, str] | None = None,
    ) -> PolicyOutcome:
        return self.runner.evaluate(
            self.policy, doc, device_id=device_id, zone=zone, labels=dict(labels or {})
        )
