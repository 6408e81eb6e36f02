"""``devtrust``: the operator and tooling command."""

# It loads no TPM or GPU library, nor the agent (tests/test_layers.py): operators run it
# where they are, not only on hosts with a TPM. The demo is `devtrust-demo` (swtpm/demo.py).

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

# grpc prints its own INFO lines (TLS handshake failures) unless told before it loads:
# one line per error is ours to write.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from devtrust.core.command import run_command
from devtrust.core.logsetup import configure_logging
from devtrust.gate import command as gate_command
from devtrust.verifier import ops, ops_connect, tools
from devtrust.verifier.gpu import command as gpu_command
from devtrust.verifier.tools import version_line


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 2 (as the tools' unreadable input does); help shows defaults. Sub-
    commands' parsers are of this class too (argparse makes them of the parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", tools.HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(tools.EXIT_USAGE)


def build_parser(
    more: Callable[[argparse._SubParsersAction], None] | None = None,  # type: ignore[type-arg]
) -> argparse.ArgumentParser:
    """The command's parser; ``more`` adds subcommands that live outside the verifier
    (``devtrust.cli``: the simulator)."""
    parser = _Parser(prog="devtrust", description=__doc__)
    parser.add_argument("--version", action="version", version=version_line())
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND"
    )
    refs = tools.add_parsers(sub)
    gate_command.add_parsers(sub)
    gpu_command.add_parsers(sub)
    ops.add_parsers(sub, refs)
    if more is not None:
        more(sub)
    return parser


def run(args: argparse.Namespace) -> int:
    configure_logging(logging.INFO if args.verbose else logging.WARNING)
    return run_command("devtrust", lambda: tools.run_tool(args), ops_connect.ERRORS)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
