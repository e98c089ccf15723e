"""A real service for the tests: embedded redis-server, local Ray, the bundled demo model, a loopback camera."""

from __future__ import annotations

import pytest
import ray
from service_helpers import FPS, RunningService, camera_frames, clip_video, service_settings

from pipeline.ask import ask, load_model
from pipeline.loopback import LoopbackCamera
from pipeline.schemas import JobRequest


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def running(media):
    svc = RunningService(service_settings(media))
    yield svc
    svc.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def camera():
    cam = LoopbackCamera(camera_frames(), fps=FPS).start()
    yield cam
    cam.stop()


@pytest.fixture(scope="module")
def answerable(media, running):
    """A held-out clip (as an H.264 file) whose question the unpruned demo model answers right locally."""
    settings = running.service.settings
    qa = None
    for index in range(30):
        path, sample = clip_video(media / f"clip{index}.mp4", index)
        job = JobRequest(source=str(path), kind="ask", question=sample.qa.question, pruning="off")

        qa = qa or load_model(settings)
        if ask(job, settings, qa).answer == sample.qa.answer:
            return path, sample
    raise AssertionError("the demo model answered none of 30 held-out questions right")
