"""``streamvlm bench decode``: sampling T frames vs decoding every frame, decord vs PyAV, in one run.

The benchmark makes its own H.264 file (default 10 min of 1280×720 at 25 fps, keyframe every 2 s,
x264 ultrafast, a synthetic moving picture with the frame number drawn as blocks) and caches it,
then times, on that file and in this order:

    pyav_all        PyAV decodes every frame (FFmpeg threads on, no RGB conversion: the cheapest full pass)
    decord_all      decord reads every frame in order (RGB, as decord always returns)
    pyav_sampled    FileSource(file_backend="pyav") + sample_clip(T): open, seek, decode forward
    decord_sampled  FileSource(file_backend="decord") + sample_clip(T): incl. the watched child process
    decord_direct   decord in this process, get_batch(T indices): decord without our watchdog

and prints the ratios all/sampled per backend and decord/PyAV. Sampled frames are checked against
the numbers drawn in them, so a fast wrong answer cannot pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

BITS = 16
BLOCK = 32


def _picture(number: int, width: int, height: int, base: np.ndarray) -> np.ndarray:
    img = np.roll(base, shift=(number * 7) % width, axis=1).copy()  # [H, W, 3] moving gradient
    for bit in range(BITS):
        value = 235 if (number >> bit) & 1 else 16
        img[0:BLOCK, bit * BLOCK : (bit + 1) * BLOCK] = value
    return img


def _read_number(img: np.ndarray) -> int:
    number = 0
    for bit in range(BITS):
        block = img[8 : BLOCK - 8, bit * BLOCK + 8 : (bit + 1) * BLOCK - 8]
        if float(block.mean()) > 128:
            number |= 1 << bit
    return number


def make_video(path: Path, *, duration_s: float, width: int, height: int, fps: int, gop_s: float) -> Path:
    """Encode the benchmark file once (to a temp name, renamed when complete) and reuse it after."""
    import av

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = int(round(duration_s * fps))
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // width), (yy * 255 // height), ((xx + yy) % 256)], axis=-1).astype(np.uint8)
    tmp = path.with_suffix(f".{os.getpid()}.partial.mp4")
    started = time.perf_counter()
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        keyint = max(1, int(round(gop_s * fps)))
        stream.options = {"preset": "ultrafast", "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0"}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(_picture(i, width, height, base), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
            if i and i % (fps * 60) == 0:
                print(f"  encoded {i / fps:.0f} s of {duration_s:.0f} s", file=sys.stderr, flush=True)
        for packet in stream.encode():
            out.mux(packet)
    tmp.replace(path)
    print(f"  made {path} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return path


def _pyav_all(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def _decord_all(path: Path) -> int:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    count = 0
    for _ in range(len(reader)):
        reader.next()
        count += 1
    return count


def _sampled(path: Path, backend: str, frames: int) -> tuple[list[int], list[float]]:
    from pipeline.settings import SourceSettings
    from pipeline.sources import SourcePolicy, open_source, sample_clip

    policy = SourcePolicy.from_settings(SourceSettings(allowed_roots=[path.parent], file_backend=backend))
    with open_source(str(path), policy) as source:
        if source.backend != backend:
            raise RuntimeError(f"{backend} was not used: {source.fallback_reason}")
        clip = sample_clip(source, frames=frames)
    return [_read_number(f) for f in clip.frames], clip.timestamps_s.tolist()


def _decord_direct(path: Path, indices: list[int]) -> list[int]:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    return [_read_number(f) for f in reader.get_batch(indices).asnumpy()]


def _timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a 30 s file instead of 10 min (CI smoke run)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--duration-s", type=float, default=None, help="file length (default 600, --quick 30)")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled per clip (default 8)")
    parser.add_argument("--gop-s", type=float, default=2.0, help="keyframe interval of the made file (default 2 s)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the made file is kept (default $XDG_CACHE_HOME/streamvlm/bench, else a temp dir)",
    )


def _cache_dir(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    candidate = Path(base) / "streamvlm" / "bench"
    try:
        candidate.mkdir(parents=True, exist_ok=True)
        return candidate
    except OSError:
        return Path(tempfile.gettempdir()) / "streamvlm-bench"


def run(args: argparse.Namespace, settings: object = None) -> int:
    del settings  # this benchmark builds its own model and media: the service settings do not apply
    width, height, fps = 1280, 720, 25
    duration_s = args.duration_s or (30.0 if args.quick else 600.0)
    if duration_s <= 0 or args.frames < 1 or args.gop_s <= 0:
        print("bench decode: --duration-s, --frames and --gop-s must be positive", file=sys.stderr)
        return 2
    name = f"decode_{int(duration_s)}s_{width}x{height}_{fps}fps_gop{args.gop_s:g}s.mp4"
    path = make_video(
        _cache_dir(args.cache_dir) / name, duration_s=duration_s, width=width, height=height, fps=fps, gop_s=args.gop_s
    )
    total = int(round(duration_s * fps))
    centres = (np.arange(args.frames) + 0.5) * (duration_s / args.frames)
    expected = [int(np.floor(t * fps + 1e-6)) for t in centres]

    # Imports (torch comes with pipeline.sources) are paid here, outside every timing.
    import av  # noqa: F401
    import decord  # noqa: F401

    import pipeline.sources  # noqa: F401

    seconds: dict[str, float] = {}
    seconds["pyav_all"], n_pyav = _timed(_pyav_all, path)
    seconds["decord_all"], n_decord = _timed(_decord_all, path)
    seconds["pyav_sampled"], (got_pyav, _) = _timed(_sampled, path, "pyav", args.frames)
    seconds["decord_sampled"], (got_decord, _) = _timed(_sampled, path, "decord", args.frames)
    seconds["decord_direct"], got_direct = _timed(_decord_direct, path, expected)
    checks = {
        "pyav_all_frames": n_pyav == total,
        "decord_all_frames": n_decord == total,
        "pyav_sampled_content": got_pyav == expected,
        "decord_sampled_content": got_decord == expected,
        "decord_direct_content": got_direct == expected,
    }
    ratios = {
        "pyav_all/pyav_sampled": seconds["pyav_all"] / seconds["pyav_sampled"],
        "decord_all/decord_sampled": seconds["decord_all"] / seconds["decord_sampled"],
        "pyav_all/decord_sampled": seconds["pyav_all"] / seconds["decord_sampled"],
        "decord_sampled/pyav_sampled": seconds["decord_sampled"] / seconds["pyav_sampled"],
        "decord_all/pyav_all": seconds["decord_all"] / seconds["pyav_all"],
    }
    report = {
        "file": {"path": str(path), "duration_s": duration_s, "width": width, "height": height, "fps": fps,
                 "frames": total, "gop_s": args.gop_s, "codec": "h264 (x264 ultrafast)"},
        "sampled_frames": args.frames,
        "cpus": os.cpu_count(),
        "seconds": seconds,
        "ratios": ratios,
        "checks": checks,
        "goal": "all/sampled >= 20",
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"file: {duration_s:.0f} s {width}x{height} H.264 @ {fps} fps, keyframe every {args.gop_s:g} s, "
              f"{total} frames; sampling {args.frames} frames; {os.cpu_count()} CPUs")
        for key, value in seconds.items():
            print(f"  {key:<16} {value:9.3f} s")
        for key, value in ratios.items():
            print(f"  {key:<28} {value:8.1f}x")
        print("  checks: " + ", ".join(f"{k}={'ok' if v else 'WRONG'}" for k, v in checks.items()))
    return 0 if all(checks.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamvlm bench decode", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
