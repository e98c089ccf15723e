"""The bundled checkpoint loads like any Video-LLaVA checkpoint and answers held-out questions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor

from pipeline.demo_model import (
    PROMPT_TEMPLATE,
    DemoModelShape,
    build_config,
    build_tokenizer,
    demo_model_path,
    processor_kwargs,
    prompt,
)
from pipeline.synthetic import EVAL_TYPES, held_out_set, vocabulary


@pytest.fixture(scope="module")
def bundle():
    path = demo_model_path()
    model = VideoLlavaForConditionalGeneration.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    images = VideoLlavaImageProcessor.from_pretrained(path)
    return model, tokenizer, images


def _video_inputs(tokenizer, images, frames: np.ndarray, question: str):
    """What VideoLlavaProcessor does: <video> -> T·(P + 1) video tokens, frames -> pixel_values_videos."""
    cfg = json.loads((demo_model_path() / "processor_config.json").read_text())
    pixels = images(images=list(frames), return_tensors="pt", return_legacy_image_output=False)["pixel_values"]
    num_frames, _, height, width = pixels.shape
    per_frame = (height // cfg["patch_size"]) * (width // cfg["patch_size"]) + cfg["num_additional_image_tokens"]
    text = prompt(question).replace(cfg["video_token"], cfg["video_token"] * (per_frame * num_frames))
    ids = tokenizer(text, return_tensors="pt").input_ids  # (1, S)
    return ids, pixels.unsqueeze(0)  # (1, T, 3, H, W)


def test_tokenizer_knows_every_word_and_the_prompt():
    tok = build_tokenizer()
    ids = tok(prompt("what colour is the circle ?")).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in tok(" ".join(vocabulary())).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<video>")) == 1
    assert tok.decode(tok("red").input_ids, skip_special_tokens=True) == "red"
    assert PROMPT_TEMPLATE == "USER: <video>\n{question} ASSISTANT:"


def test_video_token_count_matches_what_the_model_consumes():
    tok = build_tokenizer()
    shape = DemoModelShape(text_width=32, text_layers=1, text_heads=2, text_ffn=64, vision_width=32,
                           vision_layers=2)
    cfg = build_config(tok, shape)
    model = VideoLlavaForConditionalGeneration(cfg).eval()
    kw = processor_kwargs(shape)
    assert kw["patch_size"] == cfg.vision_config.patch_size
    frames = torch.zeros(1, shape.num_frames, 3, shape.frame_size, shape.frame_size)
    with torch.no_grad():
        feats = model.model.get_video_features(frames, vision_feature_layer=-2).pooler_output
    per_frame = (shape.frame_size // kw["patch_size"]) ** 2 + kw["num_additional_image_tokens"]
    assert feats.shape[0] * feats.shape[1] == shape.num_frames * per_frame == cfg.video_seq_length


def test_saved_files_are_a_complete_checkpoint():
    path = demo_model_path()
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "processor_config.json", "video_preprocessor_config.json"} <= names
    total = sum(p.stat().st_size for p in path.iterdir())
    assert total < 30 * 1024 * 1024
    proc = json.loads((path / "processor_config.json").read_text())
    cfg = json.loads((path / "config.json").read_text())
    assert proc["patch_size"] == cfg["vision_config"]["patch_size"]
    assert proc["vision_feature_select_strategy"] == cfg["vision_feature_select_strategy"]


def test_bundled_model_answers_held_out_questions(bundle):
    model, tokenizer, images = bundle
    samples = held_out_set(25)  # 5 per question type
    correct = 0
    answers = set()
    for s in samples:
        ids, pixels = _video_inputs(tokenizer, images, s.clip.frames, s.qa.question)
        with torch.no_grad():
            out = model.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=3, do_sample=False)
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        answers.add(answer)
        correct += answer == s.qa.answer
    # The shipped checkpoint is under-trained (docs/demo_model.md): s25 answers 17/25 here; chance ≈ 0.22.
    assert correct / len(samples) >= 0.32, (correct, answers)
    assert len(answers) > 3  # not one answer for everything
    assert {s.qa.qtype for s in samples} == set(EVAL_TYPES)


def test_bundled_model_captions_a_clip(bundle):
    model, tokenizer, images = bundle
    sample = held_out_set(1)[0]
    ids, pixels = _video_inputs(tokenizer, images, sample.clip.frames, "describe the video .")
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=40, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert text.strip().endswith(".")
    assert any(obj.shape in text for obj in sample.clip.objects)
