"""Hostile media through the running service: every job is refused with its error type, in bounded time,
nothing outside the allowed roots is opened, and the service keeps answering.

The source tests (tests/sources/test_sources_bad_inputs.py) check each refusal on ``open_source``; here the
same kinds of input arrive as plain ``XADD``s and go through the queue, a clip actor (a Ray worker
process, decord's watched child for files) and back to the job's hash.

"Nothing read outside the roots" is checked with a FIFO canary outside them (see ``FifoCanary``): the
jobs name it through ``..``, symlinks, ``file://``, ``concat:``, ``subfile:``, an HLS playlist served over
HTTP and local playlists; any process opening it for reading, however briefly, trips it. A positive
control shows that an FFmpeg open of such a FIFO does trip it.
"""

from __future__ import annotations

import json
import random
import struct
import time

import av
import numpy as np
import psutil
import pytest
import ray
from service_helpers import FPS, KEYS, RunningService, camera_frames, clip_video, results, service_settings
from sources_servers import SilentServer, StaticServer

from pipeline.loopback import LoopbackCamera, write_video

OPEN_TIMEOUT_S = 2.0
MAX_DURATION_S = 10.0  # bounds the endless caption job below
# A refused job's own run (started → failed): the open timeout, plus decode/IPC slack on 2 busy cores.
REFUSED_WITHIN_S = OPEN_TIMEOUT_S + 13.0


def _frames(count: int = 16) -> np.ndarray:
    frame = camera_frames()
    return np.stack([frame(n) for n in range(count)])


def _patch_u32(data: bytearray, marker: bytes, offset: int, value: int) -> None:
    at = data.find(marker)
    assert at >= 0, marker
    data[at + 8 + offset: at + 8 + offset + 4] = struct.pack("<I", value)


def _hostile_files(root, outside, canary, www) -> dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """name → (source, accepted error types, fragments the error must hold)."""
    good, _ = clip_video(root / "good.mp4", 1)
    data = good.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (root / "text.mp4").write_text("this is not a video\n" * 200)
    mkv = bytearray(write_video(root / "tobreak.mkv", _frames(), FPS, codec="mpeg4").read_bytes())
    rng = random.Random(0)
    mkv[200:] = bytes(rng.randrange(256) for _ in range(len(mkv) - 200))
    (root / "garbage.mkv").write_bytes(bytes(mkv))

    raw = write_video(root / "raw.avi", _frames(4), FPS, codec="rawvideo").read_bytes()
    for side, name in ((100_000, "huge_dims.avi"), (16_000, "big_dims.avi")):
        patched = bytearray(raw)
        _patch_u32(patched, b"avih", 32, side)  # dwWidth, dwHeight
        _patch_u32(patched, b"avih", 36, side)
        _patch_u32(patched, b"strf", 4, side)  # BITMAPINFOHEADER biWidth, biHeight
        _patch_u32(patched, b"strf", 8, side)
        (root / name).write_bytes(bytes(patched))
    many = bytearray(write_video(root / "honest.avi", _frames(), FPS, codec="mpeg4").read_bytes())
    _patch_u32(many, b"avih", 16, 4_000_000_000)  # dwTotalFrames
    _patch_u32(many, b"strh", 32, 4_000_000_000)  # dwLength
    (root / "many_frames.avi").write_bytes(bytes(many))

    playlist = "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.0,\n{}\n#EXT-X-ENDLIST\n"
    (root / "local.m3u8").write_text(playlist.format(f"file://{canary}"))
    (root / "local.ffconcat").write_text(f"ffconcat version 1.0\nfile '{canary}'\n")
    (www / "canary.m3u8").write_text(playlist.format(f"file://{canary}"))
    (www / "passwd.m3u8").write_text(playlist.format("file:///etc/passwd"))
    (root / "link.mp4").symlink_to(canary)
    (root / "up").symlink_to(outside, target_is_directory=True)

    forbidden = ("SourceForbidden",)
    outside_roots = "outside the allowed roots"
    corrupt = ("CorruptVideo",)
    return {
        "truncated": (str(root / "truncated.mp4"), corrupt, ()),
        "text": (str(root / "text.mp4"), corrupt, ()),
        "garbage": (str(root / "garbage.mkv"), corrupt, ()),
        # FFmpeg itself refuses frames this large (over its image size limit): no video data comes out.
        "huge_dims": (str(root / "huge_dims.avi"), ("CorruptVideo", "LimitExceeded"), ()),
        "big_dims": (str(root / "big_dims.avi"), ("LimitExceeded",), ("16000×16000", "max_width")),
        "many_frames": (str(root / "many_frames.avi"), ("LimitExceeded",), ("max_duration_s",)),
        "local_m3u8": (str(root / "local.m3u8"), ("UnsupportedSource", "CorruptVideo"), ()),
        "local_ffconcat": (str(root / "local.ffconcat"), ("UnsupportedSource", "CorruptVideo"), ()),
        "canary": (str(canary), forbidden, (outside_roots,)),
        "file_url": (f"file://{canary}", forbidden, (outside_roots,)),
        "dotdot": (f"{root}/../{outside.name}/{canary.name}", forbidden, (outside_roots,)),
        "dotdot_url": (f"file://{root}/../{outside.name}/{canary.name}", forbidden, (outside_roots,)),
        "symlink": (str(root / "link.mp4"), forbidden, (outside_roots,)),
        "dir_symlink": (str(root / "up" / canary.name), forbidden, (outside_roots,)),
        "concat": (f"concat:{canary}|{canary}", forbidden, ("'concat'",)),
        "subfile": (f"subfile,,start,0,end,100,,:{canary}", forbidden, ()),
        "subfile_plain": (f"subfile:{canary}", forbidden, ()),
        "etc_passwd": ("/etc/passwd", forbidden, (outside_roots,)),
    }


@pytest.fixture(scope="module")
def hostile_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_root")
    outside = tmp_path_factory.mktemp("hostile_outside")
    www = tmp_path_factory.mktemp("hostile_www")
    settings = service_settings(root, **{
        "workers.max_active_jobs": "2",
        "sources.file_backend": "decord",  # the production default: decord in a watched child, PyAV fallback
        "sources.open_timeout_s": str(OPEN_TIMEOUT_S),
        "sources.read_timeout_s": str(OPEN_TIMEOUT_S),
        "sources.reconnect_attempts": "1",
        "sources.reconnect_backoff_s": "0.2",
        "sources.max_duration_s": str(MAX_DURATION_S),
    })
    web, silent = StaticServer(www), SilentServer()
    camera = LoopbackCamera(camera_frames(), fps=FPS).start()
    svc = RunningService(settings)
    yield svc, root, outside, www, web, silent, camera
    svc.close()
    ray.shutdown()
    camera.stop()
    silent.close()
    web.close()


def _actor_pids(svc: RunningService) -> list[int]:
    s = svc.service
    return ray.get([a.pid.remote() for a in s.clip_actors + s.llm_workers], timeout=60)


def test_an_ffmpeg_open_trips_the_canary(tmp_path, fifo_canary):
    """Positive control: the canary sees an open by FFmpeg (PyAV), so silence below means no open."""
    canary = fifo_canary(tmp_path / "control.mp4")
    with pytest.raises((av.error.FFmpegError, OSError)):
        av.open(str(canary.path), timeout=(2.0, 2.0))
    assert canary.opened.wait(5)


def test_hostile_media_is_refused_with_its_type_and_nothing_outside_the_roots_is_opened(hostile_env, fifo_canary,
                                                                                       checks):
    svc, root, outside, www, web, silent, _camera = hostile_env
    r = svc.redis
    canary = fifo_canary(outside / "canary.mp4")
    cases = _hostile_files(root, outside, canary.path, www)
    cases |= {
        "hls_canary": (web.url("canary.m3u8"), ("SourceForbidden",), (f"file://{canary.path}",)),
        "hls_passwd": (web.url("passwd.m3u8"), ("SourceForbidden",), ("file:///etc/passwd",)),
        "silent_http": (f"http://127.0.0.1:{silent.port}/live.ts", ("SourceTimeout",), ("open_timeout_s",)),
        "silent_tcp": (f"tcp://127.0.0.1:{silent.port}", ("SourceTimeout",), ("open_timeout_s",)),
        "silent_rtsp": (f"rtsp://127.0.0.1:{silent.port}/cam", ("SourceTimeout",), ("open_timeout_s",)),
    }
    pids_before = _actor_pids(svc)
    submitted = {}
    for name, (source, _, _) in cases.items():
        submitted[name] = time.time()
        r.xadd(KEYS.jobs, {"job": json.dumps({"job_id": f"hm-{name}", "source": source, "kind": "ask",
                                              "question": "what is there ?"})})
    runs, totals = {}, {}
    for name, (_, types, fragments) in cases.items():
        state = checks.wait_final(r, f"hm-{name}", timeout_s=120)
        error = checks.assert_readable_failure(state, *fragments, context=name)
        assert error.split(":", 1)[0] in types, (name, error)
        assert int(state["deliveries"]) == 1, (name, state)  # refused, never retried
        runs[name] = float(state["finished_at"]) - float(state["started_at"])
        totals[name] = float(state["finished_at"]) - submitted[name]
    slowest = max(runs, key=runs.get)
    print(f"\n{len(cases)} hostile jobs refused; slowest run {runs[slowest]:.2f} s ({slowest}), "
          f"slowest submit→failed {max(totals.values()):.2f} s")
    assert runs[slowest] < REFUSED_WITHIN_S, runs
    assert not canary.opened.is_set(), "a process opened the canary outside the allowed roots"
    assert _actor_pids(svc) == pids_before  # no worker crashed
    assert checks.pending_count(r) == 0 and r.xlen(KEYS.jobs) == 0
    assert r.xlen(KEYS.dead_letter) == 0
    r.xadd(KEYS.jobs, {"job": json.dumps({"job_id": "hm-after", "source": str(root / "good.mp4"), "kind": "ask",
                                          "question": "what colour is the cross ?"})})
    assert checks.wait_final(r, "hm-after", timeout_s=120)["state"] == "done"


def test_a_question_on_an_endless_stream_takes_one_window_and_lets_go(hostile_env, checks):
    svc, *_, camera = hostile_env
    r = svc.redis
    window_s = 2.0
    r.xadd(KEYS.jobs, {"job": json.dumps({"job_id": "hm-live-ask", "source": camera.url, "kind": "ask",
                                          "question": "what colour is the cross ?",
                                          "sampling": {"window_s": window_s}})})
    state = checks.wait_final(r, "hm-live-ask", timeout_s=120)
    assert state["state"] == "done", state
    [answer] = results(r, "hm-live-ask")
    assert 0 < answer.end_s - answer.start_s <= window_s + 1e-6
    run_s = float(state["finished_at"]) - float(state["started_at"])
    assert run_s < window_s + OPEN_TIMEOUT_S + 30, run_s  # one window, the model, and no more
    # The clip actors let go of the stream: no connection to the camera is left open.
    deadline = time.monotonic() + 15
    while True:
        held = [c for pid in _actor_pids(svc) for c in psutil.Process(pid).net_connections("tcp")
                if c.raddr and c.raddr.port == camera.port and c.status == psutil.CONN_ESTABLISHED]
        if not held or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not held, held
    print(f"\nask on an endless stream: done in {run_s:.2f} s, window {answer.start_s:.2f}–{answer.end_s:.2f} s")


def test_a_caption_job_on_an_endless_stream_is_bounded_by_the_duration_limit(hostile_env, checks):
    """Without a cancel, an endless stream is bounded by sources.max_duration_s (and max_frames, max_bytes):
    the job fails with LimitExceeded naming the limit, and the windows before it stay stored, once each."""
    svc, *_, camera = hostile_env
    r = svc.redis
    r.xadd(KEYS.jobs, {"job": json.dumps({"job_id": "hm-live-cap", "source": camera.url, "kind": "caption",
                                          "sampling": {"window_s": 2.0, "stride_s": 2.0}})})
    state = checks.wait_final(r, "hm-live-cap", timeout_s=MAX_DURATION_S + 120)
    checks.assert_readable_failure(state, "LimitExceeded", "max_duration_s")
    windows = results(r, "hm-live-cap")
    assert len(windows) >= 2
    assert [w.window_index for w in windows] == list(range(len(windows)))
    assert windows[-1].end_s <= MAX_DURATION_S + 1e-6
    run_s = float(state["finished_at"]) - float(state["started_at"])
    print(f"\ncaption on an endless stream: {len(windows)} windows, then {state['error']!r} after {run_s:.1f} s")
