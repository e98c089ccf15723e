"""``streamvlm bench reliability``: the fault and load scenarios of docs/reliability.md, provoked and measured.

Every scenario drives a real service: an embedded redis-server (AOF on, on a fixed port so that it can be
stopped and restarted), local Ray, the bundled demo model, H.264 files and a loopback camera. Each returns
one ``Row``: jobs submitted, jobs lost (not in their expected final state), duplicate and missing windows,
entries left pending, recovery time, and its own measurements under ``detail``. The tests in
tests/reliability run the same functions at small sizes and assert on the rows; this command runs them at
the sizes docs/reliability.md reports.

    streamvlm bench reliability [--quick] [--only NAME ...] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import ray

from pipeline.connect import job_queue, make_client
from pipeline.keys import RedisKeys
from pipeline.loopback import write_video
from pipeline.redis_server import EmbeddedRedis, free_port
from pipeline.schemas import WindowResult
from pipeline.settings import Settings, load_settings
from pipeline.synthetic import held_out_sample
from workers.service import Service
from workers.service_thread import ServiceThread

FPS, REPEAT = 8, 4  # a held-out clip's 8 frames, each shown 4 times at 8 fps: 4 s of video per clip
CLIP_S = 8 * REPEAT / FPS
FINAL = ("done", "failed", "cancelled")

# Settings for a fault rig: short lease and heartbeat so that reclaims happen within a test's patience.
RIG_SETTINGS = {
    "sources.file_backend": "pyav",
    "ray.num_cpus": "2",
    "workers.torch_threads": "1",
    "workers.max_active_jobs": "3",
    "workers.clip_num_cpus": "0.25",
    "workers.llm_num_cpus": "0.5",
    "workers.max_batch_wait_ms": "50",
    "queue.lease_s": "10",
    "queue.heartbeat_s": "1",
    "queue.max_deliveries": "3",
    "sources.open_timeout_s": "5",
    "sources.read_timeout_s": "2",
    "sources.reconnect_backoff_s": "0.2",
    "sources.reconnect_backoff_max_s": "1",
    "sources.reconnect_attempts": "30",
    "service.health_port": "0",
}


@dataclass
class Row:
    scenario: str
    jobs: int
    lost: int  # jobs not in their expected final state
    duplicates: int  # windows stored more than once
    missing: int  # windows expected but never stored
    pending_after: int  # jobs-stream entries still pending once everything settled
    recovery_s: float | None = None  # fault → next stored result
    detail: dict[str, Any] = field(default_factory=dict)


class FaultRig:
    """A Redis server we can stop, and (unless ``service=False``) a service on it in a background thread."""

    def __init__(self, workdir: Path, overrides: dict[str, str] | None = None, service: bool = True) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis_server = EmbeddedRedis(self.workdir / "redis").start()
        settings = {**RIG_SETTINGS, "redis.url": self.redis_server.url,
                    "sources.allowed_roots": f"[{self.workdir}]", **(overrides or {})}
        self.overrides = settings
        self.settings: Settings = load_settings(overrides=[f"{k}={v}" for k, v in settings.items()])
        self.keys = RedisKeys(self.settings.redis.key_prefix)
        self.r = make_client(self.redis_server.url)
        self.queue = job_queue(self.settings, self.r, "bench-reliability-client")  # the client side only
        self.thread: ServiceThread | None = None
        if service:
            self.thread = ServiceThread(Service(self.settings).start()).start()

    @property
    def service(self) -> Service:
        assert self.thread is not None, "this rig runs no service"
        return self.thread.service

    def close(self) -> None:
        if self.thread is not None:
            self.thread.stop()
        self.r.close()
        self.redis_server.stop()

    # -- media and jobs ------------------------------------------------------------------------
    def caption_file(self, name: str, clips: int, first: int = 0) -> Path:
        """``clips`` held-out clips back to back: that many caption windows of CLIP_S."""
        path = self.workdir / name
        if not path.exists():
            frames = np.concatenate([np.repeat(held_out_sample(i).clip.frames, REPEAT, axis=0)
                                     for i in range(first, first + clips)])
            write_video(path, frames, fps=FPS)
        return path

    def submit(self, job: dict[str, Any]) -> str:
        self.r.xadd(self.keys.jobs, {"job": json.dumps(job)})
        return job["job_id"]

    def submit_caption(self, job_id: str, source: str | Path, **extra: Any) -> str:
        return self.submit({"job_id": job_id, "source": str(source), "kind": "caption",
                            "sampling": {"window_s": CLIP_S, "stride_s": CLIP_S}, **extra})

    def submit_ask(self, job_id: str, source: str | Path, index: int = 0) -> str:
        return self.submit({"job_id": job_id, "source": str(source), "kind": "ask",
                            "question": held_out_sample(index).qa.question})

    # -- observing -----------------------------------------------------------------------------
    def state(self, job_id: str) -> dict[str, str]:
        return {_s(k): _s(v) for k, v in self.r.hgetall(self.keys.job(job_id)).items()}

    def windows(self, job_id: str) -> list[WindowResult]:
        return [result for _, result in self.queue.results(job_id)]

    def wait_windows(self, job_id: str, count: int, timeout_s: float = 300) -> None:
        def ready() -> bool:
            if len(self.windows(job_id)) >= count:
                return True
            state = self.state(job_id)
            if state.get("state") in FINAL:
                raise RuntimeError(f"{job_id} ended with fewer than {count} windows: {state}")
            return False

        self._wait(ready, timeout_s, f"{job_id}: {count} windows")

    def wait_final(self, job_ids: Iterable[str], timeout_s: float = 600) -> None:
        ids = list(job_ids)
        self._wait(lambda: all(self.state(j).get("state") in FINAL for j in ids), timeout_s,
                   f"final states of {len(ids)} jobs")

    def _wait(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.thread is not None:
                self.thread.alive()  # re-raises if the service loop died
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s:g} s for {what}; pending: "
                                   f"{self.r.xpending(self.keys.jobs, self.keys.group)}")
            time.sleep(0.1)

    def pending(self) -> int:
        return int(self.r.xpending(self.keys.jobs, self.keys.group)["pending"])

    def first_result_after(self, wall_s: float) -> float | None:
        """Seconds from ``wall_s`` to the first result stored after it (stream ids are the server's ms clock)."""
        entries = self.r.xrange(self.keys.all_results, min=f"{int(wall_s * 1000)}-0", count=1)
        return int(_s(entries[0][0]).split("-")[0]) / 1000 - wall_s if entries else None

    def row(self, scenario: str, expected: dict[str, tuple[str, int]], recovery_s: float | None = None,
            **detail: Any) -> Row:
        """Tally ``expected``: job id → (final state, windows it must have)."""
        lost = duplicates = missing = 0
        for job_id, (state, windows) in expected.items():
            got = [w.window_index for w in self.windows(job_id)]
            lost += self.state(job_id).get("state") != state
            duplicates += len(got) - len(set(got))
            missing += len(set(range(windows)) - set(got))
        return Row(scenario, len(expected), lost, duplicates, missing, self.pending(),
                   None if recovery_s is None else round(recovery_s, 2), detail)


# -- scenarios --------------------------------------------------------------------------------------


def kill_llm_worker(rig: FaultRig, clips: int = 5) -> Row:
    """SIGKILL the LLM worker process while a caption job and two questions run."""
    return _kill_mid_caption(rig, "kill-llm", clips, lambda job: rig.service.llm_workers[0])


def kill_decode_actor(rig: FaultRig, clips: int = 8) -> Row:
    """SIGKILL the clip (decode + prune) actor that serves a running caption job.

    The kill lands after 2 windows are stored; the actor runs at most one clip ahead of the LLM and closes
    the source with the last clip, so with too few clips it may already have cut them all and its death
    would touch nothing: 8 clips leave it several to cut."""
    return _kill_mid_caption(rig, "kill-decode", clips, lambda job: rig.service.running[job].clip_actor)


def _kill_mid_caption(rig: FaultRig, name: str, clips: int, victim: Callable[[str], Any]) -> Row:
    video = rig.caption_file(f"{clips}clips.mp4", clips)
    asks = rig.caption_file("ask.mp4", 1)
    job = rig.submit_caption(f"{name}-caption", video)
    others = [rig.submit_ask(f"{name}-ask{i}", asks) for i in range(2)]
    rig.wait_windows(job, 2)
    pid = _pid(victim(job))
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    rig.wait_final([job, *others])
    expected = {job: ("done", clips), **{o: ("done", 1) for o in others}}
    return rig.row(name, expected, rig.first_result_after(killed_at), killed_pid=pid,
                   deliveries=int(rig.state(job).get("deliveries", 0)))


def poison_job(rig: FaultRig, clips: int = 30) -> Row:
    """A job whose worker dies on every delivery: dead-lettered after max_deliveries, others unaffected."""
    video = rig.caption_file(f"{clips}clips.mp4", clips)
    asks = rig.caption_file("ask.mp4", 1)
    job = rig.submit_caption("poison", video)
    others = [rig.submit_ask(f"bystander{i}", asks) for i in range(3)]
    kills, killed_delivery, seen = 0, 0, {}
    deadline = time.monotonic() + 600
    while rig.state(job).get("state") not in FINAL:
        state = rig.state(job)
        delivery, progress = int(state.get("deliveries", 0)), int(state.get("progress", 0))
        seen.setdefault(delivery, progress)
        running = rig.service.running.get(job)
        # Kill once this delivery has stored a window: its source is open and its next clip in flight.
        if (state.get("state") == "running" and delivery > killed_delivery and progress > seen[delivery]
                and running and running.clip_actor):
            pid = _pid(running.clip_actor)
            os.kill(pid, signal.SIGKILL)
            kills, killed_delivery = kills + 1, delivery
        if time.monotonic() > deadline:
            raise TimeoutError(f"the poison job never settled: {state}")
        time.sleep(0.05)
    rig.wait_final(others)
    dead = [json.loads(f[b"job"]) for _, f in rig.r.xrange(rig.keys.dead_letter)]
    dead_entry = next((d for d in dead if d["job_id"] == job), None)
    expected = {job: ("failed", 0), **{o: ("done", 1) for o in others}}
    return rig.row("poison", expected, kills=kills, max_deliveries=rig.settings.queue.max_deliveries,
                   dead_lettered=dead_entry is not None, dead_letter_error=(dead_entry or {}).get("error", ""),
                   final_state=rig.state(job).get("state"))


def redis_outage(rig: FaultRig, down_s: float = 10.0, clips: int = 6, asks: int = 4) -> Row:
    """Stop Redis (SIGTERM: AOF flushed) for ``down_s`` mid-run and start it again on the same port."""
    video = rig.caption_file(f"{clips}clips.mp4", clips)
    ask_video = rig.caption_file("ask.mp4", 1)
    job = rig.submit_caption("outage-caption", video)
    others = [rig.submit_ask(f"outage-ask{i}", ask_video) for i in range(asks)]
    rig.wait_windows(job, 1)
    rig.redis_server.stop()
    time.sleep(down_s)
    rig.redis_server.start()
    back_at = time.time()
    rig.wait_final([job, *others])
    expected = {job: ("done", clips), **{o: ("done", 1) for o in others}}
    return rig.row("redis_outage", expected, rig.first_result_after(back_at), down_s=down_s)


def live_server_restart(rig: FaultRig, down_s: float = 3.0) -> Row:
    """Kill the live camera's server process mid-caption and start it again: the gap is reported."""
    port, epoch = free_port(), time.time()

    def camera() -> subprocess.Popen:
        return _camera(port, "--epoch", repr(epoch), "--fps", str(FPS))

    server = camera()
    job = rig.submit_caption("live-restart", f"http://127.0.0.1:{port}/live.ts")
    try:
        rig.wait_windows(job, 2)
        _stop(server)
        killed_at = time.time()
        time.sleep(down_s)
        server = camera()
        restarted_at = time.time()
        # Once a window after the gap is stored, the job has carried on: stop it there.
        rig._wait(lambda: any(w.gap_before_s for w in rig.windows(job)), 300, "a window after the gap")
        gapped = next(w for w in rig.windows(job) if w.gap_before_s)
        rig.wait_windows(job, gapped.window_index + 2)
    finally:
        rig.queue.cancel(job)
        rig.wait_final([job])
        _stop(server)
    got = [w.window_index for w in rig.windows(job)]
    events = [json.loads(f[b"event"])["kind"] for _, f in rig.r.xrange(rig.keys.job_events(job))]
    return rig.row("live_restart", {job: ("cancelled", len(got))}, rig.first_result_after(restarted_at),
                   windows=len(got), in_order=got == sorted(got), gap_before_s=round(gapped.gap_before_s, 2),
                   server_down_s=round(restarted_at - killed_at, 2), events=sorted(set(events)),
                   deliveries=int(rig.state(job).get("deliveries", 0)))


def burst(rig: FaultRig, jobs: int = 200) -> Row:
    """``jobs`` short questions submitted at once: all answered, memory held by the process bounded."""
    videos = [rig.caption_file(f"burst{i}.mp4", 1, first=i) for i in range(4)]
    pids = _service_pids(rig)
    driver_before, actors_before = _rss(pids[:1]), _rss(pids[1:])
    started = time.monotonic()
    with rig.r.pipeline(transaction=False) as pipe:
        for i in range(jobs):
            pipe.xadd(rig.keys.jobs, {"job": json.dumps({
                "job_id": f"burst{i}", "source": str(videos[i % 4]), "kind": "ask",
                "question": held_out_sample(i % 4).qa.question})})
        pipe.execute()
    peak_depth = peak_held = peak_running = peak_driver = peak_actors = 0
    ids = [f"burst{i}" for i in range(jobs)]
    while True:
        peak_depth = max(peak_depth, rig.queue.depth())
        peak_held = max(peak_held, len(rig.service._held))
        peak_running = max(peak_running, len(rig.service.running))
        peak_driver, peak_actors = max(peak_driver, _rss(pids[:1])), max(peak_actors, _rss(pids[1:]))
        done = sum(_s(rig.r.hget(rig.keys.job(j), "state") or b"") in FINAL for j in ids)
        if done == jobs:
            break
        rig.thread.alive()
        if time.monotonic() - started > 1800:
            raise TimeoutError(f"burst: {done}/{jobs} settled after 1800 s")
        time.sleep(0.25)
    elapsed = time.monotonic() - started
    w = rig.settings.workers
    return rig.row("burst", {j: ("done", 1) for j in ids}, throughput_jobs_per_min=round(60 * jobs / elapsed, 1),
                   elapsed_s=round(elapsed, 1), peak_queue_depth=peak_depth, peak_held=peak_held,
                   peak_running=peak_running, held_limit=w.priority_lookahead, running_limit=w.max_active_jobs,
                   driver_rss_growth_mb=round((peak_driver - driver_before) / 2**20, 1),
                   actors_rss_growth_mb=round((peak_actors - actors_before) / 2**20, 1))


def long_caption(rig: FaultRig, windows: int = 1000, warmup: int = 100, fps: int = 16) -> Row:
    """A caption job of ``windows`` windows on a fast live stream: memory, descriptors, threads, latency."""
    port = free_port()
    # Short clips (each frame once) on a 16 fps stream, windows of 1 s every 0.25 s.
    server = _camera(port, "--fps", str(fps), "--repeat", "1")
    job = rig.submit({"job_id": "long-caption", "source": f"http://127.0.0.1:{port}/live.ts", "kind": "caption",
                      "sampling": {"window_s": 1.0, "stride_s": 0.25, "frames_per_clip": 8}})
    pids = _service_pids(rig)
    try:
        rig.wait_windows(job, warmup, timeout_s=1800)
        base = _probe(pids)
        rig.wait_windows(job, windows, timeout_s=3600)
        end = _probe(_service_pids(rig))
    finally:
        rig.queue.cancel(job)
        rig.wait_final([job])
        _stop(server)
    results = rig.windows(job)
    got = [w.window_index for w in results]
    work = [sum(v for k, v in w.timings_s.items() if k not in ("video_decode_s", "llm_queue_s")) for w in results]
    quarter = max(1, len(work) // 4)
    early, late = float(np.median(work[warmup:warmup + quarter])), float(np.median(work[-quarter:]))
    return rig.row("long_caption", {job: ("cancelled", len(got))}, windows=len(got),
                   actors_restarted=end["pids"] != base["pids"],
                   rss_growth_mb=round((end["rss"] - base["rss"]) / 2**20, 1),
                   fd_growth=end["fds"] - base["fds"], thread_growth=end["threads"] - base["threads"],
                   work_s_early=round(early, 4), work_s_late=round(late, 4), work_ratio=round(late / early, 2),
                   frames_dropped=sum(w.frames_dropped for w in results))


def kill_serve(workdir: Path, clips: int = 6) -> Row:
    """SIGKILL a whole ``streamvlm serve`` (its process group: Ray and actors too) mid-caption; a second
    ``serve`` reclaims the job after the lease and finishes it from its checkpoint."""
    rig = FaultRig(workdir, service=False)
    try:
        video = rig.caption_file(f"{clips}clips.mp4", clips)
        asks = rig.caption_file("ask.mp4", 1)
        job = rig.submit_caption("serve-caption", video)
        others = [rig.submit_ask(f"serve-ask{i}", asks) for i in range(2)]
        first = _serve(rig)
        try:
            rig.wait_windows(job, 2)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            _stop(first)
        killed_at = time.time()
        second = _serve(rig)
        try:
            rig.wait_final([job, *others])
        finally:
            second.send_signal(signal.SIGTERM)
            try:
                second.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
            _killpg_quietly(second.pid)  # and whatever Ray helpers it left behind
            _stop(second)
        expected = {job: ("done", clips), **{o: ("done", 1) for o in others}}
        return rig.row("kill_serve", expected, rig.first_result_after(killed_at),
                       lease_s=rig.settings.queue.lease_s, deliveries=int(rig.state(job).get("deliveries", 0)),
                       second_exit_code=second.returncode)
    finally:
        rig.close()


def _camera(port: int, *args: str) -> subprocess.Popen:
    """A loopback camera of held-out clips in its own process, once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.loopback", "--port", str(port), *args],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()  # its URL, printed once it listens
    return proc


def _stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    proc.send_signal(sig)
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _serve(rig: FaultRig) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMVLM_", "RAY_ADDRESS"))}
    args = [arg for key, value in rig.overrides.items() for arg in ("--set", f"{key}={value}")]
    proc = subprocess.Popen([sys.executable, "-m", "streamvlm", *args, "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # printed once every actor has loaded its model
    if "streamvlm serve" not in line:
        _stop(proc)
        raise RuntimeError(f"serve did not start: {line!r} (exit {proc.returncode})")
    return proc


def _killpg_quietly(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)  # Ray helpers the stopped serve left behind, if any
    except ProcessLookupError:
        pass


# -- process probes --------------------------------------------------------------------------------


def _service_pids(rig: FaultRig) -> list[int]:
    s = rig.service
    return [os.getpid(), *(_pid(a) for a in s.llm_workers + s.clip_actors)]


def _pid(actor: Any, timeout_s: float = 120) -> int:
    """The actor's process id, once it answers (an actor killed earlier may still be restarting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(actor.pid.remote(), timeout=timeout_s)
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _rss(pids: list[int]) -> int:
    return sum(psutil.Process(pid).memory_info().rss for pid in pids)


def _probe(pids: list[int]) -> dict[str, Any]:
    procs = [psutil.Process(pid) for pid in pids]
    return {"pids": sorted(pids), "rss": _rss(pids), "fds": sum(p.num_fds() for p in procs),
            "threads": sum(p.num_threads() for p in procs)}


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- command -----------------------------------------------------------------------------------------

SIZES = {  # scenario → (full size, --quick size)
    "kill_llm_worker": ({"clips": 5}, {"clips": 4}),
    "kill_decode_actor": ({"clips": 8}, {"clips": 8}),
    "poison_job": ({}, {}),
    "redis_outage": ({"down_s": 10.0}, {"down_s": 10.0}),
    "live_server_restart": ({}, {}),
    "burst": ({"jobs": 200}, {"jobs": 40}),
    "long_caption": ({"windows": 1000, "warmup": 100}, {"windows": 160, "warmup": 40}),
}
SCENARIOS: dict[str, Callable[..., Row]] = {
    "kill_llm_worker": kill_llm_worker, "kill_decode_actor": kill_decode_actor, "poison_job": poison_job,
    "redis_outage": redis_outage, "live_server_restart": live_server_restart, "burst": burst,
    "long_caption": long_caption,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument("--only", nargs="+", choices=[*SCENARIOS, "kill_serve"], help="run these scenarios only")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--out", type=Path, default=None, help="also write rows (JSON) and a table (Markdown) here")


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    del settings  # each rig builds its own settings: a restartable Redis, short leases
    names = args.only or [*SCENARIOS, "kill_serve"]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="streamvlm-reliability-") as tmp:
        in_rig = [n for n in names if n in SCENARIOS]
        if in_rig:
            rig = FaultRig(Path(tmp) / "rig")
            try:
                for name in in_rig:
                    rows.append(SCENARIOS[name](rig, **SIZES[name][args.quick]))
                    print(_line(rows[-1]), file=sys.stderr, flush=True)
            finally:
                rig.close()
                ray.shutdown()
        if "kill_serve" in names:
            rows.append(kill_serve(Path(tmp) / "serve"))
            print(_line(rows[-1]), file=sys.stderr, flush=True)
    table = markdown(rows)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "reliability.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
        (args.out / "reliability.md").write_text(table + "\n")
    print(json.dumps([asdict(r) for r in rows], indent=2) if args.json else table)
    ok = all(r.lost == 0 and r.duplicates == 0 and r.missing == 0 and r.pending_after == 0 for r in rows)
    return 0 if ok else 1


def _line(row: Row) -> str:
    return f"{row.scenario}: lost {row.lost}, duplicates {row.duplicates}, missing {row.missing}, " \
           f"pending {row.pending_after}, recovery {row.recovery_s} s, {row.detail}"


def markdown(rows: list[Row]) -> str:
    out = ["| scenario | jobs | lost | duplicate windows | missing windows | pending after | recovery s | measured |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        detail = ", ".join(f"{k} {v}" for k, v in r.detail.items())
        out.append(f"| {r.scenario} | {r.jobs} | {r.lost} | {r.duplicates} | {r.missing} | {r.pending_after} | "
                   f"{'' if r.recovery_s is None else r.recovery_s} | {detail} |")
    return "\n".join(out)
