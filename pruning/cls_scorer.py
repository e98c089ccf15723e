"""One-row [CLS] attention scores (FasterVLM) read inside a CLIP-style vision tower, in the pass that makes the features.

We drive the tower's own modules (embeddings, pre-layernorm, encoder layers) from a loop and stop at the layer
whose output the VLM consumes (``vision_feature_layer``, −2 for LLaVA/Video-LLaVA): later layers are never run.
That layer keeps its fast attention kernel (SDPA); forward hooks on its q/k projections hand us the queries and
keys it computes anyway, and we form only the [CLS] row: softmax(q_cls · Kᵀ · scale), averaged over heads.

Shape legend:
    N   frames in the batch (clips × frames per clip)
    S   tokens per frame = 1 + P ([CLS] at position 0, then P patches in raster order)
    P   patch tokens per frame
    D   vision hidden size; H heads of hd = D / H
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TowerOutput:
    features: torch.Tensor  # [N, S, D] hidden states of vision_feature_layer
    cls_scores: torch.Tensor | None  # [N, P] float32, [CLS] attention on each patch averaged over heads
    score_s: float = 0.0  # time spent forming the [CLS] row (the scoring overhead; q/k come free from the layer)


def resolve_feature_layer(feature_layer: int, num_layers: int) -> int:
    """Index into hidden_states (0 = embeddings, i = output of layer i−1); must be the output of a layer."""
    resolved = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 1 <= resolved <= num_layers:
        raise ValueError(f"vision_feature_layer={feature_layer} is not the output of one of {num_layers} layers")
    return resolved


class ClsAttentionScorer:
    """Run a CLIP vision tower up to ``feature_layer`` and return its hidden states plus the [CLS] score row."""

    def __init__(self, vision_tower: nn.Module, feature_layer: int):
        # transformers ≥ 5 exposes the CLIP modules on CLIPVisionModel itself; older releases nest them.
        self.tower = getattr(vision_tower, "vision_model", vision_tower)
        self.layers = self.tower.encoder.layers
        self.num_layers = len(self.layers)
        self.hidden_index = resolve_feature_layer(feature_layer, self.num_layers)
        attn = self.layers[self.hidden_index - 1].self_attn
        self.num_heads = attn.num_heads
        self.scale = attn.scale

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, with_scores: bool = True) -> TowerOutput:
        hidden = self.tower.embeddings(pixel_values)  # [N, S, D]
        hidden = self.tower.pre_layrnorm(hidden)
        captured: dict[str, torch.Tensor] = {}
        handles = []
        if with_scores:
            attn = self.layers[self.hidden_index - 1].self_attn
            # Only the [CLS] query is kept; the keys are needed whole. Both are outputs the layer computes anyway.
            handles.append(attn.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o[:, :1])))
            handles.append(attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)))
        try:
            for layer in self.layers[: self.hidden_index]:
                hidden = layer(hidden, None)
        finally:
            for handle in handles:
                handle.remove()
        start = time.perf_counter()
        scores = self._cls_row(captured["q"], captured["k"]) if with_scores else None
        score_s = time.perf_counter() - start if with_scores else 0.0
        return TowerOutput(features=hidden, cls_scores=scores, score_s=score_s)

    @staticmethod
    def layers_needed(feature_layer: int, num_layers: int) -> int:
        """Vision layers run to produce ``feature_layer`` (23 of 24 for CLIP ViT-L at −2)."""
        return resolve_feature_layer(feature_layer, num_layers)

    def _cls_row(self, q_cls: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        n, s, d = keys.shape
        hd = d // self.num_heads
        q = q_cls.view(n, 1, self.num_heads, hd).transpose(1, 2).float()  # [N, H, 1, hd]
        k = keys.view(n, s, self.num_heads, hd).transpose(1, 2).float()  # [N, H, S, hd]
        logits = (q @ k.transpose(-1, -2)) * self.scale  # [N, H, 1, S]
        probs = logits.softmax(dim=-1)[:, :, 0, 1:]  # [N, H, P]: the [CLS] row, on patch keys only
        return probs.mean(dim=1)  # [N, P]
