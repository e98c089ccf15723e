"""Every Redis key streamvlm uses, and how long each lives. Nothing else builds key names.

| key | type | what | expiry |
|---|---|---|---|
| ``{p}:jobs`` | stream | submitted jobs, field ``job`` = JSON (:class:`pipeline.schemas.JobRequest`) | entries deleted once finished |
| ``{p}:jobs`` group ``{p}:workers`` | consumer group | delivery, pending list, reclaim | — |
| ``{p}:dead`` | stream | jobs that failed ``max_deliveries`` times, with the error | trimmed to ``stream_maxlen`` |
| ``{p}:results`` | stream | every result of every job (dashboards) | trimmed to ``stream_maxlen`` |
| ``{p}:job:{id}`` | hash | state, progress, checkpoint, error, timestamps | ``results_ttl_s`` after finishing |
| ``{p}:job:{id}:results`` | stream | this job's results, one entry per window | ``results_ttl_s`` after finishing |
| ``{p}:job:{id}:windows`` | set | window indices already stored (idempotency) | ``results_ttl_s`` after finishing |
| ``{p}:job:{id}:events`` | stream | source status events (connected, stalled, reconnecting, …) | ``results_ttl_s`` after finishing |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "streamvlm"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def group(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def all_results(self) -> str:
        return f"{self.prefix}:results"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def job_results(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:results"

    def job_windows(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:windows"

    def job_events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def per_job(self, job_id: str) -> list[str]:
        """The keys that expire together when a job ends."""
        return [self.job(job_id), self.job_results(job_id), self.job_windows(job_id), self.job_events(job_id)]
