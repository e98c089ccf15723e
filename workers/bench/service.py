"""``streamvlm bench service``: the service end to end (Redis → Ray clip actors → batched LLM worker → Redis)
against what a user would otherwise run, side by side in one run, with a report and plots.

Configurations, all on the same H.264 files (held-out synthetic clips, one question each, written with
``write_video``) and one live loopback camera (``LoopbackCamera``, MPEG-TS over HTTP at real-time pace):

    A  baseline: transformers' own ``model.generate`` on the unpruned demo model, one request at a time, in a
       process of its own (a user's script: no Ray, no Redis). The file is decoded with plain PyAV (every frame,
       then T frames at the segment centres, the service's rule), pixels come from the checkpoint's
       preprocessing (``VideoQA.pixel_values``: the processor class needs torchvision, which this CPU torch
       lacks), and the prompt is built as pipeline/inference.py builds it (``USER: <video>×T·S_f …``).
    B  the service, pruning off (``"pruning": "off"``): batching and actor parallelism only.
    C  the service, [CLS] pruning at 90% with the ``redundancy`` temporal strategy (the best 90% row of
       ``streamvlm eval --video h264``, the clips read as the service reads them, on the bundled model's 750
       held-out questions: redundancy 63.5%, uniform 62.4%, the service's default; ``--strategy`` picks
       another), kept tokens at their original positions (the service's default).
    D  C plus FastV K=2, R=50%.

B, C and D run on ONE service (started once per run) and differ only in each job's own ``pruning`` field, which
the service honours per job; nothing else changes between them.

How it is measured:
    files      closed loop: ``--concurrency`` ask jobs in flight (A: one at a time); each finished job is
               replaced by the next. Clips are split into rounds and every round runs A, B, C, D in a rotated
               order, so load from other processes that drifts during the run hits every configuration alike.
               throughput = clips ÷ wall time of the config's rounds; latency = XADD → result seen on the
               results stream (A: file open → answer text); TTFT = latency − ``llm_decode_s`` (the service
               stores an answer only when it is complete, so this is when the first token existed; for A a
               transformers streamer clocks the first token).
    bytes      the kept visual-token features as a clip actor ships them (``ClipActor.next_clip``, run
               in-process on a few clips per config: ``features.nbytes`` in ``workers.ship_dtype``, and the
               pickled size of the whole ``VisualTokens`` object with its index tensors). A ships nothing.
    KV cache   per request after prefill: Σ_layers 2 · kv_heads · head_dim · dtype bytes · tokens the layer
               caches (layers < K: text + kept visual tokens; layers ≥ K: text + FastV's kept share), from each
               result's kept count and the question's tokenised length (tests check the formula against
               real caches).
    memory     peak RSS per process, sampled with psutil every 0.25 s during each config's phases: the LLM
               worker, the largest clip actor, the driver (this process), Redis, A's process.
    accuracy   greedy answer == expected word on the held-out questions (the same clips for every config).
    live       per config, one caption job on its own loopback camera for ``--live-windows`` windows:
               latency = result seen − wall time of the window's end (camera connection time + ``end_s``),
               dropped frames from ``frames_dropped``.
    scaling    config D, 1/2/4/8 concurrent caption streams (one camera each): captions per minute in
               steady state against the real-time rate, latency, dropped frames per stream, mean time per
               window in each stage (the service's own ``timings_s``; ``store_notify`` = result built → read
               by the client; ``stream_delay`` = the camera → reader delay A's reader measured; ``other`` = the
               rest: Ray calls, the driver's loop, waiting for the closing frame) and CPU cores used per actor
               kind; the bottleneck is the stage with the largest mean, reported with the largest compute
               stage (decode, vision, LLM wait, LLM).
    caveats    the demo model is tiny (4+4 layers, widths 128 and 192), so fixed per-clip costs (decode,
               Ray, Redis) weigh far more than on Video-LLaVA-7B; memory peaks differ little between B, C
               and D because the same long-lived actors serve all three (the allocator keeps what a bigger
               request took).

Every output folder holds results.json, results.md and PNG plots, and states the machine and its load.

This module runs the phases in order; the parts live beside it: ``plan`` (configs, sizes), ``records`` (what is
recorded per clip and window), ``baseline`` (A's process), ``rig`` (B–D through the service), ``monitor`` (RSS
and CPU per process), ``probes`` (shipped bytes, KV cache) and ``report`` (rows, Markdown, plots).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.synthetic import VALIDATION_SEED
from workers.bench.baseline import BaselineProcess, baseline_files, baseline_live
from workers.bench.monitor import ProcessMonitor
from workers.bench.plan import CONFIGS, QUICK, BenchError, BenchUsageError, Plan
from workers.bench.probes import KVShape, ShipProbe, kv_cache_bytes, kv_tokens_per_layer
from workers.bench.records import FileRecord, LiveRecord, write_media
from workers.bench.report import (
    SERVICE_ROLES,
    config_row,
    machine,
    markdown,
    output_folder,
    scaling_row,
    write_report,
)
from workers.bench.rig import ServiceRig, closed_loop, live_service, service_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def run_bench(plan: Plan, settings: Any, log: Callable[[str], None] = lambda _m: None,
              command: str = "streamvlm bench service") -> dict[str, Any]:
    import ray

    from pipeline.demo_model import demo_model_path

    model_path = str(demo_model_path())
    started_at = dt.datetime.now().astimezone()
    load_start = os.getloadavg()
    clip_timeout_s = 120.0
    with tempfile.TemporaryDirectory(prefix="streamvlm-bench-service-") as tmp:
        workdir = Path(tmp)
        media = workdir / "media"
        media.mkdir()
        # Warm-up clips come from the validation questions, so every held-out question can be measured.
        samples = write_media(media, list(range(plan.first_clip, plan.first_clip + plan.clips)))
        warm = write_media(media, list(range(plan.concurrency)), seed=VALIDATION_SEED, prefix="warm")
        log(f"wrote {len(samples)} + {len(warm)} warm-up H.264 clips; starting config A's process and the service")

        baseline = BaselineProcess(model_path, settings.model.device, settings.model.dtype, plan.baseline_threads).start()
        ray_was_up = ray.is_initialized()
        rig: ServiceRig | None = None
        monitor: ProcessMonitor | None = None
        cameras: list[Any] = []
        try:
            t0 = time.perf_counter()
            rig = ServiceRig(service_settings(settings, workdir, media, plan))
            startup_s = time.perf_counter() - t0
            baseline_pid = baseline.wait_ready()
            log(f"service up in {startup_s:.1f} s ({plan.max_active_jobs} clip actors, 1 LLM worker)")
            monitor = ProcessMonitor({**rig.roles(), "baseline": [baseline_pid]},
                                     totals={"service_total": SERVICE_ROLES}).start()
            probe = ShipProbe(rig.settings, model_path)
            kv_shape = KVShape.from_model(probe.qa.model)
            text_tokens = {s.index: probe.text_tokens(s.question) for s in samples}

            # Warm-up outside every timing: first calls allocate, Ray's workers warm their paths.
            baseline.call("files", clip_timeout_s * len(warm), items=[(s.path, s.question) for s in warm[:2]],
                          frames=8, max_new_tokens=plan.answer_tokens)
            for config in ("B", "D"):
                closed_loop(rig, warm, plan.pruning(config), plan.concurrency, f"warm{config}", plan.answer_tokens,
                            clip_timeout_s * len(warm))

            records: dict[str, dict[int, FileRecord]] = {c: {} for c in CONFIGS}
            elapsed: dict[str, float] = defaultdict(float)
            bounds = np.linspace(0, len(samples), plan.rounds + 1).astype(int)
            for rnd in range(plan.rounds):
                chunk = samples[bounds[rnd]:bounds[rnd + 1]]
                order = CONFIGS[rnd % 4:] + CONFIGS[:rnd % 4]
                for config in order:
                    with monitor.phase(config):
                        if config == "A":
                            recs, secs = baseline_files(baseline, chunk, plan.answer_tokens,
                                                        clip_timeout_s * len(chunk))
                        else:
                            recs, secs = closed_loop(rig, chunk, plan.pruning(config), plan.concurrency,
                                                     f"{config}r{rnd}", plan.answer_tokens, clip_timeout_s * len(chunk))
                    elapsed[config] += secs
                    for rec in recs:
                        records[config][rec.index] = rec
                log(f"round {rnd + 1}/{plan.rounds}: {len(chunk)} clips × {'/'.join(order)} "
                    f"(load {os.getloadavg()[0]:.1f})")

            live: dict[str, list[LiveRecord]] = {}
            live_timeout_s = 120 + 4 * (plan.window_s + plan.live_windows * plan.stride_s)
            for k, config in enumerate(CONFIGS):
                with monitor.phase(config):
                    if config == "A":
                        live[config] = baseline_live(baseline, plan, k, live_timeout_s)
                    else:
                        live[config], _ = live_service(rig, plan, plan.pruning(config), f"live{config}", 1, k,
                                                       live_timeout_s, cameras)
                log(f"live stream, {config}: {len(live[config])} windows")

            ship: dict[str, dict[str, Any]] = {}
            for config in ("B", "C", "D"):
                probes = [probe.shipped(s, plan.pruning(config)) for s in samples[:plan.probe_clips]]
                for s, p in zip(samples, probes, strict=False):
                    if p["kept"] != records[config][s.index].visual_tokens_kept:
                        raise BenchError(f"{config}: the probe kept {p['kept']} tokens of clip {s.index}, the "
                                         f"service {records[config][s.index].visual_tokens_kept}")
                ship[config] = {key: round(statistics.fmean(p[key] for p in probes)) for key in probes[0]}
            for config in ("B", "C", "D"):
                ship[config]["bytes_ratio_vs_unpruned"] = round(ship[config]["bytes"] / ship["B"]["bytes"], 4)

            delays = [x.frame_delay_s for x in live["A"] if x.frame_delay_s is not None]
            stream_delay_s = statistics.median(delays) if delays else None
            scaling = []
            for n in plan.streams:
                name = f"streams-{n}"
                with monitor.phase(name):
                    recs, cams = live_service(rig, plan, plan.pruning("D"), f"scale{n}", n, 8, live_timeout_s,
                                              cameras)
                row = scaling_row(plan, n, recs, monitor.summary(name), cams, stream_delay_s)
                scaling.append(row)
                log(f"scaling: {n} stream(s), latency p50 {row['latency_p50_s']} s, "
                    f"dropped {row['frames_dropped_per_stream']}, largest stage {row['bottleneck']}, "
                    f"largest compute stage {row['largest_compute_stage']}")
            batch_sizes = ray.get(rig.service.llm_workers[0].stats.remote(), timeout=60)
        finally:
            if monitor is not None:
                monitor.stop()
            if rig is not None:
                rig.close()
            for cam in cameras:
                cam.stop()
            baseline.close()
            if not ray_was_up:
                ray.shutdown()

    rows = []
    ordered = {c: [records[c][s.index] for s in samples] for c in CONFIGS}
    unpruned_kv = statistics.fmean(kv_cache_bytes(kv_shape, kv_tokens_per_layer(kv_shape, text_tokens[s.index],
                                                                                 ordered["B"][i].visual_tokens_in,
                                                                                 plan.fastv_k, 0.0))
                                   for i, s in enumerate(samples))
    for config in CONFIGS:
        recs = ordered[config]
        if config == "A":
            kv = unpruned_kv
        else:
            ratio = plan.fastv_ratio if config == "D" else 0.0
            kv = statistics.fmean(kv_cache_bytes(kv_shape, kv_tokens_per_layer(kv_shape, text_tokens[r.index],
                                                                                r.visual_tokens_kept, plan.fastv_k,
                                                                                ratio)) for r in recs)
        rows.append(config_row(config, plan, recs, elapsed[config], samples, ordered["A"] if config != "A" else None,
                               live[config], ship.get(config), kv, unpruned_kv, ship["B"]["tokens_in"],
                               monitor.summary(config)))
    a = rows[0]
    for row in rows:
        row["throughput_ratio_vs_A"] = round(row["throughput_clips_per_min"] / a["throughput_clips_per_min"], 3)
        row["accuracy_delta_vs_A_points"] = round(100 * (row["accuracy"] - a["accuracy"]), 2)
    d, c, b = rows[3], rows[2], rows[1]
    token_ratio = c["visual_tokens_into_llm"] / b["visual_tokens_into_llm"]
    bytes_fall = 1.0 - ship["C"]["bytes"] / ship["B"]["bytes"]
    goals = {
        "D_throughput_ratio_vs_A": {"goal": ">= 3", "measured": d["throughput_ratio_vs_A"],
                                    "met": d["throughput_ratio_vs_A"] >= 3.0},
        "D_accuracy_loss_points": {"goal": "<= 2", "measured": -d["accuracy_delta_vs_A_points"],
                                   "met": -d["accuracy_delta_vs_A_points"] <= 2.0},
        "C_bytes_fall_vs_B": {"goal": f">= the pruning ratio ({100 * plan.reduction:g}% of patches; "
                                      f"{100 * (1 - token_ratio):.1f}% of visual tokens, per-frame [CLS] kept)",
                              "measured": round(bytes_fall, 4),
                              "met_vs_tokens": bytes_fall >= (1 - token_ratio) - 1e-9,
                              "met_vs_nominal": bytes_fall >= plan.reduction},
    }
    return {
        "benchmark": "service",
        "started_at": started_at.isoformat(timespec="seconds"),
        "command": command,
        "plan": {**plan.__dict__, "streams": list(plan.streams)},
        "machine": machine(),
        "load_1m_at_start": round(load_start[0], 2),
        "load_1m_at_end": round(os.getloadavg()[0], 2),
        "service_startup_s": round(startup_s, 1),
        "settings": {"max_batch_size": rig.settings.workers.max_batch_size,
                     "max_batch_wait_ms": rig.settings.workers.max_batch_wait_ms,
                     "ship_dtype": rig.settings.workers.ship_dtype, "clip_actors": plan.max_active_jobs,
                     "torch_threads_per_actor": 1, "baseline_threads": plan.baseline_threads},
        "llm_batch_sizes": batch_sizes,
        "kv_shape": kv_shape.__dict__,
        "configs": rows,
        "scaling": scaling,
        "answers": {c: [{"index": r.index, "text": r.text} for r in ordered[c]] for c in CONFIGS},
        "live_captions": {c: [x.text for x in live[c]] for c in CONFIGS},
        "goals": goals,
    }


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Plan()
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 8 clips, 2 clip actors, 1 and 2 streams, 2 short windows (about a minute)")
    parser.add_argument("--json", action="store_true",
                        help="print the config rows (A–D) as a JSON list on stdout; the table goes to stderr")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="parent folder of the dated output folder (default bench-results)")
    parser.add_argument("--clips", type=int, default=None, help=f"held-out clips per config (default {d.clips})")
    parser.add_argument("--rounds", type=int, default=None, help=f"interleaved rounds (default {d.rounds})")
    parser.add_argument("--concurrency", type=int, default=None,
                        help=f"ask jobs in flight for B–D (default {d.concurrency})")
    parser.add_argument("--streams", type=_int_list, default=None, metavar="LIST",
                        help="concurrent caption streams of the scaling runs (default 1,2,4,8); the service gets "
                             "max(streams, concurrency) clip actors")
    parser.add_argument("--live-windows", type=int, default=None,
                        help=f"caption windows per live stream (default {d.live_windows})")
    parser.add_argument("--strategy", default=None, help=f"temporal strategy of C and D (default {d.strategy})")
    parser.add_argument("--baseline-threads", type=int, default=None,
                        help="torch threads of config A's process (default 1, like each actor)")
    parser.add_argument("--first-clip", type=int, default=None, help="first held-out question index (default 0)")


def plan_from_args(args: argparse.Namespace) -> Plan:
    from pipeline.synthetic import HELD_OUT_SIZE
    from pruning.config import TEMPORAL_STRATEGIES

    base = QUICK if args.quick else Plan()
    values = {
        "clips": args.clips, "rounds": args.rounds, "concurrency": args.concurrency, "live_windows": args.live_windows,
        "strategy": args.strategy, "baseline_threads": args.baseline_threads, "first_clip": args.first_clip,
    }
    changes: dict[str, Any] = {k: v for k, v in values.items() if v is not None}
    if args.streams is not None:
        changes["streams"] = tuple(args.streams)
    plan = Plan(**{**base.__dict__, **changes})
    for name in ("clips", "rounds", "concurrency", "live_windows", "baseline_threads"):
        value = getattr(plan, name)
        if not isinstance(value, int) or value < 1:
            raise BenchUsageError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    if plan.live_windows < 2:
        raise BenchUsageError(f"--live-windows must be >= 2 (a rate needs two windows), got {plan.live_windows}")
    if plan.rounds > plan.clips:
        raise BenchUsageError(f"--rounds ({plan.rounds}) cannot exceed --clips ({plan.clips})")
    if not plan.streams or any(n < 1 or n > 64 for n in plan.streams):
        raise BenchUsageError(f"--streams must be integers in 1..64, got {list(plan.streams)}")
    if plan.strategy not in TEMPORAL_STRATEGIES:
        raise BenchUsageError(f"--strategy must be one of {list(TEMPORAL_STRATEGIES)}, got {plan.strategy!r}")
    if plan.first_clip < 0 or plan.first_clip + plan.clips > HELD_OUT_SIZE:
        raise BenchUsageError(f"--first-clip + --clips must fit the {HELD_OUT_SIZE} held-out questions, "
                              f"got {plan.first_clip} + {plan.clips}")
    return Plan(**{**plan.__dict__, "max_active_jobs": max(max(plan.streams), plan.concurrency)})


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (the options that were given)."""
    parts = ["streamvlm bench service"]
    for name, value in vars(args).items():
        flag = "--" + name.replace("_", "-")
        if name in ("out", "json") or value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts.append(f"{flag} {','.join(str(v) for v in value)}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def run(args: argparse.Namespace, settings: Any = None) -> int:
    try:
        plan = plan_from_args(args)
    except BenchUsageError as exc:
        print(f"streamvlm bench service: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if settings is None:
        from pipeline.settings import load_settings

        settings = load_settings()
    try:
        folder = output_folder(Path(args.out))
    except OSError as exc:
        print(f"streamvlm bench service: --out: cannot create a folder under {args.out}: {exc}", file=sys.stderr)
        return EXIT_USAGE

    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[bench service {time.perf_counter() - began:5.0f} s] {message}", file=sys.stderr, flush=True)

    try:
        report = run_bench(plan, settings, log, command=_command(args))
    except BenchError as exc:
        print(f"streamvlm bench service: {exc}", file=sys.stderr)
        return EXIT_FAILED
    files = write_report(report, folder)
    table = markdown(report)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(report["configs"], indent=1))
    else:
        print(table)
    print(f"[bench service] written: {', '.join(str(p) for p in files.values())}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m workers.bench.service", description=__doc__.splitlines()[0])
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
