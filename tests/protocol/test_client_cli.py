"""The client commands (submit, results, status, cancel, caption) against a real Redis, in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import redis

from pipeline.client import JobClient
from pipeline.keys import RedisKeys
from pipeline.queue import JobQueue
from pipeline.schemas import JobState, WindowResult


def _env(redis_server):
    return {"STREAMVLM_REDIS__URL": redis_server.url, "STREAMVLM_REDIS__KEY_PREFIX": "cli"}


def _queue(r, consumer="worker") -> JobQueue:
    q = JobQueue(r, consumer, RedisKeys("cli"))
    q.ensure_group()
    return q


def test_submit_status_cancel_round_trip(run_cli, redis_server, r):
    env = _env(redis_server)
    out = run_cli("submit", "videos/a.mp4", "what colour is the square?", "--job-id", "cli-1",
                  "--reduction", "0.75", "--strategy", "global", "--positions", "contiguous", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cli-1"
    [(_, fields)] = r.xrange(RedisKeys("cli").jobs)
    job = json.loads(fields[b"job"])
    assert job["question"] == "what colour is the square?"
    assert job["pruning"] == {"encoder_reduction": 0.75, "temporal_strategy": "global", "positions": "contiguous",
                              "off": False}

    again = run_cli("submit", "videos/a.mp4", "what colour is the square?", "--job-id", "cli-1", env=env)
    assert again.returncode == 0 and r.xlen(RedisKeys("cli").jobs) == 1  # idempotent by job id

    status = run_cli("status", "cli-1", "--json", env=env)
    assert json.loads(status.stdout)["state"] == "queued"
    overview = run_cli("status", "--json", env=env)
    assert json.loads(overview.stdout)["depth"] == 1

    cancel = run_cli("cancel", "cli-1", env=env)
    assert cancel.returncode == 0 and "cancel requested" in cancel.stdout


def test_submit_wait_prints_the_answer_a_worker_stores(run_cli, redis_server, r):
    env = _env(redis_server)
    worker = _queue(r)

    def answer():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for delivery in worker.fetch(count=1, block_ms=200):
                accepted = worker.accept(delivery)
                if accepted is not None:
                    worker.store_result(WindowResult(
                        job_id=accepted.job.job_id, window_index=0, start_s=0, end_s=4, text="red",
                        visual_tokens_in=512, visual_tokens_kept=52, flops_ratio=0.12), accepted.entry_id, finish=True)
                    return

    t = threading.Thread(target=answer)
    t.start()
    out = run_cli("submit", "a.mp4", "what colour?", "--wait", "--timeout", "60", "--json", env=env)
    t.join()
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.splitlines()[0])
    assert res["text"] == "red" and res["visual_tokens_kept"] == 52


def test_caption_follows_windows_until_cancelled(redis_server, r):
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamvlm", "caption", "rtsp://127.0.0.1:1/cam", "--job-id", "cap-1", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_py_env() | _env(redis_server),
    )
    worker = _queue(r)
    deadline = time.monotonic() + 30
    accepted = None
    while accepted is None and time.monotonic() < deadline:
        for d in worker.fetch(count=1, block_ms=200):
            accepted = worker.accept(d)
    assert accepted is not None and accepted.job.kind == "caption"
    for w in range(3):
        worker.store_result(WindowResult(job_id="cap-1", window_index=w, start_s=2 * w, end_s=2 * w + 4,
                                         text=f"window {w}", visual_tokens_in=512, visual_tokens_kept=52,
                                         flops_ratio=0.12))
    JobClient(worker).cancel("cap-1")
    assert worker.cancel_requested("cap-1")
    worker.finish("cap-1", accepted.entry_id, JobState.cancelled, "cancelled by request")
    out, err = proc.communicate(timeout=60)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["window_index"] for line in lines] == [0, 1, 2]
    assert proc.returncode == 1  # the job did not end "done"


def test_client_errors_are_one_line(run_cli, redis_server):
    out = run_cli("results", "no-such-job", env=_env(redis_server))
    assert out.returncode == 1 and "no job 'no-such-job'" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("status", "x", env={"STREAMVLM_REDIS__EMBEDDED_DIR": "/nonexistent/dir"})
    assert out.returncode == 1 and "no Redis to talk to" in out.stderr
    out = run_cli("submit", "a.mp4", "q", "--frames", "0", env=_env(redis_server))
    assert out.returncode == 2 and "sampling.frames_per_clip" in out.stderr


def _py_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("STREAMVLM_")}


def test_redis_client_reconnects_after_a_restart(redis_server):
    from pipeline.connect import make_client

    client = make_client(redis_server.url)
    client.set("before", "1")
    redis_server.stop()
    restarter = threading.Timer(1.0, redis_server.start)
    restarter.start()
    try:
        assert client.ping()  # retried with backoff while the server is down
    finally:
        restarter.join()
    assert isinstance(client, redis.Redis)
