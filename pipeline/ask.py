"""One-shot local inference (``streamvlm ask``): the job's code path without Redis or Ray.

Same validation, sources, sampling, pruning and generation as a service job, in this process.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from transformers import AutoConfig

from pipeline.demo_model import demo_model_path
from pipeline.inference import VideoQA
from pipeline.jobs import JobClips, effective_generation, effective_pruning
from pipeline.schemas import JobRequest
from pipeline.settings import Settings


@dataclass(frozen=True)
class AskResult:
    answer: str
    visual_tokens_in: int
    visual_tokens_kept: int
    flops_ratio: float
    start_s: float
    end_s: float
    frame_times_s: list[float]
    timings: dict[str, float]
    pruning: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_model(settings: Settings) -> VideoQA:
    m = settings.model
    return VideoQA.load(m.path or demo_model_path(), device=m.device, dtype=m.dtype,
                        trust_remote_code=m.trust_remote_code)


def ask(job: JobRequest, settings: Settings, qa: VideoQA | None = None) -> AskResult:
    """Answer ``job`` (kind ``ask``) here and now. Raises SourceError / ValueError on bad input."""
    if job.kind != "ask":
        raise ValueError("kind: streamvlm ask answers questions; use the service for caption jobs")
    # Everything about the request is checked before the weights load: config, then the source.
    model_config = qa.pruned.config if qa is not None else AutoConfig.from_pretrained(
        settings.model.path or demo_model_path(), trust_remote_code=settings.model.trust_remote_code)
    config = effective_pruning(job, settings, model_config)
    gen = effective_generation(job, settings)
    clips = JobClips(job, settings)
    try:
        start = time.perf_counter()
        clip = clips.next()
        decode_s = time.perf_counter() - start
    finally:
        clips.close()
    if clip is None:
        raise ValueError("source: no clip could be cut from it")
    started = time.perf_counter()
    qa = qa or load_model(settings)
    load_s = time.perf_counter() - started
    visual = qa.encode(clip.frames, config)
    [answer] = qa.answer([visual], [job.text], config, gen.max_new_tokens, gen.temperature)
    return AskResult(
        answer=answer.text,
        visual_tokens_in=answer.visual_tokens_in,
        visual_tokens_kept=answer.visual_tokens_kept,
        flops_ratio=answer.flops_ratio,
        start_s=float(clip.start_s),
        end_s=float(clip.end_s),
        frame_times_s=[float(t) for t in clip.timestamps_s],
        timings={"load_s": load_s, "video_decode_s": decode_s, **answer.timings_s},
        pruning=config.to_dict(),
    )
