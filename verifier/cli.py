"""``devtrust``: the operator and tooling command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from verifier.demo import demo
from verifier.errors import DevtrustError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devtrust", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="verifier + swtpm agent: enroll, attest, certify")
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument("--keep-work", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "demo":
            return demo(args.out, keep_work=args.keep_work)
    except KeyboardInterrupt:
        print("devtrust: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    except (DevtrustError, RuntimeError, TimeoutError) as exc:
        print(f"devtrust: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
