"""What to prune and how much: one frozen ``PruningConfig``, validated when it is built.

Model-independent checks run in ``__post_init__``; checks that need the model (number of LLM layers, a
[CLS] token in the vision tower, frames × per-frame minimum) run in ``check_against``, which the
service calls when it accepts a job, before any tensor is touched.

Shape legend: T frames per clip, P patch tokens per frame.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

ENCODER_METHODS = ("cls", "random", "none")
# Temporal strategies live in pruning/temporal_budget.py; the names are repeated here so that building a
# config never imports torch code paths (a test checks the two lists agree).
TEMPORAL_STRATEGIES = ("uniform", "global", "redundancy")
# Position ids of the tokens that survive encoder pruning: "original" = the slot each token had in the untouched
# prompt (RoPE sees the gaps, as in FastV); "contiguous" = renumbered 0..S−1 around the kept tokens (FasterVLM).
POSITION_MODES = ("original", "contiguous")
# Decoder families whose layer interface FastVDecoder drives (q_proj/k_proj, input_layernorm, RoPE with
# rotate-half, no q/k norm).
FASTV_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Vision towers with a [CLS] token at position 0 of every frame's sequence.
CLS_VISION_MODEL_TYPES = ("clip_vision_model", "clip")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_ratio(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value < 1


@dataclass(frozen=True)
class PruningConfig:
    """Encoder-side pruning (FasterVLM + temporal budget) and LLM-side pruning (FastV); either, both or none.

    encoder_method: "cls" ([CLS]-attention scores), "random" (seeded random scores, a baseline) or "none".
    encoder_reduction: share r of the patch tokens to drop; a clip keeps T·round(P·(1−r)), FasterVLM's own
        rounding (Video-LLaVA at 75/90/95%: 8 × 64/26/13 = 512/208/104 of 2048; LLaVA-1.5: 144/58/29 of 576).
    encoder_budget: number of patch tokens to keep per clip; overrides encoder_reduction when set.
    temporal_strategy: how the budget is spread over frames: "uniform", "global" or "redundancy".
    min_per_frame: every frame keeps at least this many patch tokens.
    merge_dropped: fold each dropped patch into its most similar kept patch of the same frame (score-weighted
        average) instead of discarding it.
    fastv_k: FastV filtering layer K (layers 0..K−1 see every token).
    fastv_ratio: FastV ratio R of visual tokens dropped before layer K; 0 turns FastV off.
    seed: seed of the "random" encoder method.
    positions: position ids after encoder pruning, one of POSITION_MODES. "original" departs from FasterVLM
        (whose code renumbers the rebuilt prompt): every kept token keeps the slot it had in the untouched
        prompt, so RoPE still tells frames and raster positions apart; identical when nothing is pruned.
    """

    encoder_method: str = "none"
    encoder_reduction: float = 0.0
    encoder_budget: int | None = None
    temporal_strategy: str = "uniform"
    min_per_frame: int = 1
    merge_dropped: bool = False
    fastv_k: int = 2
    fastv_ratio: float = 0.0
    seed: int = 0
    positions: str = "original"

    def __post_init__(self) -> None:
        if self.encoder_method not in ENCODER_METHODS:
            raise ValueError(f"encoder_method must be one of {ENCODER_METHODS}, got {self.encoder_method!r}")
        if not _is_ratio(self.encoder_reduction):
            raise ValueError(f"encoder_reduction must be a number in [0, 1), got {self.encoder_reduction!r}")
        if self.encoder_budget is not None and (not _is_int(self.encoder_budget) or self.encoder_budget < 1):
            raise ValueError(f"encoder_budget must be a positive int or None, got {self.encoder_budget!r}")
        if self.encoder_method == "none" and (self.encoder_reduction > 0 or self.encoder_budget is not None):
            raise ValueError(
                "encoder_method is 'none' but encoder_reduction/encoder_budget ask for pruning; "
                "set encoder_method='cls' or 'random'"
            )
        if self.temporal_strategy not in TEMPORAL_STRATEGIES:
            raise ValueError(
                f"temporal_strategy must be one of {TEMPORAL_STRATEGIES}, got {self.temporal_strategy!r}"
            )
        if not _is_int(self.min_per_frame) or self.min_per_frame < 0:
            raise ValueError(f"min_per_frame must be an int >= 0, got {self.min_per_frame!r}")
        if not isinstance(self.merge_dropped, bool):
            raise ValueError(f"merge_dropped must be a bool, got {self.merge_dropped!r}")
        if not _is_int(self.fastv_k) or self.fastv_k < 1:
            raise ValueError(f"fastv_k must be an int >= 1, got {self.fastv_k!r}")
        if not _is_ratio(self.fastv_ratio):
            raise ValueError(f"fastv_ratio must be a number in [0, 1), got {self.fastv_ratio!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")

    @property
    def encoder_active(self) -> bool:
        return self.encoder_method != "none"

    @property
    def fastv_active(self) -> bool:
        return self.fastv_ratio > 0

    @property
    def llm_key(self) -> tuple:
        """Every field the LLM half (build_prompt + FastV) reads: rows of one LLM batch must agree on it."""
        return self.fastv_k, self.fastv_ratio, self.positions

    def patch_budget(self, num_frames: int, patches_per_frame: int) -> int:
        """Patch tokens kept for one clip of T frames of P patches (T·P when nothing is pruned)."""
        total = num_frames * patches_per_frame
        if not self.encoder_active:
            return total
        if self.encoder_budget is not None:
            return min(self.encoder_budget, total)
        return num_frames * int(round(patches_per_frame * (1.0 - self.encoder_reduction)))

    def check_against(self, model_config: Any, num_frames: int | None = None) -> None:
        """Model-dependent checks; raise ValueError naming the parameter. ``model_config`` is a Llava/VideoLlava config.

        num_frames: frames per clip (1 for an image); when given, the budget is checked against T × min_per_frame.
        """
        text_config = getattr(model_config, "text_config", None)
        vision_config = getattr(model_config, "vision_config", None)
        if text_config is None or vision_config is None:
            raise ValueError("model_config must be a LlavaConfig or VideoLlavaConfig (text_config + vision_config)")
        if self.fastv_active:
            num_layers = text_config.num_hidden_layers
            if self.fastv_k >= num_layers:
                raise ValueError(f"fastv_k={self.fastv_k} must be < the LLM's {num_layers} decoder layers")
            if text_config.model_type not in FASTV_MODEL_TYPES:
                raise ValueError(
                    f"fastv_ratio > 0 needs a decoder of type {FASTV_MODEL_TYPES}, got {text_config.model_type!r}"
                )
        if not self.encoder_active:
            return
        feature_layer = model_config.vision_feature_layer
        if not _is_int(feature_layer):
            raise ValueError(f"encoder_method={self.encoder_method!r} needs an int vision_feature_layer, got {feature_layer!r}")
        num_vision_layers = vision_config.num_hidden_layers
        resolved = feature_layer if feature_layer >= 0 else num_vision_layers + 1 + feature_layer
        if not 1 <= resolved <= num_vision_layers:
            raise ValueError(
                f"encoder_method={self.encoder_method!r}: vision_feature_layer={feature_layer} is not the output of "
                f"one of the {num_vision_layers} vision layers"
            )
        if self.encoder_method == "cls" and vision_config.model_type not in CLS_VISION_MODEL_TYPES:
            raise ValueError(
                f"encoder_method='cls' needs a vision tower with a [CLS] token {CLS_VISION_MODEL_TYPES}, "
                f"got {vision_config.model_type!r}"
            )
        patches = (vision_config.image_size // vision_config.patch_size) ** 2
        if self.min_per_frame > patches:
            raise ValueError(f"min_per_frame={self.min_per_frame} exceeds the {patches} patches of a frame")
        if num_frames is not None:
            if not _is_int(num_frames) or num_frames < 1:
                raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
            budget = self.patch_budget(num_frames, patches)
            if budget < num_frames * self.min_per_frame:
                name = "encoder_budget" if self.encoder_budget is not None else "encoder_reduction"
                raise ValueError(
                    f"{name} keeps {budget} patch tokens, below num_frames × min_per_frame = "
                    f"{num_frames} × {self.min_per_frame}"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
