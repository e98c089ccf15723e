"""``streamvlm``: parse arguments, load settings, call into pipeline/workers/pruning.

Exit codes: 0 ok, 1 the command failed, 2 bad usage or bad settings.
Errors print one readable line (no traceback unless ``--debug``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import yaml
from pydantic import ValidationError

from pipeline.client import JobClient, JobNotFound, WaitTimeout
from pipeline.connect import RedisUnavailable
from pipeline.schemas import JobRequest, JobState, WindowResult, readable_validation_error
from pipeline.settings import ConfigError, Settings, load_settings
from pruning.config import POSITION_MODES

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

def _pruning_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning (unset: the service's defaults)")
    g.add_argument("--no-pruning", action="store_true", help="turn every kind of pruning off")
    g.add_argument("--encoder-method", choices=["cls", "random", "none"])
    g.add_argument("--reduction", type=float, metavar="R", help="share of visual tokens dropped after the encoder")
    g.add_argument("--strategy", metavar="NAME", help="temporal budget strategy (uniform, global, redundancy)")
    g.add_argument("--fastv-k", type=int, metavar="K")
    g.add_argument("--fastv-ratio", type=float, metavar="R")
    g.add_argument("--positions", choices=POSITION_MODES,
                   help="position ids after encoder pruning: untouched (original) or renumbered (contiguous, FasterVLM)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float)


def _job_from_args(args: argparse.Namespace, kind: str) -> JobRequest:
    data: dict = {"source": args.source, "kind": kind}
    if args.job_id:
        data["job_id"] = args.job_id
    if kind == "ask":
        data["question"] = args.question
    elif args.prompt:
        data["prompt"] = args.prompt
    if args.no_pruning:
        data["pruning"] = "off"
    else:
        pruning = {k: v for k, v in {
            "encoder_method": args.encoder_method, "encoder_reduction": args.reduction,
            "temporal_strategy": args.strategy, "fastv_k": args.fastv_k, "fastv_ratio": args.fastv_ratio,
            "positions": args.positions,
        }.items() if v is not None}
        if pruning:
            data["pruning"] = pruning
    sampling = {k: v for k, v in {
        "frames_per_clip": args.frames, "start_s": getattr(args, "start", None), "end_s": getattr(args, "end", None),
        "window_s": getattr(args, "window", None), "stride_s": getattr(args, "stride", None),
    }.items() if v is not None}
    if sampling:
        data["sampling"] = sampling
    generation = {k: v for k, v in {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}.items()
                  if v is not None}
    if generation:
        data["generation"] = generation
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        raise UsageError(readable_validation_error(exc).removeprefix("invalid job: ")) from None


class UsageError(ValueError):
    """Bad arguments: exit code 2."""


def _client(settings: Settings) -> JobClient:
    from pipeline.connect import client_url, job_queue, make_client

    return JobClient(job_queue(settings, make_client(client_url(settings)), consumer="cli"))


def _print_result(res: WindowResult, as_json: bool) -> None:
    if as_json:
        print(res.model_dump_json(), flush=True)
    else:
        print(f"[{res.job_id} #{res.window_index} {res.start_s:7.1f}–{res.end_s:7.1f}s] {res.text}  "
              f"({res.visual_tokens_kept}/{res.visual_tokens_in} visual tokens, "
              f"{100 * res.flops_ratio:.0f}% FLOPs)", flush=True)


def _follow(client: JobClient, job_id: str, as_json: bool, timeout_s: float | None) -> int:
    for res in client.follow(job_id, timeout_s=timeout_s):
        _print_result(res, as_json)
    status = client.status(job_id)
    if not as_json:
        print(f"job {job_id}: {status.state.value}" + (f" ({status.error})" if status.error else ""))
    return EXIT_OK if status.state is JobState.done else EXIT_FAILED


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    job = _job_from_args(args, "ask")
    client = _client(settings)
    client.submit(job)
    if not args.wait:
        print(job.job_id)
        return EXIT_OK
    return _follow(client, job.job_id, args.json, args.timeout)


def _caption(args: argparse.Namespace, settings: Settings) -> int:
    job = _job_from_args(args, "caption")
    client = _client(settings)
    client.submit(job)
    if args.no_follow:
        print(job.job_id)
        return EXIT_OK
    print(f"caption job {job.job_id} (stop with: streamvlm cancel {job.job_id})", file=sys.stderr)
    try:
        return _follow(client, job.job_id, args.json, args.timeout)
    except KeyboardInterrupt:
        client.cancel(job.job_id)
        print(f"cancelled {job.job_id}", file=sys.stderr)
        return 130


def _results(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(settings)
    client.status(args.job_id)  # unknown job → JobNotFound
    if args.follow:
        return _follow(client, args.job_id, args.json, args.timeout)
    for _eid, res in client.queue.results(args.job_id):
        _print_result(res, args.json)
    return EXIT_OK


def _status(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(settings)
    if args.job_id:
        status = client.status(args.job_id)
        if args.json:
            print(status.model_dump_json())
        else:
            print(f"{status.job_id}: {status.state.value}, {status.progress} result(s)"
                  + (f", error: {status.error}" if status.error else ""))
        return EXIT_OK
    overview = client.overview()
    print(json.dumps(overview.__dict__) if args.json else
          f"jobs waiting or running: {overview.depth}, being worked on: {overview.pending}, "
          f"consumers: {overview.consumers}, dead letters: {overview.dead_letters}")
    return EXIT_OK


def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    verdict = _client(settings).cancel(args.job_id)
    print(f"{args.job_id}: cancel {verdict}" if verdict == "requested" else f"{args.job_id}: already {verdict}")
    return EXIT_OK


def _ask(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.ask import ask

    job = _job_from_args(args, "ask")
    result = ask(job, settings)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.answer)
        print(f"({result.visual_tokens_kept}/{result.visual_tokens_in} visual tokens kept, "
              f"{100 * result.flops_ratio:.1f}% of the unpruned FLOPs, "
              f"frames {result.start_s:.1f}–{result.end_s:.1f} s)", file=sys.stderr)
    return EXIT_OK


def _eval(args: argparse.Namespace, settings: Settings) -> int:
    # Parsed after the import, like the benchmarks: --help elsewhere stays fast.
    mod = importlib.import_module("pipeline.eval")
    parser = argparse.ArgumentParser(prog="streamvlm eval", description=EVAL_HELP)
    mod.add_arguments(parser)
    return mod.run(parser.parse_args(args.bench_args), settings)


EVAL_HELP = "accuracy against visual-token budget for every pruning method, on the demo model's held-out set"


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from workers.demo import run_demo

    return run_demo(settings, Path(args.workdir), caption_windows=args.windows)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from workers.service import serve_forever

    if args.ray_address:
        settings.ray.address = args.ray_address
    serve_forever(settings)
    return EXIT_OK


def _config_show(args: argparse.Namespace, settings: Settings) -> int:
    data = settings.redacted()
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")
    return EXIT_OK


# bench WHAT → the module that measures it (``add_arguments(parser)`` and ``run(args, settings) -> int``).
BENCHMARKS = {
    "pruning": ("pipeline.bench.pruning", "prefill/TTFT/decode time of every pruning method beside its FLOPs ratio"),
    "decode": ("pipeline.bench.decode", "sampled decoding against decoding every frame, decord against PyAV"),
    "service": ("workers.bench.service", "the service end to end against plain transformers generate: throughput, "
                "latency, bytes, KV cache, memory, accuracy, live streams and scaling"),
    "reliability": ("workers.bench.reliability", "worker, serve and Redis crashes, a live server restart, a poison "
                    "job, a burst and a long caption run: jobs lost, duplicates, recovery time, leaks"),
}


def _run_bench(name: str, module: str) -> Callable[[argparse.Namespace, Settings], int]:
    # The benchmark's own flags are parsed here, after the import: --help elsewhere stays fast.
    def run(args: argparse.Namespace, settings: Settings) -> int:
        mod = importlib.import_module(module)
        parser = argparse.ArgumentParser(prog=f"streamvlm bench {name}", description=BENCHMARKS[name][1])
        mod.add_arguments(parser)
        return mod.run(parser.parse_args(args.bench_args), settings)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamvlm",
        description="Video-stream analytics with a vision-language model and visual-token pruning.",
    )
    parser.add_argument("--config", metavar="YAML", help="settings file (default: $STREAMVLM_CONFIG, else built-in defaults)")
    parser.add_argument(
        "--set",
        metavar="SECTION.KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override one setting (repeatable); beats the file and STREAMVLM_* variables",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("eval", help=EVAL_HELP, description=EVAL_HELP, add_help=False)
    p.set_defaults(run=_eval)

    p = sub.add_parser("demo", help="the main job on embedded defaults: a sample video and a live loopback "
                                    "camera through Redis and Ray; answers, captions and what pruning saved")
    p.add_argument("--workdir", default=".streamvlm/demo", help="where the sample video is written")
    p.add_argument("--windows", type=int, default=3, help="caption windows to show before cancelling")
    p.set_defaults(run=_demo)

    p = sub.add_parser("serve", help="run the service: Redis jobs → Ray decode/prune actors → batched FastV "
                                     "LLM workers → Redis results")
    p.add_argument("--ray-address", help="join this Ray cluster (default: ray.address, $RAY_ADDRESS, else local)")
    p.set_defaults(run=_serve)

    p = sub.add_parser("ask", help="one-shot local inference on a file or URL, no Redis or Ray")
    p.add_argument("source", help="a path under sources.allowed_roots, or a URL")
    p.add_argument("question")
    p.add_argument("--frames", type=int, help="frames sampled from the clip")
    p.add_argument("--start", type=float, metavar="S", help="start of the part to look at, seconds (files)")
    p.add_argument("--end", type=float, metavar="S", help="end of the part to look at, seconds (files)")
    p.add_argument("--window", type=float, metavar="S", help="live streams: the most recent S seconds")
    p.add_argument("--json", action="store_true", help="print answer, tokens, FLOPs ratio and timings as JSON")
    p.set_defaults(run=_ask, job_id=None)
    _pruning_args(p)

    p = sub.add_parser("submit", help="submit a question job on a file or URL (--wait prints the answer)")
    p.add_argument("source", help="a path under sources.allowed_roots, or a URL")
    p.add_argument("question")
    p.add_argument("--job-id", help="idempotency key: resubmitting the same id runs the job once")
    p.add_argument("--frames", type=int, help="frames sampled from the clip")
    p.add_argument("--start", type=float, metavar="S", help="start of the part to look at, seconds")
    p.add_argument("--end", type=float, metavar="S", help="end of the part to look at, seconds")
    p.add_argument("--wait", action="store_true", help="wait and print the answer")
    p.add_argument("--timeout", type=float, metavar="S", help="give up waiting after S seconds")
    p.add_argument("--json", action="store_true", help="print results as JSON lines")
    _pruning_args(p)
    p.set_defaults(run=_submit)

    p = sub.add_parser("caption", help="submit a rolling-caption job on a stream or file and follow its captions")
    p.add_argument("source")
    p.add_argument("--prompt", help="what to ask of every window (default: describe it)")
    p.add_argument("--job-id")
    p.add_argument("--frames", type=int)
    p.add_argument("--window", type=float, metavar="S", help="window length, seconds")
    p.add_argument("--stride", type=float, metavar="S", help="a new window every S seconds")
    p.add_argument("--no-follow", action="store_true", help="print the job id and return")
    p.add_argument("--timeout", type=float, metavar="S")
    p.add_argument("--json", action="store_true")
    _pruning_args(p)
    p.set_defaults(run=_caption)

    p = sub.add_parser("results", help="print a job's results (--follow to keep reading)")
    p.add_argument("job_id")
    p.add_argument("--follow", action="store_true")
    p.add_argument("--timeout", type=float, metavar="S")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_results)

    p = sub.add_parser("status", help="show a job's state, or the queue's when no job is given")
    p.add_argument("job_id", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_status)

    p = sub.add_parser("cancel", help="cancel a job (a running caption job stops after its current window)")
    p.add_argument("job_id")
    p.set_defaults(run=_cancel)

    bench = sub.add_parser("bench", help="benchmarks that print ratios measured side by side in one run")
    bench_sub = bench.add_subparsers(dest="what", metavar="WHAT", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        p = bench_sub.add_parser(name, help=help_text, description=help_text, add_help=False)
        p.set_defaults(run=_run_bench(name, module))

    config = sub.add_parser("config", help="inspect settings")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_sub.add_parser("show", help="print the effective settings (secrets masked)")
    show.add_argument("--format", choices=["yaml", "json"], default="yaml")
    show.set_defaults(run=_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "eval" or (
            getattr(args, "command", None) == "bench" and getattr(args, "what", None) in BENCHMARKS):
        args.bench_args = extra  # the benchmark parses its own flags
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        settings = load_settings(args.config, args.overrides)
    except ConfigError as exc:
        print(f"streamvlm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args, settings)
    except KeyboardInterrupt:
        return 130
    except UsageError as exc:
        print(f"streamvlm {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (JobNotFound, RedisUnavailable, WaitTimeout) as exc:
        print(f"streamvlm {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - the CLI's one place that turns any failure into one line
        if args.debug:
            raise
        print(f"streamvlm {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
