"""The client side of the protocol: submit jobs, follow their results, read state. What the CLI calls."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.queue import JobQueue
from pipeline.schemas import JobRequest, JobStatus, WindowResult


class JobNotFound(LookupError):
    """No job with that id (never submitted, or its results expired)."""


class WaitTimeout(TimeoutError):
    """The job did not finish within the time asked for."""


@dataclass(frozen=True)
class QueueOverview:
    depth: int
    pending: int
    consumers: int
    dead_letters: int


class JobClient:
    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self.r = queue.r
        self.keys = queue.keys

    def submit(self, job: JobRequest) -> str:
        """Enqueue; resubmitting the same job id is a no-op (the job runs once)."""
        self.queue.ensure_group()
        self.queue.submit(job)
        return job.job_id

    def status(self, job_id: str) -> JobStatus:
        status = self.queue.status(job_id)
        if status is None:
            raise JobNotFound(f"no job {job_id!r} (never submitted, or its results expired)")
        return status

    def follow(self, job_id: str, timeout_s: float | None = None, poll_ms: int = 500) -> Iterator[WindowResult]:
        """Yield the job's results in order as they are stored, until the job ends (or ``timeout_s``)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last = "0-0"
        key = self.keys.job_results(job_id)
        while True:
            resp = self.r.xread({key: last}, count=100, block=poll_ms)
            for _stream, entries in resp or []:
                for eid, fields in entries:
                    last = eid.decode() if isinstance(eid, bytes) else eid
                    raw = fields.get(b"result", fields.get("result"))
                    yield WindowResult.model_validate_json(raw)
            if not resp:
                status = self.queue.status(job_id)
                if status is not None and status.state.final:
                    # A last look: results written just before the final state was read.
                    tail = self.r.xrange(key, min="(" + last)
                    for _eid, fields in tail:
                        yield WindowResult.model_validate_json(fields.get(b"result", fields.get("result")))
                    return
                if deadline is not None and time.monotonic() > deadline:
                    raise WaitTimeout(f"job {job_id} still {status.state.value if status else 'queued'} "
                                      f"after {timeout_s:g} s")

    def wait(self, job_id: str, timeout_s: float | None = None) -> tuple[JobStatus, list[WindowResult]]:
        results = list(self.follow(job_id, timeout_s=timeout_s))
        return self.status(job_id), results

    def cancel(self, job_id: str) -> str:
        verdict = self.queue.cancel(job_id)
        if verdict == "unknown":
            raise JobNotFound(f"no job {job_id!r} to cancel")
        return verdict

    def overview(self) -> QueueOverview:
        self.queue.ensure_group()
        groups = {g["name"].decode() if isinstance(g["name"], bytes) else g["name"]: g
                  for g in self.r.xinfo_groups(self.keys.jobs)}
        group = groups.get(self.keys.group, {})
        return QueueOverview(
            depth=int(self.r.xlen(self.keys.jobs)),
            pending=int(group.get("pending", 0)),
            consumers=int(group.get("consumers", 0)),
            dead_letters=int(self.r.xlen(self.keys.dead_letter)),
        )

