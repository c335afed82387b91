"""``quantlm`` command line: thin subcommands over library functions.

Each subcommand lives in ``quantlm/cli/<name>.py`` with ``register(subparsers)``. Commands whose flags are
generated from recipe dataclasses import torch to build their parser, so ``main`` builds only the parser of the
command being run (the others get a one-line stub), and ``quantlm --help`` lists them all without importing one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from quantlm import __version__
from quantlm.errors import QuantlmError
from quantlm.progress import set_library_bars

SUBCOMMANDS = {
    "size": "model sizes in bits (presets, config.json files, checkpoint directories)",
    "quantize": "quantize a LLaMA-like checkpoint with GPTQ at 2..8 bits",
    "export": "re-write a checkpoint in another format (pack a TriLM, convert a packed QuantLM, GGUF)",
    "bench": "decode/prompt speed and peak memory of models in llama.cpp (GGUF)",
    "train": "train a FloatLM or a TriLM from a recipe",
    "eval": "perplexity and zero-shot tasks of a model on local data; appends a result record",
    "plot": "size-vs-quality plots and scaling-law fits from result records",
    "suite": "regenerate a suite: every FloatLM x bitwidth x seed, evaluated, sized and plotted",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors as one line (no usage block) naming the fix, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, that subcommand's real parser and one-line stubs for the others."""
    parser = OneLineParser(
        prog="quantlm",
        description="Quantize, size and compare FloatLMs, QuantLMs and TriLMs (the Spectra suite).",
    )
    parser.add_argument("--version", action="version", version=f"quantlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, summary in SUBCOMMANDS.items():
        if only is None or name == only:
            importlib.import_module(f"quantlm.cli.{name}").register(sub)
        else:
            sub.add_parser(name, help=summary, add_help=False)
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
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in SUBCOMMANDS else None)
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as e:  # --help, --version, or a one-line argument error already printed
        return int(e.code or 0)
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

        set_library_bars(False)  # --no-progress: process-wide, which is why only the command line does it
    try:
        return int(args.func(args) or 0)
    except QuantlmError as e:
        print(f"quantlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"quantlm {args.command}: interrupted; completed outputs are kept, rerun to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen fault: one line, the traceback on request
        if args.verbose:
            raise
        print(f"quantlm {args.command}: unexpected error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
              f" (rerun with -v for the traceback)", file=sys.stderr)
        return 1


def run() -> None:
    sys.exit(main())
