"""A live MPEG-TS camera for tests: ``python sources_live_server.py PORT EPOCH [--fps N] [--tcp]``.

Every GET (or, with --tcp, every TCP connection) gets an endless H.264 MPEG-TS stream, encoded as it is sent at real-time pace. Frame
numbers (drawn into the picture by media.frame_picture) count from EPOCH, a wall-clock time, so a
restarted server continues where the clock is and the gap is visible in the pictures.
"""

from __future__ import annotations

import argparse
import http.server
import socketserver
import sys
import time
from fractions import Fraction
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sources_media import frame_picture  # noqa: E402


class RawTCPHandler(socketserver.StreamRequestHandler):
    """``--tcp``: the same MPEG-TS written straight onto the socket (what ``tcp://`` reads)."""

    def handle(self) -> None:
        try:
            Handler._stream(self)  # type: ignore[arg-type]
        except (BrokenPipeError, ConnectionResetError):
            pass


class Handler(http.server.BaseHTTPRequestHandler):
    fps = 20
    epoch = 0.0

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.send_header("Content-Type", "video/mp2t")
        self.end_headers()
        try:
            self._stream()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _stream(self) -> None:
        with av.open(self.wfile, "w", format="mpegts", options={"flush_packets": "1"}, buffer_size=4096) as out:
            stream = out.add_stream("libx264", rate=self.fps)
            stream.width, stream.height, stream.pix_fmt = 128, 64, "yuv420p"
            stream.codec_context.gop_size = self.fps // 2
            stream.options = {"preset": "ultrafast", "tune": "zerolatency", "x264-params": f"keyint={self.fps // 2}"}
            number = int((time.time() - self.epoch) * self.fps)
            while True:
                due = self.epoch + number / self.fps
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
                frame = av.VideoFrame.from_ndarray(frame_picture(number), format="rgb24")
                frame.pts, frame.time_base = number, Fraction(1, self.fps)
                for packet in stream.encode(frame):
                    out.mux(packet)
                self.wfile.flush()
                number += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("epoch", type=float)
    parser.add_argument("--fps", type=int, default=20)
    parser.add_argument("--tcp", action="store_true", help="raw MPEG-TS over TCP instead of HTTP")
    args = parser.parse_args()
    Handler.fps, Handler.epoch = args.fps, args.epoch
    RawTCPHandler.fps, RawTCPHandler.epoch = args.fps, args.epoch
    if args.tcp:
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        server = socketserver.ThreadingTCPServer(("127.0.0.1", args.port), RawTCPHandler)
    else:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
