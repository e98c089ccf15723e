"""Config A: what a user writes without streamvlm (PyAV + the checkpoint's preprocessing + transformers'
``model.generate``, one request at a time), run in a spawned process of its own and driven over a pipe."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
import traceback
from typing import Any

import numpy as np

from pipeline.synthetic import VIDEO_FPS as FPS
from workers.bench.plan import BenchError, Plan
from workers.bench.records import FileRecord, LiveRecord, Sample
from workers.bench.rig import timed_camera


class _FirstTokenClock:
    """A transformers streamer that only notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:  # generate() puts the prompt first, then each new token
            self.first_token = time.perf_counter()

    def end(self) -> None:
        pass


class PlainGenerate:
    """Config A: PyAV + the checkpoint's preprocessing + ``model.generate``, one request at a time."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto", threads: int | None = 1) -> None:
        import torch

        from pipeline.inference import VideoQA

        if threads:
            torch.set_num_threads(threads)
        self.qa = VideoQA.load(model_path, device=device, dtype=dtype)
        vision = self.qa.model.config.vision_config
        self.tokens_per_frame = (vision.image_size // vision.patch_size) ** 2 + 1  # the processor's expansion

    def generate(self, frames: np.ndarray, text: str, max_new_tokens: int) -> tuple[str, float]:
        """(answer, seconds from the call to the first generated token)."""
        import torch

        from pipeline.inference import VIDEO_PROMPT

        start = time.perf_counter()
        qa = self.qa
        pixels = qa.pixel_values(frames)  # [1, T, 3, S, S]
        span = qa.video_token * (frames.shape[0] * self.tokens_per_frame)
        enc = qa.tokenizer([VIDEO_PROMPT.format(video=span, question=text.strip())], return_tensors="pt")
        clock = _FirstTokenClock()
        with torch.no_grad():
            out = qa.model.generate(
                input_ids=enc["input_ids"].to(qa.device), attention_mask=enc["attention_mask"].to(qa.device),
                pixel_values_videos=pixels, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=qa.eos_token_id, pad_token_id=qa.pad_token_id, streamer=clock,
            )
        answer = qa.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        first = clock.first_token if clock.first_token is not None else time.perf_counter()
        return answer, first - start

    @staticmethod
    def read_clip(path: str, frames: int) -> np.ndarray:
        """Every frame of the file with PyAV, then T of them at the segment centres: [T, H, W, 3] uint8."""
        import av

        with av.open(path) as container:
            images = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        if not images:
            raise BenchError(f"{path}: no frames decoded")
        index = ((np.arange(frames) + 0.5) * len(images) / frames).astype(int)
        return np.stack([images[i] for i in index])

    def files(self, items: list[tuple[str, str]], frames: int, max_new_tokens: int) -> list[dict[str, Any]]:
        out = []
        for path, question in items:
            start = time.perf_counter()
            clip = self.read_clip(path, frames)
            decoded = time.perf_counter()
            text, ttft_after_decode = self.generate(clip, question, max_new_tokens)
            done = time.perf_counter()
            out.append({"text": text, "latency_s": done - start, "ttft_s": decoded - start + ttft_after_decode,
                        "decode_s": decoded - start, "generate_s": done - decoded})
        return out

    def live(self, url: str, windows: int, window_s: float, stride_s: float, frames: int, prompt: str,
             max_new_tokens: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Caption windows [k·stride, k·stride + window) of a live stream, read and answered in one loop."""
        import av

        results: list[dict[str, Any]] = []
        buffer: list[tuple[float, np.ndarray]] = []
        origin: float | None = None
        # The same low-latency probing the service's live sources use (pipeline/sources/policy.py), so both
        # readers see their first frame equally soon.
        options = {"analyzeduration": "1000000", "probesize": "1000000"}
        with av.open(url, timeout=timeout_s, options=options) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * stream.time_base)
                origin = t if origin is None else origin
                buffer.append((t - origin, frame.to_ndarray(format="rgb24")))
                arrived = time.time()
                k = len(results)
                while k < windows and buffer[-1][0] >= k * stride_s + window_s:  # window k is complete
                    start = k * stride_s
                    targets = start + (np.arange(frames) + 0.5) * (window_s / frames)
                    stamps = np.array([s for s, _ in buffer])
                    pick = np.clip(np.searchsorted(stamps, targets + 1e-9, side="right") - 1, 0, len(buffer) - 1)
                    text, _ = self.generate(np.stack([buffer[i][1] for i in pick]), prompt, max_new_tokens)
                    results.append({"window_index": k, "end_s": start + window_s, "seen_wall": time.time(),
                                    "text": text, "frames_dropped": 0, "frame_t": buffer[-1][0],
                                    "frame_wall": arrived})
                    k += 1
                    buffer = [b for b in buffer if b[0] >= k * stride_s - 1.0 / FPS]
                if len(results) >= windows:
                    break
        return results


def _baseline_child(conn: Any, model_path: str, device: str, dtype: str, threads: int | None) -> None:
    try:
        user = PlainGenerate(model_path, device, dtype, threads)
        conn.send(("ready", os.getpid()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        name, kwargs = conn.recv()
        if name == "stop":
            return
        try:
            conn.send(("ok", getattr(user, name)(**kwargs)))
        except Exception:  # noqa: BLE001 - reported to the parent, which raises it
            conn.send(("error", traceback.format_exc()))


class BaselineProcess:
    """Config A's process, driven over a pipe: spawned (a fresh interpreter, as a user's script is)."""

    def __init__(self, model_path: str, device: str, dtype: str, threads: int | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_baseline_child, args=(child, model_path, device, dtype, threads),
                                    name="bench-baseline", daemon=True)
        self.pid: int | None = None

    def start(self) -> BaselineProcess:
        self._process.start()
        return self

    def _receive(self, timeout_s: float, what: str) -> Any:
        if not self._conn.poll(timeout_s):
            raise BenchError(f"config A's process did not answer {what} within {timeout_s:g} s")
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise BenchError(f"config A's process died during {what} (exit code {self._process.exitcode})") from None
        if status == "error":
            raise BenchError(f"config A's process failed in {what}:\n{value}")
        return value

    def wait_ready(self, timeout_s: float = 300.0) -> int:
        self.pid = self._receive(timeout_s, "start-up")
        return self.pid

    def call(self, name: str, timeout_s: float, **kwargs: Any) -> Any:
        self._conn.send((name, kwargs))
        return self._receive(timeout_s, name)

    def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(("stop", {}))
            self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()  # our own child, by its handle
            self._process.join(timeout=5)
        self._conn.close()


def baseline_files(baseline: BaselineProcess, samples: list[Sample], max_new_tokens: int, timeout_s: float
                   ) -> tuple[list[FileRecord], float]:
    started = time.perf_counter()
    out = baseline.call("files", timeout_s, items=[(s.path, s.question) for s in samples], frames=8,
                        max_new_tokens=max_new_tokens)
    elapsed = time.perf_counter() - started
    records = [FileRecord(s.index, o["text"], o["latency_s"], o["ttft_s"], 0, 0,
                          {"video_decode_s": o["decode_s"], "generate_s": o["generate_s"]})
               for s, o in zip(samples, out, strict=True)]
    return records, elapsed


def baseline_live(baseline: BaselineProcess, plan: Plan, first_camera: int, timeout_s: float) -> list[LiveRecord]:
    from pipeline.synthetic import CAPTION_PROMPT

    cam = timed_camera(16 * first_camera).start()
    try:
        out = baseline.call("live", timeout_s, url=cam.url, windows=plan.live_windows, window_s=plan.window_s,
                            stride_s=plan.stride_s, frames=8, prompt=CAPTION_PROMPT,
                            max_new_tokens=plan.caption_tokens)
    finally:
        cam.stop()
    origin = cam.connections[0]
    return [LiveRecord(0, o["window_index"], o["seen_wall"] - (origin + o["end_s"]), o["seen_wall"],
                       o["frames_dropped"], o["text"], frame_delay_s=o["frame_wall"] - (origin + o["frame_t"]))
            for o in out]
