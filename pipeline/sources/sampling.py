"""Which times to show the model: T frames per window, one window (ask) or rolling windows (caption).

Shapes: T frames per clip; frames [T, H, W, 3] uint8; timestamps [T] float64 seconds.

A window [start, end) is cut into T equal segments and each segment's centre is sampled, so T
frames are spread evenly and never sit on the window's edges (where a file may have no frame).
With a frame-rate cap the source is treated as if it only had frames on a 1/max_fps grid: each
time is moved down to that grid before the frame on screen is picked (a clip still has T frames,
the model's fixed input, so a short window at a low cap repeats frames).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from pipeline.sources.errors import InvalidSampling
from pipeline.sources.types import Clip, Gap

if TYPE_CHECKING:
    from pipeline.sources.file import FileSource
    from pipeline.sources.live import LiveFrame, LiveSource

DEFAULT_FRAMES = 8  # Video-LLaVA's frames per clip


def uniform_times(start_s: float, end_s: float, frames: int, max_fps: float | None = None) -> np.ndarray:
    """[T] segment centres of [start_s, end_s), moved down onto the 1/max_fps grid when capped."""
    times = start_s + (np.arange(frames, dtype=np.float64) + 0.5) * ((end_s - start_s) / frames)  # [T]
    if max_fps:
        times = np.maximum(np.floor(times * max_fps + 1e-9) / max_fps, start_s)
    return times


def check_frames(frames: int) -> None:
    if not isinstance(frames, int) or isinstance(frames, bool) or not 1 <= frames <= 256:
        raise InvalidSampling(f"must be an integer in [1, 256], got {frames!r}", param="frames")


def _check_window(window_s: float, stride_s: float | None = None) -> None:
    if not isinstance(window_s, (int, float)) or not math.isfinite(window_s) or window_s <= 0:
        raise InvalidSampling(f"must be a positive number of seconds, got {window_s!r}", param="window_s")
    if stride_s is not None and (
        not isinstance(stride_s, (int, float)) or not math.isfinite(stride_s) or stride_s <= 0
    ):
        raise InvalidSampling(f"must be a positive number of seconds, got {stride_s!r}", param="stride_s")


def sample_clip(
    source: FileSource | LiveSource,
    frames: int = DEFAULT_FRAMES,
    *,
    start_s: float | None = None,
    end_s: float | None = None,
    window_s: float | None = None,
    timeout_s: float | None = None,
) -> Clip:
    """The clip for a question: T frames over [start_s, end_s) of a file (default the whole video),
    or over the most recent ``window_s`` seconds of a live stream (waits until that much has arrived,
    at most ``window_s`` + ``timeout_s``; default timeout the source's read timeout)."""
    check_frames(frames)
    if source.is_live:
        if start_s is not None or end_s is not None:
            raise InvalidSampling("a live stream has no fixed timeline; use window_s", param="start_s")
        if window_s is None:
            raise InvalidSampling("a live stream needs the window length in seconds", param="window_s")
        _check_window(window_s)
        return source.latest_clip(window_s, frames, timeout_s=timeout_s)  # type: ignore[union-attr]
    duration = source.info.duration_s or 0.0
    start = 0.0 if start_s is None else start_s
    end = duration if end_s is None else end_s
    for name, value in (("start_s", start), ("end_s", end)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidSampling(f"must be a number of seconds, got {value!r}", param=name)
    if not 0.0 <= start < duration:
        raise InvalidSampling(f"must be in [0, {duration:.3f}) s (the video's length), got {start}", param="start_s")
    if not start < end:
        raise InvalidSampling(f"must be after start_s={start}, got {end}", param="end_s")
    end = min(end, duration)
    times = uniform_times(start, end, frames, source.policy.max_fps)
    images, stamps = source.frames_at(times)  # type: ignore[union-attr]
    return Clip(frames=images, timestamps_s=stamps, window_index=0, start_s=start, end_s=end)


def rolling_clips(
    source: FileSource | LiveSource,
    window_s: float,
    stride_s: float,
    frames: int = DEFAULT_FRAMES,
    *,
    cancel: threading.Event | None = None,
    first_window: int = 0,
) -> Iterator[Clip]:
    """Caption windows [k·stride, k·stride + window) for k = 0, 1, …: to the end of a file (the last
    window is cut at the end), or for a live stream until ``cancel`` is set, the source is closed or
    the stream ends (a failed stream raises its error after the clips already complete).

    ``first_window`` resumes a run: a file starts at that window (earlier ones are not decoded); a
    live stream has no past to return to, so its windows are numbered from ``first_window`` on."""
    check_frames(frames)
    _check_window(window_s, stride_s)
    if not isinstance(first_window, int) or first_window < 0:
        raise InvalidSampling(f"must be an integer ≥ 0, got {first_window!r}", param="first_window")
    if source.is_live:
        yield from source.rolling_clips(  # type: ignore[union-attr]
            window_s, stride_s, frames, cancel=cancel, first_window=first_window
        )
        return
    duration = source.info.duration_s or 0.0
    k = first_window
    while cancel is None or not cancel.is_set():
        start = k * stride_s
        if start >= duration:
            return
        end = min(start + window_s, duration)
        times = uniform_times(start, end, frames, source.policy.max_fps)
        images, stamps = source.frames_at(times)  # type: ignore[union-attr]
        yield Clip(frames=images, timestamps_s=stamps, window_index=k, start_s=start, end_s=end)
        if end >= duration:
            return
        k += 1


class WindowSelector:
    """Rolling windows over frames that arrive in time order, holding only T frames per open window.

    Slot i of a window keeps the last frame at or before its target time (the first frame after it
    when the window begins inside a gap), which is the same rule files use.
    """

    def __init__(
        self, window_s: float, stride_s: float, frames: int, max_fps: float | None = None, first_index: int = 0
    ) -> None:
        self.window_s, self.stride_s, self.frames, self.max_fps = window_s, stride_s, frames, max_fps
        self.first_index = first_index  # added to every window_index (a resumed run keeps counting)
        self._origin: float | None = None
        self._next_k = 0
        self._open: dict[int, list[LiveFrame | None]] = {}
        self._gaps: list[Gap] = []
        self._dropped_at_last_clip = 0

    def _targets(self, k: int) -> np.ndarray:
        start = self._origin + k * self.stride_s  # type: ignore[operator]
        return uniform_times(start, start + self.window_s, self.frames, self.max_fps)

    def push(self, frame: LiveFrame, dropped_total: int) -> list[Clip]:
        """Add one frame; returns the windows that this frame completes (its time ≥ their end)."""
        if self._origin is None:
            self._origin = frame.time_s
        if frame.gap_before is not None:
            self._gaps.append(frame.gap_before)
        done = []
        for k in sorted(self._open):
            end = self._origin + k * self.stride_s + self.window_s
            if frame.time_s >= end:
                done.append(self._finish(k, end, dropped_total))
        while self._origin + self._next_k * self.stride_s <= frame.time_s:
            # A window that ended inside a gap has no frames: skip its index rather than invent frames.
            if self._origin + self._next_k * self.stride_s + self.window_s > frame.time_s:
                self._open[self._next_k] = [None] * self.frames
            self._next_k += 1
        for k, slots in self._open.items():
            for i, target in enumerate(self._targets(k)):
                if slots[i] is None or frame.time_s <= target + 1e-9:
                    slots[i] = frame
        return done

    def flush(self, dropped_total: int) -> list[Clip]:
        """At the end of a stream: the open windows that hold frames, cut at their last frame."""
        done = []
        for k in sorted(self._open):
            slots = self._open[k]
            if all(s is not None for s in slots):
                end = max(s.time_s for s in slots)  # type: ignore[union-attr]
                done.append(self._finish(k, end, dropped_total))
        self._open.clear()
        return done

    def _finish(self, k: int, end: float, dropped_total: int) -> Clip:
        slots = self._open.pop(k)
        start = self._origin + k * self.stride_s  # type: ignore[operator]
        chosen = [s for s in slots if s is not None]
        gaps = tuple(g for g in self._gaps if g.end_s > start and g.start_s < end)
        self._gaps = [g for g in self._gaps if g.end_s > start]
        clip = Clip(
            frames=np.stack([s.image for s in chosen]),  # [T, H, W, 3]
            timestamps_s=np.array([s.time_s for s in chosen], dtype=np.float64),
            window_index=k + self.first_index,
            start_s=start,
            end_s=end,
            gaps=gaps,
            dropped_frames=dropped_total - self._dropped_at_last_clip,
        )
        self._dropped_at_last_clip = dropped_total
        return clip
