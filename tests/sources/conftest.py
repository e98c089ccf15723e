from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sources_media import VFR_PTS_MS, write_video  # noqa: E402

from pipeline.settings import SamplingSettings, SourceSettings  # noqa: E402
from pipeline.sources import SourcePolicy  # noqa: E402


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def videos(media_dir) -> dict[str, Path]:
    """The session's real test files, each frame numbered in its picture."""
    return {
        "h264_mp4": write_video(media_dir / "h264.mp4", codec="libx264", frames=75, fps=25),
        "vp9_webm": write_video(media_dir / "vp9.webm", codec="libvpx-vp9", frames=50, fps=25),
        "mpeg4_avi": write_video(media_dir / "mpeg4.avi", codec="mpeg4", frames=50, fps=25),
        "mpeg4_mkv": write_video(media_dir / "mpeg4.mkv", codec="mpeg4", frames=50, fps=25),
        "bframes_mp4": write_video(media_dir / "bframes.mp4", codec="libx264", frames=100, fps=25, bframes=3, gop=25),
        "vfr_mp4": write_video(media_dir / "vfr.mp4", codec="libx264", frames=len(VFR_PTS_MS), pts_ms=VFR_PTS_MS),
    }


def make_policy(roots: list[Path], **overrides) -> SourcePolicy:
    sampling = {k: overrides.pop(k) for k in ("max_fps",) if k in overrides}
    fields = {"allowed_roots": roots, "open_timeout_s": 2.0, "read_timeout_s": 2.0, **overrides}
    settings = SourceSettings(**fields)
    return SourcePolicy.from_settings(settings, SamplingSettings(**sampling))


@pytest.fixture
def policy_for(media_dir):
    def build(*roots: Path, **overrides) -> SourcePolicy:
        return make_policy(list(roots) or [media_dir], **overrides)

    return build
