"""``streamvlm demo``: the main job on embedded defaults, end to end through Redis and Ray.

Makes a sample video (a held-out synthetic clip the demo model never trained on) and a live loopback
camera, starts the service (embedded Redis, local Ray, bundled demo model), submits a question about
the video and a caption job on the camera as plain jobs, prints answers and captions as they arrive,
cancels the caption job after a few windows, and sums up the tokens and FLOPs that pruning saved.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pipeline.client import JobClient
from pipeline.connect import redacted_url
from pipeline.loopback import LoopbackCamera, held_out_frames, write_clip
from pipeline.schemas import JobRequest, WindowResult
from pipeline.settings import Settings
from pipeline.synthetic import VIDEO_FPS, VIDEO_REPEAT, held_out_sample
from workers.service import Service
from workers.service_thread import ServiceThread

FPS, REPEAT = VIDEO_FPS, VIDEO_REPEAT  # a clip's frames on screen REPEAT / FPS s each: 4 s per clip



def _say(text: str) -> None:
    print(text, flush=True)


def _line(kind: str, res: WindowResult) -> str:
    return (f"  [{kind} #{res.window_index} {res.start_s:5.1f}–{res.end_s:5.1f} s] {res.text!r}  "
            f"({res.visual_tokens_kept}/{res.visual_tokens_in} visual tokens, "
            f"{100 * res.flops_ratio:.0f}% of the FLOPs, model time {_model_s(res):.2f} s)")


def _model_s(res: WindowResult) -> float:
    # Decode time of a live window is mostly waiting for the stream; queueing is not model work.
    return sum(v for k, v in res.timings_s.items() if k not in ("video_decode_s", "llm_queue_s"))


def run_demo(settings: Settings, workdir: Path, caption_windows: int = 3, timeout_s: float = 600.0) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    if not any(workdir.resolve().is_relative_to(Path(root).resolve()) for root in settings.sources.allowed_roots):
        settings.sources.allowed_roots = [*settings.sources.allowed_roots, workdir.resolve()]

    sample = held_out_sample(0)
    video = write_clip(workdir / "sample.mp4", sample.clip.frames)
    per_clip = sample.clip.frames.shape[0] * REPEAT
    camera = LoopbackCamera(held_out_frames(first=1, count=16, repeat=REPEAT), fps=FPS)
    camera.start()
    _say(f"sample video: {video} ({sample.clip.frames.shape[0]} frames × {REPEAT}, {FPS} fps)")
    _say(f"live camera:  {camera.url}")

    _say("starting the service (embedded Redis, local Ray, demo model) …")
    started = time.monotonic()
    service = Service(settings).start()
    _say(f"service up in {time.monotonic() - started:.0f} s; Redis at {redacted_url(service.redis_url)}")
    client = JobClient(service.queue)
    runner = ServiceThread(service).start()
    try:
        ask = JobRequest(source=str(video), kind="ask", question=sample.qa.question)
        caption = JobRequest(source=camera.url, kind="caption",
                             sampling={"window_s": per_clip / FPS, "stride_s": per_clip / FPS})
        client.submit(ask)
        client.submit(caption)
        _say(f"submitted: ask {ask.job_id} — {sample.qa.question!r} (the right answer is {sample.qa.answer!r})")
        _say(f"submitted: caption {caption.job_id} on the live camera, {per_clip / FPS:g} s windows")

        seen: list[WindowResult] = []
        for res in client.follow(ask.job_id, timeout_s=timeout_s):
            seen.append(res)
            _say(_line("answer", res))
        status = client.status(ask.job_id)
        if status.error:
            _say(f"  ask job {status.state.value}: {status.error}")
        for res in client.follow(caption.job_id, timeout_s=timeout_s):
            seen.append(res)
            _say(_line("caption", res) + f"   ({len([r for r in seen if r.job_id == caption.job_id])}"
                 f"/{caption_windows})")
            if len([r for r in seen if r.job_id == caption.job_id]) >= caption_windows:
                client.cancel(caption.job_id)
        cap_status = client.status(caption.job_id)
        _say(f"caption job {cap_status.state.value} after {cap_status.progress} windows"
             + (f": {cap_status.error}" if cap_status.error and cap_status.state.value == "failed" else ""))

        if seen:
            tokens_in = sum(r.visual_tokens_in for r in seen)
            kept = sum(r.visual_tokens_kept for r in seen)
            flops = sum(r.flops_ratio for r in seen) / len(seen)
            _say(f"pruning kept {kept} of {tokens_in} visual tokens ({100 * (1 - kept / tokens_in):.0f}% fewer) "
                 f"and used {100 * flops:.0f}% of the unpruned FLOPs on average over {len(seen)} results")
        ok = status.state.value == "done" and any(r.job_id == caption.job_id for r in seen)
        return 0 if ok else 1
    finally:
        runner.stop()
        camera.stop()


def main(settings: Settings, workdir: Path | None = None) -> int:
    try:
        return run_demo(settings, workdir or Path(".streamvlm") / "demo")
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130
