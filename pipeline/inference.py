"""The model side shared by ``ask``, ``eval`` and the workers: load a checkpoint, clips → pixel values,
prompts, and the pruned model's two halves (encode + select | generate).

A checkpoint is a local folder written by ``save_pretrained`` (a real Video-LLaVA or the bundled demo
model): loaded with ``from_pretrained``, safetensors only, ``trust_remote_code`` off unless the settings
say otherwise. Nothing is downloaded.

Shapes: T frames, H×W source pixels, S model input size, B batch rows.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    VideoLlavaForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

from pipeline.sources import ClipPreprocessor
from pruning.config import PruningConfig
from pruning.visual_tokens import VisualTokens
from pruning.vlm import PrunedVLM

# Video-LLaVA's conversation template; the processor expands <video> to T × tokens-per-frame placeholders.
VIDEO_PROMPT = "USER: {video}\n{question} ASSISTANT:"

MODEL_CLASSES = {
    "video_llava": VideoLlavaForConditionalGeneration,
    "llava": LlavaForConditionalGeneration,
}


class ModelLoadError(RuntimeError):
    """The checkpoint folder cannot be loaded as a Video-LLaVA/LLaVA model."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device={name!r} but this machine has no CUDA device")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass(frozen=True)
class Answer:
    text: str
    visual_tokens_in: int
    visual_tokens_kept: int
    flops_ratio: float
    timings_s: dict[str, float]
    batch_size: int
    record: dict[str, Any]


class VideoQA:
    """One loaded model with its tokenizer and frame preprocessing; the pruned inference every caller uses.

    The tokenizer and the preprocessing parameters come from the checkpoint folder's own files
    (``tokenizer.json``, ``preprocessor_config.json``, ``processor_config.json``) rather than from a
    ``VideoLlavaProcessor`` object: that class needs torchvision for its video half, and the frames are
    preprocessed here in one vectorised step anyway.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, preprocess: ClipPreprocessor,
                 video_token: str = "<video>") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.video_token = video_token
        self.pruned = PrunedVLM(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        if tokenizer.convert_tokens_to_ids(video_token) != self.pruned.video_token_id:
            raise ModelLoadError(f"the tokenizer's {video_token!r} is not the model's video_token_id "
                                 f"{self.pruned.video_token_id}")
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_id

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", dtype: str = "auto",
             trust_remote_code: bool = False) -> VideoQA:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model folder (no config.json); point model.path at a "
                                 "save_pretrained checkpoint")
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        hf_logging.disable_progress_bar()
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        model_class = MODEL_CLASSES.get(config.model_type)
        if model_class is None:
            raise ModelLoadError(f"{path}: model_type {config.model_type!r} is not one of {sorted(MODEL_CLASSES)}")
        model = model_class.from_pretrained(path, dtype=dt, use_safetensors=True,
                                            trust_remote_code=trust_remote_code).to(dev)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        processor_file = path / "processor_config.json"
        processor_config = json.loads(processor_file.read_text()) if processor_file.is_file() else {}
        return cls(model, tokenizer, ClipPreprocessor.from_pretrained(path),
                   processor_config.get("video_token", "<video>"))

    # -- half 1: frames → kept visual tokens -------------------------------------------------------
    def pixel_values(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[T, H, W, 3] uint8 → [1, T, 3, S, S] as the processor would make them, in one vectorised step."""
        return self.preprocess(frames).unsqueeze(0).to(device=self.device, dtype=self.dtype)

    def encode(self, frames: np.ndarray | torch.Tensor, config: PruningConfig) -> VisualTokens:
        start = time.perf_counter()
        pixels = self.pixel_values(frames)
        preprocess_s = time.perf_counter() - start
        visual = self.pruned.encode_and_select(pixel_values_videos=pixels, config=config)
        visual.timings_s["preprocess_s"] = preprocess_s
        return visual

    # -- half 2: kept visual tokens + question → answer ---------------------------------------------
    def prompt_inputs(self, questions: list[str], visual: VisualTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise each question in the template with its placeholder span of ``visual.tokens_in`` tokens."""
        span = self.video_token * visual.tokens_in
        texts = [VIDEO_PROMPT.format(video=span, question=q.strip()) for q in questions]
        self.tokenizer.padding_side = "right"
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=True)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def answer(self, visuals: list[VisualTokens], questions: list[str], config: PruningConfig,
               max_new_tokens: int = 32, temperature: float = 0.0, seed: int | None = None) -> list[Answer]:
        """Answer a batch (rows from any jobs, each with its own kept count) with one pruned generation."""
        if len(visuals) != len(questions):
            raise ValueError("answer: one question per VisualTokens")
        batch = VisualTokens.cat([v.to(device=self.device, dtype=self.dtype) for v in visuals])
        input_ids, attention_mask = self.prompt_inputs(questions, batch)
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        result = self.pruned.generate(
            input_ids, attention_mask, batch, config, max_new_tokens=max_new_tokens,
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, generator=generator,
        )
        record = result.record
        answers = []
        for b, (row, n) in enumerate(zip(result.sequences.tolist(), result.lengths, strict=True)):
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True).strip()
            timings = dict(visuals[b].timings_s)
            for key in ("project_s", "prefill_s"):
                timings[key] = record.timings_s.get(key, 0.0)
            timings["llm_decode_s"] = record.timings_s.get("decode_s", 0.0)
            answers.append(Answer(
                text=text,
                visual_tokens_in=record.visual_tokens_in[b],
                visual_tokens_kept=record.visual_tokens_kept[b],
                flops_ratio=record.flops_ratio(row=b),
                timings_s=timings,
                batch_size=len(visuals),
                record={"kept_per_frame": record.kept_per_frame[b],
                        "fastv_visual_kept": record.fastv_visual_kept[b],
                        "prompt_tokens_in": record.prompt_tokens_in[b],
                        "prompt_tokens_after_fastv": record.prompt_tokens_after_fastv[b],
                        "config": record.config},
            ))
        return answers
