"""Typed errors for video sources; every message says which parameter is wrong and what a user can do.

SourceError
├── SourceNotFound        the file or URL does not exist (404, no such file, connection refused)
├── SourceForbidden       refused by policy: scheme, path outside the allowed roots, protocol whitelist
├── UnsupportedSource     readable but not usable: no video stream, unknown codec, container not allowed
├── CorruptVideo          not a video, truncated, damaged, or zero frames
├── LimitExceeded         resolution, duration, frame count or bytes above the configured limit
├── SourceTimeout         nothing within open_timeout_s / read_timeout_s
│   └── StreamStalled     a live stream that stopped sending (and did not come back)
├── SourceClosed          the source was closed or cancelled while a caller waited on it
└── InvalidSampling       a bad sampling request (frames, start_s/end_s, window_s, stride_s); also a ValueError
"""

from __future__ import annotations


class SourceError(Exception):
    """Base of every video-source error. ``param`` names the offending input (``uri``, ``max_width``…)."""

    def __init__(self, message: str, *, param: str = "uri") -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.detail = message

    def __reduce__(self):
        # Errors cross processes (Ray): rebuild from the bare message so the prefix is not doubled.
        return _rebuild, (type(self), self.detail, self.param)


def _rebuild(cls: type[SourceError], message: str, param: str) -> SourceError:
    return cls(message, param=param)


class SourceNotFound(SourceError):
    pass


class SourceForbidden(SourceError):
    pass


class UnsupportedSource(SourceError):
    pass


class CorruptVideo(SourceError):
    pass


class LimitExceeded(SourceError):
    pass


class SourceTimeout(SourceError):
    pass


class StreamStalled(SourceTimeout):
    pass


class SourceClosed(SourceError):
    pass


class InvalidSampling(SourceError, ValueError):
    pass
