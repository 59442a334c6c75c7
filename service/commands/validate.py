"""`quantgate validate TARGET`: predict whether vLLM and SGLang load a checkpoint, from headers alone.

Exit codes: 0 no error findings, 1 any error finding, 2 the target cannot be read or the usage is
wrong (one line on stderr, never a traceback; `-v` logs the traceback of an internal error).
`--strict` also exits 1 on any warning and on any `unknown` verdict (a format quantgate does not model).
`--engine-version vllm=X` / `sglang=Y` picks the engine releases the verdicts hold for (every dialect
reads them from validators/engine_facts.py); `--tensor-parallel-size N` / `--expert-parallel` the
serving shape (QG711; without it QG712 reports the sizes at which loading stops).
Only argparse is imported at module level; the validator (never torch) loads when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys

ENGINE_CHOICES: tuple[str, ...] = ("vllm", "sglang", "all")
FORMAT_CHOICES: tuple[str, ...] = ("text", "json", "markdown", "html")
EXIT_OK, EXIT_FINDINGS, EXIT_UNREADABLE = 0, 1, 2

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "validate", help="check that vLLM and SGLang will load a quantized checkpoint correctly",
        description="Validate a checkpoint (directory, .safetensors file, Hub repo id org/name or "
                    "hf://org/name@rev) from its config and safetensors headers, without a GPU and without "
                    "downloading weights. Exit 0: no errors; 1: error findings; 2: unreadable target or "
                    "bad usage.")
    p.add_argument("target", metavar="TARGET", help="checkpoint directory, .safetensors file, or Hub repo id")
    p.add_argument("--engine", choices=ENGINE_CHOICES, default="all", help="engine semantics to check (default all)")
    p.add_argument("--format", dest="fmt", choices=FORMAT_CHOICES, default="text", help="report format (default text)")
    p.add_argument("--output", "-o", metavar="FILE", default=None, help="write the report to FILE instead of stdout")
    p.add_argument("--no-deep", dest="deep", action="store_false", default=None,
                   help="skip the scale-value checks (default: on for local checkpoints, off for the Hub)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 also on warnings and on an `unknown` verdict (a quantization format quantgate "
                        "does not model)")
    p.add_argument("--engine-version", dest="engine_versions", action="append", default=[],
                   metavar="ENGINE=VERSION",
                   help="engine release whose behaviour to predict, e.g. vllm=0.10.2 or sglang=0.5.11 (repeatable; "
                        "default: the newest release quantgate's engine facts were read from)")
    p.add_argument("--tensor-parallel-size", "--tp", dest="tensor_parallel_size", type=int, default=None,
                   metavar="N", help="check the checkpoint at this tensor-parallel size (heads, shards, scale "
                   "blocks); without it the report says at which sizes loading stops")
    p.add_argument("--expert-parallel", dest="expert_parallel", action="store_true",
                   help="experts are distributed over the ranks (EP size = tensor-parallel size), not split")


def _engines(choice: str) -> tuple[str, ...]:
    return ("vllm", "sglang") if choice == "all" else (choice,)


def _fail(message: str) -> int:
    print(f"quantgate validate: {message}", file=sys.stderr)
    return EXIT_UNREADABLE


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 500 else text[:497] + "..."


def run(args: argparse.Namespace) -> int:
    from quantgate.validators.errors import QuantgateError

    try:
        from quantgate.validators.deployment import Deployment
        from quantgate.validators.engine_facts import parse_engine_versions
        from quantgate.validators.render import render, use_color
        from quantgate.validators.report import validate

        versions = parse_engine_versions(args.engine_versions)
        deployment = Deployment(args.tensor_parallel_size, args.expert_parallel) \
            if args.tensor_parallel_size is not None or args.expert_parallel else None
        report = validate(args.target, engines=_engines(args.engine), deep=args.deep, revision=args.revision,
                          engine_versions=versions, deployment=deployment)
        if args.output:
            text = render(report, args.fmt, color=False)
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
            state = "errors found" if not report.ok else (
                f"verdict unknown for {', '.join(report.unknown_engines)}" if report.unknown_engines else "ok")
            print(f"report written to {args.output} ({state})", file=sys.stderr)
        else:
            sys.stdout.write(render(report, args.fmt, color=args.fmt == "text" and use_color(sys.stdout)))
            sys.stdout.flush()
    except QuantgateError as exc:
        return _fail(_one_line(exc))
    except OSError as exc:           # e.g. --output in a missing directory
        return _fail(f"{exc.strerror or 'I/O error'}: {exc.filename or ''}".rstrip(": "))
    except RecursionError:
        return _fail("internal error: input nested too deeply (rerun with -v for details)")
    except Exception as exc:  # noqa: BLE001 - the CLI contract: never a traceback
        log.debug("internal error", exc_info=True)
        return _fail(f"internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with -v for the traceback)")
    ok = report.strict_ok() if args.strict else report.ok
    return EXIT_OK if ok else EXIT_FINDINGS
