"""Live sources against a real MPEG-TS-over-HTTP server process on 127.0.0.1 (tests/sources/sources_live_server.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sources_media import read_number

from pipeline.sources import (
    InvalidSampling,
    LimitExceeded,
    LiveSource,
    SourceEvent,
    SourceNotFound,
    SourceStatus,
    open_source,
    rolling_clips,
    sample_clip,
)

SERVER = Path(__file__).resolve().parent / "sources_live_server.py"
FPS = 20


class LiveServer:
    def __init__(self, tcp: bool = False) -> None:
        self.tcp = tcp
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.epoch = time.time()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}" if self.tcp else f"http://127.0.0.1:{self.port}/live.ts"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), str(self.port), str(self.epoch), "--fps", str(FPS)]
            + (["--tcp"] if self.tcp else []),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None:
            self.proc.stdout.close()

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture
def server():
    srv = LiveServer()
    srv.start()
    yield srv
    srv.kill()


class Events:
    def __init__(self) -> None:
        self.items: list[SourceEvent] = []

    def __call__(self, event: SourceEvent) -> None:
        self.items.append(event)

    def statuses(self) -> list[SourceStatus]:
        return [e.status for e in self.items]


def live_policy(policy_for, tmp_path, **overrides):
    fields = {"open_timeout_s": 2.0, "read_timeout_s": 1.0, "reconnect_backoff_s": 0.2,
              "reconnect_backoff_max_s": 1.0, "reconnect_attempts": 10}
    fields.update(overrides)
    return policy_for(tmp_path, **fields)


def test_latest_window_of_live_stream(server, policy_for, tmp_path):
    with open_source(server.url, live_policy(policy_for, tmp_path)) as source:
        assert isinstance(source, LiveSource) and source.info.codec == "h264"
        clip = sample_clip(source, frames=4, window_s=1.0)
        with pytest.raises(InvalidSampling, match="^start_s"):
            sample_clip(source, frames=4, start_s=0.0)
    numbers = [read_number(f) for f in clip.frames]
    assert clip.end_s - clip.start_s == pytest.approx(1.0, abs=0.06)
    # Pictures agree with the timeline: 0.25 s apart at 20 fps is 5 frame numbers.
    assert np.all(np.diff(numbers) == 5), numbers
    assert np.allclose(np.diff(clip.timestamps_s), 0.25, atol=0.01)


def test_kill_and_restart_server_continues_the_same_caption_run(server, policy_for, tmp_path):
    events = Events()
    source = open_source(server.url, live_policy(policy_for, tmp_path), on_event=events)
    clips = []
    try:
        for clip in rolling_clips(source, window_s=1.0, stride_s=1.0, frames=4):
            clips.append(clip)
            if len(clips) == 2:
                server.kill()
                time.sleep(1.5)
                server.start()
            gapped = [c for c in clips if c.gaps]
            if gapped and clip.start_s > gapped[0].gaps[0].end_s:
                break  # a whole window after the gap has arrived
            assert len(clips) < 12, "the stream did not come back"
    finally:
        source.close()
    statuses = events.statuses()
    assert statuses[0] is SourceStatus.CONNECTED
    assert SourceStatus.RECONNECTING in statuses
    assert statuses.index(SourceStatus.RECONNECTING) < len(statuses) - 1 - statuses[::-1].index(SourceStatus.CONNECTED)
    assert statuses[-1] is SourceStatus.ENDED  # closed by us, not failed
    gapped = [c for c in clips if c.gaps]
    gap = gapped[0].gaps[0]
    assert [e.gap for e in events.items if e.gap is not None] == [gap]  # announced on CONNECTED too
    assert gap.duration_s >= 1.0  # the server was down ≥ 1.5 s
    assert gap.start_s < clips[-1].start_s and not clips[-1].gaps
    after = clips[-1]
    before = clips[1]
    # Frame numbers follow the wall clock: the jump in pictures matches the jump in the timeline.
    jump_frames = read_number(after.frames[0]) - read_number(before.frames[-1])
    jump_s = after.timestamps_s[0] - before.timestamps_s[-1]
    assert abs(jump_frames / FPS - jump_s) < 0.75, (jump_frames, jump_s)
    assert [c.window_index for c in clips] == sorted({c.window_index for c in clips})


def test_stalled_server_is_detected_and_resumes(server, policy_for, tmp_path):
    events = Events()
    with open_source(server.url, live_policy(policy_for, tmp_path), on_event=events) as source:
        assert source.read(timeout_s=3.0) is not None
        server.pause()  # connection stays open, no bytes arrive
        time.sleep(2.5)
        server.resume()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and events.statuses().count(SourceStatus.CONNECTED) < 2:
            source.read(timeout_s=0.2)
    statuses = events.statuses()
    assert SourceStatus.STALLED in statuses
    assert statuses.count(SourceStatus.CONNECTED) >= 2, statuses
    stalled = statuses.index(SourceStatus.STALLED)
    assert SourceStatus.RECONNECTING in statuses[stalled:]
    assert "read_timeout_s" in events.items[stalled].reason


def test_slow_consumer_drops_oldest_and_counts(server, policy_for, tmp_path):
    with open_source(server.url, live_policy(policy_for, tmp_path, live_buffer_frames=5)) as source:
        first = source.read(timeout_s=3.0)
        assert first is not None
        time.sleep(1.5)  # ~30 frames arrive into a 5-frame buffer
        assert source.dropped_frames >= 15
        kept = [source.read(timeout_s=1.0) for _ in range(5)]
    numbers = [read_number(f.image) for f in kept]
    assert numbers == list(range(numbers[0], numbers[0] + 5))  # the newest run, in order
    assert numbers[0] - read_number(first.image) >= 15


def test_server_gone_for_good_fails_after_the_attempts(server, policy_for, tmp_path):
    events = Events()
    policy = live_policy(policy_for, tmp_path, reconnect_attempts=2, reconnect_backoff_s=0.1)
    source = open_source(server.url, policy, on_event=events)
    server.kill()
    started = time.monotonic()
    with pytest.raises(SourceNotFound):
        for _ in rolling_clips(source, window_s=0.5, stride_s=0.5, frames=2):
            pass
    source.close()
    assert time.monotonic() - started < 10
    statuses = events.statuses()
    assert [e.status for e in source.drain_events()] == statuses  # the same events, for pollers
    assert source.drain_events() == []
    assert statuses.count(SourceStatus.RECONNECTING) == 2
    assert statuses[-1] is SourceStatus.FAILED
    assert [e.attempt for e in events.items if e.status is SourceStatus.RECONNECTING] == [1, 2]
    delays = [e.delay_s for e in events.items if e.status is SourceStatus.RECONNECTING]
    assert 0.05 <= delays[0] <= 0.1 and 0.1 <= delays[1] <= 0.2  # equal jitter on 0.1·2^k


def test_cancel_stops_a_live_caption_run(server, policy_for, tmp_path):
    cancel = threading.Event()
    windows = []
    with open_source(server.url, live_policy(policy_for, tmp_path)) as source:
        for clip in rolling_clips(source, window_s=0.5, stride_s=0.25, frames=2, cancel=cancel, first_window=5):
            windows.append(clip.window_index)
            if len(windows) == 3:
                cancel.set()
    assert windows == [5, 6, 7]  # a resumed live run keeps counting


def test_raw_tcp_stream(policy_for, tmp_path):
    srv = LiveServer(tcp=True)
    srv.start()
    try:
        with open_source(srv.url, live_policy(policy_for, tmp_path)) as source:
            assert isinstance(source, LiveSource) and source.info.container == "mpegts"
            clip = sample_clip(source, frames=3, window_s=0.6)
    finally:
        srv.kill()
    numbers = [read_number(f) for f in clip.frames]
    assert np.all(np.diff(numbers) == 4), numbers  # 0.2 s apart at 20 fps


def test_fps_cap_thins_live_frames(server, policy_for, tmp_path):
    with open_source(server.url, live_policy(policy_for, tmp_path, max_fps=5.0)) as source:
        frames = [source.read(timeout_s=3.0) for _ in range(6)]
    times = np.array([f.time_s for f in frames])
    numbers = [read_number(f.image) for f in frames]
    assert np.all(np.diff(np.floor(times * 5.0 + 1e-9)) >= 1)  # at most one frame per 0.2 s slot
    assert np.all(np.diff(numbers) >= 3), numbers  # 20 fps → every 4th frame (3 when the grid shifts)


def test_live_byte_limit_fails_the_stream(server, policy_for, tmp_path):
    events = Events()
    policy = live_policy(policy_for, tmp_path, max_bytes=20_000)
    with open_source(server.url, policy, on_event=events) as source:
        with pytest.raises(LimitExceeded, match="max_bytes"):
            while source.read(timeout_s=5.0) is not None:
                pass
    assert events.statuses()[-1] is SourceStatus.FAILED
    assert SourceStatus.RECONNECTING not in events.statuses()  # a limit is not retried
