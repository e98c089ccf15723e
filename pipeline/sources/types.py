"""Plain data the sources hand out: stream facts, clips of frames, gaps and status events.

Shapes: T frames per clip, H×W the source's picture size; frames are [T, H, W, 3] uint8 RGB.
Times are seconds on the source's own timeline: 0 is its first frame; a live stream that reconnects
continues the timeline across the gap (the gap's wall-clock length is added, and reported).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class VideoInfo:
    uri: str
    live: bool
    width: int
    height: int
    codec: str
    container: str
    backend: str  # "decord" or "pyav": what decodes the frames
    duration_s: float | None  # None for live streams
    fps: float | None  # average rate the container declares
    frame_count: int | None  # declared or estimated; None when unknown


@dataclass(frozen=True)
class Gap:
    """A stretch of timeline with no frames: a live stream lost and found again."""

    start_s: float  # timeline of the last frame before the loss
    end_s: float  # timeline of the first frame after it
    reason: str

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Clip:
    """T frames of one window. ``window_index`` counts windows of one ask/caption run from 0."""

    frames: np.ndarray  # [T, H, W, 3] uint8
    timestamps_s: np.ndarray  # [T] float64, each frame's own presentation time
    window_index: int
    start_s: float
    end_s: float
    gaps: tuple[Gap, ...] = ()
    dropped_frames: int = 0  # live: frames dropped (buffer full) since the previous clip

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


class SourceStatus(str, enum.Enum):
    CONNECTED = "connected"
    STALLED = "stalled"
    RECONNECTING = "reconnecting"
    ENDED = "ended"
    FAILED = "failed"


@dataclass(frozen=True)
class SourceEvent:
    status: SourceStatus
    reason: str
    uri: str
    attempt: int = 0  # reconnect attempt number (1-based) for RECONNECTING
    delay_s: float = 0.0  # backoff before that attempt
    gap: Gap | None = None  # on CONNECTED after a reconnect: the stretch without frames
    dropped_frames: int = 0  # total so far
    wall_time: float = field(default_factory=time.time)
