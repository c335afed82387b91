"""``quantlm`` command line: thin subcommands over library functions.

Each subcommand lives in ``quantlm/cli/<name>.py`` with ``register(subparsers)``; modules import their heavy
dependencies (torch, transformers) inside the handler so that ``quantlm size`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from quantlm import __version__
from quantlm.errors import QuantlmError

SUBCOMMANDS = ("size", "quantize", "export", "bench", "train", "eval", "plot", "suite")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantlm",
        description="Quantize, size and compare FloatLMs, QuantLMs and TriLMs (the Spectra suite).",
    )
    parser.add_argument("--version", action="version", version=f"quantlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"quantlm.cli.{name}").register(sub)
    return parser


def _unknown_option(parser: argparse.ArgumentParser, command: str | None, unknown: list[str]) -> str:
    """One line naming the first unknown argument, with the nearest option of that subcommand."""
    import difflib

    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    target = sub.choices.get(command, parser) if sub is not None and command else parser
    options = [s for a in target._actions for s in a.option_strings if s.startswith("--")]
    word = unknown[0]
    near = difflib.get_close_matches(word.split("=", 1)[0], options, n=1)
    hint = f"; did you mean {near[0]}?" if near else f"; see `quantlm {command or ''} --help`"
    return f"unknown argument {word}{hint}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        prog = f"quantlm {args.command}" if args.command else "quantlm"
        print(f"{prog}: error: {_unknown_option(parser, args.command, unknown)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "progress", True) is False:
        _hide_library_progress_bars()
    try:
        return int(args.func(args) or 0)
    except QuantlmError as e:
        print(f"quantlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"quantlm {args.command}: interrupted; completed outputs are kept, rerun to resume", file=sys.stderr)
        return 130


def _hide_library_progress_bars() -> None:
    """--no-progress also silences the bars transformers draws (loading weights, writing shards); process-wide,
    which is why only the command line does it."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def run() -> None:
    sys.exit(main())
