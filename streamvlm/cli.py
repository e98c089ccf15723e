"""``streamvlm``: parse arguments, load settings, call into pipeline/workers/pruning.

Exit codes: 0 ok, 1 the command failed, 2 bad usage or bad settings, 3 not built yet.
Errors print one readable line (no traceback unless ``--debug``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import yaml

from pipeline.settings import ConfigError, Settings, load_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_BUILT = 0, 1, 2, 3

# Subcommands that later issues fill in: name → (help, issue that builds it).
PLANNED: dict[str, tuple[str, int]] = {
    "demo": ("run the main job on embedded defaults: sample video + live stream, answers and captions", 6),
    "serve": ("run the service: Redis job queue → Ray decode/prune actors → batched FastV LLM workers", 6),
    "submit": ("submit a question job on a file or URL (--wait prints the answer)", 6),
    "caption": ("submit a rolling-caption job on a stream and follow its captions", 6),
    "results": ("print a job's results (--follow to keep reading)", 6),
    "cancel": ("cancel a job", 6),
    "status": ("show a job's state, or the service's queues", 6),
    "ask": ("one-shot local inference on a file or URL, no Redis or Ray", 6),
    "eval": ("accuracy against visual-token budget for every pruning method", 4),
}


def _not_built(name: str) -> Callable[[argparse.Namespace, Settings], int]:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        print(f"streamvlm {name}: not built yet (tracked in issue #{PLANNED[name][1]})", file=sys.stderr)
        return EXIT_NOT_BUILT

    return run


def _config_show(args: argparse.Namespace, settings: Settings) -> int:
    data = settings.redacted()
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")
    return EXIT_OK


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    print(f"streamvlm bench {args.what}: not built yet", file=sys.stderr)
    return EXIT_NOT_BUILT


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

    for name, (help_text, _issue) in PLANNED.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(run=_not_built(name))

    bench = sub.add_parser("bench", help="benchmarks that print ratios measured side by side in one run")
    bench.add_argument("what", choices=["pruning", "decode", "service", "reliability"])
    bench.set_defaults(run=_bench)

    config = sub.add_parser("config", help="inspect settings")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_sub.add_parser("show", help="print the effective settings (secrets masked)")
    show.add_argument("--format", choices=["yaml", "json"], default="yaml")
    show.set_defaults(run=_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config, args.overrides)
    except ConfigError as exc:
        print(f"streamvlm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args, settings)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's one place that turns any failure into one line
        if args.debug:
            raise
        print(f"streamvlm {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
