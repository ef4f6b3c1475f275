"""``unigen`` command line: a thin argparse dispatcher over ``unigen/commands/<name>.py``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int | None``.
Register a new one by adding its module name to ``COMMANDS``; ``train_vq`` becomes ``unigen train-vq``.

A mistake in the input ends in one line, ``error: ...``, and exit code 1 (2 for a usage error), not a
traceback; ``--debug`` (anywhere on the line) or ``UNIGEN_DEBUG=1`` lets the traceback through.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: tuple[str, ...] = ("demo", "generate", "caption", "eval", "train", "train_vq", "train_siglip", "chat",
                             "edit", "merge", "app", "pairs")
DEBUG_FLAG = "--debug"
DEBUG_ENV = "UNIGEN_DEBUG"
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
# the train extra's packages (pyproject.toml): the core install runs models, and a training command names the fix
TRAIN_EXTRA = ("accelerate", "peft", "tensorboard")


class Parser(argparse.ArgumentParser):
    """argparse with a usage error in one line (``error: ...``, exit 2) instead of the usage block."""

    def error(self, message: str):
        print(f"error: {message} (see: {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="unigen", description="Unified multimodal models (Janus-style).",
                                     epilog=f"{DEBUG_FLAG} (or {DEBUG_ENV}=1) shows the Python traceback of an error")
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of an error (also "
                        f"{DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"unigen.commands.{name}")
        p = sub.add_parser(name.replace("_", "-"), help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of an error")
        p.set_defaults(_run=module.run)
    return parser


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text.removeprefix("error: ")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (argparse stops a positional list at the first option)
    if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return EXIT_USAGE
    return run_command(args, debug)


def run_command(args: argparse.Namespace, debug: bool) -> int:
    from unigen.errors import ArgumentError, UniGenError

    try:
        return int(args._run(args) or 0)
    except ArgumentError as err:
        if debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except UniGenError as err:
        if debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OSError, FloatingPointError, MemoryError, RuntimeError) as err:
        # not one of unigen's own errors, so maybe a bug: the message, and how to see where it came from
        if debug:
            raise
        print(f"error: {one_line(err)} ({type(err).__name__}; run again with {DEBUG_FLAG} for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR
    except ModuleNotFoundError as err:
        if debug or (err.name or "").split(".")[0] not in TRAIN_EXTRA:
            raise
        print(f"error: this command needs {err.name}, from the train extra the core install leaves out: pip install "
              "'unigen[train]'", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
