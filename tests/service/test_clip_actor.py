"""ClipActor's contract with the service, called in this process (the class the Ray actors run): ``open``
cuts the first clip, an ask job's source is closed as soon as its only clip is cut, and a caption job's
source stays open until its last window."""

from __future__ import annotations

import numpy as np
import pytest
from service_helpers import FPS, REPEAT, clip_video, service_settings

from pipeline.demo_model import demo_model_path
from pipeline.loopback import write_video
from pipeline.schemas import JobRequest
from pipeline.sources import SourceNotFound
from pipeline.synthetic import held_out_sample
from workers.clip_actor import ClipActor


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return tmp_path_factory.mktemp("clip_actor")


@pytest.fixture(scope="module")
def actor(media):
    return ClipActor(service_settings(media), str(demo_model_path()))


def test_open_cuts_an_asks_only_clip_and_closes_its_source(actor, media):
    path, sample = clip_video(media / "ask.mp4", 0)
    meta, tokens = actor.open(JobRequest(source=str(path), kind="ask", question=sample.qa.question), 0)
    assert meta["end"] is False and meta["closed"] is True and meta["window_index"] == 0
    assert actor.clips is None  # nothing left open between jobs
    assert tokens.features.shape[0] == 1 and meta["bytes_shipped"] == tokens.features.nbytes


def test_a_caption_keeps_its_source_until_the_last_window(actor, media):
    frames = np.concatenate([np.repeat(held_out_sample(i).clip.frames, REPEAT, axis=0) for i in range(2)])
    path = write_video(media / "two_clips.mp4", frames, fps=FPS)  # 2 × 4 s
    job = JobRequest(source=str(path), kind="caption", sampling={"window_s": 4.0, "stride_s": 4.0})
    metas = [actor.open(job, 0)[0]]
    assert metas[0]["closed"] is False and actor.clips is not None
    while not metas[-1]["end"]:
        metas.append(actor.next_clip()[0])
    assert [m["window_index"] for m in metas[:-1]] == [0, 1]
    assert [m["closed"] for m in metas] == [False, False, True] and actor.clips is None


def test_a_failed_open_propagates_typed_and_leaves_nothing_open(actor, media):
    job = JobRequest(source=str(media / "missing.mp4"), kind="ask", question="what colour is the circle?")
    with pytest.raises(SourceNotFound):
        actor.open(job, 0)
    assert actor.clips is None
