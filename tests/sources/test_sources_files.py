"""File sources on real media: the sampled frames' own numbers prove which frames came back."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from sources_media import VFR_PTS_MS, read_number, write_video

from pipeline.sources import (
    FileSource,
    InvalidSampling,
    open_source,
    rolling_clips,
    sample_clip,
    uniform_times,
)

BACKENDS = ["decord", "pyav"]
CONSTANT_RATE = {"h264_mp4": 75, "vp9_webm": 50, "mpeg4_avi": 50, "mpeg4_mkv": 50, "bframes_mp4": 100}


def numbers(frames: np.ndarray) -> list[int]:
    return [read_number(f) for f in frames]


def on_screen(t: float, starts_s: list[float]) -> int:
    """Expected frame number at time t: the last frame whose start is ≤ t."""
    return max(i for i, s in enumerate(starts_s) if s <= t + 1e-9) if t >= starts_s[0] else 0


def test_uniform_times_are_segment_centres():
    assert np.allclose(uniform_times(0.0, 8.0, 8), np.arange(8) + 0.5)
    assert np.allclose(uniform_times(2.0, 4.0, 4), [2.25, 2.75, 3.25, 3.75])
    assert np.allclose(uniform_times(0.0, 2.0, 4, max_fps=2.0), [0.0, 0.5, 1.0, 1.5])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CONSTANT_RATE))
def test_ask_samples_uniformly_over_whole_video(videos, policy_for, name, backend):
    count = CONSTANT_RATE[name]
    with open_source(str(videos[name]), policy_for(file_backend=backend)) as source:
        assert isinstance(source, FileSource) and not source.is_live
        assert source.backend == backend, source.fallback_reason
        assert source.info.duration_s == pytest.approx(count / 25, abs=0.05)
        clip = sample_clip(source, frames=8)
    starts = [i / 25 for i in range(count)]
    expected = [on_screen(t, starts) for t in uniform_times(0.0, count / 25, 8)]
    assert clip.frames.shape == (8, 64, 128, 3) and clip.frames.dtype == np.uint8
    assert numbers(clip.frames) == expected
    assert np.allclose(clip.timestamps_s, [starts[n] for n in expected], atol=1e-3)
    assert clip.window_index == 0 and clip.start_s == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_ask_window_start_end(videos, policy_for, backend):
    with open_source(str(videos["h264_mp4"]), policy_for(file_backend=backend)) as source:
        clip = sample_clip(source, frames=5, start_s=1.0, end_s=2.0)
    assert numbers(clip.frames) == [27, 32, 37, 42, 47]  # 1.1, 1.3, … 1.9 s at 25 fps
    assert clip.start_s == 1.0 and clip.end_s == 2.0
    assert np.all((clip.timestamps_s >= 1.0) & (clip.timestamps_s < 2.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_frame_rate_picks_frame_on_screen(videos, policy_for, backend):
    starts = [ms / 1000 for ms in VFR_PTS_MS]
    with open_source(str(videos["vfr_mp4"]), policy_for(file_backend=backend)) as source:
        assert source.backend == backend, source.fallback_reason
        times = [0.05, 0.19, 0.5, 0.605, 0.95, 1.31, 0.001, 0.3]  # unsorted on purpose
        frames, stamps = source.frames_at(times)
    expected = [on_screen(t, starts) for t in times]
    assert numbers(frames) == expected
    assert np.allclose(stamps, [starts[n] for n in expected], atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bframes_random_access_in_any_order(videos, policy_for, backend):
    rng = np.random.default_rng(0)
    times = rng.uniform(0.0, 3.99, size=12)
    starts = [i / 25 for i in range(100)]
    with open_source(str(videos["bframes_mp4"]), policy_for(file_backend=backend)) as source:
        frames, stamps = source.frames_at(times)
        again, _ = source.frames_at(times[::-1])
    expected = [on_screen(t, starts) for t in times]
    assert numbers(frames) == expected
    assert numbers(again) == expected[::-1]


def test_decord_watchdog_kills_overrun_and_falls_back_to_pyav(videos, policy_for):
    policy = policy_for(file_backend="decord", decord_timeout_s=1e-4)
    with open_source(str(videos["h264_mp4"]), policy) as source:
        assert source.backend == "pyav"
        assert "decord_timeout_s" in (source.fallback_reason or "")
        clip = sample_clip(source, frames=3)
    assert numbers(clip.frames) == [12, 37, 62]


def test_pyav_decode_cost_follows_samples_not_length(media_dir, policy_for):
    path = write_video(media_dir / "long.mp4", frames=1000, fps=25, gop=25, width=128, height=64)
    with open_source(str(path), policy_for(file_backend="pyav")) as source:
        clip = sample_clip(source, frames=8)
        decoded = source.frames_decoded
    assert numbers(clip.frames) == [on_screen(t, [i / 25 for i in range(1000)]) for t in uniform_times(0, 40, 8)]
    # 8 seeks, each decoding at most one GOP (25 frames) forward: far below the 1000 frames of the file.
    assert decoded <= 8 * 26 + 1, decoded


@pytest.mark.parametrize("backend", BACKENDS)
def test_rolling_windows_cover_file_to_its_end(videos, policy_for, backend):
    with open_source(str(videos["h264_mp4"]), policy_for(file_backend=backend)) as source:
        clips = list(rolling_clips(source, window_s=1.0, stride_s=0.5, frames=4))
    assert [c.window_index for c in clips] == [0, 1, 2, 3, 4]
    assert [c.start_s for c in clips] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert clips[-1].end_s == pytest.approx(3.0, abs=0.01)  # 75 frames at 25 fps, last window [2, 3)
    starts = [i / 25 for i in range(75)]
    for clip in clips:
        expected = [on_screen(t, starts) for t in uniform_times(clip.start_s, clip.end_s, 4)]
        assert numbers(clip.frames) == expected
        assert np.all((clip.timestamps_s >= clip.start_s - 1e-6) & (clip.timestamps_s < clip.end_s))


def test_rolling_last_window_is_cut_at_end(videos, policy_for):
    with open_source(str(videos["mpeg4_avi"]), policy_for()) as source:  # 2.0 s
        clips = list(rolling_clips(source, window_s=1.5, stride_s=1.0, frames=3))
    assert [(c.start_s, round(c.end_s, 2)) for c in clips] == [(0.0, 1.5), (1.0, 2.0)]


def test_rolling_stops_when_cancelled(videos, policy_for):
    cancel = threading.Event()
    seen = []
    with open_source(str(videos["h264_mp4"]), policy_for()) as source:
        for clip in rolling_clips(source, window_s=0.5, stride_s=0.25, frames=2, cancel=cancel):
            seen.append(clip.window_index)
            if len(seen) == 2:
                cancel.set()
    assert seen == [0, 1]


def test_fps_cap_moves_samples_onto_the_cap_grid(videos, policy_for):
    with open_source(str(videos["h264_mp4"]), policy_for(max_fps=2.0)) as source:
        clip = sample_clip(source, frames=6)
    # Centres 0.25, 0.75, … 2.75 s snap down to the 0.5 s grid → frames 0, 12, 25, 37, 50, 62.
    grid = np.arange(6) * 0.5
    assert np.all((clip.timestamps_s <= grid + 1e-6) & (grid - clip.timestamps_s < 0.04))
    assert numbers(clip.frames) == [0, 12, 25, 37, 50, 62]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"frames": 0}, "frames"),
        ({"frames": 1000}, "frames"),
        ({"frames": 4, "start_s": 5.0}, "start_s"),
        ({"frames": 4, "start_s": -1.0}, "start_s"),
        ({"frames": 4, "start_s": 1.0, "end_s": 0.5}, "end_s"),
        ({"frames": 4, "start_s": float("nan")}, "start_s"),
    ],
)
def test_bad_sampling_requests_name_their_parameter(videos, policy_for, kwargs, param):
    with open_source(str(videos["h264_mp4"]), policy_for()) as source:
        with pytest.raises(InvalidSampling) as err:
            sample_clip(source, **kwargs)
    assert err.value.param == param and str(err.value).startswith(param)


def test_bad_rolling_requests_name_their_parameter(videos, policy_for):
    with open_source(str(videos["h264_mp4"]), policy_for()) as source:
        with pytest.raises(InvalidSampling, match="^stride_s"):
            next(rolling_clips(source, window_s=1.0, stride_s=0.0))
        with pytest.raises(InvalidSampling, match="^window_s"):
            next(rolling_clips(source, window_s=-1.0, stride_s=1.0))


def test_rolling_resumes_from_first_window(videos, policy_for):
    with open_source(str(videos["h264_mp4"]), policy_for()) as source:
        full = list(rolling_clips(source, window_s=1.0, stride_s=0.5, frames=4))
        resumed = list(rolling_clips(source, window_s=1.0, stride_s=0.5, frames=4, first_window=3))
        with pytest.raises(InvalidSampling, match="^first_window"):
            next(rolling_clips(source, window_s=1.0, stride_s=0.5, first_window=-1))
    assert [c.window_index for c in resumed] == [3, 4]
    for a, b in zip(full[3:], resumed, strict=True):
        assert numbers(a.frames) == numbers(b.frames) and a.start_s == b.start_s
