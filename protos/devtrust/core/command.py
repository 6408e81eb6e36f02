"""How every devtrust command ends (`devtrust`, `devtrust-verifier`, `devtrust-agent`,
`devtrust-demo`): an error is one line on stderr, ``PROG: what went wrong``, and an exit
status; never a traceback, which only ``-v`` shows, logged. The commands differ in which
errors they expect and the status each gets; those are arguments, the shape is here once.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from devtrust.core.errors import DevtrustError

EXIT_UNEXPECTED = 70  # EX_SOFTWARE: a bug, not the user's mistake
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

logger = logging.getLogger("devtrust")


def one_line(exc: BaseException) -> str:
    """An error as one line: an OSError as its file and reason, without the errno."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return " ".join(str(exc).split())


@dataclass(frozen=True)
class Failure:
    """How a command reports one error: the line after ``PROG: ``, and its exit status."""

    line: str
    status: int


def _no_explanation(exc: Exception) -> Failure | None:
    return None


@dataclass(frozen=True)
class ErrorPolicy:
    """Which errors a command expects and how it reports them.

    ``explain`` gives the errors that need their own words or status first (None: not one of
    those); then an error of a type in ``expected`` is ``one_line(exc)`` with ``status``;
    anything else is unexpected: one line asking for ``-v`` and a report, status 70, its
    traceback logged at ``traceback_level`` (the level ``-v`` turns on).
    """

    expected: tuple[type[Exception], ...] = (DevtrustError,)
    status: int = 1
    explain: Callable[[Exception], Failure | None] = _no_explanation
    # What Ctrl-C prints after "PROG: " (None: nothing); its status is always 130.
    interrupted: str | None = "interrupted"
    # `PROG ... | head`: a reader that went away is no error (exit 0, nothing said).
    quiet_broken_pipe: bool = False
    traceback_level: int = logging.DEBUG


# The tools' (`devtrust`, `devtrust-demo`): what they expect to go wrong (a file, a process,
# a deadline) exits 1, a reader that went away (`devtrust ... | head`) is no error, and -v
# logs at INFO.
TOOL_ERRORS = ErrorPolicy(
    expected=(DevtrustError, RuntimeError, TimeoutError, OSError),
    status=1,
    interrupted="interrupted; everything started was stopped",
    quiet_broken_pipe=True,
    traceback_level=logging.INFO,
)


def run_command(prog: str, command: Callable[[], int], policy: ErrorPolicy) -> int:
    """Run ``command`` and return its exit status, or the status of the error it raised,
    reported on stderr as ``policy`` says."""
    try:
        return command()
    except KeyboardInterrupt:
        if policy.interrupted is not None:
            print(f"{prog}: {policy.interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # every error ends as one line; a bug's as the last resort
        if policy.quiet_broken_pipe and isinstance(exc, BrokenPipeError):
            sys.stderr.close()
            return 0
        failure = failure_of(exc, policy)
        if failure is None:
            logger.log(policy.traceback_level, "unexpected error", exc_info=exc)
            failure = unexpected(exc)
        print(f"{prog}: {failure.line}", file=sys.stderr)
        return failure.status


def failure_of(exc: Exception, policy: ErrorPolicy) -> Failure | None:
    """The line and status ``policy`` gives ``exc``; None when it does not expect it."""
    explained = policy.explain(exc)
    if explained is not None:
        return explained
    if isinstance(exc, policy.expected):
        return Failure(one_line(exc), policy.status)
    return None


def unexpected(exc: Exception) -> Failure:
    """The last resort, for a bug: one line that says how to see where it happened."""
    return Failure(
        f"unexpected error: {type(exc).__name__}: {exc} "
        "(run with -v for where it happened, and report it)",
        EXIT_UNEXPECTED,
    )
