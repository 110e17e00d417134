"""``sparsevlm`` console script: one entry, subcommands dispatched lazily to their modules."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _make_fixtures(args: argparse.Namespace) -> int:
    from sparse_plugin.fixtures import make_fixtures

    built = make_fixtures(Path(args.dir), args.family or None)
    for family, path in built.items():
        print(f"{family}: {path}")  # noqa: T201 - CLI output
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsevlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the vLLM engine + gateway (see `sparsevlm serve -h`)")

    fx = sub.add_parser("make-fixtures", help="write tiny random-weight checkpoints into DIR")
    fx.add_argument("dir")
    from sparse_plugin.fixtures import FAMILIES  # a dict of names: no heavy import

    fx.add_argument(
        "--family", action="append", choices=list(FAMILIES), help="only this family (repeatable)"
    )
    fx.set_defaults(func=_make_fixtures)
    return parser


# Subcommands with their own parsers (flags and `-- <engine flags>` are theirs).
DELEGATED = {"serve": "server.launch:main"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        import importlib

        module, func = DELEGATED[argv[0]].split(":")
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
