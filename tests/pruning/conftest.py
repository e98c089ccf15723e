from __future__ import annotations

import pytest
from tiny_models import build_llava, build_video_llava


@pytest.fixture(scope="session")
def video_llava(tmp_path_factory):
    return build_video_llava(tmp_path_factory.mktemp("video_llava"))


@pytest.fixture(scope="session")
def video_llava_eager(tmp_path_factory):
    return build_video_llava(tmp_path_factory.mktemp("video_llava_eager"), attn_implementation="eager")


@pytest.fixture(scope="session")
def llava(tmp_path_factory):
    return build_llava(tmp_path_factory.mktemp("llava"), seed=1)


@pytest.fixture(scope="session")
def llava_full(tmp_path_factory):
    return build_llava(tmp_path_factory.mktemp("llava_full"), seed=2, select_strategy="full")
