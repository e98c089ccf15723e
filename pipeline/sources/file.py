"""Seekable sources: local files (decord in a watched child process, PyAV fallback) and http(s) files (PyAV).

Shapes: T requested times; frames [T, H, W, 3] uint8 RGB; timestamps [T] float64 seconds.

Which frame a time picks: the frame on screen at that time, i.e. the last frame whose presentation
time is ≤ t (the first frame for t before it). Both backends apply this rule to the same timeline
(0 = first frame), so they return the same frames. Decode cost follows the requested times: PyAV
seeks to the keyframe before each time that is far ahead and decodes forward only from there.
decord is trusted only after its metadata matches PyAV's probe and its first answer matches PyAV's
decode of one of the requested frames; otherwise (and on any decord error or overrun) PyAV takes over.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import av
import av.error
import numpy as np

from pipeline.sources.decord_reader import DecordFailed, DecordReader
from pipeline.sources.errors import CorruptVideo, LimitExceeded, SourceClosed, SourceError, UnsupportedSource
from pipeline.sources.ffmpeg import OpenedVideo, check_size, classify_read_error, declared_frames, open_video
from pipeline.sources.policy import SourcePolicy, Target
from pipeline.sources.types import VideoInfo

log = logging.getLogger(__name__)

# Decode forward instead of seeking while the next time is at most this far ahead (or 2 GOPs).
FORWARD_DECODE_S = 2.0
# More consecutive undecodable packets than this means the file is damaged, not glitchy.
MAX_BAD_PACKETS = 64
# A requested time this far past the last frame that exists means the file is shorter than it says.
TRUNCATION_TOLERANCE_S = 1.0
FRAME_CACHE = 64
# decord and PyAV decode with the same FFmpeg decoders; more than this mean grey-level difference on
# the spot-checked frame means decord returned another frame (or garbage).
DECORD_MAX_MEAN_DIFF = 2.0


class PyAVFileReader:
    """Random access by time on one PyAV container; holds at most a few decoded frames."""

    def __init__(self, opened: OpenedVideo, policy: SourcePolicy, *, what: str) -> None:
        self._container = opened.container
        self._stream = opened.stream
        self._tb = float(opened.stream.time_base)
        self._policy = policy
        self._what = what
        self._frames: Iterator[av.VideoFrame] | None = None
        self._prev: av.VideoFrame | None = None  # last decoded frame at or before the current time
        self._ahead: av.VideoFrame | None = None  # decoded, not yet passed
        self._gop_s = 0.0
        self._last_key_s: float | None = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.bytes_read = 0
        self.frames_decoded = 0
        self._origin_s = 0.0
        self._frames = self._decode()
        first = next(self._frames, None)
        if first is None:
            raise CorruptVideo(f"the {what} contains no video frames")
        self._origin_s = self._abs_time(first)
        self._last_key_s = None
        check_size(first.width, first.height, policy)
        self.width, self.height = first.width, first.height
        self._ahead = first

    def frames_at(self, times_s: Sequence[float], duration_s: float | None) -> tuple[np.ndarray, np.ndarray]:
        """Frames on screen at each time (times on the 0-based timeline, any order)."""
        order = np.argsort(np.asarray(times_s, dtype=np.float64), kind="stable")
        picked: list[av.VideoFrame | None] = [None] * len(times_s)
        for i in order:
            t = float(times_s[i])
            if self._should_seek(t):
                self._seek(t)
            picked[i] = self._advance_to(t, duration_s)
        images = [self._to_rgb(frame) for frame in picked]  # type: ignore[arg-type]
        timestamps = np.array([self._time(frame) for frame in picked], dtype=np.float64)  # type: ignore[arg-type]
        return np.stack(images), timestamps  # [T, H, W, 3], [T]

    def close(self) -> None:
        self._frames = None
        self._prev = self._ahead = None
        self._container.close()

    # -- decoding -------------------------------------------------------------------------------

    def _abs_time(self, frame: av.VideoFrame) -> float:
        if frame.pts is not None:
            return frame.pts * self._tb
        if frame.time is not None:
            return float(frame.time)
        raise CorruptVideo(f"the {self._what} has frames without timestamps")

    def _time(self, frame: av.VideoFrame) -> float:
        return self._abs_time(frame) - self._origin_s

    def _decode(self) -> Iterator[av.VideoFrame]:
        bad = 0
        try:
            for packet in self._container.demux(self._stream):
                self.bytes_read += packet.size
                if self.bytes_read > self._policy.max_bytes:
                    raise LimitExceeded(f"read more than sources.max_bytes={self._policy.max_bytes} bytes")
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    bad += 1
                    if bad > MAX_BAD_PACKETS:
                        raise CorruptVideo(f"the {self._what} is damaged: too many undecodable packets") from None
                    continue
                bad = 0
                for frame in frames:
                    self.frames_decoded += 1
                    if frame.key_frame:
                        t = self._abs_time(frame)
                        if self._last_key_s is not None and t > self._last_key_s:
                            self._gop_s = max(self._gop_s, t - self._last_key_s)
                        self._last_key_s = t
                    yield frame
        except SourceError:
            raise
        except (av.error.FFmpegError, OSError) as exc:
            raise classify_read_error(exc, what=self._what) from None

    def _position(self) -> float | None:
        frame = self._prev if self._prev is not None else self._ahead
        return None if frame is None else self._time(frame)

    def _should_seek(self, t: float) -> bool:
        position = self._position()
        if self._frames is None or position is None:
            return True
        if t < position - 1e-6:
            return True
        return t - position > max(FORWARD_DECODE_S, 2 * self._gop_s)

    def _seek(self, t: float) -> None:
        target = t
        for attempt in range(8):
            offset = int(math.floor((target + self._origin_s) / self._tb))
            try:
                self._container.seek(offset, stream=self._stream, backward=True, any_frame=False)
            except (av.error.FFmpegError, OSError) as exc:
                raise classify_read_error(exc, what=self._what) from None
            self._last_key_s = None
            self._frames = self._decode()
            self._prev = None
            self._ahead = next(self._frames, None)
            landed = None if self._ahead is None else self._time(self._ahead)
            if (landed is not None and landed <= t + 1e-6) or target <= 0.0:
                return
            # Landed after t (or past the end): the index put the keyframe late; step back further.
            target = max(0.0, target - max(1.0, self._gop_s) * 2**attempt)

    def _advance_to(self, t: float, duration_s: float | None) -> av.VideoFrame:
        while True:
            if self._ahead is None:
                self._ahead = next(self._frames, None) if self._frames is not None else None
                if self._ahead is None:  # end of data
                    if self._prev is None:
                        raise CorruptVideo(f"the {self._what} has no decodable frame near {t:.3f} s")
                    last = self._time(self._prev)
                    tolerance = max(TRUNCATION_TOLERANCE_S, 0.1 * (duration_s or 0.0))
                    if t - last > tolerance:
                        raise CorruptVideo(
                            f"the {self._what}'s video data ends at {last:.2f} s but it claims "
                            f"{duration_s or 0:.2f} s (truncated?)"
                        )
                    return self._prev
            if self._time(self._ahead) > t + 1e-6:
                return self._prev if self._prev is not None else self._ahead
            self._prev, self._ahead = self._ahead, None

    def _to_rgb(self, frame: av.VideoFrame) -> np.ndarray:
        key = frame.pts if frame.pts is not None else id(frame)
        image = self._cache.get(key)
        if image is None:
            check_size(frame.width, frame.height, self._policy)
            image = frame.to_ndarray(format="rgb24")  # [H, W, 3]
            self._cache[key] = image
            while len(self._cache) > FRAME_CACHE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        if image.shape[:2] != (self.height, self.width):
            raise UnsupportedSource(
                f"the {self._what} changes resolution mid-stream ({self.width}×{self.height} → "
                f"{image.shape[1]}×{image.shape[0]}); re-encode it at one size"
            )
        return image


class FileSource:
    """A seekable video: ``frames_at(times)`` returns the frames on screen at those times."""

    is_live = False

    def __init__(self, target: Target, policy: SourcePolicy) -> None:
        self.target = target
        self.policy = policy
        self._closed = False
        if target.is_local:
            size = os.path.getsize(target.location)
            if size > policy.max_bytes:
                raise LimitExceeded(f"file is {size} bytes, above sources.max_bytes={policy.max_bytes}")
        what = "file" if target.is_local else "video"
        opened = open_video(target, policy, live=False)
        try:
            self._pyav = PyAVFileReader(opened, policy, what=what)
        except BaseException:
            opened.container.close()
            raise
        container, stream = opened.container, opened.stream
        duration_s = None
        if stream.duration is not None:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration_s = container.duration / 1_000_000
        if duration_s is None or duration_s <= 0:
            self._pyav.close()
            raise UnsupportedSource("the video does not declare its duration; open it as a live stream")
        rate = stream.average_rate or stream.guessed_rate
        self._declared_frames = declared_frames(container, stream)
        self.fallback_reason: str | None = None
        self._decord: DecordReader | None = None
        self._decord_verified = False
        self._decord_times: np.ndarray | None = None
        backend = "pyav"
        if target.is_local and policy.file_backend == "decord":
            backend = self._start_decord(duration_s)
            if self._decord is not None and self._decord_times is not None:
                duration_s = float(self._decord_times[-1, 1])
        self.info = VideoInfo(
            uri=target.uri,
            live=False,
            width=self._pyav.width,
            height=self._pyav.height,
            codec=stream.codec_context.name,
            container=container.format.name,
            backend=backend,
            duration_s=duration_s,
            fps=float(rate) if rate else None,
            frame_count=self._decord.num_frames if self._decord is not None else self._declared_frames,
        )

    @property
    def backend(self) -> str:
        return "decord" if self._decord is not None else "pyav"

    @property
    def frames_decoded(self) -> int:
        """Frames PyAV decoded so far (decord's own count is not visible from its child process)."""
        return self._pyav.frames_decoded

    def frames_at(self, times_s: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """[T, H, W, 3] uint8 frames on screen at ``times_s`` (seconds from the first frame), and their times."""
        if self._closed:
            raise SourceClosed("the source is closed")
        times = np.asarray(times_s, dtype=np.float64)
        if times.ndim != 1 or times.size == 0 or not np.all(np.isfinite(times)):
            raise ValueError("times_s must be a non-empty list of finite seconds")
        times = np.clip(times, 0.0, self.info.duration_s)
        if self._decord is not None:
            try:
                frames, stamps = self._decord_frames(times)
            except DecordFailed as exc:
                self._fall_back(f"decord failed while reading: {exc}")
            else:
                if self._decord_verified or self._decord_agrees(times, frames, stamps):
                    return frames, stamps
        return self._pyav.frames_at(times.tolist(), self.info.duration_s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._decord is not None:
            self._decord.close()
            self._decord = None
        self._pyav.close()

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- decord ---------------------------------------------------------------------------------

    def _start_decord(self, duration_s: float) -> str:
        try:
            reader = DecordReader(
                self.target.location, threads=self.policy.decode_threads, timeout_s=self.policy.decord_timeout_s
            )
        except DecordFailed as exc:
            self._fall_back(f"decord could not open the file: {exc}")
            return "pyav"
        reason = self._decord_misreads(reader, duration_s)
        if reason is not None:
            reader.close()
            self._fall_back(reason)
            return "pyav"
        self._decord = reader
        starts = reader.frame_times_s[:, 0]
        self._decord_times = reader.frame_times_s - starts[0]  # [n, 2] on the 0-based timeline
        return "decord"

    def _decord_misreads(self, reader: DecordReader, duration_s: float) -> str | None:
        """Why decord's view of the file disagrees with PyAV's (then decord is not trusted), or None."""
        if reader.num_frames <= 0:
            return "decord sees no frames"
        if (reader.width, reader.height) != (self._pyav.width, self._pyav.height):
            return f"decord sees {reader.width}×{reader.height}, PyAV {self._pyav.width}×{self._pyav.height}"
        times = reader.frame_times_s
        if not np.all(np.isfinite(times)) or np.any(np.diff(times[:, 0]) < 0):
            return "decord reports non-monotonic frame times"
        declared = self._declared_frames
        if declared is not None and abs(reader.num_frames - declared) > max(2, 0.02 * declared):
            return f"decord counts {reader.num_frames} frames, the container declares {declared}"
        span = float(times[-1, 1] - times[0, 0])
        if abs(span - duration_s) > max(1.0, 0.05 * duration_s):
            return f"decord's frames span {span:.2f} s, the container declares {duration_s:.2f} s"
        return None

    def _decord_frames(self, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self._decord is not None and self._decord_times is not None
        starts = self._decord_times[:, 0]  # [n]
        index = np.clip(np.searchsorted(starts, times + 1e-6, side="right") - 1, 0, len(starts) - 1)  # [T]
        unique, inverse = np.unique(index, return_inverse=True)
        batch = self._decord.get([int(i) for i in unique])  # [U, H, W, 3]
        return batch[inverse], starts[index]  # [T, H, W, 3], [T]

    def _decord_agrees(self, times: np.ndarray, frames: np.ndarray, stamps: np.ndarray) -> bool:
        """Spot-check decord's first answer against PyAV on one frame (both run FFmpeg's decoder, so
        they agree to the pixel on a healthy file); a disagreement means decord misreads the file."""
        i = int(np.argmin(times))
        reference, ref_stamps = self._pyav.frames_at([float(times[i])], self.info.duration_s)
        diff = float(np.abs(reference[0].astype(np.int16) - frames[i].astype(np.int16)).mean())
        if diff > DECORD_MAX_MEAN_DIFF or abs(float(ref_stamps[0]) - float(stamps[i])) > 1e-3:
            self._fall_back(
                f"decord's frame at {times[i]:.3f} s differs from PyAV's (mean |diff| {diff:.1f}, "
                f"times {stamps[i]:.3f} vs {ref_stamps[0]:.3f} s)"
            )
            return False
        self._decord_verified = True
        return True

    def _fall_back(self, reason: str) -> None:
        log.warning("%s: using PyAV instead of decord: %s", self.target.uri, reason)
        self.fallback_reason = reason
        if self._decord is not None:
            self._decord.close()
            self._decord = None
