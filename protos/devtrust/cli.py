"""``devtrust``: the operator and tooling command, and the fleet simulator.

The operator commands are the verifier's (``devtrust.verifier.cli``): they load no TPM or
GPU library, nor the agent or swtpm (tests/test_layers.py). ``devtrust simulate`` drives
agents and software TPMs (``devtrust.swtpm.simulate``), so it is routed here, above both,
and loads them only when it runs. ``devtrust audit`` (``devtrust.verifier.audit_command``)
reads the verifier's database itself, not the verifier's API.
"""

from __future__ import annotations

import argparse
import sys

from devtrust.verifier import audit_command, report_command
from devtrust.verifier.cli import build_parser as verifier_parser
from devtrust.verifier.cli import run as run_operator_command

SIMULATE_HELP = "simulate a fleet of devices attesting to a verifier (see devtrust simulate --help)"


def _add_simulate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    # Listed in `devtrust --help`; its options are the simulator's own parser's.
    p = sub.add_parser("simulate", help=SIMULATE_HELP, add_help=False)
    p.add_argument(
        "options", nargs=argparse.REMAINDER, help="the simulator's (devtrust simulate --help)"
    )


def _add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    _add_simulate(sub)
    audit_command.add_parsers(sub)
    report_command.add_parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    return verifier_parser(_add_commands)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `devtrust [-v] simulate ...`: the first word that is not an option names the command.
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if at is not None and argv[at] == "simulate" and all(a in _VERBOSE for a in argv[:at]):
        try:
            from devtrust.swtpm.simulate import main as simulate  # noqa: PLC0415 - the agent: only here
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith(("devtrust.swtpm", "devtrust.agent")):
                raise
            print(
                "devtrust: simulate is not in the devtrust-verifier package (it drives agents "
                "and software TPMs): run it from a source checkout (make venv)",
                file=sys.stderr,
            )
            return 2

        return simulate(argv[at + 1 :], verbose=bool(argv[:at]))
    return run_operator_command(build_parser().parse_args(argv))


_VERBOSE = ("-v", "--verbose")


if __name__ == "__main__":
    sys.exit(main())
