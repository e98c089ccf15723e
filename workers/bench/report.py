"""The bench's rows (per configuration, per stream count), the machine it ran on, and its outputs: the
Markdown table, the PNG plots and the dated folder they go to."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from workers.bench.plan import BenchError, Plan
from workers.bench.records import FileRecord, LiveRecord, Sample


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


SERVICE_ROLES = ("llm_worker", "clip_actor", "driver", "redis")


VISION_STAGES = ("preprocess_s", "vision_s", "score_s", "select_s")


LLM_STAGES = ("project_s", "prefill_s", "llm_decode_s")


COMPUTE_STAGES = ("decode", "vision", "llm_wait", "llm")


def stage_means(timings: list[dict[str, float]], latencies: list[float], live: bool,
                stream_delay_s: float | None = None) -> dict[str, float]:
    """Mean seconds per window in each stage; ``store_notify`` = result built → read by the client (Redis
    store script, results stream, the client's read); ``other`` = latency minus all of them (Ray calls and
    object transfer, the driver's event loop, waiting for a free slot or for the window's closing frame).

    Live windows: ``decode`` is left out (a live clip's decode time is mostly waiting for its frames to be
    filmed) and ``stream_delay`` is the camera → reader delay that A's reader measured on the same kind of
    stream, which every reader pays before a window can close."""
    if not timings:
        return {}

    def mean(keys: tuple[str, ...]) -> float:
        return statistics.fmean(sum(t.get(k, 0.0) for k in keys) for t in timings)

    out = {"vision": mean(VISION_STAGES), "llm_wait": mean(("llm_queue_s",)), "llm": mean(LLM_STAGES),
           "store_notify": mean(("store_notify_s",))}
    if not live:
        out = {"decode": mean(("video_decode_s",)), **out}
    elif stream_delay_s is not None:
        out["stream_delay"] = stream_delay_s
    out["other"] = max(0.0, statistics.fmean(latencies) - sum(out.values()))
    return {k: round(v, 4) for k, v in out.items()}


def config_row(config: str, plan: Plan, records: list[FileRecord], elapsed_s: float, samples: list[Sample],
               reference: list[FileRecord] | None, live: list[LiveRecord], ship: dict[str, Any] | None,
               kv_bytes: float, kv_unpruned: float, tokens_in: int, monitor: dict[str, Any]) -> dict[str, Any]:
    latencies = [r.latency_s for r in records]
    correct = [r.text == s.answer for r, s in zip(records, samples, strict=True)]
    if config == "A":  # generate() takes every visual token, through every layer
        kept = deep = float(tokens_in)
    else:
        kept = statistics.fmean(r.visual_tokens_kept for r in records)
        drop = plan.fastv_ratio if config == "D" else 0.0
        deep = statistics.fmean(r.visual_tokens_kept - int(round(drop * r.visual_tokens_kept)) for r in records)
    live_lat = [x.latency_s for x in live]
    roles = ("baseline",) if config == "A" else (*SERVICE_ROLES, "service_total")
    row: dict[str, Any] = {
        "config": config,
        "label": plan.label(config),
        "pruning": plan.pruning(config) if config != "A" else None,
        "clips": len(records),
        "throughput_clips_per_min": round(60.0 * len(records) / elapsed_s, 2),
        "throughput_ratio_vs_A": None,  # filled once A is known
        "latency_p50_s": _r(_pct(latencies, 50)),
        "latency_p95_s": _r(_pct(latencies, 95)),
        "ttft_p50_s": _r(_pct([r.ttft_s for r in records], 50)),
        "ttft_p95_s": _r(_pct([r.ttft_s for r in records], 95)),
        "accuracy": round(sum(correct) / len(correct), 4),
        "accuracy_delta_vs_A_points": None,
        "answers_same_as_A": (round(statistics.fmean(a.text == b.text for a, b in zip(records, reference, strict=True)), 4)
                              if reference is not None else None),
        "visual_tokens_in": tokens_in,
        "visual_tokens_into_llm": _r(kept, 1),
        "visual_tokens_deep_layers": _r(deep, 1),
        "bytes_per_clip": ship["bytes"] if ship else None,
        "bytes_pickled_per_clip": ship["pickled_bytes"] if ship else None,
        "bytes_ratio_vs_unpruned": ship["bytes_ratio_vs_unpruned"] if ship else None,
        "kv_cache_bytes_per_request": round(kv_bytes),
        "kv_cache_ratio_vs_unpruned": round(kv_bytes / kv_unpruned, 4),
        "stage_mean_s": stage_means([r.timings_s for r in records], latencies, live=False)
        if config != "A" else {k: round(statistics.fmean(r.timings_s[k] for r in records), 4)
                               for k in ("video_decode_s", "generate_s")},
        "live_windows": len(live),
        "live_latency_p50_s": _r(_pct(live_lat, 50)),
        "live_latency_p95_s": _r(_pct(live_lat, 95)),
        "live_frames_dropped": sum(x.frames_dropped for x in live),
        "live_frame_delay_s": _r(_pct([x.frame_delay_s for x in live if x.frame_delay_s is not None], 50)),
        "live_captions_nonempty": sum(bool(x.text.strip()) for x in live),
        "peak_rss_mb": {k: v for k, v in monitor["peak_rss_mb"].items() if k in roles},
        "cpu_cores_used": {k: v for k, v in monitor["cpu_cores_used"].items() if k in roles},
        "load_1m": monitor["load_1m"],
        "elapsed_s": round(elapsed_s, 4),
    }
    return row


def scaling_row(plan: Plan, streams: int, records: list[LiveRecord], monitor: dict[str, Any],
                cams: list[dict[str, Any]], stream_delay_s: float | None) -> dict[str, Any]:
    latencies = [r.latency_s for r in records]
    per_stream: dict[int, list[LiveRecord]] = defaultdict(list)
    for r in records:
        per_stream[r.stream].append(r)
    stages = stage_means([r.timings_s for r in records], latencies, live=True, stream_delay_s=stream_delay_s)
    bottleneck = max(stages, key=stages.get) if stages else None
    compute = {k: v for k, v in stages.items() if k in COMPUTE_STAGES}
    largest_compute = max(compute, key=compute.get) if compute else None
    # Captions per minute in steady state: each stream's windows after its first ÷ the time they took, summed.
    rate = 0.0
    for recs in per_stream.values():
        times = sorted(x.seen_wall for x in recs)
        if len(times) >= 2 and times[-1] > times[0]:
            rate += 60.0 * (len(times) - 1) / (times[-1] - times[0])
    return {
        "config": "D",
        "streams": streams,
        "windows": len(records),
        "captions_per_min": round(rate, 2),
        "realtime_captions_per_min": round(streams * 60.0 / plan.stride_s, 2),
        "latency_p50_s": _r(_pct(latencies, 50)),
        "latency_p95_s": _r(_pct(latencies, 95)),
        "latency_max_s": _r(max(latencies) if latencies else None),
        "latency_growth_s": _r(statistics.fmean(v[-1].latency_s - v[0].latency_s for v in per_stream.values())),
        "frames_dropped_per_stream": [sum(x.frames_dropped for x in per_stream[k]) for k in sorted(per_stream)],
        "reconnections": sum(c["connections"] - 1 for c in cams),
        "stage_mean_s": stages,
        "bottleneck": bottleneck,
        "largest_compute_stage": largest_compute,
        "window_indices": [sorted(x.window_index for x in per_stream[k]) for k in sorted(per_stream)],
        "peak_rss_mb": {k: v for k, v in monitor["peak_rss_mb"].items() if k != "baseline"},
        "cpu_cores_used": {k: v for k, v in monitor["cpu_cores_used"].items() if k != "baseline"},
        "load_1m": monitor["load_1m"],
    }


def machine() -> dict[str, Any]:
    import av
    import psutil
    import ray
    import redis
    import torch
    import transformers

    cpu_model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({cpu_model})"
    return {
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "device": device,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "ray": ray.__version__,
                     "av": av.__version__, "redis-py": redis.__version__, "numpy": np.__version__},
    }


def _f(value: Any, fmt: str = "{:.3f}") -> str:
    return "–" if value is None else fmt.format(value)


def _bytes(value: Any) -> str:
    return "–" if value is None else f"{value / 1024:.1f} KiB"


def markdown(report: dict[str, Any]) -> str:
    m, plan = report["machine"], report["plan"]
    lines = [
        f"# streamvlm bench service — {report['started_at']}",
        "",
        f"Machine: {m['cores']} cores, {m['memory_gb']} GB, {m['device']}; {m['platform']}; Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        f"Load average (1 min): {report['load_1m_at_start']} at start, {report['load_1m_at_end']} at end "
        "(the machine is shared; per-config load below). "
        f"Service start-up {report['service_startup_s']} s ({plan['max_active_jobs']} clip actors + 1 LLM worker, "
        f"1 torch thread each; LLM batches ≤ {report['settings']['max_batch_size']}, wait "
        f"{report['settings']['max_batch_wait_ms']:g} ms; features shipped as {report['settings']['ship_dtype']}).",
        f"Files: {plan['clips']} held-out clips (4 s H.264, 8 frames sampled), {plan['rounds']} interleaved rounds, "
        f"{plan['concurrency']} jobs in flight (A: one at a time, {plan['baseline_threads']} torch thread(s)); "
        f"answers ≤ {plan['answer_tokens']} tokens, greedy.",
        "",
        "| config | what | clips/min | × A | latency p50 / p95 s | TTFT p50 s | accuracy | Δ vs A (pts) | "
        "tokens into LLM / deep layers | bytes shipped per clip | × unpruned | KV cache per request | "
        "peak RSS MB | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["configs"]:
        rss = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_rss_mb"].items()
                        if k in ("baseline", "llm_worker", "clip_actor", "service_total"))
        load = r["load_1m"]["mean"] if r["load_1m"] else None
        lines.append(
            f"| {r['config']} | {r['label']} | {r['throughput_clips_per_min']:.0f} | {r['throughput_ratio_vs_A']:.2f} | "
            f"{_f(r['latency_p50_s'])} / {_f(r['latency_p95_s'])} | {_f(r['ttft_p50_s'])} | "
            f"{100 * r['accuracy']:.1f}% | {r['accuracy_delta_vs_A_points']:+.1f} | "
            f"{r['visual_tokens_into_llm']:.0f} / {r['visual_tokens_deep_layers']:.0f} | {_bytes(r['bytes_per_clip'])} | "
            f"{_f(r['bytes_ratio_vs_unpruned'])} | {_bytes(r['kv_cache_bytes_per_request'])} "
            f"({r['kv_cache_ratio_vs_unpruned']:.3f}) | {rss} | {_f(load, '{:.1f}')} |")
    lines += ["", "Where a file clip's time goes (mean s per clip; A: decode / generate):", "",
              "| config | decode | vision | LLM wait | LLM | store+notify | other |", "|---|---|---|---|---|---|---|"]
    for r in report["configs"]:
        st = r["stage_mean_s"]
        if r["config"] == "A":
            lines.append(f"| A | {st['video_decode_s']:.3f} | generate {st['generate_s']:.3f} | | | | |")
        else:
            lines.append(f"| {r['config']} | " + " | ".join(f"{st.get(k, 0.0):.3f}" for k in
                                                              ("decode", "vision", "llm_wait", "llm", "store_notify",
                                                               "other")) + " |")
    lines += [
        "",
        "A ships nothing between processes (one process). Bytes: kept features as a clip actor ships them "
        "(pickled with their index tensors: " + ", ".join(
            f"{r['config']} {_bytes(r['bytes_pickled_per_clip'])}" for r in report["configs"] if r["config"] != "A")
        + "). KV cache after prefill (model dtype), ratio to the unpruned prompt in brackets. TTFT for the service = "
        "latency − decode of the tokens after the first.",
        "",
        f"Live loopback stream (one camera per config, {plan['live_windows']} caption windows of {plan['window_s']:g} s "
        f"every {plan['stride_s']:g} s; latency = caption seen − end of its window on the camera's clock):",
        "",
        "| config | windows | latency p50 / p95 s | frames dropped |",
        "|---|---|---|---|",
    ]
    delay = report["configs"][0].get("live_frame_delay_s")
    for r in report["configs"]:
        lines.append(f"| {r['config']} | {r['live_windows']} | {_f(r['live_latency_p50_s'])} / "
                     f"{_f(r['live_latency_p95_s'])} | {r['live_frames_dropped']} |")
    lines += [
        "",
        f"A's reader had the frame that closes a window {_f(delay)} s (p50) after the camera sent it (H.264 "
        "decoder + MPEG-TS delay): a floor under every config's live latency.",
        "",
        "Scaling (config D, one caption job per loopback camera):",
        "",
        "| streams | captions/min (real time) | latency p50 / p95 / max s | dropped frames per stream | "
        "mean s per window: vision / LLM wait / LLM / store+notify / stream delay / other | largest (compute) | "
        "CPU cores: LLM worker / clip actors | service RSS MB | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["scaling"]:
        st, cpu = r["stage_mean_s"], r["cpu_cores_used"]
        load = r["load_1m"]["mean"] if r["load_1m"] else None
        lines.append(
            f"| {r['streams']} | {r['captions_per_min']:.1f} ({r['realtime_captions_per_min']:.0f}) | "
            f"{_f(r['latency_p50_s'])} / {_f(r['latency_p95_s'])} / {_f(r['latency_max_s'])} | "
            f"{r['frames_dropped_per_stream']} | {st.get('vision', 0):.3f} / {st.get('llm_wait', 0):.3f} / "
            f"{st.get('llm', 0):.3f} / {st.get('store_notify', 0):.3f} / {_f(st.get('stream_delay'))} / "
            f"{st.get('other', 0):.3f} | {r['bottleneck']} "
            f"({r['largest_compute_stage']}) | {_f(cpu.get('llm_worker'), '{:.2f}')} / "
            f"{_f(cpu.get('clip_actor'), '{:.2f}')} | {_f(r['peak_rss_mb'].get('service_total'), '{:.0f}')} | "
            f"{_f(load, '{:.1f}')} |")
    lines += ["", "Goals:", ""]
    for name, g in report["goals"].items():
        met = {k: v for k, v in g.items() if k.startswith("met")}
        lines.append(f"- {name}: goal {g['goal']}, measured {g['measured']}, "
                     + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items()))
    lines += ["", f"LLM batch sizes (size: batches): {report['llm_batch_sizes']}", "",
              f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def write_plots(report: dict[str, Any], folder: Path) -> list[Path]:
    from matplotlib.figure import Figure  # no pyplot: an Agg canvas, no global backend state
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    rows = report["configs"]
    fig = Figure(figsize=(11, 4.8), dpi=110)
    ax_t, ax_a = fig.subplots(1, 2)
    by_x: dict[float, list[str]] = defaultdict(list)
    for r in rows:
        x = r["visual_tokens_deep_layers"]
        by_x[x].append(r["config"])
        ax_t.plot([x], [r["throughput_clips_per_min"]], "o", markersize=8, label=f"{r['config']}: {r['label']}")
        ax_t.annotate(r["config"], (x, r["throughput_clips_per_min"]), textcoords="offset points", xytext=(7, 3))
        ax_a.plot([x], [100 * r["accuracy"]], "o", markersize=8)
    for r in rows:  # configs on the same point (A and B when they agree) share one label
        same = [c for c in by_x[r["visual_tokens_deep_layers"]]
                if next(q for q in rows if q["config"] == c)["accuracy"] == r["accuracy"]]
        if same[0] == r["config"]:
            ax_a.annotate(", ".join(same), (r["visual_tokens_deep_layers"], 100 * r["accuracy"]),
                          textcoords="offset points", xytext=(7, 3))
    for ax in (ax_t, ax_a):
        ax.set_xscale("log")
        ax.set_xticks(sorted({round(x) for x in by_x}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(min(by_x) / 1.6, max(by_x) * 1.6)
        ax.set_xlabel("visual tokens per clip in the deep LLM layers (log)")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_ylabel(f"throughput (clips / min), {report['plan']['concurrency']} jobs in flight (A: 1)")
    ax_t.set_ylim(0, 1.35 * max(r["throughput_clips_per_min"] for r in rows))
    ax_a.set_ylabel(f"held-out accuracy (%), n = {rows[0]['clips']}")
    ax_a.set_ylim(0, 100)
    ax_t.legend(fontsize=7, loc="upper center")
    fig.suptitle("streamvlm bench service: throughput and accuracy against kept tokens")
    fig.tight_layout()
    first = folder / "throughput_accuracy_vs_tokens.png"
    fig.savefig(first, format="png")

    scaling = report["scaling"]
    fig = Figure(figsize=(15, 4.8), dpi=110)
    ax_l, ax_r, ax_s = fig.subplots(1, 3)
    n = [r["streams"] for r in scaling]
    ax_l.plot(n, [r["latency_p50_s"] for r in scaling], "o-", label="p50")
    ax_l.plot(n, [r["latency_p95_s"] for r in scaling], "s--", label="p95")
    ax_l.set_ylabel("caption latency after its window ends (s)")
    ax_l.set_ylim(bottom=0)
    ax_l.legend()
    ax_r.plot(n, [r["captions_per_min"] for r in scaling], "o-", label="delivered")
    ax_r.plot(n, [r["realtime_captions_per_min"] for r in scaling], "k:", label="real time (cameras)")
    ax_r.set_ylabel("captions / min")
    ax_r.legend()
    stages = [k for k in ("vision", "llm_wait", "llm", "store_notify", "stream_delay", "other")
              if k in scaling[0]["stage_mean_s"]]
    positions = np.arange(len(scaling))
    bottom = np.zeros(len(scaling))
    for stage in stages:
        values = np.array([r["stage_mean_s"].get(stage, 0.0) for r in scaling])
        ax_s.bar(positions, values, bottom=bottom, label=stage)
        bottom += values
    ax_s.set_xticks(positions, [str(v) for v in n])
    ax_s.set_ylabel("mean seconds per caption window, by stage")
    ax_s.set_ylim(0, 1.45 * float(bottom.max()))
    ax_s.legend(fontsize=8, ncol=3, loc="upper left")
    for ax in (ax_l, ax_r):
        ax.set_xticks(n)
    for ax in (ax_l, ax_r, ax_s):
        ax.set_xlabel("concurrent caption streams")
        ax.grid(True, alpha=0.3)
    fig.suptitle("streamvlm bench service: config D against concurrent caption streams")
    fig.tight_layout()
    second = folder / "latency_vs_streams.png"
    fig.savefig(second, format="png")
    return [first, second]


def output_folder(parent: Path) -> Path:
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    for suffix in ("", *(f"-{i}" for i in range(1, 100))):
        folder = parent / f"{stamp}{suffix}"
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise BenchError(f"cannot create a new output folder under {parent}")


def write_report(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    files = {"json": folder / "results.json", "markdown": folder / "results.md"}
    files["json"].write_text(json.dumps(report, indent=1) + "\n")
    files["markdown"].write_text(markdown(report))
    for path in write_plots(report, folder):
        files[path.stem] = path
    report["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(report, indent=1) + "\n")
    return files
