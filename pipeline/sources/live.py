"""Live streams (http(s) MPEG-TS/HLS, rtsp, rtmp, udp, tcp …) read by PyAV on a background thread.

Shapes: frames [H, W, 3] uint8 in the buffer; clips [T, H, W, 3].

One reader thread per source decodes into a bounded buffer of ``live_buffer_frames`` frames; when the
consumer is slower than the stream the oldest frame is dropped and counted. A read that waits longer
than ``read_timeout_s`` marks the stream stalled. Any loss (stall, error, end of data) is followed by
up to ``reconnect_attempts`` reconnections with exponential backoff and jitter; a stream that comes
back continues the same timeline (the gap's wall-clock length is added to it and reported as a Gap
on the next frame and clip, and on the CONNECTED event that announces the first frame after it).
Status events go to ``on_event`` (called on the reader thread; keep it
quick) and to a bounded event log read with ``drain_events()``.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import av.error
import numpy as np

from pipeline.sources.errors import (
    LimitExceeded,
    SourceClosed,
    SourceError,
    SourceForbidden,
    SourceNotFound,
    SourceTimeout,
    StreamStalled,
    UnsupportedSource,
)
from pipeline.sources.ffmpeg import OpenedVideo, check_size, classify_read_error, open_video
from pipeline.sources.policy import SourcePolicy, Target
from pipeline.sources.sampling import WindowSelector, check_frames, uniform_times
from pipeline.sources.types import Clip, Gap, SourceEvent, SourceStatus, VideoInfo

log = logging.getLogger(__name__)

EVENT_LOG = 1024
# Errors no reconnection can fix: the stream is refused outright.
FATAL_ERRORS = (LimitExceeded, SourceForbidden, UnsupportedSource)


@dataclass(frozen=True)
class LiveFrame:
    time_s: float  # on the source's continuous timeline
    image: np.ndarray  # [H, W, 3] uint8
    gap_before: Gap | None = None


class LiveSource:
    """A live stream: ``read()`` frames in order, ``latest_clip()`` for questions, ``rolling_clips()`` for captions."""

    is_live = True

    def __init__(
        self,
        target: Target,
        policy: SourcePolicy,
        *,
        on_event: Callable[[SourceEvent], None] | None = None,
        opened: OpenedVideo | None = None,
    ) -> None:
        self.target = target
        self.policy = policy
        self._on_event = on_event
        self._events: collections.deque[SourceEvent] = collections.deque(maxlen=EVENT_LOG)
        self._buffer: collections.deque[LiveFrame] = collections.deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._dropped = 0
        self._frames_seen = 0
        self._bytes_read = 0
        self._status = SourceStatus.CONNECTED
        self._failure: SourceError | None = None
        self._finished = False
        self._last_t: float | None = None
        self._last_frame_wall: float | None = None
        self._pending_gap_reason: str | None = None
        self._last_slot: int | None = None
        self._connected_wall: float | None = None
        self.gaps: list[Gap] = []
        conn = opened if opened is not None else open_video(target, policy, live=True)
        stream = conn.stream
        rate = stream.average_rate or stream.guessed_rate
        self.info = VideoInfo(
            uri=target.uri,
            live=True,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            codec=stream.codec_context.name,
            container=conn.container.format.name,
            backend="pyav",
            duration_s=None,
            fps=float(rate) if rate else None,
            frame_count=None,
        )
        self._emit(SourceStatus.CONNECTED, "connected")
        self._thread = threading.Thread(target=self._run, args=(conn,), name=f"live-source:{target.scheme}", daemon=True)
        self._thread.start()

    # -- consumer side --------------------------------------------------------------------------

    @property
    def status(self) -> SourceStatus:
        return self._status

    @property
    def dropped_frames(self) -> int:
        return self._dropped

    @property
    def finished(self) -> bool:
        return self._finished

    def drain_events(self) -> list[SourceEvent]:
        with self._cond:
            events = list(self._events)
            self._events.clear()
        return events

    def read(self, timeout_s: float | None = None) -> LiveFrame | None:
        """The oldest buffered frame; None when the stream ended, the source closed or ``timeout_s`` passed.
        Raises the stream's error when it failed (after the buffered frames)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while not self._buffer:
                if self._finished or self._stop.is_set():
                    if self._failure is not None and not self._stop.is_set():
                        raise self._failure
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._buffer.popleft()

    def latest_clip(self, window_s: float, frames: int, *, timeout_s: float | None = None) -> Clip:
        """T frames over the most recent ``window_s`` seconds; waits for that much stream to arrive
        (or for the buffer to fill, or the stream to end) at most ``window_s`` + ``timeout_s``."""
        check_frames(frames)
        wait_s = window_s + (self.policy.read_timeout_s if timeout_s is None else timeout_s)
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                buffered = list(self._buffer)
                spans = len(buffered) >= 2 and buffered[-1].time_s - buffered[0].time_s >= window_s
                full = len(buffered) >= self.policy.live_buffer_frames
                remaining = deadline - time.monotonic()
                if spans or full or self._finished or self._stop.is_set() or remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.25))
            dropped = self._dropped
        if self._stop.is_set():
            raise SourceClosed("the source was closed")
        if not buffered:
            if self._failure is not None:
                raise self._failure
            raise StreamStalled(f"no frames arrived within {wait_s:g} s")
        end = buffered[-1].time_s
        start = max(buffered[0].time_s, end - window_s)
        times = uniform_times(start, end, frames, self.policy.max_fps) if end > start else np.full(frames, end)
        stamps = np.array([f.time_s for f in buffered])  # [N]
        index = np.clip(np.searchsorted(stamps, times + 1e-9, side="right") - 1, 0, len(buffered) - 1)  # [T]
        gaps = tuple(g for g in self.gaps if g.end_s > start and g.start_s < end)
        return Clip(
            frames=np.stack([buffered[i].image for i in index]),  # [T, H, W, 3]
            timestamps_s=stamps[index],
            window_index=0,
            start_s=start,
            end_s=end,
            gaps=gaps,
            dropped_frames=dropped,
        )

    def rolling_clips(
        self,
        window_s: float,
        stride_s: float,
        frames: int,
        *,
        cancel: threading.Event | None = None,
        first_window: int = 0,
    ) -> Iterator[Clip]:
        """Caption windows over the frames as they arrive, until cancelled, closed or ended; window
        indices start at ``first_window``."""
        selector = WindowSelector(window_s, stride_s, frames, self.policy.max_fps, first_index=first_window)
        while cancel is None or not cancel.is_set():
            try:
                frame = self.read(timeout_s=0.2)
            except SourceError:
                yield from selector.flush(self._dropped)
                raise
            if frame is None:
                if self._finished or self._stop.is_set():
                    if not self._stop.is_set():
                        yield from selector.flush(self._dropped)
                    return
                continue
            yield from selector.push(frame, self._dropped)

    def close(self) -> None:
        """Stop reading (the reader notices within read_timeout_s at worst) and release the stream."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=self.policy.read_timeout_s + self.policy.open_timeout_s + 1.0)

    def __enter__(self) -> LiveSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reader thread --------------------------------------------------------------------------

    def _emit(self, status: SourceStatus, reason: str, **extra: object) -> None:
        self._status = status
        event = SourceEvent(status=status, reason=reason, uri=self.target.uri, dropped_frames=self._dropped, **extra)  # type: ignore[arg-type]
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()
        log.info("source %s: %s (%s)", self.target.uri, status.value, reason)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # noqa: BLE001 - a broken listener must not stop the stream
                log.exception("on_event listener failed")

    def _run(self, conn: OpenedVideo) -> None:
        try:
            while True:
                reason, error = self._pump(conn)
                conn.container.close()
                if self._stop.is_set():
                    self._emit(SourceStatus.ENDED, "closed by the consumer")
                    return
                if isinstance(error, FATAL_ERRORS):
                    self._failure = error
                    self._emit(SourceStatus.FAILED, str(error))
                    return
                if isinstance(error, SourceTimeout):
                    self._emit(SourceStatus.STALLED, reason)
                next_conn = self._reconnect(reason)
                if next_conn is None:
                    if self._stop.is_set():
                        self._emit(SourceStatus.ENDED, "closed by the consumer")
                    elif error is None:
                        self._emit(SourceStatus.ENDED, f"{reason}; it did not come back")
                    else:
                        self._failure = (
                            StreamStalled(f"{reason}; it did not come back") if isinstance(error, SourceTimeout) else error
                        )
                        self._emit(SourceStatus.FAILED, f"{reason}; it did not come back")
                    return
                conn = next_conn
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _pump(self, conn: OpenedVideo) -> tuple[str, SourceError | None]:
        """Decode one connection until it ends; returns why it ended and the error, None for end of data."""
        tb = float(conn.stream.time_base)
        first_abs: float | None = None
        offset = 0.0
        try:
            for packet in conn.container.demux(conn.stream):
                if self._stop.is_set():
                    return "closed", None
                self._bytes_read += packet.size
                if self._bytes_read > self.policy.max_bytes:
                    raise LimitExceeded(f"read more than sources.max_bytes={self.policy.max_bytes} bytes")
                try:
                    decoded = packet.decode()
                except av.error.InvalidDataError:
                    continue  # a damaged packet in a live stream: skip it, the next keyframe recovers
                for frame in decoded:
                    if frame.pts is None:
                        continue
                    abs_t = frame.pts * tb
                    if first_abs is None:
                        first_abs, offset = abs_t, self._connection_offset()
                    self._accept(offset + (abs_t - first_abs), frame)
        except SourceError as exc:
            return str(exc), exc
        except av.error.ExitError:
            return (
                f"no data for sources.read_timeout_s={self.policy.read_timeout_s:g} s",
                StreamStalled("the stream stopped sending data"),
            )
        except av.error.DecoderNotFoundError as exc:
            return str(exc), classify_read_error(exc, what="stream")
        except (av.error.FFmpegError, OSError) as exc:
            detail = getattr(exc, "strerror", None) or type(exc).__name__
            return f"the connection was lost ({detail})", SourceNotFound(f"the stream was lost ({detail})")
        return "the stream reached its end", None

    def _connection_offset(self) -> float:
        """Timeline of a connection's first frame: 0, or the last frame + the wall-clock outage, measured
        to when the new connection was made (its first frame then waits in FFmpeg's probe buffer)."""
        if self._last_t is None or self._last_frame_wall is None:
            return 0.0
        interval = 1.0 / self.info.fps if self.info.fps else 0.04
        back = self._connected_wall if self._connected_wall is not None else time.monotonic()
        return self._last_t + max(back - self._last_frame_wall, interval)

    def _accept(self, t: float, frame: av.VideoFrame) -> None:
        if self._last_t is not None and t <= self._last_t:
            return  # not after the previous frame (timestamp reset inside a connection): drop it
        cap = self.policy.max_fps
        if cap:
            slot = math.floor(t * cap + 1e-9)
            if slot == self._last_slot:
                return  # the frame-rate cap skips it before paying for the RGB conversion
            self._last_slot = slot
        check_size(frame.width, frame.height, self.policy)
        self._frames_seen += 1
        if self._frames_seen > self.policy.max_frames:
            raise LimitExceeded(f"more than sources.max_frames={self.policy.max_frames} frames")
        if t > self.policy.max_duration_s:
            raise LimitExceeded(f"longer than sources.max_duration_s={self.policy.max_duration_s:g} s")
        gap = None
        if self._pending_gap_reason is not None and self._last_t is not None:
            gap = Gap(start_s=self._last_t, end_s=t, reason=self._pending_gap_reason)
            self.gaps.append(gap)
            self._pending_gap_reason = None
            self._emit(SourceStatus.CONNECTED, f"frames again after a {gap.duration_s:.1f} s gap ({gap.reason})", gap=gap)
        item = LiveFrame(time_s=t, image=frame.to_ndarray(format="rgb24"), gap_before=gap)
        with self._cond:
            if len(self._buffer) >= self.policy.live_buffer_frames:
                dropped = self._buffer.popleft()
                self._dropped += 1
                if dropped.gap_before is not None and self._buffer:
                    # Keep the gap visible to the consumer even when its frame was dropped.
                    head = self._buffer.popleft()
                    self._buffer.appendleft(LiveFrame(head.time_s, head.image, head.gap_before or dropped.gap_before))
            self._buffer.append(item)
            self._cond.notify_all()
        self._last_t = t
        self._last_frame_wall = time.monotonic()

    def _reconnect(self, reason: str) -> OpenedVideo | None:
        last_error = reason
        for attempt in range(1, self.policy.reconnect_attempts + 1):
            base = min(self.policy.reconnect_backoff_max_s, self.policy.reconnect_backoff_s * 2 ** (attempt - 1))
            delay = base / 2 + random.uniform(0.0, base / 2)  # "equal jitter": never zero, never in lockstep
            self._emit(SourceStatus.RECONNECTING, last_error, attempt=attempt, delay_s=delay)
            if self._stop.wait(delay):
                return None
            self._connected_wall = time.monotonic()
            try:
                conn = open_video(self.target, self.policy, live=True)
            except SourceError as exc:
                last_error = f"reconnect attempt {attempt} failed: {exc}"
                continue
            # CONNECTED is announced with the first frame of this connection, when the gap is known.
            self._pending_gap_reason = reason
            return conn
        return None
