"""How every command ends (devtrust.core.command): the shape the four commands share. Their
own words and statuses are checked on the real commands (tests/test_user_errors_*.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from devtrust.core.command import TOOL_ERRORS, ErrorPolicy, Failure, run_command
from devtrust.core.errors import ConfigError, DevtrustError


def _raises(exc: BaseException) -> Callable[[], int]:
    def command() -> int:
        raise exc

    return command


def _explain(exc: Exception) -> Failure | None:
    return Failure(f"pending: {exc}", 3) if isinstance(exc, ConfigError) else None


POLICY = ErrorPolicy(expected=(DevtrustError, OSError), status=2, explain=_explain)


@pytest.mark.parametrize(
    ("exc", "status", "line"),
    [
        (DevtrustError("bad\n  input"), 2, "prog: bad input"),
        (FileNotFoundError(2, "No such file or directory", "/x"), 2,
         "prog: /x: No such file or directory"),
        (ConfigError("c.yaml: no"), 3, "prog: pending: c.yaml: no"),
        (KeyError("k"), 70, "prog: unexpected error: KeyError: 'k' (run with -v for where it "
                            "happened, and report it)"),
        (KeyboardInterrupt(), 130, "prog: interrupted"),
    ],
)  # fmt: skip
def test_an_error_is_one_line_and_a_status(
    exc: BaseException, status: int, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_command("prog", _raises(exc), POLICY) == status
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"{line}\n")


def test_the_status_of_a_command_that_ends_is_its_own() -> None:
    assert run_command("prog", lambda: 4, POLICY) == 4


def test_only_a_bug_logs_its_traceback_at_the_verbose_level(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.DEBUG, logger="devtrust"):
        run_command("prog", _raises(DevtrustError("expected")), TOOL_ERRORS)
        assert caplog.records == []
        run_command("prog", _raises(KeyError("k")), TOOL_ERRORS)
    [record] = caplog.records
    assert (record.levelno, record.getMessage()) == (logging.INFO, "unexpected error")
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], KeyError)


def test_ctrl_c_may_end_quietly(capsys: pytest.CaptureFixture[str]) -> None:
    quiet = ErrorPolicy(interrupted=None)
    assert run_command("prog", _raises(KeyboardInterrupt()), quiet) == 130
    assert capsys.readouterr().err == ""
