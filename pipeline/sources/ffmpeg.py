"""Opening a checked Target with PyAV, and turning FFmpeg failures into typed source errors.

PyAV's FFmpeg logging stays off (it costs a lock per message and can deadlock threaded decoders), so
errors are classified from the exception class, plus one check of our own: when an http(s) open
fails and the body is an HLS playlist, the playlist is read (≤ 1 MB) to name a forbidden entry.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import av
import av.container
import av.error
import av.video

from pipeline.sources.errors import (
    CorruptVideo,
    LimitExceeded,
    SourceError,
    SourceForbidden,
    SourceNotFound,
    SourceTimeout,
    UnsupportedSource,
)
from pipeline.sources.policy import LOCAL_PROTOCOLS, NETWORK_PROTOCOLS, SourcePolicy, Target, ffmpeg_options

PLAYLIST_PEEK_BYTES = 1 << 20


@dataclass
class OpenedVideo:
    container: av.container.InputContainer
    stream: av.video.VideoStream
    start_s: float  # the stream's first presentation time; source timelines count from here
    time_base: float


def open_video(target: Target, policy: SourcePolicy, *, live: bool) -> OpenedVideo:
    """Open ``target``, pick its video stream and enforce the static limits (size, duration, frames)."""
    options = ffmpeg_options(target, policy, live=live)
    started = time.monotonic()
    try:
        container = av.open(
            target.location,
            options=options,
            timeout=(policy.open_timeout_s, policy.read_timeout_s),
        )
    except av.error.FFmpegError as exc:
        raise _classify_open_error(exc, target, policy, time.monotonic() - started) from None
    except OSError as exc:  # PyAV maps some errno values onto the builtin OSError family
        raise _classify_open_error(exc, target, policy, time.monotonic() - started) from None
    try:
        return _pick_video(container, target, policy, live=live)
    except BaseException:
        container.close()
        raise


def _pick_video(
    container: av.container.InputContainer, target: Target, policy: SourcePolicy, *, live: bool
) -> OpenedVideo:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["nothing"]
        raise UnsupportedSource(f"has no video stream (it holds {', '.join(kinds)})")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx is None:
        raise UnsupportedSource("its video codec is unknown to FFmpeg; re-encode it (e.g. H.264)")
    check_size(ctx.width, ctx.height, policy)
    tb = float(stream.time_base) if stream.time_base is not None else 1.0
    start_s = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    if not live:
        duration_s = _duration_s(container, stream)
        if duration_s is not None and duration_s > policy.max_duration_s:
            raise LimitExceeded(
                f"video lasts {duration_s:.0f} s, above sources.max_duration_s={policy.max_duration_s:g}"
            )
        frames = declared_frames(container, stream)
        if frames is not None and frames > policy.max_frames:
            raise LimitExceeded(f"video has {frames} frames, above sources.max_frames={policy.max_frames}")
    stream.thread_type = "AUTO"
    stream.thread_count = policy.decode_threads
    return OpenedVideo(container=container, stream=stream, start_s=start_s, time_base=tb)


def check_size(width: int, height: int, policy: SourcePolicy) -> None:
    if width > policy.max_width or height > policy.max_height:
        raise LimitExceeded(
            f"video is {width}×{height}, above sources.max_width×max_height="
            f"{policy.max_width}×{policy.max_height}"
        )


def _duration_s(container: av.container.InputContainer, stream: av.video.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def declared_frames(container: av.container.InputContainer, stream: av.video.VideoStream) -> int | None:
    if stream.frames:
        return int(stream.frames)
    duration_s = _duration_s(container, stream)
    rate = stream.average_rate or stream.guessed_rate
    if duration_s is not None and rate:
        return int(round(duration_s * float(rate)))
    return None


def _classify_open_error(exc: Exception, target: Target, policy: SourcePolicy, elapsed_s: float = 0.0) -> SourceError:
    what = "file" if target.is_local else "stream"
    if isinstance(exc, av.error.ExitError):
        return SourceTimeout(f"no answer within sources.open_timeout_s={policy.open_timeout_s:g} s")
    if isinstance(exc, (av.error.HTTPNotFoundError, FileNotFoundError)):
        return SourceNotFound(f"{what} not found")
    if isinstance(exc, (av.error.HTTPForbiddenError, av.error.HTTPUnauthorizedError, PermissionError)):
        return SourceForbidden(f"access to the {what} was refused ({exc.strerror if hasattr(exc, 'strerror') else exc})")
    if isinstance(exc, (av.error.HTTPClientError, av.error.HTTPServerError, av.error.HTTPOtherClientError)):
        return SourceNotFound(f"the server refused the request ({getattr(exc, 'strerror', exc)})")
    if isinstance(exc, (ConnectionError, av.error.ConnectionRefusedError)):
        return SourceNotFound("could not connect (connection refused or reset)")
    if isinstance(exc, TimeoutError):
        return SourceTimeout(f"no answer within sources.open_timeout_s={policy.open_timeout_s:g} s")
    if isinstance(exc, av.error.ProtocolNotFoundError):
        return UnsupportedSource("this FFmpeg build has no such protocol")
    if not target.is_local and elapsed_s >= 0.95 * policy.open_timeout_s:
        # Some demuxers (rtsp, a TLS handshake) turn the interrupt at open_timeout_s into a generic
        # error (invalid data, I/O error); a server that sent nothing in that time timed out.
        return SourceTimeout(f"no answer within sources.open_timeout_s={policy.open_timeout_s:g} s")
    forbidden = _forbidden_playlist_entry(target, policy)
    if forbidden is not None:
        return SourceForbidden(f"the playlist names {forbidden!r}, a protocol sources may not read")
    if isinstance(exc, av.error.ArgumentError):
        return UnsupportedSource("its container format is not one of the allowed video formats")
    if isinstance(exc, av.error.EOFError):
        return CorruptVideo(f"the {what} ends before any video data (empty or truncated)")
    if isinstance(exc, av.error.InvalidDataError):
        return CorruptVideo(f"the {what} is not a readable video (damaged, truncated, or not a video at all)")
    return CorruptVideo(f"the {what} could not be opened: {getattr(exc, 'strerror', None) or exc}")


def _forbidden_playlist_entry(target: Target, policy: SourcePolicy) -> str | None:
    """For an http(s) HLS playlist: the first entry whose scheme FFmpeg was not allowed to open."""
    if target.scheme not in ("http", "https"):
        return None
    try:
        with urllib.request.urlopen(target.location, timeout=policy.open_timeout_s) as response:  # noqa: S310
            head = response.read(PLAYLIST_PEEK_BYTES)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    text = head.decode("utf-8", errors="replace")
    if not text.lstrip("\ufeff").startswith("#EXTM3U"):
        return None
    network_ok = set()
    for scheme in policy.allowed_schemes:
        network_ok |= NETWORK_PROTOCOLS.get(scheme, frozenset())
    for line in text.splitlines():
        entries = [line.strip()] if line.strip() and not line.startswith("#") else []
        if 'URI="' in line:
            entries.append(line.split('URI="', 1)[1].split('"', 1)[0])
        for entry in entries:
            absolute = urllib.parse.urljoin(target.location, entry)
            scheme = urllib.parse.urlsplit(absolute).scheme.lower()
            if scheme in LOCAL_PROTOCOLS or scheme not in network_ok:
                return absolute if len(absolute) < 200 else absolute[:200] + "…"
    return None


def classify_read_error(exc: Exception, *, what: str) -> SourceError:
    """An error while demuxing/decoding an already opened source."""
    if isinstance(exc, av.error.ExitError):
        return SourceTimeout(f"the {what} stopped sending data (read timeout)")
    if isinstance(exc, av.error.DecoderNotFoundError):
        return UnsupportedSource(f"the {what}'s video codec cannot be decoded by this FFmpeg build")
    return CorruptVideo(f"the {what} is damaged: {getattr(exc, 'strerror', None) or exc}")
