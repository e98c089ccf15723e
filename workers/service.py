"""``streamvlm serve``: Redis jobs → clip actors (decode + prune) → LLM workers (batched FastV) → Redis results.

The driver process owns every Redis write; actors only compute. Per running job, one asyncio task:

    open source on an idle clip actor (from the job's checkpoint)
    loop: clip actor → meta + kept tokens (an ObjectRef: the tokens go actor → LLM worker directly)
          LLM worker → answer → store_result (idempotent per window) → next
    finish: done | failed (bad input: never retried) | cancelled; or, if an actor died, give the job
    back for another delivery (it resumes from its checkpoint; after max_deliveries → dead letter).

Backpressure: at most ``max_active_jobs`` jobs run per service process (the rest wait in Redis, not
in memory), each with at most one clip in flight ahead of the LLM; live sources drop their oldest
frames when their buffer is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import redis
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from transformers import AutoConfig

from pipeline.connect import client_url, job_queue, make_client, redacted_url, start_embedded
from pipeline.demo_model import demo_model_path
from pipeline.jobs import effective_generation, effective_pruning
from pipeline.queue import JOB_FIELD, Accepted, Delivery, JobQueue
from pipeline.redis_server import EmbeddedRedis
from pipeline.schemas import JobState, SourceEvent, WindowResult
from pipeline.settings import Settings
from pipeline.sources import SourceError
from workers.clip_actor import clip_actor_class
from workers.llm_worker import llm_worker_actor
from workers.metrics import HealthServer, ServiceMetrics

log = logging.getLogger("streamvlm.service")

# Errors of the job's own making: retrying cannot help, the job fails at once with the message.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (SourceError, ValueError)
# The actor died or vanished mid-call: the job is given back and redelivered.
ACTOR_LOST: tuple[type[BaseException], ...] = (ActorDiedError, ActorUnavailableError, RayActorError)
# How often a job waiting for its next clip looks for a cancel request.
CANCEL_POLL_S = 0.5
# Redis went away mid-job (the client's own retries with backoff ran out).
REDIS_LOST: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)


class ServiceStartError(RuntimeError):
    """The service cannot start as configured (resources, model, Redis)."""


@dataclass
class _Running:
    accepted: Accepted
    task: asyncio.Task
    clip_actor: Any = None  # the decode actor serving the job, once it has one
    started: float = field(default_factory=time.monotonic)


class Service:
    def __init__(self, settings: Settings, consumer: str | None = None) -> None:
        self.settings = settings
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = ServiceMetrics()
        self.embedded: EmbeddedRedis | None = None
        self.redis_url = ""
        self.queue: JobQueue | None = None
        self.health_server: HealthServer | None = None
        self.running: dict[str, _Running] = {}
        # Entries read from the stream (pending to this consumer) and not started yet: the lookahead
        # inside which a higher priority goes first. Bounded by workers.priority_lookahead.
        self._held: list[Delivery] = []
        self._stopping = asyncio.Event()
        self._idle_clip_actors: asyncio.Queue | None = None
        self._maybe_restarting: set[int] = set()  # id() of clip actors that died under a job: probed before reuse
        self._llm_cycle: Any = None
        self.llm_workers: list[Any] = []
        self.clip_actors: list[Any] = []
        self.model_config: Any = None

    # -- start / stop ------------------------------------------------------------------------------
    def start(self) -> Service:
        s = self.settings
        if s.redis.url is None:
            self.embedded = start_embedded(s)
            self.redis_url = client_url(s)
        else:
            self.redis_url = s.redis.url.get_secret_value()
        self.queue = job_queue(s, make_client(self.redis_url), self.consumer)
        self.queue.ensure_group()

        model_path = str(s.model.path or demo_model_path())
        self.model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=s.model.trust_remote_code)
        if not ray.is_initialized():
            address = s.ray.address or os.environ.get("RAY_ADDRESS")
            ray.init(address=address, num_cpus=None if address else s.ray.num_cpus,
                     include_dashboard=s.ray.include_dashboard, dashboard_host=s.ray.dashboard_host,
                     log_to_driver=False, configure_logging=False)
        w = s.workers
        llm_cls = llm_worker_actor(w.llm_num_gpus, w.llm_num_cpus, w.llm_resources, w.max_restarts)
        self.llm_workers = [
            llm_cls.remote(model_path, s.model.device, s.model.dtype, s.model.trust_remote_code,
                           w.max_batch_size, w.max_batch_wait_ms, w.torch_threads)
            for _ in range(w.llm_workers)
        ]
        clip_cls = clip_actor_class(w.clip_num_cpus, w.max_restarts)
        self.clip_actors = [clip_cls.remote(s, model_path) for _ in range(w.max_active_jobs)]
        self._check_resources()
        # Wait until every actor has loaded its model, so a broken checkpoint fails start-up, not jobs.
        try:
            ray.get([a.pid.remote() for a in self.llm_workers + self.clip_actors], timeout=s.workers.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ServiceStartError(
                f"the actors did not start within workers.start_timeout_s={s.workers.start_timeout_s:g} s; "
                f"cluster resources: {ray.cluster_resources()}") from None
        self._llm_cycle = itertools.cycle(self.llm_workers)
        if s.service.health_port:
            self.health_server = HealthServer(self.metrics, self.health, s.service.health_host,
                                              s.service.health_port).start()
        return self

    def _check_resources(self) -> None:
        w = self.settings.workers
        need = {"CPU": w.llm_workers * w.llm_num_cpus + w.max_active_jobs * w.clip_num_cpus,
                "GPU": w.llm_workers * w.llm_num_gpus}
        for name, amount in w.llm_resources.items():
            need[name] = need.get(name, 0.0) + w.llm_workers * amount
        have = ray.cluster_resources()
        short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
        if short:
            detail = ", ".join(f"{k}: need {v:g}, cluster has {h:g}" for k, (v, h) in short.items())
            raise ServiceStartError(
                f"the Ray cluster cannot hold the configured actors ({detail}); lower workers.max_active_jobs, "
                "workers.clip_num_cpus, workers.llm_num_cpus or workers.llm_workers, or add nodes")

    def stop(self) -> None:
        self._stopping.set()
        if self.health_server is not None:
            self.health_server.stop()
            self.health_server = None
        for actor in self.llm_workers + self.clip_actors:
            ray.kill(actor, no_restart=True)
        self.llm_workers, self.clip_actors = [], []
        if self.queue is not None:
            self.queue.r.close()
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None

    def health(self) -> dict[str, Any]:
        try:
            redis_ok = bool(self.queue and self.queue.r.ping())
        except Exception:  # noqa: BLE001 - health reports, never raises
            redis_ok = False
        return {"status": "ok" if redis_ok and self.llm_workers else "degraded", "redis": redis_ok,
                "jobs_running": len(self.running), "llm_workers": len(self.llm_workers),
                "clip_actors": len(self.clip_actors), "consumer": self.consumer}

    # -- main loop ---------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> None:
        assert self.queue is not None, "start() first"
        self._stopping = stop or self._stopping
        self._idle_clip_actors = asyncio.Queue()
        for actor in self.clip_actors:
            self._idle_clip_actors.put_nowait(actor)
        heartbeat = asyncio.create_task(self._heartbeats())
        w = self.settings.workers
        try:
            while not self._stopping.is_set():
                free = w.max_active_jobs - len(self.running)
                room = w.priority_lookahead - len(self._held)
                if room > 0:
                    # Block only when there is nothing else to do: no held job waits for a free slot.
                    block_ms = None if (self._held and free > 0) else (500 if free > 0 else 100)
                    try:
                        self._held.extend(await asyncio.to_thread(self.queue.fetch, room, block_ms))
                        self.metrics.queue_depth.set(self.queue.depth())
                    except Exception as exc:  # noqa: BLE001 - Redis away: back off, keep serving once it returns
                        log.warning("fetching jobs failed: %s", exc)
                        await asyncio.sleep(1.0)
                        continue
                elif free <= 0:
                    await asyncio.sleep(0.05)
                while free > 0 and self._held:
                    # Highest priority first; among equals, the oldest entry (stream ids grow with time).
                    delivery = max(self._held, key=_start_order)
                    try:
                        started = self._start(delivery)
                    except REDIS_LOST as exc:  # still pending to us: keep it held and try again later
                        log.warning("starting a job failed: %s", exc)
                        await self._redis_back()
                        break
                    except Exception as exc:  # noqa: BLE001 - one bad entry must not stop the service
                        log.exception("could not start entry %s; failing it", delivery.entry_id)
                        try:
                            self.queue.finish(f"entry-{delivery.entry_id}", delivery.entry_id, JobState.failed,
                                              f"internal error while starting the job: {_message(exc)}")
                        except Exception:  # noqa: BLE001 - left pending: reclaimed after the lease
                            log.exception("could not fail entry %s either", delivery.entry_id)
                        started = False
                    self._held.remove(delivery)
                    if started:
                        free -= 1
        finally:
            heartbeat.cancel()
            for delivery in self._held:  # not started: give them back for anyone, now
                try:
                    self.queue.release(delivery.entry_id)
                except REDIS_LOST:  # then the lease runs out and another consumer claims them
                    break
            self._held.clear()
            for r in list(self.running.values()):
                r.task.cancel()
            await asyncio.gather(*(r.task for r in self.running.values()), return_exceptions=True)

    def _start(self, delivery: Delivery) -> bool:
        assert self.queue is not None
        accepted = self.queue.accept(delivery)
        if accepted is None:
            return False
        job_id = accepted.job.job_id
        log.info("job running (delivery %d, from window %d)", accepted.status.deliveries,
                 accepted.status.checkpoint, extra={"job_id": job_id, "state": "running"})
        task = asyncio.create_task(self._run_job(accepted), name=f"job {job_id}")
        self.running[job_id] = _Running(accepted, task)
        self.metrics.jobs_running.set(len(self.running))
        return True

    async def _heartbeats(self) -> None:
        assert self.queue is not None
        while True:
            await asyncio.sleep(self.settings.queue.heartbeat_s)
            for delivery in list(self._held):  # read but not started: ours until the lease runs out
                try:
                    owned = await asyncio.to_thread(self.queue.heartbeat, delivery.entry_id)
                except Exception:  # noqa: BLE001 - Redis away: the next beat retries
                    continue
                if not owned and delivery in self._held:
                    self._held.remove(delivery)
            for job_id, r in list(self.running.items()):
                try:
                    owned = await asyncio.to_thread(self.queue.heartbeat, r.accepted.entry_id)
                except Exception as exc:  # noqa: BLE001 - Redis away: the next beat retries
                    log.warning("heartbeat failed: %s", exc, extra={"job_id": job_id})
                    continue
                if not owned:
                    log.warning("job %s: reclaimed by another consumer; stopping here", job_id, extra={"job_id": job_id})
                    r.task.cancel()

    async def _run_job(self, accepted: Accepted) -> None:
        job_id = accepted.job.job_id
        try:
            await self._job_steps(accepted)
        except asyncio.CancelledError:
            if self._stopping.is_set():  # shutting down: hand the job on now, not after the lease
                with contextlib.suppress(*REDIS_LOST):
                    self.queue.release(accepted.entry_id)
            raise
        except REDIS_LOST as exc:
            # Nothing was acknowledged: the entry stays pending to us. Give it back as soon as Redis
            # answers again; if even that fails, the lease runs out and XAUTOCLAIM hands it on.
            log.warning("Redis unreachable (%s); the job is given back once it returns", exc,
                        extra={"job_id": job_id})
            await self._redis_back()
            try:
                await asyncio.to_thread(self.queue.release, accepted.entry_id)
            except REDIS_LOST:
                pass
        finally:
            # Every way out frees the slot, or a job that ended early would hold it for good. Only our own
            # entry: the same job id may have been started again (redelivered to us) meanwhile.
            current = self.running.get(job_id)
            if current is not None and current.task is asyncio.current_task():
                del self.running[job_id]
            self.metrics.jobs_running.set(len(self.running))

    async def _job_steps(self, accepted: Accepted) -> None:
        q = self.queue
        assert q is not None and self._idle_clip_actors is not None
        job, entry = accepted.job, accepted.entry_id
        try:
            config = effective_pruning(job, self.settings, self.model_config)
            gen = effective_generation(job, self.settings)
        except ValueError as exc:
            self._end(job.job_id, entry, JobState.failed, f"invalid job: {exc}")
            return
        if job.deadline is not None and time.time() > job.deadline.timestamp():
            self._end(job.job_id, entry, JobState.failed, "deadline passed before the job started")
            return
        actor = await self._idle_clip_actors.get()
        self.running[job.job_id].clip_actor = actor
        closed = False  # the actor closed the source itself (after a job's last clip)
        try:
            next_clip = await self._open(actor, job, accepted.status.checkpoint)
            while True:
                if job.deadline is not None and time.time() > job.deadline.timestamp():
                    self._end(job.job_id, entry, JobState.failed, "deadline passed before the job finished")
                    return
                meta_ref, tokens_ref = next_clip
                meta = await self._next_meta(actor, meta_ref, job.job_id)
                closed = meta["closed"]
                self._publish_events(job.job_id, meta["events"])
                if q.cancel_requested(job.job_id):  # once per window (an "end" may be the stop's doing)
                    self._end(job.job_id, entry, JobState.cancelled, "cancelled by request")
                    return
                if meta["end"]:
                    break
                if job.kind == "caption":
                    next_clip = actor.next_clip.remote()  # decode the next window while the LLM works
                llm = next(self._llm_cycle)
                answer = await llm.generate.remote(tokens_ref, job.text, config, gen.max_new_tokens,
                                                   gen.temperature)
                result = self._result(job.job_id, meta, answer)
                final = job.kind == "ask"
                await self._store(result, entry, final)
                log.info("window %d stored", meta["window_index"],
                         extra={"job_id": job.job_id, "window": meta["window_index"]})
                self._observe(meta, answer)
                if final:
                    self.metrics.jobs.labels(JobState.done.value).inc()
                    log.info("job done", extra={"job_id": job.job_id, "state": JobState.done.value})
                    return
            self._end(job.job_id, entry, JobState.done)
        except asyncio.CancelledError:
            actor.stop.remote()
            raise
        except PERMANENT_ERRORS as exc:
            self._end(job.job_id, entry, JobState.failed, _message(exc))
        except ACTOR_LOST as exc:
            log.warning("an actor died (%s); giving the job back", type(exc).__name__,
                        extra={"job_id": job.job_id})
            q.note_error(job.job_id, f"worker died: {type(exc).__name__}")
            q.release(entry)
            self.metrics.redeliveries.inc()
            self._maybe_restarting.add(id(actor))
        except RayTaskError as exc:  # an unexpected error inside an actor: retried up to max_deliveries
            log.exception("failed in an actor; the job will be retried", extra={"job_id": job.job_id})
            q.note_error(job.job_id, _message(exc))
            q.release(entry)
            self.metrics.redeliveries.inc()
        finally:
            if not closed:
                actor.close.remote()
            self._idle_clip_actors.put_nowait(actor)

    async def _open(self, actor: Any, job: Any, first_window: int) -> Any:
        """Submit ``open`` (which cuts the first clip) on ``actor``; returns its (meta, tokens) refs. An actor
        that lost a job to a crash may still be restarting: it is waited for first, since the new job has
        done nothing wrong and must not spend one of its ``max_deliveries`` on it. Other actors are not
        probed (a round trip per job). A crash during ``open`` itself is the job's, and propagates."""
        if id(actor) in self._maybe_restarting:
            deadline = time.monotonic() + self.settings.workers.start_timeout_s
            delay_s = 0.25
            while True:
                try:
                    await actor.pid.remote()
                    break
                except ActorUnavailableError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(delay_s)
                    delay_s = min(2 * delay_s, 5.0)
            self._maybe_restarting.discard(id(actor))
        return actor.open.remote(job, first_window)

    async def _next_meta(self, actor: Any, meta_ref: Any, job_id: str) -> dict[str, Any]:
        """The clip's meta. Meanwhile a cancel is looked for every ``CANCEL_POLL_S`` and passed to the actor,
        whose ``stop`` runs beside the blocked call: a live window that may never come (the camera is gone,
        the source keeps reconnecting) must not hold a cancelled job."""
        assert self.queue is not None
        meta = asyncio.wrap_future(meta_ref.future())
        while True:
            done, _ = await asyncio.wait({meta}, timeout=CANCEL_POLL_S)
            if done:
                return meta.result()
            # Repeated every poll: a stop that lands while open() is still connecting finds no clips to stop.
            if await asyncio.to_thread(self.queue.cancel_requested, job_id):
                actor.stop.remote()

    async def _store(self, result: WindowResult, entry: str, final: bool) -> None:
        """Store a window's result, waiting out a Redis outage: the script stores each window at most once,
        so repeating it after a lost reply is safe, and the computed answer is not thrown away."""
        assert self.queue is not None
        while True:
            try:
                await asyncio.to_thread(self.queue.store_result, result, entry, final)
                return
            except REDIS_LOST as exc:
                log.warning("storing window %d failed (%s); retrying when Redis is back", result.window_index,
                            exc, extra={"job_id": result.job_id})
                await self._redis_back()

    async def _redis_back(self) -> None:
        """Return once Redis answers a PING (the client's own retries back off between attempts)."""
        assert self.queue is not None
        delay_s = 0.5
        while not self._stopping.is_set():
            try:
                if await asyncio.to_thread(self.queue.r.ping):
                    return
            except REDIS_LOST:
                pass
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 5.0)

    # -- helpers -----------------------------------------------------------------------------------
    def _end(self, job_id: str, entry: str, state: JobState, error: str = "") -> None:
        assert self.queue is not None
        self.queue.finish(job_id, entry, state, error)
        self.metrics.jobs.labels(state.value).inc()
        log.info("job %s%s", state.value, f": {error}" if error else "",
                 extra={"job_id": job_id, "state": state.value})

    def _result(self, job_id: str, meta: dict[str, Any], answer: Any) -> WindowResult:
        timings = {**meta["timings_s"], **answer.timings_s}
        return WindowResult(
            job_id=job_id, window_index=meta["window_index"], start_s=meta["start_s"], end_s=meta["end_s"],
            frame_times_s=meta["frame_times_s"], text=answer.text, visual_tokens_in=answer.visual_tokens_in,
            visual_tokens_kept=answer.visual_tokens_kept, flops_ratio=answer.flops_ratio, timings_s=timings,
            frames_dropped=meta["frames_dropped"], gap_before_s=meta["gap_before_s"], worker=self.consumer,
        )

    def _observe(self, meta: dict[str, Any], answer: Any) -> None:
        m = self.metrics
        for stage, seconds in {**meta["timings_s"], **answer.timings_s}.items():
            m.stage_seconds.labels(stage.removesuffix("_s")).observe(seconds)
        m.windows.inc()
        m.batch_size.observe(answer.batch_size)
        m.visual_tokens_in.inc(answer.visual_tokens_in)
        m.visual_tokens_kept.inc(answer.visual_tokens_kept)
        m.flops_saved.inc(max(0.0, 1.0 - answer.flops_ratio))
        m.dropped_frames.inc(meta["frames_dropped"])

    def _publish_events(self, job_id: str, events: list[Any]) -> None:
        assert self.queue is not None
        for ev in events:
            out = SourceEvent(job_id=job_id, kind=ev.status.value, reason=ev.reason, at=ev.wall_time)
            self.queue.r.xadd(self.queue.keys.job_events(job_id), {"event": out.model_dump_json()},
                              maxlen=self.settings.queue.stream_maxlen, approximate=True)
            self.metrics.source_events.labels(out.kind).inc()


def _priority(delivery: Delivery) -> int:
    """The job's priority, read without full validation; an unreadable job goes first, to fail fast."""
    try:
        value = json.loads((delivery.fields or {}).get(JOB_FIELD, "")).get("priority", 0)
    except (ValueError, AttributeError, RecursionError):  # RecursionError: JSON nested too deep
        return 10
    return value if isinstance(value, int) and 0 <= value <= 9 else 10


def _start_order(delivery: Delivery) -> tuple[int, int, int]:
    """Sort key: priority, then the older entry (stream ids are ``ms-seq`` and grow with time)."""
    ms, _, seq = delivery.entry_id.partition("-")
    return _priority(delivery), -int(ms), -int(seq or 0)


def _message(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {cause}"


def serve_forever(settings: Settings) -> None:
    """Run the service until SIGINT/SIGTERM."""
    import signal

    from workers.logs import configure

    configure(settings.service.log_level)
    service = Service(settings).start()
    where = redacted_url(service.redis_url) + (" (embedded, data in " + str(Path(settings.redis.embedded_dir).resolve()) + ")"
                                 if service.embedded else "")
    print(f"streamvlm serve: Redis at {where}; consumer {service.consumer}", flush=True)
    if service.health_server is not None:
        host, port = service.health_server.address
        print(f"streamvlm serve: health on http://{host}:{port}/health, metrics on /metrics", flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await service.run(stop)

    try:
        asyncio.run(main())
    finally:
        service.stop()
