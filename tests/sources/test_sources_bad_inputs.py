"""Every hostile or broken input is refused with its typed error, quickly, and nothing hangs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from sources_media import write_audio_only, write_video
from sources_servers import SilentServer, StaticServer

from pipeline.sources import (
    CorruptVideo,
    FileSource,
    LimitExceeded,
    SourceForbidden,
    SourceNotFound,
    SourceTimeout,
    UnsupportedSource,
    open_source,
    sample_clip,
)


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad")


@pytest.fixture(scope="module")
def good_mp4(bad_dir) -> Path:
    return write_video(bad_dir / "good.mp4", frames=50)


def refuse(uri: str, policy, error: type[Exception], within_s: float = 5.0, **kwargs) -> Exception:
    start = time.monotonic()
    with pytest.raises(error) as caught:
        source = open_source(uri, policy, **kwargs)
        try:
            sample_clip(source, frames=4, **({"window_s": 1.0} if source.is_live else {}))
        finally:
            source.close()
    assert time.monotonic() - start < within_s
    assert caught.value.param == "uri"
    return caught.value


# -- files that are not (good) videos ---------------------------------------------------------------


def test_missing_file(bad_dir, policy_for):
    refuse(str(bad_dir / "nope.mp4"), policy_for(bad_dir), SourceNotFound)


def test_text_file_renamed_mp4(bad_dir, policy_for):
    path = bad_dir / "notes.mp4"
    path.write_text("this is not a video\n" * 200)
    refuse(str(path), policy_for(bad_dir), CorruptVideo)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_truncated_mp4(bad_dir, good_mp4, policy_for, backend):
    path = bad_dir / "truncated.mp4"
    path.write_bytes(good_mp4.read_bytes()[: good_mp4.stat().st_size // 2])
    refuse(str(path), policy_for(bad_dir, file_backend=backend), CorruptVideo)


def test_truncated_mkv_fails_where_data_ends(bad_dir, policy_for):
    full = write_video(bad_dir / "full.mkv", codec="mpeg4", frames=100)
    path = bad_dir / "truncated.mkv"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 4])
    refuse(str(path), policy_for(bad_dir, file_backend="pyav"), CorruptVideo)


def test_garbage_after_header(bad_dir, policy_for):
    full = write_video(bad_dir / "tobreak.mkv", codec="mpeg4", frames=50)
    data = bytearray(full.read_bytes())
    rng = __import__("random").Random(0)
    for i in range(200, len(data)):
        data[i] = rng.randrange(256)
    path = bad_dir / "garbage.mkv"
    path.write_bytes(bytes(data))
    refuse(str(path), policy_for(bad_dir), CorruptVideo)


def test_audio_only(bad_dir, policy_for):
    path = write_audio_only(bad_dir / "audio.m4a")
    err = refuse(str(path), policy_for(bad_dir), UnsupportedSource)
    assert "no video stream" in str(err)


def test_zero_frames(bad_dir, policy_for):
    """A Matroska file that declares a video stream but holds only audio packets."""
    import av
    import numpy as np

    path = bad_dir / "zero.mkv"
    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=25)
        video.width, video.height, video.pix_fmt = 128, 64, "yuv420p"
        audio = out.add_stream("aac", rate=8000)
        for k in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, k * 1024
            for packet in audio.encode(frame):
                out.mux(packet)
        for packet in audio.encode():
            out.mux(packet)
    err = refuse(str(path), policy_for(bad_dir), (CorruptVideo, UnsupportedSource))
    assert "frame" in str(err) or "video" in str(err)


def test_unknown_codec(bad_dir, policy_for):
    full = write_video(bad_dir / "fourcc.avi", codec="mpeg4", frames=10)
    data = full.read_bytes()
    assert data.count(b"FMP4") >= 1
    path = bad_dir / "unknown_codec.avi"
    path.write_bytes(data.replace(b"FMP4", b"ZQX9"))
    refuse(str(path), policy_for(bad_dir), UnsupportedSource)


# -- limits -----------------------------------------------------------------------------------------


def test_absurd_dimensions(bad_dir, policy_for):
    path = write_video(bad_dir / "wide.mp4", frames=2, width=2048, height=16)
    err = refuse(str(path), policy_for(bad_dir, max_width=1024), LimitExceeded)
    assert "max_width" in str(err)


def test_duration_frames_and_bytes_limits(good_mp4, bad_dir, policy_for):
    assert "max_duration_s" in str(refuse(str(good_mp4), policy_for(bad_dir, max_duration_s=1.0), LimitExceeded))
    assert "max_frames" in str(refuse(str(good_mp4), policy_for(bad_dir, max_frames=10), LimitExceeded))
    assert "max_bytes" in str(refuse(str(good_mp4), policy_for(bad_dir, max_bytes=1000), LimitExceeded))


# -- paths and schemes ------------------------------------------------------------------------------


def test_dotdot_escape(bad_dir, good_mp4, policy_for):
    inner = bad_dir / "inner"
    inner.mkdir(exist_ok=True)
    refuse(str(inner / ".." / good_mp4.name), policy_for(inner), SourceForbidden)
    refuse(f"file://{inner}/../{good_mp4.name}", policy_for(inner), SourceForbidden)


def test_symlink_escape(bad_dir, good_mp4, policy_for):
    root = bad_dir / "root"
    root.mkdir(exist_ok=True)
    link = root / "escape.mp4"
    if not link.exists():
        link.symlink_to(good_mp4)
    refuse(str(link), policy_for(root), SourceForbidden)
    dir_link = root / "up"
    if not dir_link.exists():
        dir_link.symlink_to(bad_dir, target_is_directory=True)
    refuse(str(dir_link / good_mp4.name), policy_for(root), SourceForbidden)
    # A link that stays inside the root is fine.
    inside = root / "real.mp4"
    inside.write_bytes(good_mp4.read_bytes())
    ok_link = root / "alias.mp4"
    if not ok_link.exists():
        ok_link.symlink_to(inside)
    with open_source(str(ok_link), policy_for(root)) as source:
        assert isinstance(source, FileSource)


@pytest.mark.parametrize(
    "uri",
    [
        "concat:/etc/passwd|/etc/hosts",
        "subfile,,start,0,end,100,,:/etc/passwd",
        "subfile:/etc/passwd",
        "data:video/mp4;base64,AAAA",
        "pipe:0",
        "ftp://127.0.0.1/x.mp4",
        "file:///etc/passwd",
        "/etc/passwd",
        "file://evil.example/etc/passwd",
    ],
)
def test_forbidden_uris(uri, bad_dir, policy_for):
    refuse(uri, policy_for(bad_dir), SourceForbidden)


def test_scheme_allowlist_is_configurable(bad_dir, policy_for):
    refuse("rtsp://127.0.0.1:1/cam", policy_for(bad_dir, allowed_schemes=["file", "http"]), SourceForbidden)
    refuse(str(bad_dir / "good.mp4"), policy_for(bad_dir, allowed_schemes=["http"]), SourceForbidden)


# -- network ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    server = StaticServer(root)
    yield root, server
    server.close()


def test_http_file_is_seekable_and_sampled(web, policy_for):
    root, server = web
    write_video(root / "clip.mp4", frames=50)
    with open_source(server.url("clip.mp4"), policy_for(root)) as source:
        assert isinstance(source, FileSource) and source.backend == "pyav"
        clip = sample_clip(source, frames=4)
    assert clip.frames.shape[0] == 4


def test_http_404(web, policy_for):
    root, server = web
    refuse(server.url("missing.mp4"), policy_for(root), SourceNotFound)


def test_server_that_accepts_and_never_sends(policy_for, bad_dir):
    server = SilentServer()
    try:
        policy = policy_for(bad_dir, open_timeout_s=1.0, read_timeout_s=1.0)
        refuse(f"http://127.0.0.1:{server.port}/live.ts", policy, SourceTimeout, within_s=4.0)
        refuse(f"tcp://127.0.0.1:{server.port}", policy, SourceTimeout, within_s=4.0)
    finally:
        server.close()


def test_connection_refused(policy_for, bad_dir):
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on this port now
    refuse(f"http://127.0.0.1:{port}/x.ts", policy_for(bad_dir), SourceNotFound)


def test_hls_playlist_naming_a_local_file_is_refused(web, bad_dir, policy_for):
    root, server = web
    secret = write_video(bad_dir / "secret.ts", codec="mpeg2video", frames=25)
    (root / "evil.m3u8").write_text(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.0,\n"
        f"file://{secret}\n#EXT-X-ENDLIST\n"
    )
    err = refuse(server.url("evil.m3u8"), policy_for(root), SourceForbidden)
    assert "file://" in str(err)
    # The same playlist with a normal http segment plays, so the refusal is about the file:// entry.
    if not (root / "seg.ts").exists():
        os.link(secret, root / "seg.ts")
    (root / "ok.m3u8").write_text(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.0,\nseg.ts\n#EXT-X-ENDLIST\n"
    )
    with open_source(server.url("ok.m3u8"), policy_for(root)) as source:
        assert sample_clip(source, frames=2).frames.shape[0] == 2


def test_local_playlists_cannot_reach_other_files(bad_dir, good_mp4, policy_for):
    """A playlist or concat list inside the root naming files outside it: the demuxer is not allowed."""
    root = bad_dir / "playlists"
    root.mkdir(exist_ok=True)
    (root / "list.m3u8").write_text(
        f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nfile://{good_mp4}\n#EXT-X-ENDLIST\n"
    )
    (root / "list.ffconcat").write_text(f"ffconcat version 1.0\nfile '{good_mp4}'\n")
    for name in ("list.m3u8", "list.ffconcat"):
        refuse(str(root / name), policy_for(root), (UnsupportedSource, CorruptVideo))


def test_ffmpeg_options_whitelist_protocols(bad_dir, policy_for):
    from pipeline.sources.policy import ffmpeg_options, resolve_uri

    policy = policy_for(bad_dir)
    local = ffmpeg_options(resolve_uri(str(bad_dir / "good.mp4"), policy), policy, live=False)
    assert local["protocol_whitelist"] == "file" and "hls" not in local["format_whitelist"].split(",")
    remote = ffmpeg_options(resolve_uri("http://127.0.0.1:9/x.m3u8", policy), policy, live=True)
    protocols = set(remote["protocol_whitelist"].split(","))
    assert {"http", "tcp"} <= protocols
    assert not protocols & {"file", "concat", "subfile", "pipe", "data", "fd", "crypto"}
    assert "hls" in remote["format_whitelist"].split(",")
    no_hls = policy_for(bad_dir, allowed_schemes=["http"])
    options = ffmpeg_options(resolve_uri("http://127.0.0.1:9/x.m3u8", no_hls), no_hls, live=True)
    assert "hls" not in options["format_whitelist"].split(",")


def test_over_reported_frame_count_is_caught(bad_dir, policy_for):
    """An AVI whose headers claim 10× its frames (decord's known hang): decord is not trusted, and
    sampling the declared length fails with CorruptVideo instead of hanging or inventing frames."""
    import struct

    data = bytearray(write_video(bad_dir / "honest.avi", codec="mpeg4", frames=30).read_bytes())
    total = data.find(b"avih") + 8 + 16  # avih: dwMicroSecPerFrame … dwFlags, then dwTotalFrames
    length = data.find(b"strh") + 8 + 32  # strh: fccType … dwStart, then dwLength
    for offset in (total, length):
        assert struct.unpack("<I", data[offset : offset + 4]) == (30,)
        data[offset : offset + 4] = struct.pack("<I", 300)
    path = bad_dir / "over_reported.avi"
    path.write_bytes(bytes(data))
    with open_source(str(path), policy_for(bad_dir, file_backend="decord")) as source:
        assert source.backend == "pyav"
        assert "300" in (source.fallback_reason or "")
        assert source.info.duration_s == pytest.approx(12.0)
        start = time.monotonic()
        with pytest.raises(CorruptVideo, match="truncated"):
            sample_clip(source, frames=4)
        assert time.monotonic() - start < 5
        frames, _ = source.frames_at([0.5])  # what does exist still reads
    assert frames.shape == (1, 64, 128, 3)
