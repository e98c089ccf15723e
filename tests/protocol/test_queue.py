"""The Redis protocol on a real redis-server: delivery, idempotency, reclaim, heartbeat, dead letters."""

from __future__ import annotations

import json
import time

import pytest
import redis

from pipeline.keys import RedisKeys
from pipeline.queue import JobQueue
from pipeline.redis_server import EmbeddedRedis
from pipeline.schemas import JobRequest, JobState, WindowResult, parse_job

KEYS = RedisKeys("t")


def queue(r, consumer="c1", **kw) -> JobQueue:
    q = JobQueue(r, consumer, KEYS, **kw)
    q.ensure_group()
    return q


def result(job_id: str, window: int, text: str = "red") -> WindowResult:
    return WindowResult(job_id=job_id, window_index=window, start_s=window, end_s=window + 1, text=text,
                        visual_tokens_in=2048, visual_tokens_kept=208, flops_ratio=0.11)


def xadd(r, payload) -> str:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return r.xadd(KEYS.jobs, {"job": body}).decode()


def take_one(q: JobQueue, block_ms: int = 200):
    got = q.fetch(count=1, block_ms=block_ms)
    assert len(got) == 1
    return got[0]


def test_plain_xadd_job_runs_and_finishing_is_one_step(r):
    q = queue(r)
    entry = xadd(r, {"job_id": "j1", "source": "clip.mp4", "kind": "ask", "question": "what colour?"})
    accepted = q.accept(take_one(q))
    assert accepted is not None and accepted.job.job_id == "j1" and accepted.entry_id == entry
    assert q.status("j1").state is JobState.running

    assert q.store_result(result("j1", 0), entry_id=entry, finish=True)
    status = q.status("j1")
    assert status.state is JobState.done and status.progress == 1 and status.checkpoint == 1
    assert r.xpending(KEYS.jobs, KEYS.group)["pending"] == 0
    assert q.depth() == 0  # finished entries leave the jobs stream
    [(_, stored)] = q.results("j1")
    assert stored.text == "red" and stored.visual_tokens_kept == 208
    assert r.xlen(KEYS.all_results) == 1
    for key in (KEYS.job("j1"), KEYS.job_results("j1"), KEYS.job_windows("j1")):
        assert 0 < r.ttl(key) <= q.results_ttl_s


def test_submit_is_idempotent_by_job_id(r):
    q = queue(r)
    job = JobRequest(job_id="same", source="a.mp4", kind="ask", question="q?")
    assert q.submit(job) is not None
    assert q.submit(job) is None
    assert q.depth() == 1 and q.status("same").state is JobState.queued


def test_duplicate_xadd_of_a_running_job_is_dropped_not_run(r):
    q = queue(r)
    payload = {"job_id": "dup", "source": "a.mp4", "kind": "ask", "question": "q?"}
    xadd(r, payload)
    xadd(r, payload)
    first, second = q.fetch(count=2, block_ms=200)
    assert q.accept(first) is not None
    assert q.accept(second) is None
    assert r.xpending(KEYS.jobs, KEYS.group)["pending"] == 1  # only the running one


@pytest.mark.parametrize(
    "payload, expected",
    [
        ("not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"job_id": "u1", "source": "a.mp4", "kind": "ask", "question": "q", "colour": "red"}, "colour: unknown field"),
        ({"job_id": "u2", "source": "a.mp4", "kind": "ask"}, "needs a question"),
        ({"job_id": "u3", "source": "a.mp4", "kind": "summarise", "question": "q"}, "kind"),
        ({"job_id": "u4", "source": "a.mp4", "kind": "ask", "question": "q",
          "pruning": {"encoder_reduction": 1.5}}, "pruning.encoder_reduction"),
        ({"job_id": "u6", "source": "a.mp4", "kind": "ask", "question": "q", "pruning": "fast"},
         "pruning must be an object of settings or the string 'off'"),
        ({"job_id": "u7", "source": "a\nb.mp4", "kind": "caption"}, "control characters"),
        ({"job_id": "u8", "source": "a.mp4", "kind": "ask", "question": "q",
          "deadline": "2030-01-01T00:00:00"}, "time zone"),
        ({"job_id": "u5", "source": "a.mp4", "kind": "ask", "question": "q",
          "sampling": {"start_s": 5, "end_s": 2}}, "end_s must be greater"),
    ],
)
def test_invalid_payloads_fail_readably_and_are_acked(r, payload, expected):
    q = queue(r)
    entry = xadd(r, payload)
    assert q.accept(take_one(q)) is None
    job_id = payload["job_id"] if isinstance(payload, dict) else f"entry-{entry}"
    status = q.status(job_id)
    assert status.state is JobState.failed
    assert expected in status.error
    assert r.xpending(KEYS.jobs, KEYS.group)["pending"] == 0


def test_pruning_off_as_a_plain_string():
    job = parse_job(json.dumps({"source": "a.mp4", "kind": "ask", "question": "q", "pruning": "off"}))
    assert job.pruning is not None and job.pruning.off
    assert len(job.job_id) == 32  # generated when not given


def test_entry_without_job_field_names_the_field(r):
    q = queue(r)
    entry = r.xadd(KEYS.jobs, {"payload": "{}"}).decode()
    assert q.accept(take_one(q)) is None
    assert "one field named 'job'" in q.status(f"entry-{entry}").error


def test_an_invalid_entry_reusing_a_queued_jobs_id_leaves_that_job_alone(r):
    q = queue(r)
    victim = JobRequest(job_id="victim", source="a.mp4", kind="ask", question="q")
    victim_entry = q.submit(victim)
    bad_entry = xadd(r, {"job_id": "victim", "kind": "oops"})
    deliveries = {d.entry_id: d for d in q.fetch(2, block_ms=None)}
    assert q.accept(deliveries[bad_entry]) is None  # the bad one first, as a higher priority would have it
    assert q.status("victim").state is JobState.queued
    assert "kind" in q.status(f"entry-{bad_entry}").error
    accepted = q.accept(deliveries[victim_entry])
    assert accepted is not None and q.status("victim").state is JobState.running


def test_non_utf8_entries_fail_as_not_json(r):
    q = queue(r)
    entry = r.xadd(KEYS.jobs, {"job": b"\xff\xfe{\x80"}).decode()
    assert q.accept(take_one(q)) is None
    assert "not JSON" in q.status(f"entry-{entry}").error


def test_results_are_stored_once_per_window(r):
    q = queue(r)
    xadd(r, {"job_id": "cap", "source": "rtsp://127.0.0.1/x", "kind": "caption"})
    q.accept(take_one(q))
    assert q.store_result(result("cap", 0))
    assert q.store_result(result("cap", 1))
    assert not q.store_result(result("cap", 1, text="again"))
    assert [res.window_index for _, res in q.results("cap")] == [0, 1]
    assert q.status("cap").progress == 2 and q.status("cap").checkpoint == 2


def test_dead_consumers_entries_are_reclaimed_after_the_lease_and_resume_from_checkpoint(r):
    dead = queue(r, "dead", lease_s=0.2)
    live = queue(r, "live", lease_s=0.2)
    entry = xadd(r, {"job_id": "long", "source": "rtsp://127.0.0.1/x", "kind": "caption"})
    assert dead.accept(take_one(dead)) is not None
    dead.store_result(result("long", 0))  # then the consumer dies: no heartbeat, no finish

    assert live.fetch(count=1, block_ms=50) == []  # still inside the lease
    time.sleep(0.3)
    delivery = take_one(live)
    assert delivery.entry_id == entry and delivery.deliveries == 2
    accepted = live.accept(delivery)
    assert accepted is not None and accepted.status.checkpoint == 1 and accepted.status.consumer == "live"


def test_heartbeat_keeps_a_long_job_and_tells_when_it_was_lost(r):
    owner = queue(r, "owner", lease_s=0.3)
    thief = queue(r, "thief", lease_s=0.3)
    entry = xadd(r, {"job_id": "hb", "source": "rtsp://127.0.0.1/x", "kind": "caption"})
    owner.accept(take_one(owner))
    for _ in range(4):
        time.sleep(0.15)
        assert owner.heartbeat(entry)
        assert thief.fetch(count=1, block_ms=10) == []
    time.sleep(0.4)  # the owner stalls past the lease
    assert take_one(thief).entry_id == entry
    assert not owner.heartbeat(entry)


def test_after_max_deliveries_a_job_goes_to_dead_letter_and_others_still_run(r):
    qs = [queue(r, f"w{i}", lease_s=0.1, max_deliveries=2) for i in range(3)]
    xadd(r, {"job_id": "poison", "source": "a.mp4", "kind": "ask", "question": "q?"})
    for attempt in range(2):
        time.sleep(0.15)
        accepted = qs[attempt].accept(take_one(qs[attempt]))
        assert accepted is not None
        qs[attempt].note_error("poison", f"worker crashed on attempt {attempt + 1}")
    xadd(r, {"job_id": "fine", "source": "b.mp4", "kind": "ask", "question": "q?"})
    time.sleep(0.15)
    deliveries = qs[2].fetch(count=2, block_ms=100)
    settled = [qs[2].accept(d) for d in deliveries]
    assert [a.job.job_id for a in settled if a is not None] == ["fine"]
    status = qs[2].status("poison")
    assert status.state is JobState.failed and "crashed on attempt 2" in status.error
    [(_, fields)] = r.xrange(KEYS.dead_letter)
    dead = json.loads(fields[b"job"])
    assert dead["job_id"] == "poison" and "gave up after 2 deliveries" in dead["error"]


def test_release_makes_a_failed_attempt_retry_at_once(r):
    a = queue(r, "a", lease_s=30)
    b = queue(r, "b", lease_s=30)
    entry = xadd(r, {"job_id": "retry", "source": "a.mp4", "kind": "ask", "question": "q?"})
    a.accept(take_one(a))
    a.note_error("retry", "transient")
    a.release(entry)
    delivery = take_one(b)
    assert delivery.entry_id == entry and delivery.deliveries == 2


def test_cancel_queued_and_running_jobs(r):
    q = queue(r)
    q.submit(JobRequest(job_id="queued", source="a.mp4", kind="ask", question="q?"))
    assert q.cancel("queued") == "requested"
    assert q.accept(take_one(q)) is None
    assert q.status("queued").state is JobState.cancelled

    q.submit(JobRequest(job_id="running", source="rtsp://127.0.0.1/x", kind="caption"))
    accepted = q.accept(take_one(q))
    assert not q.cancel_requested("running")
    assert q.cancel("running") == "requested" and q.cancel_requested("running")
    q.finish("running", accepted.entry_id, JobState.cancelled, "cancelled by request")
    assert q.cancel("running") == "cancelled"
    assert q.cancel("nobody") == "unknown"


def test_embedded_redis_keeps_jobs_across_a_crash_with_aof(tmp_path):
    server = EmbeddedRedis(tmp_path / "data").start()
    try:
        client = redis.Redis.from_url(server.url)
        q = queue(client)
        q.submit(JobRequest(job_id="survivor", source="a.mp4", kind="ask", question="q?"))
        time.sleep(1.2)  # appendfsync everysec
        client.close()
        server.stop(kill=True)
        server.start()
        client = redis.Redis.from_url(server.url)
        q = queue(client)
        assert q.status("survivor").state is JobState.queued
        assert q.accept(take_one(q)).job.job_id == "survivor"
        client.close()
    finally:
        server.stop()
