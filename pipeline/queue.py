"""The job queue on Redis Streams: at-least-once delivery, exactly one stored result per (job, window).

Life of a job entry:

1. ``XADD {p}:jobs * job <JSON>`` (any client; :meth:`JobQueue.submit` is the idempotent helper).
2. A consumer takes it: first entries idle longer than ``lease_s`` (``XAUTOCLAIM``: their consumer
   died), then new ones (``XREADGROUP >``). :meth:`JobQueue.begin` marks the job running, or says
   to skip it (a duplicate of a job that is already running or finished, or a cancelled one).
3. While it runs, :meth:`JobQueue.heartbeat` re-claims the entry (idle time → 0) so a long caption
   job is never reclaimed while alive; it fails when another consumer owns the entry now.
4. Each window's result goes through :meth:`JobQueue.store_result`: stored at most once per window
   (a set of stored windows makes a rerun after a crash idempotent) and the checkpoint advanced.
5. :meth:`JobQueue.finish` (or ``store_result(..., finish=True)``) sets the final state, ``XACK``s
   and deletes the entry and sets the expiry, all in one script: a job is acknowledged only once its
   result is stored, and a crash before that leaves it pending, to be reclaimed and resumed from its
   checkpoint.
6. An entry delivered more than ``max_deliveries`` times goes to ``{p}:dead`` with its last error.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from pipeline.keys import RedisKeys
from pipeline.schemas import (
    InvalidJob,
    JobRequest,
    JobState,
    JobStatus,
    WindowResult,
    parse_job,
    printable_name,
)

JOB_FIELD = "job"

# KEYS: job hash. ARGV: entry id, consumer, now, kind, source.
# → "run" | "cancelled" | "duplicate" | "finished"
_BEGIN = """
local state = redis.call('HGET', KEYS[1], 'state')
local owner = redis.call('HGET', KEYS[1], 'entry_id')
if state == 'done' or state == 'failed' or state == 'cancelled' then
  return 'finished'
end
if owner and owner ~= ARGV[1] then
  return 'duplicate'
end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  return 'cancelled'
end
redis.call('HSET', KEYS[1], 'state', 'running', 'entry_id', ARGV[1], 'consumer', ARGV[2],
           'updated_at', ARGV[3], 'kind', ARGV[4], 'source', ARGV[5])
redis.call('HSETNX', KEYS[1], 'submitted_at', ARGV[3])
if not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[3])
end
redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
return 'run'
"""

# KEYS: job hash, job results, job windows, all results, jobs stream, job events.
# ARGV: window index, result JSON, maxlen, now, finish state or "", entry id or "", group, ttl_s.
# → 1 if stored now, 0 if this window was stored before.
_STORE = """
local added = redis.call('SADD', KEYS[3], ARGV[1])
if added == 1 then
  redis.call('XADD', KEYS[2], '*', 'result', ARGV[2])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'result', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'progress', 1)
end
local nxt = tonumber(ARGV[1]) + 1
local cur = tonumber(redis.call('HGET', KEYS[1], 'checkpoint') or '0')
if nxt > cur then redis.call('HSET', KEYS[1], 'checkpoint', nxt) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[4])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'state', ARGV[5], 'finished_at', ARGV[4])
  if ARGV[6] ~= '' then
    redis.call('XACK', KEYS[5], ARGV[7], ARGV[6])
    redis.call('XDEL', KEYS[5], ARGV[6])
  end
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[8]) end
  redis.call('EXPIRE', KEYS[6], ARGV[8])
end
return added
"""

# KEYS: job hash, job results, job windows, jobs stream, job events, dead-letter stream.
# ARGV: state, error, now, entry id or "", group, ttl_s, dead-letter JSON or "", maxlen.
_FINISH = """
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'error', ARGV[2], 'finished_at', ARGV[3], 'updated_at', ARGV[3])
redis.call('HSETNX', KEYS[1], 'submitted_at', ARGV[3])
if ARGV[4] ~= '' then
  redis.call('XACK', KEYS[4], ARGV[5], ARGV[4])
  redis.call('XDEL', KEYS[4], ARGV[4])
end
if ARGV[7] ~= '' then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[8], '*', 'job', ARGV[7])
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
redis.call('EXPIRE', KEYS[5], ARGV[6])
return 1
"""

# KEYS: jobs stream. ARGV: group, consumer, entry id.
# Re-claims the entry only while this consumer still owns it. → 1 owned (idle reset), 0 lost.
_HEARTBEAT = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""

# KEYS: job hash, jobs stream. ARGV: job JSON, now. Enqueue once per job id.
# → the stream entry id, or "" if the job id was already submitted.
_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return '' end
local id = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'queued', 'submitted_at', ARGV[2], 'updated_at', ARGV[2], 'entry_id', id)
return id
"""

# KEYS: job hash. ARGV: now. Cancel a queued job at once; ask a running one to stop.
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'unknown' end
if state == 'done' or state == 'failed' or state == 'cancelled' then return state end
redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'updated_at', ARGV[1])
return 'requested'
"""


@dataclass(frozen=True)
class Delivery:
    """One jobs-stream entry handed to this consumer."""

    entry_id: str
    deliveries: int
    fields: dict[str, str] | None  # None if the entry vanished (deleted while pending)


@dataclass(frozen=True)
class Accepted:
    entry_id: str
    job: JobRequest
    status: JobStatus


class JobQueue:
    """One consumer's view of the jobs stream. Thread-safe as far as the redis client is."""

    def __init__(
        self,
        client: redis.Redis,
        consumer: str,
        keys: RedisKeys | None = None,
        lease_s: float = 60.0,
        max_deliveries: int = 3,
        results_ttl_s: int = 7 * 24 * 3600,
        stream_maxlen: int = 100_000,
    ) -> None:
        self.r = client
        self.consumer = consumer
        self.keys = keys or RedisKeys()
        self.lease_s = lease_s
        self.max_deliveries = max_deliveries
        self.results_ttl_s = results_ttl_s
        self.stream_maxlen = stream_maxlen
        self._begin = client.register_script(_BEGIN)
        self._store = client.register_script(_STORE)
        self._finish = client.register_script(_FINISH)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._submit = client.register_script(_SUBMIT)
        self._cancel = client.register_script(_CANCEL)

    # -- setup -------------------------------------------------------------------------------
    def ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.keys.jobs, self.keys.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- client side -------------------------------------------------------------------------
    def submit(self, job: JobRequest) -> str | None:
        """Enqueue ``job`` unless its id was submitted before. Returns the entry id, or None if a duplicate."""
        entry = self._submit(keys=[self.keys.job(job.job_id), self.keys.jobs],
                             args=[job.model_dump_json(exclude_none=True), time.time()])
        return _text(entry) or None

    def cancel(self, job_id: str) -> str:
        """``requested`` (the worker stops at its next window), ``unknown``, or the final state it already had."""
        return _text(self._cancel(keys=[self.keys.job(job_id)], args=[time.time()]))

    def status(self, job_id: str) -> JobStatus | None:
        fields = self.r.hgetall(self.keys.job(job_id))
        if not fields:
            return None
        return JobStatus.from_hash(job_id, {_text(k): _text(v) for k, v in fields.items()})

    def results(self, job_id: str, after: str = "-", count: int | None = None) -> list[tuple[str, WindowResult]]:
        start = after if after == "-" else "(" + after
        entries = self.r.xrange(self.keys.job_results(job_id), min=start, count=count)
        return [(_text(eid), WindowResult.model_validate_json(_fields(f)["result"])) for eid, f in entries]

    def depth(self) -> int:
        """Jobs waiting or running: entries still in the jobs stream (finished ones are deleted)."""
        return int(self.r.xlen(self.keys.jobs))

    # -- consumer side -----------------------------------------------------------------------
    def fetch(self, count: int = 1, block_ms: int | None = 1000) -> list[Delivery]:
        """Up to ``count`` entries: those of dead consumers (idle > lease) first, then new ones.

        ``block_ms``: how long to wait for a new entry; None returns at once.
        """
        out: list[Delivery] = []
        # Redis 6.2 answers [next, claimed]; 7+ adds the ids of entries deleted while pending.
        claimed = self.r.xautoclaim(
            self.keys.jobs, self.keys.group, self.consumer,
            min_idle_time=int(self.lease_s * 1000), start_id="0-0", count=count,
        )[1]
        for eid, fields in claimed:
            out.append(Delivery(_text(eid), self._delivery_count(_text(eid)), _fields(fields)))
        if len(out) < count:
            resp = self.r.xreadgroup(self.keys.group, self.consumer, {self.keys.jobs: ">"},
                                     count=count - len(out), block=None if out else block_ms)
            for _stream, entries in resp or []:
                for eid, fields in entries:
                    out.append(Delivery(_text(eid), 1, _fields(fields)))
        return out

    def _delivery_count(self, entry_id: str) -> int:
        info = self.r.xpending_range(self.keys.jobs, self.keys.group, min=entry_id, max=entry_id, count=1)
        return int(info[0]["times_delivered"]) if info else 1

    def accept(self, delivery: Delivery) -> Accepted | None:
        """Validate and start one delivery. None means it was settled here (failed, skipped, dead-lettered)."""
        if delivery.fields is None:  # deleted while pending: nothing to run
            self.r.xack(self.keys.jobs, self.keys.group, delivery.entry_id)
            return None
        raw = delivery.fields.get(JOB_FIELD)
        try:
            if raw is None:
                names = ", ".join(printable_name(f) for f in sorted(delivery.fields)[:10]) or "none"
                raise InvalidJob(f"invalid job: the entry needs one field named '{JOB_FIELD}' "
                                 f"holding the job as JSON (fields given: {names})", None)
            job = parse_job(raw)
        except InvalidJob as exc:
            job_id = exc.job_id or f"entry-{delivery.entry_id}"
            owner = self.r.hget(self.keys.job(job_id), "entry_id") if exc.job_id else None
            if owner is not None and _text(owner) != delivery.entry_id:
                # The id belongs to another entry (a job queued, running or finished): recording this failure
                # under it would overwrite that job's state. It goes under the entry's own id instead.
                job_id = f"entry-{delivery.entry_id}"
            self.finish(job_id, delivery.entry_id, JobState.failed, str(exc))
            return None
        if delivery.deliveries > self.max_deliveries:
            prior = self.status(job.job_id)
            last = prior.error if prior and prior.error else "the worker stopped without a result"
            error = f"gave up after {delivery.deliveries - 1} deliveries; last error: {last}"
            dead = json.dumps({"job_id": job.job_id, "entry_id": delivery.entry_id, "error": error,
                               "job": raw, "at": time.time()})
            self.finish(job.job_id, delivery.entry_id, JobState.failed, error, dead_letter=dead)
            return None
        verdict = _text(self._begin(keys=[self.keys.job(job.job_id)],
                                    args=[delivery.entry_id, self.consumer, time.time(), job.kind, job.source]))
        if verdict == "run":
            status = self.status(job.job_id)
            assert status is not None
            return Accepted(delivery.entry_id, job, status)
        if verdict == "cancelled":
            self.finish(job.job_id, delivery.entry_id, JobState.cancelled, "cancelled before it started")
        else:  # a duplicate submission of a job already running or finished: drop this entry only
            self.r.xack(self.keys.jobs, self.keys.group, delivery.entry_id)
            self.r.xdel(self.keys.jobs, delivery.entry_id)
        return None

    def heartbeat(self, entry_id: str) -> bool:
        """Keep a running job's entry from being reclaimed. False: another consumer owns it now; stop."""
        return bool(self._heartbeat(keys=[self.keys.jobs], args=[self.keys.group, self.consumer, entry_id]))

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(self.keys.job(job_id), "cancel_requested") in (b"1", "1")

    def note_error(self, job_id: str, error: str) -> None:
        """Remember the error of a failed attempt; the entry stays pending and is retried after the lease."""
        self.r.hset(self.keys.job(job_id), mapping={"error": error, "updated_at": time.time()})

    def release(self, entry_id: str) -> None:
        """Give a pending entry back for another attempt now, rather than after the lease."""
        self.r.xclaim(self.keys.jobs, self.keys.group, self.consumer, min_idle_time=0,
                      message_ids=[entry_id], idle=int(self.lease_s * 1000) + 1, justid=True)

    def store_result(self, result: WindowResult, entry_id: str | None = None, finish: bool = False) -> bool:
        """Store one window's result once; with ``finish``, also end the job ``done`` and ack its entry."""
        j = result.job_id
        stored = self._store(
            keys=[self.keys.job(j), self.keys.job_results(j), self.keys.job_windows(j),
                  self.keys.all_results, self.keys.jobs, self.keys.job_events(j)],
            args=[result.window_index, result.model_dump_json(), self.stream_maxlen, time.time(),
                  JobState.done.value if finish else "", entry_id or "", self.keys.group, self.results_ttl_s],
        )
        return bool(stored)

    def finish(self, job_id: str, entry_id: str | None, state: JobState, error: str = "",
               dead_letter: str | None = None) -> None:
        """End a job in ``state`` and ack its entry, in one script."""
        self._finish(
            keys=[self.keys.job(job_id), self.keys.job_results(job_id), self.keys.job_windows(job_id),
                  self.keys.jobs, self.keys.job_events(job_id), self.keys.dead_letter],
            args=[state.value, error, time.time(), entry_id or "", self.keys.group, self.results_ttl_s,
                  dead_letter or "", self.stream_maxlen],
        )


def _text(value: object) -> str:
    if value is None:
        return ""
    # Anyone can XADD bytes that are not UTF-8: they become U+FFFD here, and the job fails as not JSON.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _fields(fields: dict | None) -> dict[str, str] | None:
    if fields is None:
        return None
    return {_text(k): _text(v) for k, v in fields.items()}
