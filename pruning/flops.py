"""FLOPs accounting with the papers' convention (REFERENCE.md §4), for vision tower, projector, LLM prefill and decode.

Convention (FastV/FasterVLM): per decoder layer, a prefill of n tokens costs
    F(n) = 4·n·d² + 2·n²·d + 2·n·d·m
i.e. the four attention projections, QKᵀ and AV, and TWO FFN matrices. Each term counts one multiply-add per
weight and token, as the papers do (double everything for hardware FLOPs; ratios do not change). The third
SwiGLU matrix of Llama's FFN is IGNORED by default, as in the papers; ``swiglu_third=True`` adds it (3·n·d·m).
Grouped-query attention is counted as full multi-head attention (Vicuna-7B is multi-head anyway).
Decode, per layer and per new token with a context of c tokens: 4·d² + 2·d·m + 2·d·c.
The CLIP tower's MLP really has two matrices, so the same F is exact there; the patch embedding adds P·(3·p²)·D.

Shapes: n tokens, d hidden size, m FFN width, L layers, K FastV layer, R FastV ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LLMShape:
    num_layers: int  # L
    hidden: int  # d
    intermediate: int  # m

    @classmethod
    def from_config(cls, text_config: Any) -> LLMShape:
        return cls(text_config.num_hidden_layers, text_config.hidden_size, text_config.intermediate_size)


@dataclass(frozen=True)
class VisionShape:
    num_layers: int
    hidden: int
    intermediate: int
    patches: int  # P per frame
    patch_size: int
    channels: int

    @classmethod
    def from_config(cls, vision_config: Any) -> VisionShape:
        patches = (vision_config.image_size // vision_config.patch_size) ** 2
        return cls(
            vision_config.num_hidden_layers,
            vision_config.hidden_size,
            vision_config.intermediate_size,
            patches,
            vision_config.patch_size,
            vision_config.num_channels,
        )


def layer_prefill_flops(n: int, d: int, m: int, swiglu_third: bool = False) -> float:
    """F(n) of one transformer layer over n tokens."""
    ffn_matrices = 3 if swiglu_third else 2
    return 4.0 * n * d * d + 2.0 * n * n * d + ffn_matrices * float(n) * d * m


def layer_decode_flops(context: int, d: int, m: int, swiglu_third: bool = False) -> float:
    """One new token through one layer with ``context`` tokens in its cache (the new one included)."""
    ffn_matrices = 3 if swiglu_third else 2
    return 4.0 * d * d + ffn_matrices * float(d) * m + 2.0 * d * context


def prefill_flops(
    shape: LLMShape, n: int, n_after_k: int | None = None, k: int = 0, swiglu_third: bool = False
) -> float:
    """Prefill of n tokens through L layers; with FastV, layers ≥ k see n_after_k tokens."""
    n_after_k = n if n_after_k is None else n_after_k
    low = layer_prefill_flops(n, shape.hidden, shape.intermediate, swiglu_third)
    high = layer_prefill_flops(n_after_k, shape.hidden, shape.intermediate, swiglu_third)
    return k * low + (shape.num_layers - k) * high


def fastv_kept(n_visual: int, ratio: float) -> int:
    """Visual tokens FastV keeps of n_visual at ratio R (the same rounding as FastVDecoder)."""
    return n_visual - int(round(ratio * n_visual))


def fastv_flops_ratio(shape: LLMShape, n: int, n_visual: int, k: int, ratio: float) -> float:
    """[K·F(n) + (L−K)·F(n')] / [L·F(n)], n' = n − R·n_visual."""
    n_after = n - n_visual + fastv_kept(n_visual, ratio)
    return prefill_flops(shape, n, n_after, k) / prefill_flops(shape, n)


def decode_flops(
    shape: LLMShape, context_low: int, context_high: int, k: int, new_tokens: int, swiglu_third: bool = False
) -> float:
    """new_tokens decode steps; layers < k start from context_low cached tokens, layers ≥ k from context_high.

    The first new token comes out of prefill, so only new_tokens − 1 decode steps run.
    """
    total = 0.0
    for step in range(max(new_tokens - 1, 0)):
        low = layer_decode_flops(context_low + step + 1, shape.hidden, shape.intermediate, swiglu_third)
        high = layer_decode_flops(context_high + step + 1, shape.hidden, shape.intermediate, swiglu_third)
        total += k * low + (shape.num_layers - k) * high
    return total


def vision_flops(shape: VisionShape, frames: int, layers_run: int | None = None) -> float:
    """Vision tower over ``frames`` frames: patch embedding plus ``layers_run`` layers on 1 + P tokens."""
    layers_run = shape.num_layers if layers_run is None else layers_run
    tokens = shape.patches + 1
    embed = float(shape.patches) * shape.channels * shape.patch_size**2 * shape.hidden
    per_frame = embed + layers_run * layer_prefill_flops(tokens, shape.hidden, shape.intermediate)
    return frames * per_frame


def projector_flops(tokens: int, vision_hidden: int, text_hidden: int) -> float:
    """Two-layer MLP projector over ``tokens`` visual tokens."""
    return float(tokens) * (vision_hidden * text_hidden + text_hidden * text_hidden)
