"""The bundled demo Video-LLaVA: where it lives, and how its tokenizer, processor and config are built.

The model is a real ``VideoLlavaForConditionalGeneration`` (CLIP vision tower, Llama language model,
two-layer projector), tiny, trained here on ``pipeline.synthetic`` clips by
``scripts/train_demo_model.py`` and saved with ``save_pretrained`` into ``pipeline/assets/demo_model``.
Load it exactly as any checkpoint: ``VideoLlavaForConditionalGeneration.from_pretrained(demo_model_path())``
and ``AutoTokenizer`` / ``VideoLlavaProcessor.from_pretrained(...)`` on the same folder.

Video tokens: transformers' Video-LLaVA keeps each frame's [CLS] for videos, so a clip of T frames is
T × (1 + P) tokens (8 × 65 = 520 here), and the processor expands ``<video>`` to that count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    VideoLlavaConfig,
    VideoLlavaImageProcessor,
)

from pipeline.synthetic import FRAME_SIZE, NUM_FRAMES, PATCH_SIZE, vocabulary

PROMPT_TEMPLATE = "USER: <video>\n{question} ASSISTANT:"
VIDEO_TOKEN = "<video>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN, VIDEO_TOKEN)
PROMPT_WORDS = ("USER", "ASSISTANT", ":")
# Per-channel statistics of the synthetic frames (measured over 200 training clips, rounded).
FRAME_MEAN = (0.446, 0.451, 0.452)
FRAME_STD = (0.117, 0.112, 0.117)


def demo_model_path() -> Path:
    """Folder of the bundled demo checkpoint (config, safetensors, tokenizer, processor files)."""
    return Path(__file__).resolve().parent / "assets" / "demo_model"


def prompt(question: str) -> str:
    """Video-LLaVA's single-turn prompt around one question."""
    return PROMPT_TEMPLATE.format(question=question)


@dataclass(frozen=True)
class DemoModelShape:
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 192
    text_layers: int = 4
    text_heads: int = 6
    text_ffn: int = 576
    frame_size: int = FRAME_SIZE
    patch_size: int = PATCH_SIZE
    num_frames: int = NUM_FRAMES

    @property
    def patches_per_frame(self) -> int:
        return (self.frame_size // self.patch_size) ** 2

    @property
    def tokens_per_frame(self) -> int:
        return self.patches_per_frame + 1  # the frame's [CLS] stays in for videos


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over every word the synthetic data and the prompt template use."""
    words = list(SPECIAL_TOKENS) + list(PROMPT_WORDS) + vocabulary()
    vocab = {w: i for i, w in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN},
        padding_side="left",
        model_max_length=1024,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, shape: DemoModelShape | None = None) -> VideoLlavaConfig:
    shape = shape or DemoModelShape()
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_width,
        intermediate_size=4 * shape.vision_width,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.frame_size,
        patch_size=shape.patch_size,
        projection_dim=shape.vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.text_width,
        intermediate_size=shape.text_ffn,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return VideoLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=shape.patches_per_frame,
        video_seq_length=shape.num_frames * shape.tokens_per_frame,
    )


def build_image_processor(shape: DemoModelShape | None = None) -> VideoLlavaImageProcessor:
    shape = shape or DemoModelShape()
    return VideoLlavaImageProcessor(
        size={"shortest_edge": shape.frame_size},
        crop_size={"height": shape.frame_size, "width": shape.frame_size},
        image_mean=list(FRAME_MEAN),
        image_std=list(FRAME_STD),
    )


def processor_kwargs(shape: DemoModelShape | None = None) -> dict:
    """VideoLlavaProcessor arguments that make its ``<video>`` expansion match the model."""
    shape = shape or DemoModelShape()
    return {
        "patch_size": shape.patch_size,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
        "image_token": IMAGE_TOKEN,
        "video_token": VIDEO_TOKEN,
    }


def build_processor(tokenizer: PreTrainedTokenizerFast, shape: DemoModelShape | None = None):
    """A ``VideoLlavaProcessor``; its video processor needs torchvision (ImportError without it)."""
    from transformers import VideoLlavaProcessor, VideoLlavaVideoProcessor

    shape = shape or DemoModelShape()
    video = VideoLlavaVideoProcessor(
        size={"shortest_edge": shape.frame_size},
        crop_size={"height": shape.frame_size, "width": shape.frame_size},
        image_mean=list(FRAME_MEAN),
        image_std=list(FRAME_STD),
    )
    return VideoLlavaProcessor(
        image_processor=build_image_processor(shape),
        video_processor=video,
        tokenizer=tokenizer,
        **processor_kwargs(shape),
    )


def save_processor_files(folder: Path, tokenizer: PreTrainedTokenizerFast,
                         shape: DemoModelShape | None = None) -> None:
    """Write tokenizer + processor files as ``VideoLlavaProcessor.save_pretrained`` lays them out.

    With torchvision installed the real processor saves itself. Without it (this machine's CPU torch
    has no matching torchvision wheel on PyPI) the processor cannot even be constructed, so the
    tokenizer and image processor save themselves and the two small processor JSON files are
    written from the same settings, so that ``VideoLlavaProcessor.from_pretrained`` works wherever
    torchvision is present.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        build_processor(tokenizer, shape).save_pretrained(folder)
        return
    except ImportError:
        pass
    tokenizer.save_pretrained(folder)
    image = build_image_processor(shape)
    image.save_pretrained(folder)
    video_cfg = {k: v for k, v in image.to_dict().items() if k != "image_processor_type"}
    video_cfg.update({"video_processor_type": "VideoLlavaVideoProcessor", "do_sample_frames": False})
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video_cfg, indent=2, sort_keys=True))
    proc_cfg = {"processor_class": "VideoLlavaProcessor", **processor_kwargs(shape)}
    (folder / "processor_config.json").write_text(json.dumps(proc_cfg, indent=2, sort_keys=True))
