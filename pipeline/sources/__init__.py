"""Video sources: a file path or stream URL → clips of T frames with timestamps, cheaply and safely.

    policy = SourcePolicy.from_settings(settings.sources, settings.sampling)
    with open_source("clips/cat.mp4", policy) as source:          # FileSource (seekable)
        clip = sample_clip(source, frames=8)                        # ask: uniform over the video
    with open_source("http://cam/live.ts", policy, on_event=publish) as source:   # LiveSource
        for clip in rolling_clips(source, window_s=8, stride_s=4, frames=8, cancel=stop):
            pixel_values = ClipPreprocessor.from_pretrained(model_dir)(clip.frames)  # [T, 3, S, S]

Errors are ``SourceError`` subclasses (see ``errors``); live status arrives as ``SourceEvent``s.
"""

from pipeline.sources.errors import (
    CorruptVideo,
    InvalidSampling,
    LimitExceeded,
    SourceClosed,
    SourceError,
    SourceForbidden,
    SourceNotFound,
    SourceTimeout,
    StreamStalled,
    UnsupportedSource,
)
from pipeline.sources.factory import VideoSource, open_source
from pipeline.sources.file import FileSource
from pipeline.sources.live import LiveFrame, LiveSource
from pipeline.sources.policy import SourcePolicy, Target, resolve_uri
from pipeline.sources.preprocess import ClipPreprocessor
from pipeline.sources.sampling import (
    DEFAULT_FRAMES,
    WindowSelector,
    rolling_clips,
    sample_clip,
    uniform_times,
)
from pipeline.sources.types import Clip, Gap, SourceEvent, SourceStatus, VideoInfo

__all__ = [
    "DEFAULT_FRAMES",
    "Clip",
    "ClipPreprocessor",
    "CorruptVideo",
    "FileSource",
    "Gap",
    "InvalidSampling",
    "LimitExceeded",
    "LiveFrame",
    "LiveSource",
    "SourceClosed",
    "SourceError",
    "SourceEvent",
    "SourceForbidden",
    "SourceNotFound",
    "SourcePolicy",
    "SourceStatus",
    "SourceTimeout",
    "StreamStalled",
    "Target",
    "UnsupportedSource",
    "VideoInfo",
    "VideoSource",
    "WindowSelector",
    "open_source",
    "resolve_uri",
    "rolling_clips",
    "sample_clip",
    "uniform_times",
]
