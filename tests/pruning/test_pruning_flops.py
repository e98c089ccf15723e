"""FLOPs accounting reproduces REFERENCE.md §4's worked checks on the real Video-LLaVA-7B shapes (meta device)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

from pruning.flops import (
    LLMShape,
    VisionShape,
    decode_flops,
    fastv_flops_ratio,
    layer_prefill_flops,
    prefill_flops,
    vision_flops,
)

OTHER_TOKENS = 55  # system prompt + question + "ASSISTANT:" around the 2048 video tokens


@pytest.fixture(scope="module")
def video_llava_7b():
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    config = VideoLlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), vision_feature_layer=-2)
    with torch.device("meta"):
        model = VideoLlavaForConditionalGeneration(config)
    return model


def shapes_from_weights(model) -> tuple[LLMShape, VisionShape]:
    """Read the sizes off the built modules, so the check is against the model, not our own constants."""
    lm = model.model.language_model
    mlp = lm.layers[0].mlp
    llm = LLMShape(len(lm.layers), mlp.gate_proj.weight.shape[1], mlp.gate_proj.weight.shape[0])
    tower = model.model.video_tower
    vision = VisionShape.from_config(tower.config)
    assert vision.num_layers == len(tower.encoder.layers)
    assert vision.intermediate == tower.encoder.layers[0].mlp.fc1.weight.shape[0]
    return llm, vision


def test_shapes_of_the_real_model(video_llava_7b):
    llm, vision = shapes_from_weights(video_llava_7b)
    assert video_llava_7b.lm_head.weight.device.type == "meta"
    assert (llm.num_layers, llm.hidden, llm.intermediate) == (32, 4096, 11008)
    assert (vision.patches, vision.hidden, vision.num_layers) == (256, 1024, 24)
    assert llm == LLMShape.from_config(video_llava_7b.config.text_config)


def test_fastv_k2_r50_is_about_52_percent(video_llava_7b):
    llm, _ = shapes_from_weights(video_llava_7b)
    ratio = fastv_flops_ratio(llm, 2048 + OTHER_TOKENS, 2048, k=2, ratio=0.5)
    assert ratio == pytest.approx(0.52, abs=0.005)


@pytest.mark.parametrize(("kept", "expected"), [(512, 0.25), (208, 0.114), (104, 0.069)])
def test_pruning_before_the_llm(video_llava_7b, kept, expected):
    llm, _ = shapes_from_weights(video_llava_7b)
    n = 2048 + OTHER_TOKENS
    ratio = prefill_flops(llm, kept + OTHER_TOKENS) / prefill_flops(llm, n)
    assert ratio == pytest.approx(expected, abs=0.002)


def test_fastv_floor_is_k_over_l(video_llava_7b):
    llm, _ = shapes_from_weights(video_llava_7b)
    n = 2048 + OTHER_TOKENS
    floor = fastv_flops_ratio(llm, n, 2048, k=2, ratio=0.9999)
    assert floor > 2 / 32
    assert floor == pytest.approx(2 / 32 + 30 / 32 * layer_prefill_flops(OTHER_TOKENS, 4096, 11008)
                                  / layer_prefill_flops(n, 4096, 11008), rel=1e-3)


def test_swiglu_convention_is_explicit():
    paper = layer_prefill_flops(100, 4096, 11008)
    full = layer_prefill_flops(100, 4096, 11008, swiglu_third=True)
    assert full - paper == pytest.approx(100 * 4096 * 11008)


def test_decode_barely_changes_with_pruning(video_llava_7b):
    llm, vision = shapes_from_weights(video_llava_7b)
    unpruned = decode_flops(llm, 2103, 2103, 0, new_tokens=32)
    fastv = decode_flops(llm, 2103, 1079, 2, new_tokens=32)
    assert 0.8 < fastv / unpruned < 1.0
    # the tower costs a fixed amount per clip: 8 frames of 257 tokens, 23 of 24 layers up to layer −2
    assert vision_flops(vision, 8, 23) / vision_flops(vision, 8) == pytest.approx(23 / 24, abs=0.002)
