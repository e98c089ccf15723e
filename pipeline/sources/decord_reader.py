"""The parent side of the decord child process: every request has a deadline, overrun means kill.

Shapes: n frames in the file; k requested indices; frames come back [k, H, W, 3] uint8.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("_decord_worker.py")


class DecordFailed(Exception):
    """decord could not open or read the file (or overran its deadline); the caller falls back to PyAV."""


class DecordReader:
    def __init__(self, path: str, *, threads: int, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        # A list argv, no shell; the path travels as data over the pipe, never on a command line.
        self._proc = subprocess.Popen(
            # Run the worker file itself (not ``-m``): importing the package would pull in torch.
            [sys.executable, "-I", str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        try:
            header, payload = self._call({"op": "open", "path": path, "threads": threads})
        except DecordFailed:
            self.close()
            raise
        self.num_frames = int(header["n"])
        self.fps = float(header["fps"])
        self.height = int(header["height"])
        self.width = int(header["width"])
        self.frame_times_s = np.frombuffer(payload, dtype=np.float64).reshape(self.num_frames, 2)  # [n, 2]

    def get(self, indices: list[int]) -> np.ndarray:
        header, payload = self._call({"op": "get", "indices": indices})
        shape = tuple(header["shape"])
        expected = (len(indices), self.height, self.width, 3)
        if shape != expected:
            raise DecordFailed(f"decord returned frames of shape {shape}, expected {expected}")
        return np.frombuffer(payload, dtype=np.uint8).reshape(shape)  # [k, H, W, 3]

    def close(self) -> None:
        proc = self._proc
        try:
            proc.stdin.close()  # type: ignore[union-attr]  # EOF tells the worker to exit
        except OSError:
            pass
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]

    def _call(self, request: dict) -> tuple[dict, bytes]:
        deadline = time.monotonic() + self._timeout_s
        try:
            encoded = json.dumps(request).encode()
            self._proc.stdin.write(struct.pack("<IQ", len(encoded), 0) + encoded)  # type: ignore[union-attr]
            self._proc.stdin.flush()  # type: ignore[union-attr]
            head = self._read_exact(12, deadline)
            header_len, payload_len = struct.unpack("<IQ", head)
            header = json.loads(self._read_exact(header_len, deadline))
            payload = self._read_exact(payload_len, deadline) if payload_len else b""
        except (OSError, ValueError) as exc:
            self._kill()
            raise DecordFailed(f"decord worker failed: {exc}") from None
        if not header.get("ok"):
            raise DecordFailed(str(header.get("error", "unknown decord error")))
        return header, payload

    def _read_exact(self, size: int, deadline: float) -> bytes:
        fd = self._proc.stdout.fileno()  # type: ignore[union-attr]
        chunks = bytearray()
        while len(chunks) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill()
                raise DecordFailed(f"decord did not answer within sources.decord_timeout_s={self._timeout_s:g}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, min(size - len(chunks), 1 << 22))
            if not chunk:
                self._kill()
                raise DecordFailed("decord worker exited (crashed on this file?)")
            chunks += chunk
        return bytes(chunks)

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
