"""The service end to end: plain XADD in, answers and captions out, on a real Redis, real Ray, the demo model."""

from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import pytest
import ray
from service_helpers import FPS, KEYS, REPEAT, results, wait_state, xadd

from pipeline.loopback import write_video
from pipeline.synthetic import held_out_sample


def test_plain_xadd_question_is_answered_correctly_with_its_record(running, answerable):
    r = running.redis
    path, sample = answerable
    xadd(r, {"job_id": "q-off", "source": str(path), "kind": "ask", "question": sample.qa.question,
             "pruning": "off"})
    xadd(r, {"job_id": "q-cls", "source": str(path), "kind": "ask", "question": sample.qa.question,
             "pruning": {"encoder_reduction": 0.75, "temporal_strategy": "uniform"}})
    assert wait_state(r, "q-off")["state"] == "done"
    [off] = results(r, "q-off")
    assert off.text == sample.qa.answer
    assert off.visual_tokens_kept == off.visual_tokens_in
    assert off.flops_ratio <= 1.0  # below 1 only because the tower stops at its feature layer
    assert wait_state(r, "q-cls")["state"] == "done"
    [pruned] = results(r, "q-cls")
    assert pruned.visual_tokens_kept < pruned.visual_tokens_in
    assert pruned.flops_ratio < off.flops_ratio
    assert {"video_decode_s", "vision_s", "prefill_s"} <= set(pruned.timings_s)
    assert len(pruned.frame_times_s) == 8 and pruned.end_s > pruned.start_s


def test_caption_job_on_a_live_stream_runs_in_order_until_cancelled(running, camera):
    r = running.redis
    xadd(r, {"job_id": "cap-live", "source": camera.url, "kind": "caption",
             "sampling": {"window_s": 2.0, "stride_s": 1.0, "frames_per_clip": 8}})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(results(r, "cap-live")) < 3:
        time.sleep(0.3)
    assert r.hget(KEYS.job("cap-live"), "state") == b"running"
    r.hset(KEYS.job("cap-live"), "cancel_requested", "1")  # what `streamvlm cancel` does
    assert wait_state(r, "cap-live")["state"] == "cancelled"
    windows = results(r, "cap-live")
    assert len(windows) >= 3
    assert [w.window_index for w in windows] == list(range(len(windows)))
    starts = [w.start_s for w in windows]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    for w in windows:
        assert w.frame_times_s == sorted(w.frame_times_s) and w.text
    events = [json.loads(f[b"event"])["kind"] for _, f in r.xrange(KEYS.job_events("cap-live"))]
    assert "connected" in events


def test_ten_jobs_at_once_are_batched_and_all_answered(running, answerable):
    r = running.redis
    path, sample = answerable
    for i in range(10):
        xadd(r, {"job_id": f"burst-{i}", "source": str(path), "kind": "ask", "question": sample.qa.question})
    for i in range(10):
        assert wait_state(r, f"burst-{i}")["state"] == "done"
        assert len(results(r, f"burst-{i}")) == 1
    host, port = running.service.health_server.address
    metrics = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    single = _metric(metrics, 'streamvlm_llm_batch_size_bucket{le="1.0"}')
    total = _metric(metrics, "streamvlm_llm_batch_size_count")
    assert total > single, "no LLM batch held more than one request"
    health = json.loads(urllib.request.urlopen(f"http://{host}:{port}/health", timeout=10).read())
    assert health["status"] == "ok" and health["redis"]


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize(
    "job_id, payload, expected",
    [
        ("m-json", "{not json", "not JSON"),
        ("m-field", {"job_id": "m-field", "source": "a.mp4", "kind": "ask", "question": "q", "speed": 3},
         "speed: unknown field"),
        ("m-path", {"job_id": "m-path", "source": "/etc/passwd", "kind": "ask", "question": "q"},
         "outside the allowed roots"),
        ("m-url", {"job_id": "m-url", "source": "http://127.0.0.1:9/none.ts", "kind": "ask", "question": "q"},
         "SourceNotFound"),
        ("m-prune", {"job_id": "m-prune", "source": "a.mp4", "kind": "ask", "question": "q",
                     "pruning": {"fastv_k": 99, "fastv_ratio": 0.5}}, "fastv_k=99"),
        ("m-late", {"job_id": "m-late", "source": "http://127.0.0.1:9/none.ts", "kind": "ask", "question": "q",
                    "deadline": "2001-01-01T00:00:00Z"}, "deadline passed"),
    ],
)
def test_bad_jobs_fail_readably_and_the_service_keeps_serving(running, answerable, job_id, payload, expected):
    r = running.redis
    xadd(r, payload)
    if job_id == "m-json":
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            failed = [k for k in r.scan_iter(KEYS.job("entry-*")) if r.hget(k, "state") == b"failed"]
            if failed:
                break
            time.sleep(0.2)
        assert any(expected in r.hget(k, "error").decode() for k in failed)
    else:
        state = wait_state(r, job_id, timeout_s=60)
        assert state["state"] == "failed" and expected in state["error"]
    path, sample = answerable
    xadd(r, {"job_id": f"after-{job_id}", "source": str(path), "kind": "ask", "question": sample.qa.question})
    assert wait_state(r, f"after-{job_id}")["state"] == "done"


def test_killed_actors_restart_and_the_job_resumes_without_duplicates(running, media):
    frames = np.concatenate([np.repeat(held_out_sample(i).clip.frames, REPEAT, axis=0) for i in range(6)])
    path = write_video(media / "six_clips.mp4", frames, fps=FPS)  # 6 × 4 s
    r = running.redis
    xadd(r, {"job_id": "crash", "source": str(path), "kind": "caption",
             "sampling": {"window_s": 4.0, "stride_s": 4.0}})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(results(r, "crash")) < 2:
        time.sleep(0.1)
    for actor in running.service.clip_actors + running.service.llm_workers:
        ray.kill(actor, no_restart=False)  # a crash: Ray restarts them (max_restarts)
    state = wait_state(r, "crash", timeout_s=300)
    assert state["state"] == "done", state
    windows = [w.window_index for w in results(r, "crash")]
    assert windows == list(range(6))  # every window exactly once, in order
    assert int(state["deliveries"]) >= 2  # it was given back and resumed from its checkpoint

