"""Frames → the model's ``pixel_values`` in one vectorised torch pass over the whole clip.

Shapes: T frames; H×W source size; h×w after the shortest-edge resize; S×S (crop_h×crop_w) output.
    frames [T, H, W, 3] uint8 → [T, 3, H, W] → resize [T, 3, h, w] → crop [T, 3, S, S] float32

The steps and their order follow CLIP-style image processors (Video-LLaVA's included): resize so the
shortest edge is ``shortest_edge`` (bicubic, antialiased, rounded back to 0..255 like the PIL path),
centre crop, rescale by 1/255, normalise by mean/std. Parameters come from the model's processor
config (``preprocessor_config.json``) or a processor object, never hard-coded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.sources.errors import InvalidSampling

CONFIG_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")


def _size_pair(size: Any, name: str) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if isinstance(size, dict) and "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        return edge, edge
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise ValueError(f"{name}: expected an int, (height, width) or a size dict, got {size!r}")


class ClipPreprocessor:
    """Resize + centre crop + rescale + normalise a clip; ``__call__`` returns [T, 3, crop_h, crop_w]."""

    def __init__(
        self,
        size: int | tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        shortest_edge: int | None = None,
        rescale_factor: float = 1 / 255,
        center_crop: bool = True,
    ) -> None:
        self.crop_h, self.crop_w = _size_pair(size, "size")
        # Without a separate resize size (e.g. a processor with do_center_crop=False) resize to the crop.
        self.shortest_edge = shortest_edge if shortest_edge is not None else min(self.crop_h, self.crop_w)
        self.center_crop = center_crop
        self.rescale_factor = float(rescale_factor)
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 channels with std > 0, got mean={mean!r} std={std!r}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ClipPreprocessor:
        """From an image/video processor config dict (the JSON transformers saves)."""
        size = config.get("size", {"shortest_edge": 224})
        crop = config.get("crop_size", size)
        do_crop = bool(config.get("do_center_crop", True))
        if isinstance(size, dict) and "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        else:
            shortest = None
        out_size = _size_pair(crop if do_crop else size, "crop_size")
        if not do_crop and shortest is not None:
            raise ValueError("a processor that resizes by shortest edge without cropping has no fixed output size")
        return cls(
            out_size,
            config.get("image_mean", [0.48145466, 0.4578275, 0.40821073]),
            config.get("image_std", [0.26862954, 0.26130258, 0.27577711]),
            shortest_edge=shortest,
            rescale_factor=config.get("rescale_factor", 1 / 255),
            center_crop=do_crop,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ClipPreprocessor:
        """From a saved model/processor directory (``preprocessor_config.json`` or the video one)."""
        for name in CONFIG_FILES:
            candidate = Path(path) / name
            if candidate.is_file():
                return cls.from_config(json.loads(candidate.read_text()))
        raise FileNotFoundError(f"no {' or '.join(CONFIG_FILES)} in {path}")

    @classmethod
    def from_processor(cls, processor: Any) -> ClipPreprocessor:
        """From a transformers processor or image processor object."""
        image_processor = getattr(processor, "image_processor", None) or getattr(processor, "video_processor", None)
        source = image_processor if image_processor is not None else processor
        config = {
            key: getattr(source, key)
            for key in ("size", "crop_size", "do_center_crop", "image_mean", "image_std", "rescale_factor")
            if getattr(source, key, None) is not None
        }
        return cls.from_config({k: dict(v) if isinstance(v, dict) else v for k, v in config.items()})

    def __call__(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        video = torch.as_tensor(frames)
        if video.dtype != torch.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise InvalidSampling(f"expected [T, H, W, 3] uint8 frames, got {tuple(video.shape)} {video.dtype}", param="frames")
        t, h, w, _ = video.shape
        x = video.permute(0, 3, 1, 2).to(torch.float32)  # [T, 3, H, W]
        if self.center_crop:
            short, long = (h, w) if h <= w else (w, h)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
        else:
            new_h, new_w = self.crop_h, self.crop_w
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
            x = x.round_().clamp_(0, 255)  # [T, 3, h, w], back on the uint8 grid as the PIL path is
        if self.center_crop:
            top = max((new_h - self.crop_h) // 2, 0)
            left = max((new_w - self.crop_w) // 2, 0)
            x = x[:, :, top : top + self.crop_h, left : left + self.crop_w]  # [T, 3, S, S]
        if x.shape[-2:] != (self.crop_h, self.crop_w):
            raise InvalidSampling(
                f"frames of {w}×{h} cannot be cropped to {self.crop_w}×{self.crop_h} after resizing", param="frames"
            )
        x = x * self.rescale_factor
        return ((x - self.mean) / self.std).contiguous()  # [T, 3, S, S]
