"""Configs B–D: one started service on the bench's own Redis, driven in a background thread; the closed loop
of ask jobs and the caption jobs on timed loopback cameras."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pipeline.synthetic import VIDEO_FPS as FPS
from pipeline.synthetic import VIDEO_REPEAT as REPEAT
from workers.bench.plan import BenchError, Plan
from workers.bench.records import FileRecord, LiveRecord, Sample, Seen


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
