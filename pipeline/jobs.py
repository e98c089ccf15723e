"""A job's effective settings (its own fields over the service's defaults) and its stream of clips.

Everything a job asks for is checked when the job is accepted, before any frame is decoded:
pruning against the loaded model's config, sampling against the source kind.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.schemas import JobRequest
from pipeline.settings import Settings
from pipeline.sources import Clip, SourceEvent, SourcePolicy, open_source, rolling_clips, sample_clip
from pruning.config import PruningConfig


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float


@dataclass(frozen=True)
class SamplingParams:
    frames: int
    window_s: float
    stride_s: float
    start_s: float | None
    end_s: float | None
    max_fps: float | None


def effective_pruning(job: JobRequest, settings: Settings, model_config: Any | None = None) -> PruningConfig:
    """The job's pruning over the service defaults; ValueError naming the parameter if it cannot run."""
    if job.pruning is not None and job.pruning.off:
        return PruningConfig()
    base = settings.pruning.model_dump()
    own = job.pruning.model_dump(exclude_none=True, exclude={"off"}) if job.pruning is not None else {}
    merged = {**base, **own}
    if merged["encoder_method"] == "none":
        merged["encoder_reduction"] = 0.0
    config = PruningConfig(**merged)
    if model_config is not None:
        config.check_against(model_config, num_frames=effective_sampling(job, settings).frames)
    return config


def effective_generation(job: JobRequest, settings: Settings) -> GenerationParams:
    g = job.generation
    return GenerationParams(
        max_new_tokens=g.max_new_tokens if g.max_new_tokens is not None else settings.generation.max_new_tokens,
        temperature=g.temperature if g.temperature is not None else settings.generation.temperature,
    )


def effective_sampling(job: JobRequest, settings: Settings) -> SamplingParams:
    s, d = job.sampling, settings.sampling
    return SamplingParams(
        frames=s.frames_per_clip or d.frames_per_clip,
        window_s=s.window_s or d.window_s,
        stride_s=s.stride_s or d.stride_s,
        start_s=s.start_s,
        end_s=s.end_s,
        max_fps=s.max_fps or d.max_fps,
    )


class JobClips:
    """The clips of one job, from window ``first_window`` on (a resumed job skips what it already stored).

    ``ask``: one clip (window 0): T frames over the file (or [start, end]), or the most recent window
    of a live stream. ``caption``: rolling windows until the file ends, or until ``stop()`` for a
    live stream. Source status events go to ``on_event``.
    """

    def __init__(self, job: JobRequest, settings: Settings, first_window: int = 0,
                 on_event: Callable[[SourceEvent], None] | None = None) -> None:
        self.job = job
        self.sampling = effective_sampling(job, settings)
        policy = SourcePolicy.from_settings(settings.sources, max_fps=self.sampling.max_fps)
        self.source = open_source(job.source, policy, on_event=on_event)
        self.first_window = first_window
        self._cancel = threading.Event()
        self._clips = self._iterate()

    @property
    def live(self) -> bool:
        return self.source.is_live

    def _iterate(self) -> Iterator[Clip]:
        p = self.sampling
        if self.job.kind == "ask":
            if self.first_window > 0:
                return
            yield sample_clip(self.source, p.frames, start_s=p.start_s, end_s=p.end_s,
                              window_s=p.window_s if self.source.is_live else None)
            return
        yield from rolling_clips(self.source, p.window_s, p.stride_s, p.frames, cancel=self._cancel,
                                  first_window=self.first_window)

    def next(self) -> Clip | None:
        return next(self._clips, None)

    def stop(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        self._cancel.set()
        self.source.close()
