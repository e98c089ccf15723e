"""A real service for the tests: embedded redis-server, local Ray, the bundled demo model, a loopback camera."""

from __future__ import annotations

import pytest
import ray
from service_helpers import FPS, RunningService, camera_frames, service_settings

from pipeline.loopback import LoopbackCamera


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
