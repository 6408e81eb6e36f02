"""Log lines (protos/devtrust/core/logsetup.py): ``--log-format json`` writes one valid JSON
object per line whatever a message holds, with the fields of the contract and every ``extra=``
attribute; text stays the default and keeps its one-line shape."""

from __future__ import annotations

import datetime
import json
import logging
import subprocess
import sys

import pytest

from devtrust.core.logsetup import configure_logging

DEVICE_HOSTNAME = 'evil\n2026-12-01T00:00:00.000+00:00 INFO forged: "line"\x1b[2J\u202e'


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_json_one_object_per_line_with_extras(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(logging.INFO, "json")
    log = logging.getLogger("devtrust.verifier.decision")
    log.info(
        "appraisal device=%s host %s",
        "3f2a",
        DEVICE_HOSTNAME,
        extra={
            "device_id": "3f2a",
            "tier": "warning",
            "findings": ["gpu.driver.below_minimum", "os.sshd.root_login"],
            "zone": None,
            "certificate": None,
            "when": datetime.date(2026, 12, 1),  # not JSON: its str
        },
    )
    lines = _lines(capsys)
    assert len(lines) == 1  # the newline in the hostname stayed inside the line
    assert lines[0].isascii()
    doc = json.loads(lines[0])
    assert doc["level"] == "INFO"
    assert doc["logger"] == "devtrust.verifier.decision"
    assert doc["message"] == f"appraisal device=3f2a host {DEVICE_HOSTNAME}"
    assert datetime.datetime.fromisoformat(doc["ts"]).tzinfo is not None
    assert doc["findings"] == ["gpu.driver.below_minimum", "os.sshd.root_login"]
    assert (doc["device_id"], doc["tier"], doc["zone"], doc["certificate"]) == (
        "3f2a",
        "warning",
        None,
        None,
    )
    assert doc["when"] == "2026-12-01"


def test_json_exception_and_lone_surrogate(capsys: pytest.CaptureFixture[str]) -> None:
    """A traceback stays in its record's line; a file name decoded with surrogateescape
    does not lose the record."""
    configure_logging(logging.INFO, "json")
    log = logging.getLogger("t")
    try:
        int("bad\nvalue")
    except ValueError:
        log.exception("failed on %s", b"\xff.pem".decode(errors="surrogateescape"))
    (line,) = _lines(capsys)
    doc = json.loads(line)
    assert doc["message"] == "failed on \udcff.pem"
    assert doc["exception"].endswith(
        "ValueError: invalid literal for int() with base 10: " + repr("bad\nvalue")
    )
    assert "Traceback" in doc["exception"]


def _strict(text: str) -> object:
    """JSON as strict parsers read it: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_never_nan_nor_a_text_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    """NaN or Infinity in an extra, a dict with tuple keys: still one strict JSON object
    per record (review 13b L6), the values made strings where JSON has none."""
    configure_logging(logging.INFO, "json")
    log = logging.getLogger("t")
    log.info("ratio", extra={"ratio": float("nan"), "top": float("-inf")})
    log.info("by tier", extra={"counts": {("zone", 1): 2, "x": [float("inf")]}})
    first, second = (_strict(line) for line in _lines(capsys))
    assert isinstance(first, dict)
    assert (first["ratio"], first["top"]) == ("nan", "-inf")
    assert isinstance(second, dict)
    assert second["counts"] == {"('zone', 1)": 2, "x": ["inf"]}


def test_text_stays_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(logging.INFO)
    logging.getLogger("devtrust.x").info("hello", extra={"device_id": "3f2a"})
    (line,) = _lines(capsys)
    assert line.endswith(" INFO devtrust.x: hello")
    datetime.datetime.fromisoformat(line.split(" ")[0])


def test_unknown_format_refused() -> None:
    with pytest.raises(ValueError, match="log format 'xml': expected one of text, json"):
        configure_logging(logging.INFO, "xml")


@pytest.mark.parametrize("program", ["devtrust.verifier.main", "devtrust.agent.main"])
def test_daemons_take_the_option(program: str, tmp_path: object) -> None:
    """`--log-format json` before the command: the one error line of a missing
    configuration still goes out, and every log line is JSON."""
    done = subprocess.run(
        [sys.executable, "-m", program, "--log-format", "json", "-v", *_missing(program)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert len(errors) == 1, done.stderr
    assert "does not exist" in errors[0]
    bad = subprocess.run(
        [sys.executable, "-m", program, "--log-format", "yaml", "--version"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "invalid choice: 'yaml'" in bad.stderr


def _missing(program: str) -> list[str]:
    command = "serve" if "verifier" in program else "run"
    return [command, "--config", "/nonexistent/devtrust.yaml"]
