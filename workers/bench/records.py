"""What the bench records per clip and per caption window, and the held-out clips it writes as H.264 files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.synthetic import HELD_OUT_SEED


@dataclass
class Sample:
    index: int  # held-out question index
    path: str
    question: str
    answer: str


@dataclass
class Seen:
    """A result as the client saw it."""

    result: Any  # WindowResult
    seen: float  # perf_counter when read from the results stream
    seen_wall: float


@dataclass
class FileRecord:
    index: int
    text: str
    latency_s: float
    ttft_s: float
    visual_tokens_in: int
    visual_tokens_kept: int
    timings_s: dict[str, float] = field(default_factory=dict)


@dataclass
class LiveRecord:
    stream: int
    window_index: int
    latency_s: float
    seen_wall: float
    frames_dropped: int
    text: str
    timings_s: dict[str, float] = field(default_factory=dict)
    frame_delay_s: float | None = None  # A only: camera sent the frame that closed the window → reader had it


def write_media(media: Path, indices: list[int], seed: int = HELD_OUT_SEED, prefix: str = "clip") -> list[Sample]:
    """Questions ``indices`` of the held-out set (or of another ``seed``'s set) as H.264 files."""
    from pipeline.loopback import write_clip
    from pipeline.synthetic import held_out_sample

    samples = []
    for i in indices:
        sample = held_out_sample(i, seed=seed)
        path = media / f"{prefix}{i:04d}.mp4"
        write_clip(path, sample.clip.frames)
        samples.append(Sample(i, str(path), sample.qa.question, sample.qa.answer))
    return samples
