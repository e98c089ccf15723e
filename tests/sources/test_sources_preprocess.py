"""ClipPreprocessor against transformers' own Video-LLaVA image processor, on the same frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sources_media import frame_picture
from transformers import VideoLlavaImageProcessor

from pipeline.sources import ClipPreprocessor, InvalidSampling


def clip_frames(t: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    base = np.stack([np.resize(frame_picture(i, 128, 64), (h, w, 3)) for i in range(t)])
    noise = rng.integers(0, 40, size=base.shape)
    return np.clip(base.astype(np.int64) + noise, 0, 255).astype(np.uint8)  # [T, H, W, 3]


@pytest.mark.parametrize(("h", "w"), [(90, 160), (160, 90), (224, 224), (300, 400)])
def test_matches_transformers_image_processor(tmp_path, h, w):
    reference = VideoLlavaImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 48, "width": 48},
        image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3],
    )
    reference.save_pretrained(tmp_path)
    pre = ClipPreprocessor.from_pretrained(tmp_path)
    assert (pre.crop_h, pre.crop_w, pre.shortest_edge) == (48, 48, 56)
    frames = clip_frames(3, h, w)
    ours = pre(frames)
    theirs = reference(images=list(frames), return_tensors="pt", return_legacy_image_output=False)["pixel_values"]
    assert ours.shape == theirs.shape == (3, 3, 48, 48) and ours.dtype == torch.float32
    # PIL's bicubic kernel uses a=-0.5, torch's a=-0.75: equal on smooth areas, a few grey levels
    # apart on hard edges when upsampling (0.2 here ≈ 10 levels at std 0.2; mean stays ≪ 1 level).
    diff = (ours - theirs).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.2, (diff.mean(), diff.max())


def test_from_processor_object_and_per_frame_independence():
    reference = VideoLlavaImageProcessor()
    pre = ClipPreprocessor.from_processor(reference)
    assert (pre.crop_h, pre.crop_w, pre.shortest_edge) == (224, 224, 224)
    frames = clip_frames(4, 120, 200)
    whole = pre(torch.from_numpy(frames))
    one = pre(frames[2:3])
    assert torch.allclose(whole[2:3], one, atol=1e-5)


def test_rejects_wrong_input():
    pre = ClipPreprocessor(32, [0.5] * 3, [0.5] * 3)
    with pytest.raises(InvalidSampling, match="^frames"):
        pre(np.zeros((2, 10, 10, 3), dtype=np.float32))
    with pytest.raises(InvalidSampling, match="^frames"):
        pre(np.zeros((10, 10, 3), dtype=np.uint8))
