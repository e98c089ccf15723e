"""Helpers for the service tests: sample videos, a camera feed, a service running in a thread."""

from __future__ import annotations

import json
import socket
import time

import redis

from pipeline.keys import RedisKeys
from pipeline.loopback import held_out_frames, write_clip
from pipeline.schemas import WindowResult
from pipeline.settings import load_settings
from pipeline.synthetic import VIDEO_FPS, VIDEO_REPEAT, held_out_sample
from workers.service import Service
from workers.service_thread import ServiceThread

FPS, REPEAT = VIDEO_FPS, VIDEO_REPEAT  # a clip's frames on screen REPEAT / FPS s each: 4 s per clip



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clip_video(path, index: int):
    """A 4 s H.264 file of held-out clip ``index``; returns (path, sample)."""
    sample = held_out_sample(index)
    write_clip(path, sample.clip.frames)
    return path, sample


def camera_frames(count: int = 16):
    return held_out_frames(count=count, repeat=REPEAT)


class RunningService:
    """A started ``Service`` on its own event loop in a thread (``ServiceThread``), and a client of its Redis."""

    def __init__(self, settings) -> None:
        self.thread = ServiceThread(Service(settings).start()).start()
        self.service = self.thread.service
        self.redis = redis.Redis.from_url(self.service.redis_url)

    def close(self) -> None:
        self.redis.close()
        self.thread.stop()


def service_settings(tmp_path, **extra: str):
    overrides = {
        "sources.allowed_roots": f"[{tmp_path}]",
        "sources.file_backend": "pyav",
        "redis.embedded_dir": str(tmp_path / "redis"),
        "ray.num_cpus": "2",
        "workers.torch_threads": "1",
        "workers.max_active_jobs": "4",
        "workers.clip_num_cpus": "0.25",
        "workers.llm_num_cpus": "0.5",
        "workers.max_batch_wait_ms": "200",
        "queue.lease_s": "30",
        "queue.heartbeat_s": "2",
        "service.health_port": str(free_port()),
        **extra,
    }
    return load_settings(overrides=[f"{k}={v}" for k, v in overrides.items()])




KEYS = RedisKeys()


def xadd(r, payload) -> None:
    r.xadd(KEYS.jobs, {"job": payload if isinstance(payload, str) else json.dumps(payload)})


def wait_state(r, job_id: str, states=("done", "failed", "cancelled"), timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fields = {k.decode(): v.decode() for k, v in r.hgetall(KEYS.job(job_id)).items()}
        if fields.get("state") in states:
            return fields
        time.sleep(0.2)
    running = {k.decode(): r.hget(k, "state") for k in r.scan_iter(KEYS.job("*")) if b":" not in k[len(KEYS.job("")):]}
    raise AssertionError(f"job {job_id} did not reach {states}: {r.hgetall(KEYS.job(job_id))}; "
                         f"pending {r.xpending(KEYS.jobs, KEYS.group)}; "
                         f"running {[k for k, v in running.items() if v == b'running']}")


def results(r, job_id: str) -> list[WindowResult]:
    return [WindowResult.model_validate_json(f[b"result"]) for _, f in r.xrange(KEYS.job_results(job_id))]
