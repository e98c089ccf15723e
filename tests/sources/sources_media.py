"""Real test media written with PyAV: every frame carries its own number as 16 black/white blocks.

Frame layout (width ≥ 128, height ≥ 48): the top 32 rows hold 2 rows × 8 columns of 16×16 blocks,
block j white when bit j of the frame number is set; the rest is a moving gradient so that the
encoder has real motion to code.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

BITS = 16
BLOCK = 16
# Variable frame rate: irregular millisecond timestamps (frame i shows from VFR_PTS_MS[i]).
VFR_PTS_MS = [0, 20, 80, 180, 200, 260, 400, 420, 440, 600, 610, 900, 960, 1000, 1300, 1320]


def frame_picture(number: int, width: int = 128, height: int = 64) -> np.ndarray:
    """[H, W, 3] uint8 picture whose top blocks spell ``number`` in binary."""
    img = np.empty((height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    img[..., 0] = (xx * 2 + number * 3) % 256
    img[..., 1] = (yy * 3 + number) % 256
    img[..., 2] = 128
    for bit in range(BITS):
        row, col = divmod(bit, 8)
        value = 235 if (number >> bit) & 1 else 16
        img[row * BLOCK : (row + 1) * BLOCK, col * BLOCK : (col + 1) * BLOCK] = value
    return img


def read_number(img: np.ndarray) -> int:
    """Inverse of ``frame_picture`` on a decoded (lossy) [H, W, 3] picture."""
    number = 0
    for bit in range(BITS):
        row, col = divmod(bit, 8)
        block = img[row * BLOCK + 4 : (row + 1) * BLOCK - 4, col * BLOCK + 4 : (col + 1) * BLOCK - 4]
        if float(block.mean()) > 128:
            number |= 1 << bit
    return number


def write_video(
    path: Path,
    *,
    codec: str = "libx264",
    frames: int = 50,
    fps: int = 25,
    width: int = 128,
    height: int = 64,
    pts_ms: Sequence[int] | None = None,
    gop: int = 12,
    bframes: int = 0,
    options: dict[str, str] | None = None,
    audio: bool = False,
) -> Path:
    """Encode ``frames`` numbered frames; ``pts_ms`` gives a variable frame rate (millisecond pts)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        opts = dict(options or {})
        if codec == "libx264":
            opts.setdefault("preset", "veryfast" if bframes else "ultrafast")
            opts.setdefault("x264-params", f"bframes={bframes}:keyint={gop}:min-keyint={gop}:scenecut=0")
        elif bframes:
            stream.codec_context.max_b_frames = bframes
        if codec in ("libvpx-vp9", "libvpx"):
            opts.setdefault("deadline", "realtime")
            opts.setdefault("cpu-used", "8")
        stream.options = opts
        if pts_ms is not None:
            stream.time_base = Fraction(1, 1000)
            stream.codec_context.time_base = Fraction(1, 1000)
        audio_stream = out.add_stream("aac", rate=8000) if audio else None
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_picture(i, width, height), format="rgb24")
            if pts_ms is not None:
                frame.pts = pts_ms[i]
                frame.time_base = Fraction(1, 1000)
            else:
                frame.pts = i
                frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if audio_stream is not None:
            _write_silence(out, audio_stream, seconds=frames / fps)
    return path


def _write_silence(out: av.container.OutputContainer, stream: av.AudioStream, seconds: float) -> None:
    samples = 1024
    for k in range(int(seconds * 8000 / samples) + 1):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, samples), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        frame.pts = k * samples
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def write_audio_only(path: Path, seconds: float = 1.0) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        _write_silence(out, stream, seconds)
    return path


def write_zero_frames(path: Path) -> Path:
    """A container with a declared video stream and not one frame in it."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height = 128, 64
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for packet in stream.encode():
            out.mux(packet)
    return path
