"""The fault scenarios of docs/reliability.md at small sizes, on a real service: embedded redis-server
(restartable), local Ray, the demo model. Each scenario is the one ``streamvlm bench reliability`` runs."""

from __future__ import annotations

import time

import pytest
import ray

from workers.bench import reliability as rel


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    rig = rel.FaultRig(tmp_path_factory.mktemp("faults"))
    yield rig
    rig.close()
    ray.shutdown()


def nothing_lost(row: rel.Row) -> None:
    assert (row.lost, row.duplicates, row.missing, row.pending_after) == (0, 0, 0, 0), row


def test_jobs_that_end_before_they_run_free_their_slot(rig):
    # More early endings than slots: each must give its slot back, or the last job never starts.
    video = rig.caption_file("ask.mp4", 1)
    early = [rig.submit({"job_id": f"early-k{i}", "source": str(video), "kind": "ask", "question": "q",
                         "pruning": {"fastv_k": 99, "fastv_ratio": 0.5}}) for i in range(4)]
    early += [rig.submit({"job_id": f"early-late{i}", "source": str(video), "kind": "ask", "question": "q",
                          "deadline": "2001-01-01T00:00:00Z"}) for i in range(2)]
    rig.wait_final(early, timeout_s=60)
    assert all(rig.state(j)["state"] == "failed" for j in early)
    rig.submit_ask("after-early", video)
    rig.wait_final(["after-early"], timeout_s=120)
    assert rig.state("after-early")["state"] == "done"
    deadline = time.monotonic() + 10
    while rig.service.running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rig.service.running == {}


def test_sigkill_of_the_llm_worker(rig):
    row = rel.kill_llm_worker(rig, clips=4)
    nothing_lost(row)
    assert row.recovery_s is not None


def test_sigkill_of_a_jobs_decode_actor(rig):
    row = rel.kill_decode_actor(rig, clips=8)
    nothing_lost(row)
    assert row.detail["deliveries"] >= 2  # given back and resumed from its checkpoint


def test_a_job_that_always_kills_its_worker_is_dead_lettered_and_blocks_nobody(rig):
    row = rel.poison_job(rig)
    nothing_lost(row)  # the poison job ended failed, the bystanders done
    assert row.detail["kills"] == row.detail["max_deliveries"]
    assert row.detail["dead_lettered"] and "worker died" in row.detail["dead_letter_error"]


def test_redis_stopped_for_ten_seconds_and_restarted(rig):
    row = rel.redis_outage(rig, down_s=10.0)
    nothing_lost(row)
    assert row.recovery_s is not None


def test_live_server_killed_and_restarted_mid_caption(rig):
    row = rel.live_server_restart(rig, down_s=3.0)
    nothing_lost(row)
    assert row.detail["in_order"] and row.detail["deliveries"] == 1  # the same run carried on
    assert row.detail["gap_before_s"] >= 2.0
    assert {"connected", "reconnecting"} <= set(row.detail["events"])


@pytest.mark.slow
def test_burst_of_short_jobs_queues_in_redis(rig):
    row = rel.burst(rig, jobs=40)
    nothing_lost(row)
    d = row.detail
    assert d["peak_held"] <= d["held_limit"] and d["peak_running"] <= d["running_limit"]
    assert d["peak_queue_depth"] >= 30  # the backlog waited in Redis, not in the service


@pytest.mark.slow
def test_long_caption_run_does_not_leak(rig):
    row = rel.long_caption(rig, windows=160, warmup=40)
    nothing_lost(row)
    d = row.detail
    assert not d["actors_restarted"]
    assert d["rss_growth_mb"] < 50 and d["fd_growth"] <= 4 and d["thread_growth"] <= 4, d
    # Steady latency (work_ratio) is a timing, measured by `streamvlm bench reliability`, not asserted here:
    # on a 2-core machine shared with Ray's own processes one late quarter of 40 windows can run 2x slow.


def test_cancelling_a_caption_whose_camera_is_gone_frees_its_actor_at_once(rig):
    # The actor is blocked in next_clip() waiting for frames that will not come (the source keeps
    # reconnecting for sources.reconnect_attempts): a cancel must reach it beside that call, not after it.
    port = rel.free_port()
    camera = rel._camera(port, "--fps", str(rel.FPS))
    job = rig.submit_caption("cancel-dead-camera", f"http://127.0.0.1:{port}/live.ts")
    try:
        rig.wait_windows(job, 1)
        actor = rig.service.running[job].clip_actor
    finally:
        rel._stop(camera)
    started = time.monotonic()
    rig.queue.cancel(job)  # what `streamvlm cancel` does
    rig.wait_final([job], timeout_s=60)
    assert rig.state(job)["state"] == "cancelled"
    ray.get(actor.close.remote(), timeout=60)  # queued behind the blocked next_clip(), if it still runs
    # The source would go on reconnecting for ~25 s (30 attempts, backoff up to 1 s).
    assert time.monotonic() - started < 5.0
