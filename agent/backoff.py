"""The waits between attempts to reach a verifier (and the TPM): exponential backoff with
full jitter, and the short jittered wait after a verifier drains. Pure: the random draw is
a parameter, nothing sleeps here.

Full jitter (each wait drawn uniformly from zero up to the exponential cap, as in the AWS
Architecture Blog's "Exponential Backoff And Jitter" and gRPC's connection-backoff
document) spreads a fleet that lost its verifier at the same moment over the whole window,
instead of bunching every agent's retry near the same instant, as a +-20 % jitter does. The
attempt count resets after a stream that delivered a result: a verifier that worked and then
went away is tried again soon, not after the cap left by an earlier outage.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# reconnect_min_s and reconnect_max_s in the agent's configuration.
DEFAULT_MIN_S = 0.5
DEFAULT_MAX_S = 30.0
# A draining verifier (C4: trailing metadata devtrust-drain: 1) asks its agents to reconnect
# at once elsewhere: each waits a draw from 0 to this, so that they do not arrive together.
DRAIN_JITTER_S = 1.0
# Past this many doublings the cap is reached for any sane min/max (2**40 x min): the
# exponent stops growing, so a counter that ran for years cannot overflow a float.
_MAX_EXPONENT = 40

Uniform = Callable[[float, float], float]


def ceiling(attempt: int, *, min_s: float, max_s: float) -> float:
    """The longest wait before attempt ``attempt + 1`` (``attempt`` failures so far, from
    0): ``min(max_s, min_s * 2**attempt)``."""
    if attempt < 0:
        raise ValueError(f"attempt must be 0 or more, got {attempt}")
    return min(max_s, min_s * 2.0 ** min(attempt, _MAX_EXPONENT))


def full_jitter(
    attempt: int, *, min_s: float, max_s: float, uniform: Uniform = random.uniform
) -> float:
    """The wait after ``attempt`` failures: drawn uniformly from [0, ceiling]."""
    return uniform(0.0, ceiling(attempt, min_s=min_s, max_s=max_s))


def drain_delay(uniform: Uniform = random.uniform) -> float:
    """The wait before reconnecting after a verifier drained: 0 to ``DRAIN_JITTER_S``."""
    return uniform(0.0, DRAIN_JITTER_S)


class Backoff:
    """The failures since the last success, and the wait each one earns (``full_jitter``).
    Shared by enrollment, the attestation stream and the TPM's retries."""

    def __init__(
        self,
        *,
        min_s: float = DEFAULT_MIN_S,
        max_s: float = DEFAULT_MAX_S,
        uniform: Uniform = random.uniform,
    ) -> None:
        if not min_s > 0:
            raise ValueError(f"min_s must be positive, got {min_s}")
        if not max_s > 0:
            raise ValueError(f"max_s must be positive, got {max_s}")
        self.min_s = min_s
        self.max_s = max_s
        self.attempt = 0
        self._uniform = uniform

    def reset(self) -> None:
        """A success: the next failure waits at most ``min_s`` again."""
        self.attempt = 0

    def delay(self) -> float:
        """The wait before the next attempt, after one more failure."""
        wait = full_jitter(self.attempt, min_s=self.min_s, max_s=self.max_s, uniform=self._uniform)
        self.attempt += 1
        return wait

    @property
    def bound(self) -> float:
        """The longest the next ``delay`` can be."""
        return ceiling(self.attempt, min_s=self.min_s, max_s=self.max_s)
