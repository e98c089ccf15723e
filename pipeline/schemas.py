"""What crosses the wire: jobs in, results and job state out. JSON only, validated by pydantic.

A job is one ``XADD {prefix}:jobs * job '<JobRequest JSON>'``. Unknown fields and bad values are
rejected (the job then ends ``failed`` with the validation message), never silently dropped.
"""

from __future__ import annotations

import enum
import json
import time
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
# A job's own keys are {p}:job:{id}:<suffix> (pipeline.keys): an id ending in one of these would name another
# job's results, windows or events.
RESERVED_ID_SUFFIXES = (":results", ":windows", ":events")
# Field names quoted in error messages are cut to this length (an unknown key can be megabytes long).
MAX_FIELD_NAME_CHARS = 64
DEFAULT_CAPTION_PROMPT = "Describe what happens in the video."


class _Strict(BaseModel):
    # NaN and ±Infinity (which Python's JSON reader accepts) are refused: no limit check can hold on them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SamplingRequest(_Strict):
    """How clips are cut. Unset fields take the service's ``sampling`` settings."""

    frames_per_clip: int | None = Field(None, ge=1, le=64)
    window_s: float | None = Field(None, gt=0.0, le=3600.0)
    stride_s: float | None = Field(None, gt=0.0, le=3600.0)
    start_s: float | None = Field(None, ge=0.0)
    end_s: float | None = Field(None, gt=0.0)
    max_fps: float | None = Field(None, gt=0.0, le=240.0)

    @model_validator(mode="after")
    def _start_before_end(self) -> SamplingRequest:
        if self.start_s is not None and self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError("end_s must be greater than start_s")
        return self


class PruningRequest(_Strict):
    """Visual-token pruning for this job. Unset fields take the service's ``pruning`` settings.

    ``off`` (also written as the plain string ``"pruning": "off"``) turns every kind of pruning off.
    """

    off: bool = False
    encoder_method: Literal["cls", "random", "none"] | None = None
    encoder_reduction: float | None = Field(None, ge=0.0, lt=1.0)
    temporal_strategy: str | None = Field(None, min_length=1, max_length=64)
    min_per_frame: int | None = Field(None, ge=0)
    fastv_k: int | None = Field(None, ge=1)
    fastv_ratio: float | None = Field(None, ge=0.0, lt=1.0)
    positions: Literal["original", "contiguous"] | None = None


class GenerationRequest(_Strict):
    max_new_tokens: int | None = Field(None, ge=1, le=1024)
    temperature: float | None = Field(None, ge=0.0, le=5.0)


class JobRequest(_Strict):
    job_id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=JOB_ID_PATTERN)
    source: str = Field(min_length=1, max_length=4096)
    kind: Literal["ask", "caption"]
    question: str | None = Field(None, min_length=1, max_length=2000)
    prompt: str | None = Field(None, min_length=1, max_length=2000)
    sampling: SamplingRequest = Field(default_factory=SamplingRequest)
    # null (or absent) takes the service defaults.
    pruning: PruningRequest | None = None
    generation: GenerationRequest = Field(default_factory=GenerationRequest)
    priority: int = Field(0, ge=0, le=9)
    # Absolute time (ISO 8601 with a zone); a job not finished by then ends failed.
    deadline: datetime | None = None

    @field_validator("job_id")
    @classmethod
    def _not_another_jobs_key(cls, value: str) -> str:
        if value.endswith(RESERVED_ID_SUFFIXES):
            raise ValueError(f"must not end in {', '.join(RESERVED_ID_SUFFIXES)} (those name another job's keys)")
        return value

    @field_validator("source")
    @classmethod
    def _no_control_characters(cls, value: str) -> str:
        if any(ord(c) < 32 for c in value):
            raise ValueError("source must not contain control characters")
        return value.strip()

    @field_validator("pruning", mode="before")
    @classmethod
    def _pruning_off(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value != "off":
                raise ValueError("pruning must be an object of settings or the string 'off'")
            return {"off": True}
        return value

    @field_validator("deadline")
    @classmethod
    def _deadline_has_zone(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("deadline needs a time zone, e.g. 2026-01-01T12:00:00Z")
        return value

    @model_validator(mode="after")
    def _text_matches_kind(self) -> JobRequest:
        if self.kind == "ask" and self.question is None:
            raise ValueError("an ask job needs a question")
        if self.kind == "caption" and self.question is not None:
            raise ValueError("a caption job takes a prompt, not a question")
        return self

    @property
    def text(self) -> str:
        """What the model is asked for every clip of this job."""
        if self.kind == "ask":
            assert self.question is not None
            return self.question
        return self.prompt or DEFAULT_CAPTION_PROMPT


class InvalidJob(ValueError):
    """A job payload that cannot be run; ``job_id`` is the payload's own when it had a usable one."""

    def __init__(self, message: str, job_id: str | None) -> None:
        super().__init__(message)
        self.job_id = job_id


def printable_name(part: object) -> str:
    """A field name as the user wrote it, printable and short (it may be any string they sent)."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(part))
    return text if len(text) <= MAX_FIELD_NAME_CHARS else text[:MAX_FIELD_NAME_CHARS] + "…"


def readable_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(printable_name(p) for p in err["loc"]) or "job"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{field}: {msg}")
    return "invalid job: " + "; ".join(parts)


def parse_job(raw: bytes | str) -> JobRequest:
    """Decode one jobs-stream payload; every problem is an :class:`InvalidJob` with a readable message."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise InvalidJob("invalid job: not JSON we accept (nested too deeply)", None) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and integers of more than 4300 digits
        raise InvalidJob(f"invalid job: not JSON ({exc})", None) from None
    if not isinstance(data, dict):
        raise InvalidJob(f"invalid job: expected a JSON object, got {type(data).__name__}", None)
    job_id = data.get("job_id")
    usable_id = job_id if isinstance(job_id, str) and _id_ok(job_id) else None
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidJob(readable_validation_error(exc), usable_id) from None


def _id_ok(job_id: str) -> bool:
    import re

    return re.fullmatch(JOB_ID_PATTERN, job_id) is not None and not job_id.endswith(RESERVED_ID_SUFFIXES)


class JobState(str, enum.Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.done, JobState.failed, JobState.cancelled)


class JobStatus(BaseModel):
    """The job's hash, typed. Written only by :class:`pipeline.queue.JobQueue`."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    state: JobState
    kind: str | None = None
    source: str | None = None
    progress: int = 0  # windows stored
    checkpoint: int = 0  # next window to run
    deliveries: int = 0
    error: str | None = None
    cancel_requested: bool = False
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    consumer: str | None = None

    @classmethod
    def from_hash(cls, job_id: str, fields: dict[str, str]) -> JobStatus:
        data: dict[str, Any] = dict(fields)
        data["job_id"] = job_id
        data["cancel_requested"] = fields.get("cancel_requested") == "1"
        for key in ("error", "kind", "source", "consumer"):
            if data.get(key) == "":
                data[key] = None
        return cls.model_validate(data)


class WindowResult(BaseModel):
    """One answer (window 0 of an ask job) or one caption window."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    window_index: int = Field(ge=0)
    start_s: float
    end_s: float
    frame_times_s: list[float] = Field(default_factory=list)
    text: str
    visual_tokens_in: int = Field(ge=0)
    visual_tokens_kept: int = Field(ge=0)
    flops_ratio: float = Field(ge=0.0)
    timings_s: dict[str, float] = Field(default_factory=dict)
    frames_dropped: int = Field(0, ge=0)
    gap_before_s: float | None = None  # a live stream that came back: how long it was gone
    worker: str | None = None
    created_at: float = Field(default_factory=time.time)


class SourceEvent(BaseModel):
    """A live source's status change, published on the job's events stream."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    kind: Literal["connected", "stalled", "reconnecting", "ended", "failed"]
    reason: str = ""
    at: float = Field(default_factory=time.time)
