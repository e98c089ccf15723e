"""Priority: among jobs read ahead of free slots, the higher priority starts first (its own service)."""

from __future__ import annotations

import time

from service_helpers import KEYS, wait_state, xadd


def test_a_higher_priority_job_starts_first_when_a_slot_frees(running, camera, answerable):
    r = running.redis
    path, sample = answerable
    slots = running.service.settings.workers.max_active_jobs
    hogs = [f"hog-{i}" for i in range(slots)]
    for job_id in hogs:
        xadd(r, {"job_id": job_id, "source": camera.url, "kind": "caption",
                 "sampling": {"window_s": 2.0, "stride_s": 2.0}})
    for job_id in hogs:
        wait_state(r, job_id, states=("running",), timeout_s=120)
    xadd(r, {"job_id": "low", "source": str(path), "kind": "ask", "question": sample.qa.question, "priority": 1})
    xadd(r, {"job_id": "high", "source": str(path), "kind": "ask", "question": sample.qa.question, "priority": 8})
    deadline = time.monotonic() + 30
    while r.xpending(KEYS.jobs, KEYS.group)["pending"] < slots + 2:  # both read ahead, neither started
        assert time.monotonic() < deadline, "the waiting jobs were not read ahead"
        time.sleep(0.1)
    assert r.hget(KEYS.job("low"), "state") is None and r.hget(KEYS.job("high"), "state") is None

    r.hset(KEYS.job(hogs[0]), "cancel_requested", "1")  # one slot frees: the older "low" does not get it
    high = wait_state(r, "high")
    low = wait_state(r, "low")
    assert high["state"] == low["state"] == "done"
    assert float(low["started_at"]) >= float(high["finished_at"])  # low got the slot only when high left it
    for job_id in hogs[1:]:
        r.hset(KEYS.job(job_id), "cancel_requested", "1")
    for job_id in hogs:
        assert wait_state(r, job_id)["state"] == "cancelled"
