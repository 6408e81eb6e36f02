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

The budget bounds one evaluation's own running time, never its wait: under a burst (thousands
of devices reconnecting after a restart) calls queue behind each other in the pool, and a
healthy device whose evaluation merely waited must get its verdict, not a finding. So each
worker reports when it starts a call (its token and ``time.monotonic()``, system-wide on
Linux, over a pipe of the pool: one small write, atomic, no lock a killed worker could hold),
and the budget runs from then.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from devtrust.verifier.document import Bulletins, Document
from devtrust.verifier.policy import Policy, PolicyOutcome
from devtrust.verifier.trust import Claim, Finding, Severity

logger = logging.getLogger(__name__)

# In each worker process: the policies it was sent, by the sha256 of their text.
_COMPILED: dict[str, Policy] = {}
# In each worker process: where it reports the calls it starts (_Starts.writer of its pool).
_STARTS: list[Connection] = []
# How many times a call is retried when the workers are replaced under it.
_RETRIES = 3


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


def _init_worker(starts: Connection) -> None:
    """Runs in a worker process, once, when it starts."""
    _STARTS[:] = [starts]


def _reporting(token: int, fn: Callable[[Any], PolicyOutcome], arg: Any) -> PolicyOutcome:
    """Runs in a worker process: says it started call ``token``, then runs it."""
    for starts in _STARTS:
        starts.send((token, time.monotonic()))
    return fn(arg)


class _Starts:
    """When each call of one pool started in its worker, as the workers report it."""

    def __init__(self, ctx: Any) -> None:
        self.reader, self.writer = ctx.Pipe(duplex=False)
        self._cond = threading.Condition()
        self._started: dict[int, float] = {}
        self._forgotten: set[int] = set()
        threading.Thread(target=self._listen, name="policy-starts", daemon=True).start()

    def _listen(self) -> None:
        while True:
            try:
                message = self.reader.recv()
            except (EOFError, OSError):
                return
            if message is None:
                return
            token, at = message
            with self._cond:
                if token in self._forgotten:
                    self._forgotten.discard(token)
                else:
                    self._started[token] = at
                self._cond.notify_all()

    def wait(self, token: int, future: concurrent.futures.Future[PolicyOutcome]) -> float | None:
        """When call ``token`` started in a worker; None when it finished (or failed) before
        its start was heard of. Waits as long as the call is queued: no budget runs then."""
        future.add_done_callback(self._wake)
        with self._cond:
            while token not in self._started and not future.done():
                self._cond.wait()
            at = self._started.pop(token, None)
            if at is None:
                self._forgotten.add(token)  # its start may still be on the way
            return at

    def _wake(self, _: object) -> None:
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.writer.send(None)  # the listener's end
        self.writer.close()


class PolicyRunner:
    """Evaluates policies in ``workers`` processes, each call within ``budget_s``."""

    def __init__(self, *, workers: int, budget_s: float) -> None:
        self._workers = workers
        self.budget_s = budget_s
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._starts: _Starts | None = None
        self._tokens = itertools.count()

    def _executor(self) -> tuple[concurrent.futures.ProcessPoolExecutor, _Starts]:
        with self._lock:
            if self._pool is None or self._starts is None:
                ctx = multiprocessing.get_context("spawn")
                self._starts = _Starts(ctx)
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=self._workers,
                    mp_context=ctx,
                    initializer=_init_worker,
                    initargs=(self._starts.writer,),
                )
            return self._pool, self._starts

    def worker_pids(self) -> frozenset[int]:
        """The process ids of the current workers (those started so far)."""
        with self._lock:
            processes: dict[Any, Any] = getattr(self._pool, "_processes", None) or {}
            return frozenset(processes)

    def _replace(self, broken: concurrent.futures.ProcessPoolExecutor) -> None:
        """Kill the workers of ``broken`` (one may be stuck in an evaluation) and start over."""
        with self._lock:
            if self._pool is not broken:
                return  # another thread replaced it already
            self._pool, starts, self._starts = None, self._starts, None
        processes: dict[Any, Any] = getattr(broken, "_processes", None) or {}
        for process in list(processes.values()):
            process.kill()
        broken.shutdown(wait=False, cancel_futures=True)
        if starts is not None:
            starts.close()

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
        return self.run(_evaluate, call, policy_id=call.policy_id, device_id=call.device_id)

    def run(
        self,
        fn: Callable[[Any], PolicyOutcome],
        arg: Any,
        *,
        policy_id: str,
        device_id: str,
    ) -> PolicyOutcome:
        """``fn(arg)`` (a module-level function) in a worker, within ``budget_s`` of the moment
        the worker starts it; how long it waited for a worker does not count."""
        for _ in range(_RETRIES):
            try:
                return self._once(fn, arg, policy_id=policy_id, device_id=device_id)
            except BrokenProcessPool:
                # Another device's evaluation ran out of time and the workers were replaced
                # under this one (running or queued): again, on the new workers.
                continue
        return self._once(fn, arg, policy_id=policy_id, device_id=device_id)

    def _once(
        self,
        fn: Callable[[Any], PolicyOutcome],
        arg: Any,
        *,
        policy_id: str,
        device_id: str,
    ) -> PolicyOutcome:
        pool, starts = self._executor()
        token = next(self._tokens)
        try:
            try:
                future = pool.submit(_reporting, token, fn, arg)
            except RuntimeError as e:
                with self._lock:
                    if self._pool is pool:
                        raise
                # Shut down: another thread replaced it just now.
                raise BrokenProcessPool(str(e)) from e
            started = starts.wait(token, future)
            left = self.budget_s
            if started is not None:
                left = max(0.0, self.budget_s - (time.monotonic() - started))
            try:
                return future.result(timeout=left)
            except concurrent.futures.CancelledError as e:  # queued when the pool was replaced
                raise BrokenProcessPool("replaced") from e
        except concurrent.futures.TimeoutError:
            logger.warning(
                "policy evaluation for device %s ran past %.1fs: workers restarted",
                device_id,
                self.budget_s,
            )
            self._replace(pool)
            return budget_exceeded(policy_id, device_id, self.budget_s)
        except BrokenProcessPool:
            self._replace(pool)
            raise

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            starts, self._starts = self._starts, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if starts is not None:
            starts.close()


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
