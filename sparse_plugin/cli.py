"""``sparsevlm`` console script: one entry, subcommands dispatched lazily to their modules."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _make_fixtures(args: argparse.Namespace) -> int:
    from sparse_plugin.fixtures import FAMILIES, make_fixtures

    built = make_fixtures(Path(args.dir), args.family or None)
    for family, path in built.items():
        print(f"{family}: {path}")  # noqa: T201 - CLI output
    if args.family and set(args.family) - set(FAMILIES):
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsevlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    fx = sub.add_parser("make-fixtures", help="write tiny random-weight checkpoints into DIR")
    fx.add_argument("dir")
    fx.add_argument("--family", action="append", help="only this family (repeatable)")
    fx.set_defaults(func=_make_fixtures)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
