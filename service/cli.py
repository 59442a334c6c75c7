"""`quantgate` command line: `validate`, `quantize`, `serve`.

Each subcommand lives in `service/commands/<name>.py` with `register(subparsers)` and `run(args) -> int`.
Those modules import only argparse at module level, so `quantgate validate` never pays for
torch or fastapi. Exit codes: 0 success, 1 findings/validation errors, 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS: tuple[str, ...] = ("validate", "quantize", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantgate",
        description="Quantize Hugging Face checkpoints (NVFP4/FP8) and validate that vLLM and SGLang "
        "will load them correctly.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"service.commands.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    module = importlib.import_module(f"service.commands.{args.command}")
    return int(module.run(args))


if __name__ == "__main__":
    sys.exit(main())
