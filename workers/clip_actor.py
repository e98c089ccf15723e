"""The clip actor: opens one job's source, cuts its clips, runs the vision tower with [CLS] scoring and
the temporal budget, and hands on only the kept pre-projector features, cast to a reduced precision.

The service keeps a pool of these (``workers.max_active_jobs``), each serving one job at a time; the
model is loaded once per actor. One call = one clip: ``open`` cuts the first, so an ask job takes one
call here (its source is closed as soon as its only clip is cut).
"""

from __future__ import annotations

import time
from typing import Any

import ray
import torch

from pipeline.inference import VideoQA
from pipeline.jobs import JobClips, effective_pruning
from pipeline.schemas import JobRequest
from pipeline.settings import Settings
from pipeline.sources import SourceEvent

SHIP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ClipActor:
    def __init__(self, settings: Settings, model_path: str) -> None:
        if settings.workers.torch_threads:
            torch.set_num_threads(settings.workers.torch_threads)
        self.settings = settings
        m = settings.model
        self.qa = VideoQA.load(model_path, device=m.device, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
        self.ship_dtype = SHIP_DTYPES[settings.workers.ship_dtype]
        self.clips: JobClips | None = None
        self.events: list[SourceEvent] = []

    @ray.method(num_returns=2)
    def open(self, job: JobRequest, first_window: int) -> tuple[dict[str, Any], Any]:
        """Open the job's source and cut its first clip, as ``next_clip``. Source errors (forbidden, not
        found, corrupt …) propagate typed."""
        self.close()
        self.events.clear()
        self.config = effective_pruning(job, self.settings, self.qa.pruned.config)
        self.clips = JobClips(job, self.settings, first_window, on_event=self.events.append)
        return self.next_clip()

    @ray.method(num_returns=2)
    def next_clip(self) -> tuple[dict[str, Any], Any]:
        """(meta, kept visual tokens) for the next clip, or ({"end": True, ...}, None) when there is none.
        ``meta["closed"]``: the source is closed already (the job has no further clip), no close() needed."""
        assert self.clips is not None, "open() first"
        start = time.perf_counter()
        clip = self.clips.next()
        decode_s = time.perf_counter() - start
        closed = clip is None or self.clips.job.kind == "ask"  # an ask has one clip: free the source now
        if closed:
            self.close()
        # Emptied in place, one atomic pop at a time: the live reader thread appends through this very
        # list's bound append, at any moment.
        events = []
        while self.events:
            events.append(self.events.pop(0))
        if clip is None:
            return {"end": True, "closed": True, "events": events}, None
        visual = self.qa.encode(clip.frames, self.config)
        shipped = visual.to(dtype=self.ship_dtype)
        meta = {
            "end": False,
            "closed": closed,
            "window_index": clip.window_index,
            "start_s": float(clip.start_s),
            "end_s": float(clip.end_s),
            "frame_times_s": [float(t) for t in clip.timestamps_s],
            "frames_dropped": int(clip.dropped_frames),
            "gap_before_s": float(sum(g.duration_s for g in clip.gaps)) if clip.gaps else None,
            "timings_s": {"video_decode_s": decode_s, **visual.timings_s},
            "bytes_shipped": int(shipped.features.numel() * shipped.features.element_size()),
            "events": events,
        }
        return meta, shipped

    # stop() and pid() run in their own thread (the "control" group), beside a next_clip() that may be
    # blocked on a live stream: a cancel must not wait for the next window, nor a health probe for a clip.
    @ray.method(concurrency_group="control")
    def stop(self) -> None:
        clips = self.clips
        if clips is not None:
            clips.stop()

    def close(self) -> None:
        if self.clips is not None:
            self.clips.close()
            self.clips = None

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        import os

        return os.getpid()

    @ray.method(concurrency_group="control")
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def clip_actor_class(num_cpus: float, max_restarts: int):
    # A restarted actor has lost its open source: the service reopens the job from its checkpoint,
    # so Ray must not replay calls on it (max_task_retries=0).
    return ray.remote(num_cpus=num_cpus, max_restarts=max_restarts, max_task_retries=0,
                      concurrency_groups={"control": 1})(ClipActor)
