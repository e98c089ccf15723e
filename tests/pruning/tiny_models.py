"""Tiny random-weight Llava / Video-LLaVA models and a word-level tokenizer, built from configs (no download).

Every model is round-tripped through save_pretrained/from_pretrained so tests load it like the service does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

WORDS = ["USER:", "ASSISTANT:", "what", "is", "in", "the", "video", "image", "a", "cat", "dog", "runs", "?", "."]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
VOCAB_SIZE = 64  # ids past the word list are reachable by generation only
BOS, EOS, PAD, IMAGE_ID, VIDEO_ID = 1, 2, 3, 4, 5
IMAGE_SIZE, PATCH_SIZE = 28, 7  # 16 patches + [CLS] per frame
PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2


def vision_config(**overrides) -> CLIPVisionConfig:
    base = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32,
    )
    base.update(overrides)
    return CLIPVisionConfig(**base)


def text_config(model_type: str = "llama", **overrides):
    from transformers import AutoConfig

    base = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    base.update(overrides)
    if model_type == "llama":
        return LlamaConfig(**base)
    return AutoConfig.for_model(model_type, **base)


def save_load(model: torch.nn.Module, folder: Path, cls, **kwargs):
    model.save_pretrained(folder)
    return cls.from_pretrained(folder, **kwargs).eval()


def build_video_llava(folder: Path, seed: int = 0, text_type: str = "llama", **kwargs):
    torch.manual_seed(seed)
    config = VideoLlavaConfig(
        vision_config=vision_config().to_dict(),
        text_config=text_config(text_type).to_dict(),
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=PATCHES,
        video_seq_length=(PATCHES + 1) * 4,
    )
    model = VideoLlavaForConditionalGeneration(config)
    return save_load(model, folder, VideoLlavaForConditionalGeneration, **kwargs)


def build_llava(folder: Path, seed: int = 0, select_strategy: str = "default", text_type: str = "llama", **kwargs):
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=vision_config().to_dict(),
        text_config=text_config(text_type).to_dict(),
        image_token_index=IMAGE_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy=select_strategy,
        image_seq_length=PATCHES,
    )
    model = LlavaForConditionalGeneration(config)
    return save_load(model, folder, LlavaForConditionalGeneration, **kwargs)


def build_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tok


def prompt_ids(words: list[str], placeholder: int, span: int) -> list[int]:
    """Hand-built ids: BOS, "USER:", the expanded placeholder span, the question words, "ASSISTANT:"."""
    return [BOS, VOCAB["USER:"], *([placeholder] * span), *[VOCAB[w] for w in words], VOCAB["ASSISTANT:"]]


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def build_causal_lm(folder: Path, model_type: str = "llama", seed: int = 0, **kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(text_config(model_type))
    return save_load(model, folder, AutoModelForCausalLM, **kwargs)
