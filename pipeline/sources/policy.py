"""What a source may be: the URI checks (schemes, confined local paths) and the FFmpeg options they imply.

User text never reaches a shell; it reaches FFmpeg only after these checks, and every FFmpeg open
carries a ``protocol_whitelist`` (no ``file``/``concat``/``subfile``/``pipe``/``data`` for network
sources, only ``file`` for local ones) and a ``format_whitelist`` (video containers; ``hls`` only for
network URLs and only when ``hls`` is an allowed scheme), so a playlist cannot reach beyond them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.settings import SamplingSettings, SourceSettings
from pipeline.sources.errors import SourceForbidden, SourceNotFound, UnsupportedSource

# Protocols that read local resources or wrap other URLs; never allowed for a URL a user gave.
LOCAL_PROTOCOLS = frozenset(
    {"file", "pipe", "fd", "concat", "concatf", "subfile", "data", "cache", "async", "crypto", "android_content"}
)
# User-facing scheme → the FFmpeg protocols an open of that scheme may use underneath.
NETWORK_PROTOCOLS: dict[str, frozenset[str]] = {
    "http": frozenset({"http", "tcp"}),
    "https": frozenset({"https", "http", "tls", "tcp"}),
    "rtsp": frozenset({"rtsp", "rtp", "srtp", "udp", "tcp"}),
    "rtsps": frozenset({"rtsps", "rtsp", "rtp", "srtp", "udp", "tcp", "tls"}),
    "rtmp": frozenset({"rtmp", "tcp"}),
    "rtmps": frozenset({"rtmps", "rtmp", "tls", "tcp"}),
    "udp": frozenset({"udp"}),
    "tcp": frozenset({"tcp"}),
    "srt": frozenset({"srt", "udp"}),
    "rtp": frozenset({"rtp", "udp"}),
}
LIVE_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "udp", "tcp", "srt", "rtp"})
# Demuxers allowed to parse what a source sends: video containers and elementary streams only.
FILE_FORMATS = (
    "mov,mp4,m4a,3gp,3g2,mj2",
    "matroska,webm",
    "avi",
    "mpegts",
    "mpeg",
    "flv",
    "live_flv",
    "ogg",
    "asf",
    "nut",
    "ivf",
    "h264",
    "hevc",
    "m4v",
    "mpegvideo",
    "mjpeg",
    "yuv4mpegpipe",
)
NETWORK_ONLY_FORMATS = ("rtsp", "rtp", "sdp")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


@dataclass(frozen=True)
class SourcePolicy:
    """Everything a source needs to know about limits and permissions; build it with ``from_settings``."""

    allowed_roots: tuple[Path, ...]
    allowed_schemes: frozenset[str]
    max_width: int
    max_height: int
    max_duration_s: float
    max_frames: int
    max_bytes: int
    open_timeout_s: float
    read_timeout_s: float
    reconnect_attempts: int
    reconnect_backoff_s: float
    reconnect_backoff_max_s: float
    live_buffer_frames: int
    file_backend: str = "decord"
    decord_timeout_s: float = 30.0
    decode_threads: int = 0
    rtsp_transport: str = "tcp"
    max_fps: float | None = None

    @classmethod
    def from_settings(
        cls, sources: SourceSettings, sampling: SamplingSettings | None = None, **overrides: object
    ) -> SourcePolicy:
        """Resolve the roots now (relative roots are relative to the current directory)."""
        fields = sources.model_dump()
        fields["allowed_roots"] = tuple(Path(os.path.realpath(root)) for root in sources.allowed_roots)
        fields["allowed_schemes"] = frozenset(s.lower() for s in sources.allowed_schemes)
        fields["max_fps"] = sampling.max_fps if sampling is not None else None
        fields.update(overrides)
        if "allowed_roots" in overrides:
            fields["allowed_roots"] = tuple(Path(os.path.realpath(r)) for r in fields["allowed_roots"])  # type: ignore[union-attr]
        return cls(**fields)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Target:
    """A checked source location: a confined local path, or a network URL with its FFmpeg options."""

    uri: str  # what the user gave (for messages)
    scheme: str  # "file" for local paths
    location: str  # absolute real path, or the URL as given
    live_hint: bool | None  # True for inherently live schemes, None when the content decides

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"


def resolve_uri(uri: str, policy: SourcePolicy) -> Target:
    """Check ``uri`` against the policy; raises SourceForbidden / SourceNotFound / UnsupportedSource."""
    if not isinstance(uri, str) or not uri.strip():
        raise UnsupportedSource("expected a file path or URL, got an empty value")
    if "\x00" in uri or any(ord(c) < 32 for c in uri):
        raise SourceForbidden("contains control characters")
    match = _SCHEME.match(uri)
    scheme = match.group(1).lower() if match else None
    if scheme is None or scheme == "file":
        if "file" not in policy.allowed_schemes:
            raise SourceForbidden("local files are not allowed (add 'file' to sources.allowed_schemes)")
        return Target(uri=uri, scheme="file", location=str(_confined_path(uri, scheme, policy)), live_hint=False)
    if scheme in LOCAL_PROTOCOLS:
        raise SourceForbidden(f"the {scheme!r} protocol reads local data and is never allowed for sources")
    if scheme not in policy.allowed_schemes:
        allowed = ", ".join(sorted(policy.allowed_schemes))
        raise SourceForbidden(f"scheme {scheme!r} is not allowed (allowed: {allowed})")
    parts = urlsplit(uri)
    if not parts.hostname:
        raise UnsupportedSource(f"{scheme} URL has no host: expected {scheme}://host[:port]/...")
    return Target(uri=uri, scheme=scheme, location=uri, live_hint=True if scheme in LIVE_SCHEMES else None)


def _confined_path(uri: str, scheme: str | None, policy: SourcePolicy) -> Path:
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise SourceForbidden("file:// URLs must name a local path (file:///path), not a host")
        raw = unquote(parts.path)
    else:
        raw = uri
    path = Path(raw).expanduser() if raw.startswith("~") else Path(raw)
    # realpath follows every symlink, so a link pointing out of a root resolves to where it really leads.
    real = Path(os.path.realpath(path))
    if not any(real == root or root in real.parents for root in policy.allowed_roots):
        raise SourceForbidden("path is outside the allowed roots (sources.allowed_roots)")
    if not real.exists():
        raise SourceNotFound(f"no such file: {uri}")
    if not real.is_file():
        raise UnsupportedSource(f"not a regular file: {uri}")
    return real


def protocol_whitelist(target: Target, policy: SourcePolicy) -> str:
    """The FFmpeg protocols an open of ``target`` may touch, nested opens (HLS segments) included."""
    if target.is_local:
        return "file"
    allowed: set[str] = set()
    for scheme in policy.allowed_schemes:
        allowed |= NETWORK_PROTOCOLS.get(scheme, frozenset())
    allowed |= NETWORK_PROTOCOLS.get(target.scheme, frozenset({target.scheme}))
    return ",".join(sorted(allowed - LOCAL_PROTOCOLS))


def format_whitelist(target: Target, policy: SourcePolicy) -> str:
    formats = list(FILE_FORMATS)
    if not target.is_local:
        formats += NETWORK_ONLY_FORMATS
        if "hls" in policy.allowed_schemes:
            formats.append("hls")
    return ",".join(formats)


def ffmpeg_options(target: Target, policy: SourcePolicy, *, live: bool) -> dict[str, str]:
    """Options for ``av.open``: whitelists always; low-latency probing and transport for live URLs."""
    options = {
        "protocol_whitelist": protocol_whitelist(target, policy),
        "format_whitelist": format_whitelist(target, policy),
    }
    if not target.is_local:
        # HLS: refuse segment names that are not media files (FFmpeg checks extensions with this).
        options["allowed_extensions"] = "ts,m4s,mp4,m4v,aac,vtt,m3u8,mov,mkv,webm"
        if target.scheme.startswith("rtsp"):
            options["rtsp_transport"] = policy.rtsp_transport
    if live:
        # Probing a live stream reads this much before the first frame; keep the first answer quick.
        options["analyzeduration"] = "1000000"
        options["probesize"] = "1000000"
    return options
