"""Real video on this machine, for the demo, the benchmarks and the tests: H.264 files written with PyAV,
and a live camera served as MPEG-TS over HTTP on 127.0.0.1, encoded as it is sent, at real-time pace.

Frames come from a function ``frame(n) -> [H, W, 3] uint8``; the camera's frame numbers follow the wall
clock from its ``epoch``, so a restarted camera continues where the clock is (a reconnecting reader
sees the gap in the pictures and the timestamps alike).
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

FrameFn = Callable[[int], np.ndarray]


def write_video(path: str | Path, frames: Sequence[np.ndarray] | np.ndarray, fps: float,
                codec: str = "libx264", gop: int | None = None) -> Path:
    """Encode [N, H, W, 3] uint8 frames to a file (container from the suffix)."""
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be [N, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
    rate = Fraction(fps).limit_denominator(1000)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, 1 / rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


class LoopbackCamera:
    """An endless live stream at ``http://127.0.0.1:PORT/live.ts``; every GET gets the stream from now on."""

    def __init__(self, frame: FrameFn, fps: float = 8.0, port: int = 0, epoch: float | None = None,
                 keyint: int | None = None) -> None:
        self.frame, self.fps = frame, fps
        self.keyint = keyint or max(1, int(fps))  # frames between keyframes: how soon a new reader sees a picture
        self.epoch = time.time() if epoch is None else epoch
        self.port = port
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/live.ts"

    def start(self) -> LoopbackCamera:
        camera = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
                pass

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                self.send_response(200)
                self.send_header("Content-Type", "video/mp2t")
                self.end_headers()
                camera.stream_to(self.wfile)

        self._stopped.clear()
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="loopback-camera", daemon=True)
        self._thread.start()
        return self

    def stream_to(self, wfile) -> None:
        """Write the stream to ``wfile`` until the reader goes away or the camera stops."""
        try:
            self._stream(wfile)
        except (OSError, ValueError, av.error.FFmpegError):
            pass  # the reader went away, or the camera was stopped

    def _stream(self, wfile) -> None:
        first = self.frame(0)
        height, width = first.shape[:2]
        with av.open(wfile, "w", format="mpegts", options={"flush_packets": "1"}, buffer_size=4096) as out:
            rate = Fraction(self.fps).limit_denominator(1000)
            stream = out.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.gop_size = self.keyint
            stream.options = {"preset": "ultrafast", "tune": "zerolatency", "x264-params": f"keyint={self.keyint}"}
            number = int((time.time() - self.epoch) * self.fps)
            while not self._stopped.is_set():
                delay = self.epoch + number / self.fps - time.time()
                if delay > 0:
                    time.sleep(delay)
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(self.frame(number)), format="rgb24")
                frame.pts, frame.time_base = number, 1 / rate
                for packet in stream.encode(frame):
                    out.mux(packet)
                wfile.flush()
                number += 1

    def stop(self) -> None:
        """Stop serving; open connections are cut at their next frame."""
        self._stopped.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LoopbackCamera:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_clip(path: str | Path, frames: np.ndarray) -> Path:
    """A synthetic clip's [T, H, W, 3] frames as the 4 s H.264 file the demo, tests and benchmarks use."""
    from pipeline.synthetic import VIDEO_FPS, VIDEO_REPEAT

    return write_video(path, np.repeat(frames, VIDEO_REPEAT, axis=0), fps=VIDEO_FPS)


def h264_round_trip(frames: np.ndarray, workdir: str | Path) -> np.ndarray:
    """The [T, H, W, 3] frames the service samples from ``write_clip``'s file of ``frames``.

    ``sample_clip`` asks for the T frames at the centres of T equal windows of the 4 s video, i.e. frame
    ``REPEAT // 2`` of each group of ``REPEAT`` copies; decoding every frame with PyAV and taking those
    is the same picture (tests check equality with the service path) without opening a source, which
    costs ~0.1 s per file. Training uses it so the model learns the pictures the service reads.
    """
    from pipeline.synthetic import VIDEO_REPEAT

    path = write_clip(Path(workdir) / "round_trip.mp4", frames)
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]  # T·REPEAT × [H, W, 3]
    if len(decoded) != len(frames) * VIDEO_REPEAT:
        raise RuntimeError(f"decoded {len(decoded)} frames from {len(frames)} × {VIDEO_REPEAT} written")
    return np.stack(decoded[VIDEO_REPEAT // 2 :: VIDEO_REPEAT])  # [T, H, W, 3]


def held_out_frames(first: int = 0, count: int = 16, repeat: int = 4) -> FrameFn:
    """Frame ``n`` of an endless feed cycling through held-out clips ``first … first+count-1``, each of
    their frames shown ``repeat`` times (at 8 fps and repeat 4, one clip = 4 s of video)."""
    from pipeline.synthetic import held_out_sample

    clips = [held_out_sample(i).clip.frames for i in range(first, first + count)]
    per_clip = clips[0].shape[0] * repeat
    return lambda n: clips[(n // per_clip) % count][(n % per_clip) // repeat]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m pipeline.loopback --port P``: a camera of held-out clips in a process of its own
    (one that can be killed and restarted, as a real camera's server can)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.loopback", description=main.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--repeat", type=int, default=4, help="times each clip frame is shown")
    parser.add_argument("--epoch", type=float, default=None, help="wall-clock time of frame 0 (default: now)")
    args = parser.parse_args(argv)
    camera = LoopbackCamera(held_out_frames(repeat=args.repeat), fps=args.fps, port=args.port,
                            epoch=args.epoch).start()
    print(camera.url, flush=True)
    threading.Event().wait()  # until killed


if __name__ == "__main__":
    main()
