"""PruningConfig: bad values fail at construction, model-dependent ones in check_against, before any request runs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from tiny_models import IMAGE_SIZE, PATCH_SIZE, PATCHES, text_config
from transformers import LlavaConfig, SiglipVisionConfig

from pruning.config import TEMPORAL_STRATEGIES, PruningConfig
from pruning.temporal_budget import STRATEGIES
from pruning.vlm import PrunedVLM


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"encoder_method": "cls", "encoder_reduction": 1.0}, "encoder_reduction"),
        ({"encoder_method": "cls", "encoder_reduction": -0.1}, "encoder_reduction"),
        ({"encoder_method": "cls", "encoder_reduction": math.nan}, "encoder_reduction"),
        ({"encoder_method": "cls", "encoder_reduction": True}, "encoder_reduction"),
        ({"encoder_method": "cls", "encoder_budget": 0}, "encoder_budget"),
        ({"encoder_method": "cls", "encoder_budget": 2.5}, "encoder_budget"),
        ({"encoder_method": "none", "encoder_reduction": 0.5}, "encoder_method"),
        ({"encoder_method": "attention"}, "encoder_method"),
        ({"temporal_strategy": "bogus"}, "temporal_strategy"),
        ({"min_per_frame": -1}, "min_per_frame"),
        ({"fastv_k": 0}, "fastv_k"),
        ({"fastv_ratio": 1.0}, "fastv_ratio"),
        ({"fastv_ratio": -0.5}, "fastv_ratio"),
        ({"merge_dropped": "yes"}, "merge_dropped"),
        ({"seed": "1"}, "seed"),
        ({"positions": "renumbered"}, "positions"),
    ],
)
def test_bad_values_raise_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PruningConfig(**kwargs)


def test_llm_key_separates_what_the_llm_half_reads():
    base = PruningConfig("cls", 0.5, fastv_ratio=0.5)
    for change in ({"fastv_k": 3}, {"fastv_ratio": 0.25}, {"positions": "contiguous"}):
        assert replace(base, **change).llm_key != base.llm_key, change
    for change in ({"encoder_reduction": 0.9}, {"temporal_strategy": "global"}, {"seed": 7}, {"min_per_frame": 2}):
        assert replace(base, **change).llm_key == base.llm_key, change


def test_strategy_names_match_the_registry():
    assert set(TEMPORAL_STRATEGIES) == set(STRATEGIES)


def test_budget_semantics_follow_fastervlm():
    assert PruningConfig("cls", 0.75).patch_budget(8, 256) == 512
    assert PruningConfig("cls", 0.90).patch_budget(8, 256) == 208
    assert PruningConfig("cls", 0.95).patch_budget(8, 256) == 104
    assert PruningConfig("cls", 0.90).patch_budget(1, 576) == 58
    assert PruningConfig("cls", 0.95).patch_budget(1, 576) == 29
    assert PruningConfig("cls", 0.5, encoder_budget=100).patch_budget(8, 256) == 100
    assert PruningConfig("cls", encoder_budget=10_000).patch_budget(8, 256) == 2048
    assert PruningConfig().patch_budget(8, 256) == 2048


def test_model_checks(video_llava):
    config = video_llava.config
    layers = config.text_config.num_hidden_layers
    PruningConfig(fastv_k=layers - 1, fastv_ratio=0.5).check_against(config)
    with pytest.raises(ValueError, match="fastv_k"):
        PruningConfig(fastv_k=layers, fastv_ratio=0.5).check_against(config)
    with pytest.raises(ValueError, match="encoder_budget"):
        PruningConfig("cls", encoder_budget=7, min_per_frame=2).check_against(config, num_frames=4)
    with pytest.raises(ValueError, match="encoder_reduction"):
        PruningConfig("cls", 0.95, min_per_frame=2).check_against(config, num_frames=4)  # keeps 4 < 8
    with pytest.raises(ValueError, match="min_per_frame"):
        PruningConfig("cls", 0.5, min_per_frame=PATCHES + 1).check_against(config)
    PruningConfig("cls", encoder_budget=8, min_per_frame=2).check_against(config, num_frames=4)


def test_cls_scores_need_a_cls_token():
    siglip = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    config = LlavaConfig(vision_config=siglip.to_dict(), text_config=text_config().to_dict(), vision_feature_layer=-2)
    with pytest.raises(ValueError, match="encoder_method"):
        PruningConfig("cls", 0.5).check_against(config)
    PruningConfig("random", 0.5).check_against(config)  # no [CLS] needed


def test_fastv_needs_a_supported_decoder():
    config = LlavaConfig(vision_config={"model_type": "clip_vision_model"},
                         text_config=text_config("gemma", head_dim=16).to_dict())
    with pytest.raises(ValueError, match="fastv_ratio"):
        PruningConfig(fastv_ratio=0.5).check_against(config)


def test_entry_point_rejects_before_running(video_llava):
    vlm = PrunedVLM(video_llava)
    clip = torch.randn(1, 4, 3, IMAGE_SIZE, IMAGE_SIZE)
    calls = []
    handle = video_llava.model.video_tower.embeddings.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="encoder_budget"):
            vlm.encode_and_select(clip, config=PruningConfig("cls", encoder_budget=3, min_per_frame=1))
    finally:
        handle.remove()
    assert calls == []
