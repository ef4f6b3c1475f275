"""``unigen`` command line: a thin argparse dispatcher over ``unigen/commands/<name>.py``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int | None``.
Register a new one by adding its module name to ``COMMANDS``; ``train_vq`` becomes ``unigen train-vq``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: tuple[str, ...] = ("demo", "generate", "caption", "eval", "train", "train_vq", "train_siglip")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unigen", description="Unified multimodal models (Janus-style).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"unigen.commands.{name}")
        p = sub.add_parser(name.replace("_", "-"), help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (argparse stops a positional list at the first option)
    if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
