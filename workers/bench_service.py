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
       ``streamvlm eval --video h264``, the clips read as the service reads them, on the demo model's 750
       held-out questions: redundancy 51.1%, uniform 49.6%; on rendered frames they tie, 50.7 / 50.8%),
       kept tokens at their original positions (the service's default).
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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing
import os
import pickle
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.synthetic import HELD_OUT_SEED, VALIDATION_SEED
from pipeline.synthetic import VIDEO_FPS as FPS
from pipeline.synthetic import VIDEO_REPEAT as REPEAT

CONFIGS = ("A", "B", "C", "D")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class BenchUsageError(ValueError):
    """A bad option value; the message names the option."""


class BenchError(RuntimeError):
    """The benchmark could not measure what it set out to (a job failed, a wait timed out)."""


# -- what runs ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    clips: int = 750  # the whole held-out set, as `streamvlm eval` scores it
    rounds: int = 4
    concurrency: int = 8
    max_active_jobs: int = 8
    streams: tuple[int, ...] = (1, 2, 4, 8)
    live_windows: int = 4
    window_s: float = 4.0
    stride_s: float = 2.0
    answer_tokens: int = 8  # answers are one word and </s>; eval uses 8 too
    caption_tokens: int = 32
    reduction: float = 0.9
    strategy: str = "redundancy"
    fastv_k: int = 2
    fastv_ratio: float = 0.5
    baseline_threads: int = 1
    probe_clips: int = 3
    first_clip: int = 0
    quick: bool = False

    def pruning(self, config: str) -> dict[str, Any] | str:
        """The job's ``pruning`` field for a service configuration."""
        if config == "B":
            return "off"
        cls = {"encoder_method": "cls", "encoder_reduction": self.reduction, "temporal_strategy": self.strategy}
        if config == "C":
            return {**cls, "fastv_ratio": 0.0}
        if config == "D":
            return {**cls, "fastv_k": self.fastv_k, "fastv_ratio": self.fastv_ratio}
        raise ValueError(f"config {config!r} does not run on the service")

    def label(self, config: str) -> str:
        return {
            "A": "transformers generate, unpruned, one at a time",
            "B": "streamvlm, pruning off",
            "C": f"streamvlm, [CLS] {100 * self.reduction:g}% {self.strategy}",
            "D": f"streamvlm, [CLS] {100 * self.reduction:g}% {self.strategy} + FastV K={self.fastv_k} "
                 f"R={100 * self.fastv_ratio:g}%",
        }[config]


QUICK = Plan(clips=8, rounds=1, concurrency=2, max_active_jobs=2, streams=(1, 2), live_windows=2, window_s=2.0,
             stride_s=2.0, caption_tokens=16, probe_clips=1, quick=True)


# -- config A: a user's own script, in a process of its own ------------------------------------------------
class _FirstTokenClock:
    """A transformers streamer that only notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:  # generate() puts the prompt first, then each new token
            self.first_token = time.perf_counter()

    def end(self) -> None:
        pass


class PlainGenerate:
    """Config A: PyAV + the checkpoint's preprocessing + ``model.generate``, one request at a time."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto", threads: int | None = 1) -> None:
        import torch

        from pipeline.inference import VideoQA

        if threads:
            torch.set_num_threads(threads)
        self.qa = VideoQA.load(model_path, device=device, dtype=dtype)
        vision = self.qa.model.config.vision_config
        self.tokens_per_frame = (vision.image_size // vision.patch_size) ** 2 + 1  # the processor's expansion

    def generate(self, frames: np.ndarray, text: str, max_new_tokens: int) -> tuple[str, float]:
        """(answer, seconds from the call to the first generated token)."""
        import torch

        from pipeline.inference import VIDEO_PROMPT

        start = time.perf_counter()
        qa = self.qa
        pixels = qa.pixel_values(frames)  # [1, T, 3, S, S]
        span = qa.video_token * (frames.shape[0] * self.tokens_per_frame)
        enc = qa.tokenizer([VIDEO_PROMPT.format(video=span, question=text.strip())], return_tensors="pt")
        clock = _FirstTokenClock()
        with torch.no_grad():
            out = qa.model.generate(
                input_ids=enc["input_ids"].to(qa.device), attention_mask=enc["attention_mask"].to(qa.device),
                pixel_values_videos=pixels, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=qa.eos_token_id, pad_token_id=qa.pad_token_id, streamer=clock,
            )
        answer = qa.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        first = clock.first_token if clock.first_token is not None else time.perf_counter()
        return answer, first - start

    @staticmethod
    def read_clip(path: str, frames: int) -> np.ndarray:
        """Every frame of the file with PyAV, then T of them at the segment centres: [T, H, W, 3] uint8."""
        import av

        with av.open(path) as container:
            images = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        if not images:
            raise BenchError(f"{path}: no frames decoded")
        index = ((np.arange(frames) + 0.5) * len(images) / frames).astype(int)
        return np.stack([images[i] for i in index])

    def files(self, items: list[tuple[str, str]], frames: int, max_new_tokens: int) -> list[dict[str, Any]]:
        out = []
        for path, question in items:
            start = time.perf_counter()
            clip = self.read_clip(path, frames)
            decoded = time.perf_counter()
            text, ttft_after_decode = self.generate(clip, question, max_new_tokens)
            done = time.perf_counter()
            out.append({"text": text, "latency_s": done - start, "ttft_s": decoded - start + ttft_after_decode,
                        "decode_s": decoded - start, "generate_s": done - decoded})
        return out

    def live(self, url: str, windows: int, window_s: float, stride_s: float, frames: int, prompt: str,
             max_new_tokens: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Caption windows [k·stride, k·stride + window) of a live stream, read and answered in one loop."""
        import av

        results: list[dict[str, Any]] = []
        buffer: list[tuple[float, np.ndarray]] = []
        origin: float | None = None
        # The same low-latency probing the service's live sources use (pipeline/sources/policy.py), so both
        # readers see their first frame equally soon.
        options = {"analyzeduration": "1000000", "probesize": "1000000"}
        with av.open(url, timeout=timeout_s, options=options) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * stream.time_base)
                origin = t if origin is None else origin
                buffer.append((t - origin, frame.to_ndarray(format="rgb24")))
                arrived = time.time()
                k = len(results)
                while k < windows and buffer[-1][0] >= k * stride_s + window_s:  # window k is complete
                    start = k * stride_s
                    targets = start + (np.arange(frames) + 0.5) * (window_s / frames)
                    stamps = np.array([s for s, _ in buffer])
                    pick = np.clip(np.searchsorted(stamps, targets + 1e-9, side="right") - 1, 0, len(buffer) - 1)
                    text, _ = self.generate(np.stack([buffer[i][1] for i in pick]), prompt, max_new_tokens)
                    results.append({"window_index": k, "end_s": start + window_s, "seen_wall": time.time(),
                                    "text": text, "frames_dropped": 0, "frame_t": buffer[-1][0],
                                    "frame_wall": arrived})
                    k += 1
                    buffer = [b for b in buffer if b[0] >= k * stride_s - 1.0 / FPS]
                if len(results) >= windows:
                    break
        return results


def _baseline_child(conn: Any, model_path: str, device: str, dtype: str, threads: int | None) -> None:
    try:
        user = PlainGenerate(model_path, device, dtype, threads)
        conn.send(("ready", os.getpid()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        name, kwargs = conn.recv()
        if name == "stop":
            return
        try:
            conn.send(("ok", getattr(user, name)(**kwargs)))
        except Exception:  # noqa: BLE001 - reported to the parent, which raises it
            conn.send(("error", traceback.format_exc()))


class BaselineProcess:
    """Config A's process, driven over a pipe: spawned (a fresh interpreter, as a user's script is)."""

    def __init__(self, model_path: str, device: str, dtype: str, threads: int | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_baseline_child, args=(child, model_path, device, dtype, threads),
                                    name="bench-baseline", daemon=True)
        self.pid: int | None = None

    def start(self) -> BaselineProcess:
        self._process.start()
        return self

    def _receive(self, timeout_s: float, what: str) -> Any:
        if not self._conn.poll(timeout_s):
            raise BenchError(f"config A's process did not answer {what} within {timeout_s:g} s")
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise BenchError(f"config A's process died during {what} (exit code {self._process.exitcode})") from None
        if status == "error":
            raise BenchError(f"config A's process failed in {what}:\n{value}")
        return value

    def wait_ready(self, timeout_s: float = 300.0) -> int:
        self.pid = self._receive(timeout_s, "start-up")
        return self.pid

    def call(self, name: str, timeout_s: float, **kwargs: Any) -> Any:
        self._conn.send((name, kwargs))
        return self._receive(timeout_s, name)

    def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(("stop", {}))
            self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()  # our own child, by its handle
            self._process.join(timeout=5)
        self._conn.close()


# -- the live cameras ----------------------------------------------------------------------------------------
def timed_camera(first_clip: int):
    """A loopback camera that notes the wall time of every connection (its frame 0 is sent then)."""
    from pipeline.loopback import LoopbackCamera, held_out_frames

    class TimedCamera(LoopbackCamera):
        def __init__(self) -> None:
            super().__init__(held_out_frames(first=first_clip, count=16, repeat=REPEAT), fps=FPS)
            self.connections: list[float] = []

        def stream_to(self, wfile: Any) -> None:
            self.connections.append(time.time())
            super().stream_to(wfile)

    return TimedCamera()


# -- process sampling ----------------------------------------------------------------------------------------
class ProcessMonitor:
    """Peak RSS per process role and CPU seconds per role, accumulated per named phase; load average samples."""

    def __init__(self, roles: dict[str, list[int]], totals: dict[str, tuple[str, ...]] | None = None,
                 interval_s: float = 0.25) -> None:
        import psutil

        self.procs: dict[str, list[Any]] = {}
        for role, pids in roles.items():
            self.procs[role] = []
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    self.procs[role].append(psutil.Process(pid))
        self.totals = totals or {}  # name → roles whose RSS is summed per sample (e.g. the whole service)
        self.interval_s = interval_s
        self.current: str | None = None
        self.peak: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.cpu_s: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.wall_s: dict[str, float] = defaultdict(float)
        self.load: dict[str, list[float]] = defaultdict(list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> ProcessMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _sample(self) -> None:
        import psutil

        phase = self.current
        if phase is None:
            return
        with self._lock:
            summed: dict[str, int] = defaultdict(int)
            for role, procs in self.procs.items():
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                    except psutil.Error:
                        continue
                    self.peak[phase][role] = max(self.peak[phase][role], rss)
                    summed[role] += rss
            for name, roles in self.totals.items():
                self.peak[phase][name] = max(self.peak[phase][name], sum(summed[r] for r in roles))
            self.load[phase].append(os.getloadavg()[0])

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _cpu(self) -> dict[str, float]:
        import psutil

        out: dict[str, float] = {}
        for role, procs in self.procs.items():
            total = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    continue
            out[role] = total
        return out

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        before, started = self._cpu(), time.perf_counter()
        self.current = name
        self._sample()
        try:
            yield
        finally:
            self._sample()
            self.current = None
            after = self._cpu()
            with self._lock:
                self.wall_s[name] += time.perf_counter() - started
                for role in after:
                    self.cpu_s[name][role] += after[role] - before.get(role, 0.0)

    def summary(self, name: str) -> dict[str, Any]:
        wall = self.wall_s.get(name, 0.0)
        return {
            "peak_rss_mb": {role: round(v / 2**20, 1) for role, v in self.peak[name].items()},
            "cpu_cores_used": {role: round(v / wall, 3) if wall else None for role, v in self.cpu_s[name].items()},
            "load_1m": _stats(self.load[name]),
            "wall_s": round(wall, 2),
        }


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": round(statistics.fmean(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}


# -- the service -----------------------------------------------------------------------------------------------
def service_settings(base: Any, workdir: Path, media: Path, plan: Plan) -> Any:
    """The caller's settings with the rig's own Redis, media root, local CPU split and the bundled model."""
    s = base.model_copy(deep=True)
    cores = os.cpu_count() or 2
    s.model.path = None  # the held-out questions belong to the bundled demo model
    s.redis.url = None
    s.redis.embedded_dir = workdir / "redis"
    s.sources.allowed_roots = [media]
    s.sources.file_backend = "pyav"  # A decodes with PyAV too: the same decoder on both sides
    s.ray.num_cpus = cores
    s.workers.llm_workers = 1
    s.workers.llm_num_gpus = 0.0
    s.workers.llm_num_cpus = 1.0
    s.workers.max_active_jobs = plan.max_active_jobs
    s.workers.clip_num_cpus = max(cores - 1.0, 0.0) / plan.max_active_jobs
    s.workers.priority_lookahead = max(s.workers.priority_lookahead, plan.concurrency)
    s.workers.torch_threads = 1
    s.service.health_port = 0
    s.service.log_level = "WARNING"
    return s


@dataclass
class Seen:
    """A result as the client saw it."""

    result: Any  # WindowResult
    seen: float  # perf_counter when read from the results stream
    seen_wall: float


class ServiceRig:
    """One started service driven in a background thread, and a Redis client reading its results stream."""

    def __init__(self, settings: Any) -> None:
        import redis

        from pipeline.client import JobClient
        from pipeline.connect import job_queue
        from pipeline.keys import RedisKeys
        from workers.service import Service
        from workers.service_thread import ServiceThread

        self.settings = settings
        self.thread = ServiceThread(Service(settings).start()).start()
        self.service = self.thread.service
        self.r = redis.Redis.from_url(self.service.redis_url)
        self.keys = RedisKeys(settings.redis.key_prefix)
        self.client = JobClient(job_queue(settings, self.r, "bench-client"))  # what `streamvlm submit` uses
        tail = self.r.xrevrange(self.keys.all_results, count=1)
        self._last = tail[0][0] if tail else b"0-0"

    def roles(self) -> dict[str, list[int]]:
        import ray

        return {
            "llm_worker": ray.get([a.pid.remote() for a in self.service.llm_workers], timeout=60),
            "clip_actor": ray.get([a.pid.remote() for a in self.service.clip_actors], timeout=60),
            "driver": [os.getpid()],
            "redis": [int(self.r.info("server")["process_id"])],
        }

    def submit(self, job: dict[str, Any]) -> float:
        from pipeline.schemas import JobRequest

        request = JobRequest.model_validate(job)
        started = time.perf_counter()
        self.client.submit(request)
        return started

    def read(self, block_ms: int = 500) -> list[Seen]:
        from pipeline.schemas import WindowResult

        out = self.r.xread({self.keys.all_results: self._last}, block=block_ms, count=1000)
        now, wall = time.perf_counter(), time.time()
        seen = []
        for _stream, entries in out or []:
            for entry_id, fields in entries:
                self._last = entry_id
                seen.append(Seen(WindowResult.model_validate_json(fields[b"result"]), now, wall))
        return seen

    def state(self, job_id: str) -> tuple[str, str]:
        status = self.client.queue.status(job_id)
        return ("", "") if status is None else (status.state.value, status.error or "")

    def check_alive(self, job_ids: list[str]) -> None:
        if not self.thread.alive():
            raise BenchError("the service loop stopped")
        for job_id in job_ids:
            state, error = self.state(job_id)
            if state == "failed":
                raise BenchError(f"job {job_id} failed: {error}")

    def cancel(self, job_id: str) -> None:
        self.client.queue.cancel(job_id)  # what `streamvlm cancel` does

    def wait_final(self, job_ids: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = set(job_ids)
        while waiting:
            waiting = {j for j in waiting if self.state(j)[0] not in ("done", "failed", "cancelled")}
            if waiting and time.monotonic() > deadline:
                raise BenchError(f"jobs {sorted(waiting)} did not end within {timeout_s:g} s")
            time.sleep(0.1)

    def close(self) -> None:
        self.thread.stop()
        self.r.close()


# -- measurements ------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    index: int  # held-out question index
    path: str
    question: str
    answer: str


@dataclass
class FileRecord:
    index: int
    text: str
    latency_s: float
    ttft_s: float
    visual_tokens_in: int
    visual_tokens_kept: int
    timings_s: dict[str, float] = field(default_factory=dict)


def _with_store(result: Any, seen: Seen) -> dict[str, float]:
    """The result's stage timings plus ``store_notify_s``: the service built the result → the client read it."""
    return {**result.timings_s, "store_notify_s": max(0.0, seen.seen_wall - result.created_at)}


def closed_loop(rig: ServiceRig, samples: list[Sample], pruning: Any, concurrency: int, tag: str,
                max_new_tokens: int, timeout_s: float) -> tuple[list[FileRecord], float]:
    """Ask jobs with ``concurrency`` in flight; returns the records (in sample order) and the wall time."""
    jobs: dict[str, tuple[int, float]] = {}  # job id → (position in samples, submit time)
    records: dict[int, FileRecord] = {}
    upcoming = iter(range(len(samples)))

    def submit_next() -> None:
        i = next(upcoming, None)
        if i is None:
            return
        s = samples[i]
        job_id = f"{tag}-{s.index}"
        jobs[job_id] = (i, rig.submit({"job_id": job_id, "source": s.path, "kind": "ask", "question": s.question,
                                       "pruning": pruning, "generation": {"max_new_tokens": max_new_tokens}}))

    started = time.perf_counter()
    for _ in range(min(concurrency, len(samples))):
        submit_next()
    deadline, next_check = time.monotonic() + timeout_s, time.monotonic() + 2.0
    while len(records) < len(samples):
        for seen in rig.read():
            res = seen.result
            if res.job_id not in jobs or jobs[res.job_id][0] in records:
                continue
            i, submitted = jobs[res.job_id]
            latency = seen.seen - submitted
            records[i] = FileRecord(samples[i].index, res.text, latency,
                                    latency - res.timings_s.get("llm_decode_s", 0.0), res.visual_tokens_in,
                                    res.visual_tokens_kept, _with_store(res, seen))
            submit_next()
        now = time.monotonic()
        if now > next_check:
            rig.check_alive([j for j, (i, _) in jobs.items() if i not in records])
            next_check = now + 2.0
        if now > deadline:
            raise BenchError(f"{tag}: {len(samples) - len(records)} of {len(samples)} answers missing after "
                             f"{timeout_s:g} s")
    elapsed = time.perf_counter() - started  # first submission → last answer seen
    return [records[i] for i in range(len(samples))], elapsed


def baseline_files(baseline: BaselineProcess, samples: list[Sample], max_new_tokens: int, timeout_s: float
                   ) -> tuple[list[FileRecord], float]:
    started = time.perf_counter()
    out = baseline.call("files", timeout_s, items=[(s.path, s.question) for s in samples], frames=8,
                        max_new_tokens=max_new_tokens)
    elapsed = time.perf_counter() - started
    records = [FileRecord(s.index, o["text"], o["latency_s"], o["ttft_s"], 0, 0,
                          {"video_decode_s": o["decode_s"], "generate_s": o["generate_s"]})
               for s, o in zip(samples, out, strict=True)]
    return records, elapsed


@dataclass
class LiveRecord:
    stream: int
    window_index: int
    latency_s: float
    seen_wall: float
    frames_dropped: int
    text: str
    timings_s: dict[str, float] = field(default_factory=dict)
    frame_delay_s: float | None = None  # A only: camera sent the frame that closed the window → reader had it


def live_service(rig: ServiceRig, plan: Plan, pruning: Any, tag: str, streams: int, first_camera: int,
                 timeout_s: float, keep: list[Any]) -> tuple[list[LiveRecord], list[dict[str, Any]]]:
    """``streams`` caption jobs, one camera each, until each has ``plan.live_windows`` windows; then cancelled.

    The cameras go to ``keep`` and stay up until the run ends: a cancelled caption job's clip actor finishes the
    window it had started reading before it is free again, and a camera that vanished would hold it until the
    source's read timeout and reconnections gave up."""
    from pipeline.synthetic import CAPTION_PROMPT

    cameras = [timed_camera(16 * (first_camera + k)).start() for k in range(streams)]
    keep.extend(cameras)
    job_ids = [f"{tag}-cam{k}" for k in range(streams)]
    seen: dict[str, list[Seen]] = {j: [] for j in job_ids}
    for job_id, cam in zip(job_ids, cameras, strict=True):
        rig.submit({"job_id": job_id, "source": cam.url, "kind": "caption", "prompt": CAPTION_PROMPT,
                    "sampling": {"window_s": plan.window_s, "stride_s": plan.stride_s, "frames_per_clip": 8},
                    "pruning": pruning, "generation": {"max_new_tokens": plan.caption_tokens}})
    deadline, next_check = time.monotonic() + timeout_s, time.monotonic() + 2.0
    while any(len(v) < plan.live_windows for v in seen.values()):
        for s in rig.read():
            if s.result.job_id in seen:
                seen[s.result.job_id].append(s)
        now = time.monotonic()
        if now > next_check:
            rig.check_alive(job_ids)
            next_check = now + 2.0
        if now > deadline:
            got = {j: len(v) for j, v in seen.items()}
            raise BenchError(f"{tag}: caption windows missing after {timeout_s:g} s: {got}")
    for job_id in job_ids:
        rig.cancel(job_id)
    rig.wait_final(job_ids, timeout_s=60 + 2 * plan.stride_s + plan.window_s)
    records, cams = [], []
    for k, (job_id, cam) in enumerate(zip(job_ids, cameras, strict=True)):
        if not cam.connections:
            raise BenchError(f"{tag}: camera {k} was never connected to")
        origin = cam.connections[0]
        for s in seen[job_id][: plan.live_windows]:
            r = s.result
            records.append(LiveRecord(k, r.window_index, s.seen_wall - (origin + r.end_s), s.seen_wall,
                                      r.frames_dropped, r.text, _with_store(r, s)))
        cams.append({"connections": len(cam.connections)})
    return records, cams


def baseline_live(baseline: BaselineProcess, plan: Plan, first_camera: int, timeout_s: float) -> list[LiveRecord]:
    from pipeline.synthetic import CAPTION_PROMPT

    cam = timed_camera(16 * first_camera).start()
    try:
        out = baseline.call("live", timeout_s, url=cam.url, windows=plan.live_windows, window_s=plan.window_s,
                            stride_s=plan.stride_s, frames=8, prompt=CAPTION_PROMPT,
                            max_new_tokens=plan.caption_tokens)
    finally:
        cam.stop()
    origin = cam.connections[0]
    return [LiveRecord(0, o["window_index"], o["seen_wall"] - (origin + o["end_s"]), o["seen_wall"],
                       o["frames_dropped"], o["text"], frame_delay_s=o["frame_wall"] - (origin + o["frame_t"]))
            for o in out]


# -- what a clip actor ships, and what the KV cache holds -------------------------------------------------------
class ShipProbe:
    """``ClipActor`` (the class the service's actors run) in this process: the kept tokens exactly as shipped."""

    def __init__(self, settings: Any, model_path: str) -> None:
        from workers.clip_actor import ClipActor

        self.actor = ClipActor(settings, model_path)
        self.qa = self.actor.qa

    def shipped(self, sample: Sample, pruning: Any) -> dict[str, int]:
        from pipeline.schemas import JobRequest

        job = JobRequest.model_validate({"source": sample.path, "kind": "ask", "question": sample.question,
                                         "pruning": pruning})
        try:
            meta, tokens = self.actor.open(job, 0)
        finally:
            self.actor.close()
        return {"bytes": int(meta["bytes_shipped"]), "features_nbytes": int(tokens.features.nbytes),
                "pickled_bytes": len(pickle.dumps(tokens, protocol=5)), "kept": int(tokens.lengths[0]),
                "tokens_in": int(tokens.tokens_in)}

    def text_tokens(self, question: str) -> int:
        """Prompt tokens other than the video span, for this question in the inference template."""
        from pipeline.inference import VIDEO_PROMPT

        ids = self.qa.tokenizer(VIDEO_PROMPT.format(video=self.qa.video_token, question=question.strip()))["input_ids"]
        return len(ids) - 1


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @classmethod
    def from_model(cls, model: Any) -> KVShape:
        text = model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        dtype = next(model.parameters()).dtype
        return cls(text.num_hidden_layers, kv_heads, head_dim, dtype.itemsize)


def kv_tokens_per_layer(shape: KVShape, text_tokens: int, visual_kept: int, fastv_k: int, fastv_ratio: float
                        ) -> list[int]:
    """Tokens each decoder layer caches for one prompt: FastV's layers ≥ K drop round(R · visual) of them."""
    low = text_tokens + visual_kept
    if fastv_ratio <= 0:
        return [low] * shape.layers
    high = text_tokens + visual_kept - int(round(fastv_ratio * visual_kept))
    return [low] * fastv_k + [high] * (shape.layers - fastv_k)


def kv_cache_bytes(shape: KVShape, tokens_per_layer: list[int]) -> int:
    return sum(2 * shape.kv_heads * shape.head_dim * shape.dtype_bytes * n for n in tokens_per_layer)


# -- summaries ------------------------------------------------------------------------------------------------
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


# -- the run -----------------------------------------------------------------------------------------------------
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


def write_media(media: Path, indices: list[int], seed: int = HELD_OUT_SEED, prefix: str = "clip") -> list[Sample]:
    """Questions ``indices`` of the held-out set (or of another ``seed``'s set) as H.264 files."""
    from pipeline.loopback import write_clip
    from pipeline.synthetic import held_out_sample

    samples = []
    for i in indices:
        sample = held_out_sample(i, seed=seed)
        path = media / f"{prefix}{i:04d}.mp4"
        write_clip(path, sample.clip.frames)
        samples.append(Sample(i, str(path), sample.qa.question, sample.qa.answer))
    return samples


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


# -- the report -------------------------------------------------------------------------------------------------
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


# -- command line -----------------------------------------------------------------------------------------------
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
    p = argparse.ArgumentParser(prog="python -m workers.bench_service", description=__doc__.splitlines()[0])
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
