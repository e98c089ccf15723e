"""``open_source``: the one entry point from a user's URI to a FileSource or a LiveSource."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.sources.errors import SourceError, UnsupportedSource
from pipeline.sources.ffmpeg import open_video
from pipeline.sources.file import FileSource
from pipeline.sources.live import LiveSource
from pipeline.sources.policy import SourcePolicy, resolve_uri
from pipeline.sources.types import SourceEvent

VideoSource = FileSource | LiveSource


def open_source(
    uri: str,
    policy: SourcePolicy,
    *,
    live: bool | None = None,
    on_event: Callable[[SourceEvent], None] | None = None,
) -> VideoSource:
    """Check ``uri`` against ``policy`` and open it.

    Local paths and ``file://`` URLs are files. rtsp/rtmp/udp/tcp/… are live. For http(s) the
    content decides unless ``live`` says: a video with a known duration (an MP4, a finished HLS
    playlist) is a seekable file, anything else (MPEG-TS as it is produced, a live playlist) is live.
    Raises a ``SourceError`` subclass for every refusal; ``on_event`` receives live status events.
    """
    target = resolve_uri(uri, policy)
    if target.is_local:
        if live:
            raise UnsupportedSource("a local file cannot be read as a live stream")
        return FileSource(target, policy)
    if live is None:
        live = target.live_hint
    if live is None:
        opened = open_video(target, policy, live=True)
        duration = opened.container.duration
        if duration is not None and duration > 0:
            opened.container.close()
            return FileSource(target, policy)
        return LiveSource(target, policy, on_event=on_event, opened=opened)
    if live:
        return LiveSource(target, policy, on_event=on_event)
    return FileSource(target, policy)


__all__ = ["VideoSource", "open_source", "SourceError"]
