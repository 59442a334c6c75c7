"""`quantgate quantize SOURCE --recipe RECIPE --out DIR ...`: export, validate, and report.

Exit codes: 0 exported and validated, 1 the validator found errors (the output is kept at
`<out>.failed-validation` with its report), 2 bad input (one-line reason on stderr).
Only argparse is imported at module level: torch and the exporter load when the command runs.
"""

from __future__ import annotations

import argparse
import sys

PROGRESS_MODES: tuple[str, ...] = ("auto", "bar", "json", "none")
NUMERICS_MODES: tuple[str, ...] = ("modelopt-cuda", "modelopt-cpu")   # exporter.numerics.modes (not imported: torch)
SIZE_UNITS: dict[str, int] = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """`5GB`, `500MB`, `2GiB`, `1000000` -> bytes (decimal units like transformers' max_shard_size)."""
    raw = text.strip().upper().replace(" ", "")
    digits = raw.rstrip("KMGTIB")
    unit = raw[len(digits):]
    try:
        value = float(digits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 5GB, 500MB or a byte count") from None
    if unit not in SIZE_UNITS or value <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 5GB, 500MB or a byte count")
    return int(value * SIZE_UNITS[unit])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize", help="quantize a BF16 checkpoint (NVFP4, FP8, auto mixed, W4A16, W8A8-int8, NVFP4A16) "
                         "and validate it",
        description="Quantize a Hugging Face checkpoint (local directory or Hub repo id) and write it in "
                    "the ModelOpt or compressed-tensors format vLLM and SGLang load. The export is validated "
                    "before it is moved to --out; a failing export is kept at <out>.failed-validation with "
                    "its report. Exit 0: exported and validated; 1: the export failed validation; 2: bad "
                    "input.")
    p.add_argument("source", metavar="SOURCE", help="local checkpoint directory / .safetensors file, or Hub repo id")
    from quantgate.exporter.recipes import WRITABLE_DIALECTS, default_dialects_text, recipe_names   # torch-free tables

    p.add_argument("--recipe", required=True, metavar="RECIPE",
                   help=f"what to quantize: {', '.join(recipe_names())}")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    p.add_argument("--dialect", default=None, choices=WRITABLE_DIALECTS,
                   help="output format: modelopt (hf_quant_config.json), compressed-tensors (llm-compressor's "
                        "config groups), fp8 (Hugging Face native block fp8) or mxfp4 (GPT-OSS native); "
                        f"default: the recipe's first dialect ({default_dialects_text()})")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--calib-data", default="random", metavar="random|FILE|DATASET",
                   help="calibration data: random token ids, a .jsonl (field 'text') or .txt file, or a Hub "
                        "dataset id (default random)")
    p.add_argument("--calib-samples", type=_positive_int, default=512, metavar="N", help="default 512")
    p.add_argument("--calib-seq-len", type=_positive_int, default=512, metavar="L", help="default 512")
    p.add_argument("--calib-batch-size", type=_positive_int, default=8, metavar="B", help="default 8")
    p.add_argument("--calib-all-experts", action=argparse.BooleanOptionalAction, default=True,
                   help="also send every token through every expert, for statistics only (default on)")
    p.add_argument("--calib-stats", default=None, metavar="FILE",
                   help="reuse activation stats (calibration.json of an earlier export) and skip calibration")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="keep modules matching this fnmatch pattern (HF module names) in BF16; repeatable")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.add_argument("--numerics", default="modelopt-cuda", choices=NUMERICS_MODES,
                   help="whose bits to reproduce, on any device: ModelOpt 0.47 as run on CUDA (default, what "
                        "nearly every ModelOpt export is) or on the CPU (one ulp away on some global scales, "
                        "and on about 2%% of FP8 weight bytes)")
    p.add_argument("--shard-size", type=parse_size, default=5_000_000_000, metavar="SIZE",
                   help="maximum shard size, e.g. 5GB (default), 500MB")
    _register_auto(p)
    _register_push(p)
    p.add_argument("--progress", default="auto", choices=PROGRESS_MODES,
                   help="auto: a bar on a terminal, nothing otherwise; json: one JSON event per line on stdout")


def _bits(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bits per weight such as 6.0, got {text!r}") from None


def _register_auto(p: argparse.ArgumentParser) -> None:
    """Options of `--recipe auto` (checked, with a clear message, by exporter.auto.options)."""
    group = p.add_argument_group(
        "recipe auto", "per-layer NVFP4 / FP8 / BF16 under an effective-bits budget (ModelOpt MIXED_PRECISION); "
        "the scoring tokens are the calibration data")
    group.add_argument("--bits", type=_bits, default=None, metavar="B",
                       help="effective bits per weight to fit, e.g. 6.0 (NVFP4 counts 4.5, FP8 8, BF16 16); "
                            "required with --recipe auto")
    group.add_argument("--candidates", default=None, metavar="LIST",
                       help="formats to choose from, comma separated (default nvfp4,fp8; BF16 is implied)")
    group.add_argument("--method", default=None, choices=("gradient", "kl_div"),
                       help="sensitivity score: gradient (Fisher estimate, default) or kl_div (one forward per "
                            "layer group and format)")
    group.add_argument("--score-samples", type=_positive_int, default=None, metavar="N",
                       help="sequences scored (default 128)")
    group.add_argument("--scores", default=None, metavar="FILE",
                       help="scores file: reused when it exists (re-planning needs no forward pass), written "
                            "otherwise; every auto export also keeps its scores in auto_scores.json")


def _register_push(p: argparse.ArgumentParser) -> None:
    """Options that publish the validated export (exporter.publish); HF_TOKEN must allow writing."""
    group = p.add_argument_group(
        "publish", "after the export validates, push it with a generated model card (README.md) to the Hub "
        "(HF_TOKEN, HF_ENDPOINT); a failed validation is never pushed, and a re-run does not commit twice")
    group.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="repo to push to (created if missing)")
    group.add_argument("--private", action="store_true", help="create the repo private (ignored if it exists)")
    group.add_argument("--push-revision", default=None, metavar="BRANCH",
                       help="branch to commit to, created from main when missing (default main); "
                            "--revision names the source's revision")


def _auto_fields(args: argparse.Namespace) -> dict:
    """QuantizeRequest fields from the auto options; auto-only options with another recipe are an error."""
    from quantgate.exporter.auto.options import CLI_NAMES, check_only_for_auto, parse_candidates

    check_only_for_auto(args.recipe, {"candidates": args.candidates, "method": args.method,
                                      "score_samples": args.score_samples}, CLI_NAMES)
    fields: dict = {"bits": args.bits, "scores": args.scores}
    if args.candidates is not None:
        fields["candidates"] = parse_candidates(args.candidates)
    if args.method is not None:
        fields["method"] = args.method
    if args.score_samples is not None:
        fields["score_samples"] = args.score_samples
    return fields


def _progress_sink(mode: str):
    from quantgate.exporter.progress import BarProgress, JsonLinesProgress

    if mode == "json":
        return StdoutProgress(JsonLinesProgress(sys.stdout))
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        return BarProgress(sys.stderr)
    return None


def _stdout_gone() -> None:
    """Point fd 1 at /dev/null once the reader of stdout has gone, so no later write or the
    interpreter's final flush raises BrokenPipeError again (the Python docs' SIGPIPE recipe)."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class StdoutProgress:
    """JSON progress lines on stdout that stop, while the export goes on, once the reader has gone
    (`quantgate quantize ... --progress json | head -3`): the export is the result, not the lines."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.open = True

    def __call__(self, event) -> None:
        if not self.open:
            return
        try:
            self.inner(event)
        except BrokenPipeError:
            self.open = False
            _stdout_gone()
            print("quantgate quantize: stdout was closed; no more progress lines, the export goes on",
                  file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from quantgate.validators.errors import QuantgateError

    try:
        process = _start_calibration(args)   # first, before torch: its imports run beside this process's
    except QuantgateError as exc:
        print(f"quantgate quantize: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    try:
        return _run(args, process)
    finally:
        from quantgate.exporter import device_warmup

        device_warmup.finish()   # a warm-up the job never waited for (it failed early) ends before the process
        if process is not None:
            process.close()


def _start_calibration(args: argparse.Namespace):
    """The job's calibration process (exporter.calibration.process), or None where the job calibrates
    in this process or not at all."""
    from quantgate.exporter.calibration.process import start_if_wanted

    return start_if_wanted({**vars(args), "exclude": tuple(args.exclude)})


def _run(args: argparse.Namespace, process) -> int:
    from quantgate.exporter import device_warmup

    device_warmup.start(args.device)   # the GPU made ready beside the imports below and the planning
    device_warmup.start_kernels()      # (imports torch and the numerics here first)
    from quantgate.exporter.pipeline import QuantizeRequest, run_quantize
    from quantgate.exporter.progress import emit, process_seconds
    from quantgate.validators.errors import QuantgateError

    import_seconds = process_seconds()   # interpreter start + imports, before the job begins

    try:
        auto_fields = _auto_fields(args)
        target = _push_target(args)
    except QuantgateError as exc:
        print(f"quantgate quantize: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    request = QuantizeRequest(
        source=args.source, revision=args.revision, recipe=args.recipe, out=args.out,
        dialect=args.dialect,
        calib_data=args.calib_data, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
        calib_batch_size=args.calib_batch_size, calib_all_experts=args.calib_all_experts,
        calib_stats=args.calib_stats, device=args.device, exclude=tuple(args.exclude),
        shard_size=args.shard_size, overwrite=args.overwrite, numerics=args.numerics, **auto_fields)
    sink = _progress_sink(args.progress)
    emit(sink, "plan", 0.0, "imports done", import_seconds=import_seconds)
    try:
        result = run_quantize(request, sink, calibration=process)
        if import_seconds is not None:
            result.timings["import"] = import_seconds
    except QuantgateError as exc:
        _close(sink)
        print(f"quantgate quantize: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close(sink)
        print("quantgate quantize: interrupted; nothing was written to --out", file=sys.stderr)
        return 130
    _close(sink)
    status = _summarize(result, args.progress == "json")
    if status != 0 or target is None:
        return status
    return _push(args, result, target, sink)


def _push_target(args: argparse.Namespace):
    """The push target of --push-to-hub (checked before any work), or None."""
    from quantgate.exporter.publish import PushTarget, check_repo_id
    from quantgate.validators.errors import UsageError

    if args.push_to_hub is None:
        if args.private or args.push_revision:
            raise UsageError("--private and --push-revision need --push-to-hub ORG/NAME")
        return None
    return PushTarget(check_repo_id(args.push_to_hub), private=args.private, revision=args.push_revision)


def _push(args: argparse.Namespace, result, target, sink) -> int:
    """Push the validated export; exit 2 when the Hub refuses the token, 1 when the upload fails."""
    import json

    from quantgate.exporter.publish import PushError, PushRejected, publish_export

    try:
        push, _card = publish_export(result.output, target, source=args.source, source_revision=args.revision,
                                     recipe=args.recipe, progress=sink)
    except PushRejected as exc:
        _close(sink)
        print(f"quantgate quantize: push refused: {_one_line(exc)} (the validated export is at {result.output})",
              file=sys.stderr)
        return 2
    except PushError as exc:
        _close(sink)
        print(f"quantgate quantize: push failed: {_one_line(exc)}", file=sys.stderr)
        return 1
    _close(sink)
    if args.progress == "json":
        print(json.dumps({"event": "push", **push.to_dict()}), flush=True)
    verb = "pushed" if push.created else "already pushed"
    print(f"{verb}: {push.repo_url} (commit {push.commit})", file=sys.stderr)
    return 0


def _summarize(result, json_mode: bool) -> int:
    import json

    errors = [f for f in result.report.findings if f.severity.value == "error"]
    if json_mode:
        try:
            print(json.dumps({"event": "result", "ok": result.ok,
                              "output": str(result.output) if result.output else None,
                              "temp_output": str(result.temp_output) if result.temp_output else None,
                              "errors": len(errors), "warnings": result.warnings, "timings": result.timings,
                              **({"auto": result.auto} if result.auto else {})}), flush=True)
        except BrokenPipeError:
            _stdout_gone()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if result.auto:
        from quantgate.exporter.auto.stage import describe

        print(describe(result.auto), file=sys.stderr)
    if result.ok:
        print(f"exported and validated: {result.output}", file=sys.stderr)
        return 0
    print(f"validation found {len(errors)} error(s); output kept at {result.temp_output} "
          f"(see quantgate-report.json there)", file=sys.stderr)
    for finding in errors[:10]:
        print(f"  {finding.code} {finding.message}", file=sys.stderr)
    return 1


def _close(sink) -> None:
    close = getattr(sink, "close", None)
    if close is not None:
        close()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return " ".join(text.split())
