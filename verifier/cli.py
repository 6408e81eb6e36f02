"""``devtrust``: the operator and tooling command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from verifier import tools
from verifier.demo import demo
from verifier.errors import DevtrustError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(tools.EXIT_USAGE)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="devtrust", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("demo", help="verifier + swtpm agent: enroll, attest, certify")
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument("--keep-work", action="store_true", help="keep the temporary directory")
    tools.add_parsers(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "demo":
            return demo(args.out, keep_work=args.keep_work)
        return tools.run_tool(args)
    except BrokenPipeError:  # `devtrust ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("devtrust: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    except (DevtrustError, RuntimeError, TimeoutError) as exc:
        print(f"devtrust: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
