"""Child process that reads one local file with decord; run as ``python -I _decord_worker.py``.

decord can hang inside ``get_batch`` (files that over-report their frame count) and leak memory, so
it never runs in the service's process: the parent talks to this child over stdin/stdout and kills it
when a request overruns its deadline. Messages are length-prefixed: a JSON header, then raw bytes
(never pickle, so a child fed a hostile file cannot make the parent run code).

Requests (JSON): {"op": "open", "path": str, "threads": int}
                 {"op": "get", "indices": [int, ...]}
Replies: header {"ok": true, ...} + payload, or {"ok": false, "error": str} + empty payload.
  open → header {n, fps, height, width}, payload float64 [n, 2] frame start/end times
  get  → header {shape}, payload uint8 [k, H, W, 3]
"""

from __future__ import annotations

import json
import struct
import sys
from typing import BinaryIO


def read_message(stream: BinaryIO) -> tuple[dict, bytes] | None:
    head = stream.read(12)
    if len(head) < 12:
        return None
    header_len, payload_len = struct.unpack("<IQ", head)
    header = json.loads(stream.read(header_len))
    payload = stream.read(payload_len) if payload_len else b""
    return header, payload


def write_message(stream: BinaryIO, header: dict, payload: bytes = b"") -> None:
    encoded = json.dumps(header).encode()
    stream.write(struct.pack("<IQ", len(encoded), len(payload)))
    stream.write(encoded)
    if payload:
        stream.write(payload)
    stream.flush()


def main() -> int:
    import decord
    import numpy as np

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    # decord prints to stdout on some errors; keep the protocol channel clean.
    sys.stdout = sys.stderr
    reader = None
    while True:
        message = read_message(stdin)
        if message is None:
            return 0
        request, _ = message
        try:
            if request["op"] == "open":
                reader = decord.VideoReader(request["path"], ctx=decord.cpu(0), num_threads=int(request["threads"]))
                n = len(reader)
                times = np.asarray(reader.get_frame_timestamp(np.arange(n)), dtype=np.float64).reshape(n, 2)
                shape = reader[0].shape if n else (0, 0, 3)
                reader.seek(0)
                header = {"ok": True, "n": n, "fps": float(reader.get_avg_fps()), "height": int(shape[0]),
                          "width": int(shape[1])}
                write_message(stdout, header, times.tobytes())
            elif request["op"] == "get" and reader is not None:
                batch = reader.get_batch([int(i) for i in request["indices"]]).asnumpy()
                batch = np.ascontiguousarray(batch, dtype=np.uint8)
                write_message(stdout, {"ok": True, "shape": list(batch.shape)}, batch.tobytes())
            else:
                write_message(stdout, {"ok": False, "error": f"bad request {request.get('op')!r}"})
        except Exception as exc:  # noqa: BLE001 - every decord failure is reported to the parent, which falls back
            write_message(stdout, {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]})


if __name__ == "__main__":
    raise SystemExit(main())
