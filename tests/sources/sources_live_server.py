"""A live MPEG-TS camera for tests: ``python sources_live_server.py PORT EPOCH [--fps N] [--tcp]``.

Every GET (or, with --tcp, every TCP connection) gets an endless H.264 MPEG-TS stream, encoded as it is
sent at real-time pace (``pipeline.loopback.LoopbackCamera``). Frame numbers (drawn into the picture by
media.frame_picture) count from EPOCH, a wall-clock time, so a restarted server continues where the
clock is and the gap is visible in the pictures.
"""

from __future__ import annotations

import argparse
import socketserver
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sources_media import frame_picture  # noqa: E402

from pipeline.loopback import LoopbackCamera  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("epoch", type=float)
    parser.add_argument("--fps", type=int, default=20)
    parser.add_argument("--tcp", action="store_true", help="raw MPEG-TS over TCP instead of HTTP")
    args = parser.parse_args()
    camera = LoopbackCamera(frame_picture, fps=args.fps, port=args.port, epoch=args.epoch,
                            keyint=max(1, args.fps // 2))
    if args.tcp:
        class RawTCPHandler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                camera.stream_to(self.wfile)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        server = socketserver.ThreadingTCPServer(("127.0.0.1", args.port), RawTCPHandler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    else:
        camera.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
