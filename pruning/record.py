"""What one pruned generation did: tokens in/kept per stage, kept indices, FLOPs with/without pruning, timings.

Plain ints, floats, strings and lists (JSON-ready through ``to_dict``). Lists are per batch row; kept_per_frame
and kept_patch_indices are [B][T] and [B][T][kept].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PruningRecord:
    config: dict[str, Any]
    modality: str  # "video" | "image"
    cls_policy: str  # how per-frame [CLS] tokens are treated (see pruning/vlm.py)
    span_has_cls: bool  # the untouched model's span holds each frame's [CLS]
    num_frames: int
    visual_tokens_in: list[int]  # [B] visual tokens the untouched model would use
    visual_tokens_kept: list[int]  # [B] after encoder pruning ([CLS] tokens included)
    kept_per_frame: list[list[int]]  # [B][T] after encoder pruning ([CLS] included)
    kept_patch_indices: list[list[list[int]]]  # [B][T][kept] raster patch indices
    fastv_visual_in: list[int]  # [B] visual tokens entering the LLM
    fastv_visual_kept: list[int]  # [B] visual tokens layers ≥ K see
    fastv_kept_positions: list[list[int]]  # [B][kept] position ids of the visual tokens layers ≥ K see
    prompt_tokens_in: list[int]  # [B] untouched prompt length
    prompt_tokens_after_encoder: list[int]  # [B] prompt length layers < K see
    prompt_tokens_after_fastv: list[int]  # [B] prompt length layers ≥ K see
    new_tokens: list[int]  # [B]
    flops: dict[str, dict[str, float]]  # stage → {"unpruned", "pruned"}; stages vision/projector/prefill/decode
    flops_per_row: list[dict[str, dict[str, float]]]  # [B] the same, per batch row (``flops`` is their sum)
    timings_s: dict[str, float] = field(default_factory=dict)  # vision_s, score_s, select_s, project_s, prefill_s, decode_s
    flops_convention: str = "FastV/FasterVLM: 4nd²+2n²d+2ndm per layer (SwiGLU third matrix ignored), multiply-adds"

    def flops_ratio(self, stage: str | None = None, row: int | None = None) -> float:
        """Pruned ÷ unpruned FLOPs of one stage, or of all stages together; of the batch, or of one ``row``."""
        flops = self.flops if row is None else self.flops_per_row[row]
        stages = [stage] if stage else list(flops)
        unpruned = sum(flops[s]["unpruned"] for s in stages)
        pruned = sum(flops[s]["pruned"] for s in stages)
        return pruned / unpruned if unpruned else 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
