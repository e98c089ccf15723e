"""One entry point for a whole Llava / Video-LLaVA model: encode → score → select | project → prefill (FastV) → decode.

Split in two halves so the service can run them on different machines:
    encode_and_select(...) -> VisualTokens          where the video is decoded (vision tower + selection)
    generate(input_ids, attention_mask, VisualTokens, ...) -> GenerationResult   on the LLM worker
``run`` does both. Device and dtype are the caller's: everything follows the model's parameters and inputs.

[CLS] policy. transformers' Video-LLaVA keeps every frame's [CLS] token in the video features (T × (1 + P)
tokens, the processor expands <video> to match), while images drop it under
vision_feature_select_strategy="default". We keep that layout: when the untouched model puts a frame's [CLS]
in the span, we ALWAYS keep it (it summarises the frame and costs one token) and prune patches only; the
budget (encoder_reduction / encoder_budget) counts patch tokens. So Video-LLaVA at 75% keeps 8 × (1 + 64)
tokens, and with nothing pruned the span is exactly the untouched model's. FastV treats every visual token of
the span ([CLS] ones included) as a candidate, like the public code treats all image tokens.

Positions after encoder pruning (PruningConfig.positions). FasterVLM rebuilds the prompt around the kept tokens
and numbers it contiguously. By default we depart from that: each kept token keeps the position id it has in the
untouched prompt and the text after the span keeps its own, the rule FastV applies inside the LLM. The LLM then
sees exactly the untouched model with the dropped tokens masked out, and RoPE still says which frame and where in
it a token came from; on the demo model that is worth 4–5 points at 90% (docs/demo_model.md). "contiguous" keeps
the paper's rule.

Shape legend:
    B rows; T frames per clip; C,H,W pixels; P patches per frame; S_f = tokens per frame in the span
    N kept visual tokens (padded across rows); Dv vision width; d LLM width; L prompt length; V vocab
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pruning.cls_scorer import ClsAttentionScorer
from pruning.config import POSITION_MODES, PruningConfig
from pruning.fastv import FastVDecoder, PackedSequence, PrefillOutput
from pruning.flops import (
    LLMShape,
    VisionShape,
    decode_flops,
    prefill_flops,
    projector_flops,
    vision_flops,
)
from pruning.record import PruningRecord
from pruning.temporal_budget import TemporalBudget, merge_dropped
from pruning.visual_tokens import VisualTokens

CLS_POLICY = "per-frame [CLS] kept whenever the untouched model puts it in the span; patches pruned; budget counts patches"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class LogitsOutput:
    logits: torch.Tensor  # [B, S', V] at the tokens the last layer saw
    sequence: PackedSequence  # positions/valid/visual of those tokens
    prefill: PrefillOutput


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # [B, t] generated ids, pad_token_id after a row stopped
    lengths: list[int]  # [B] generated tokens per row (EOS included)
    record: PruningRecord


@dataclass
class RunResult:
    texts: list[str] | None
    sequences: torch.Tensor
    record: PruningRecord
    visual_tokens: VisualTokens | None = field(repr=False, default=None)


class PrunedVLM:
    """Pruned inference around a loaded ``VideoLlavaForConditionalGeneration`` or ``LlavaForConditionalGeneration``."""

    def __init__(self, model: nn.Module):
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "multi_modal_projector") or not hasattr(model, "lm_head"):
            raise ValueError("model must be a VideoLlavaForConditionalGeneration or LlavaForConditionalGeneration")
        self.model = model
        self.config = model.config
        self.is_video_llava = hasattr(inner, "video_tower")
        self.image_tower = inner.image_tower if self.is_video_llava else inner.vision_tower
        self.video_tower = inner.video_tower if self.is_video_llava else None
        self.projector = inner.multi_modal_projector
        self.language_model = inner.language_model
        self.lm_head = model.lm_head
        self.decoder = FastVDecoder(self.language_model)
        self.image_token_id = self.config.image_token_id
        self.video_token_id = getattr(self.config, "video_token_id", None)
        vision = self.config.vision_config
        self.patches = (vision.image_size // vision.patch_size) ** 2
        self.vision_shape = VisionShape.from_config(vision)
        self.llm_shape = LLMShape.from_config(self.config.text_config)
        self._scorers: dict[int, ClsAttentionScorer] = {}

    # ----- half 1: vision tower + selection --------------------------------------------------------------
    def _scorer(self, tower: nn.Module) -> ClsAttentionScorer:
        if id(tower) not in self._scorers:
            self._scorers[id(tower)] = ClsAttentionScorer(tower, self.config.vision_feature_layer)
        return self._scorers[id(tower)]

    @torch.no_grad()
    def encode_and_select(
        self,
        pixel_values_videos: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        config: PruningConfig | None = None,
    ) -> VisualTokens:
        """Vision tower once, [CLS] scores at vision_feature_layer, temporal budget; kept pre-projector features.

        pixel_values_videos [B, T, C, H, W] (Video-LLaVA) or pixel_values [B, C, H, W] (an image per row).
        """
        config = config or PruningConfig()
        if (pixel_values_videos is None) == (pixel_values is None):
            raise ValueError("pass exactly one of pixel_values_videos and pixel_values")
        if pixel_values_videos is not None:
            if self.video_tower is None:
                raise ValueError("pixel_values_videos: this model has no video tower (LLaVA takes images)")
            if pixel_values_videos.dim() != 5:
                raise ValueError(f"pixel_values_videos must be [B, T, C, H, W], got {tuple(pixel_values_videos.shape)}")
            b, t = pixel_values_videos.shape[:2]
            frames = pixel_values_videos.flatten(0, 1)  # [B·T, C, H, W]
            tower, modality, span_has_cls = self.video_tower, "video", True
        else:
            if pixel_values.dim() != 4:
                raise ValueError(f"pixel_values must be [B, C, H, W], got {tuple(pixel_values.shape)}")
            b, t = pixel_values.shape[0], 1
            frames = pixel_values
            tower, modality = self.image_tower, "image"
            span_has_cls = self.config.vision_feature_select_strategy == "full"
        config.check_against(self.config, num_frames=t)
        if not isinstance(self.config.vision_feature_layer, int):
            raise ValueError("vision_feature_layer: lists of layers are not supported by pruning")
        device = frames.device
        p = self.patches

        _sync(device)
        start = time.perf_counter()
        out = self._scorer(tower)(frames, with_scores=config.encoder_method == "cls")
        _sync(device)
        vision_s = time.perf_counter() - start
        if out.features.shape[1] != p + 1:
            raise ValueError(f"pixel values give {out.features.shape[1] - 1} patches per frame, the model expects {p}")

        start = time.perf_counter()
        features = out.features.view(b, t, p + 1, -1)  # [B, T, 1+P, Dv]
        keep = torch.ones(b, t, p + 1, dtype=torch.bool, device=device)  # [B, T, 1+P]
        keep[:, :, 0] = span_has_cls
        if config.encoder_active:
            scores = self._scores(out.cls_scores, config, b * t, device).view(b, t, p)  # [B, T, P]
            budget = config.patch_budget(t, p)
            selector = TemporalBudget(config.temporal_strategy, config.min_per_frame)
            for row in range(b):
                patch_keep = selector.keep_mask(scores[row], budget, features[row, :, 1:])  # [T, P]
                keep[row, :, 1:] = patch_keep
                if config.merge_dropped:  # out.features is our own tensor: safe to overwrite in place
                    features[row, :, 1:] = merge_dropped(features[row, :, 1:], scores[row], patch_keep)
        visual = self._gather(features, keep, t, p, span_has_cls, modality)
        _sync(device)
        select_s = time.perf_counter() - start
        visual.timings_s = {"vision_s": vision_s, "score_s": out.score_s, "select_s": select_s}
        return visual

    def _scores(self, cls_scores: torch.Tensor | None, config: PruningConfig, frames: int, device) -> torch.Tensor:
        if config.encoder_method == "cls":
            return cls_scores  # [B·T, P]
        generator = torch.Generator().manual_seed(config.seed)
        return torch.rand(frames, self.patches, generator=generator).to(device)  # [B·T, P]

    @staticmethod
    def _gather(features, keep, t: int, p: int, span_has_cls: bool, modality: str) -> VisualTokens:
        b = features.shape[0]
        flat_keep = keep.view(b, t * (p + 1))  # [B, T·(1+P)]
        lengths = flat_keep.sum(dim=1)  # [B]
        width = int(lengths.max())
        order = torch.sort((~flat_keep).to(torch.int8), dim=1, stable=True).indices[:, :width]  # [B, N]
        valid = torch.arange(width, device=keep.device)[None] < lengths[:, None]  # [B, N]
        flat = features.reshape(b, t * (p + 1), -1)  # [B, T·(1+P), Dv]
        kept = flat.gather(1, order[..., None].expand(-1, -1, flat.shape[-1])) * valid[..., None]  # [B, N, Dv]
        frame_index = torch.where(valid, order // (p + 1), -1)
        within = order % (p + 1)  # 0 = [CLS], j + 1 = patch j
        token_index = torch.where(valid, within if span_has_cls else within - 1, -1)
        return VisualTokens(
            features=kept,
            lengths=[int(n) for n in lengths],
            frame_index=frame_index,
            token_index=token_index,
            num_frames=t,
            tokens_per_frame=p + 1 if span_has_cls else p,
            span_has_cls=span_has_cls,
            modality=modality,
        )

    # ----- half 2: projector + LLM -----------------------------------------------------------------------
    def build_prompt(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        visual: VisualTokens,
        positions: str = "original",
    ) -> PackedSequence:
        """Rebuild each row so its placeholder span (found by token id) holds exactly its kept visual tokens.

        positions: "original" gives every token the position id it has in the untouched prompt (kept visual
        token of frame f, span index j at span_start + f·S_f + j; text after the span where it was); "contiguous"
        renumbers each row 0..S_b−1 (FasterVLM). The two agree when nothing was pruned.
        """
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got {tuple(input_ids.shape)}")
        if input_ids.shape[0] != visual.batch_size:
            raise ValueError(f"input_ids has {input_ids.shape[0]} rows but visual_tokens has {visual.batch_size}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        placeholder = self.video_token_id if visual.modality == "video" else self.image_token_id
        other = self.image_token_id if visual.modality == "video" else self.video_token_id
        embed = self.language_model.get_input_embeddings()
        param = next(self.projector.parameters())
        projected = self.projector(visual.features.to(device=param.device, dtype=param.dtype))  # [B, N, d]
        rows, visual_rows, row_positions = [], [], []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b][attention_mask[b].bool()]  # [L_b]
            span = (ids == placeholder).nonzero().flatten()
            if span.numel() != visual.tokens_in:
                raise ValueError(
                    f"input_ids row {b}: {span.numel()} placeholder tokens (id {placeholder}), expected "
                    f"{visual.tokens_in} = {visual.num_frames} frames × {visual.tokens_per_frame}"
                )
            if int(span[-1] - span[0]) + 1 != span.numel():
                raise ValueError(f"input_ids row {b}: the placeholder tokens are not one contiguous span")
            if other is not None and bool((ids == other).any()):
                raise ValueError(f"input_ids row {b}: holds {'image' if visual.modality == 'video' else 'video'} "
                                 f"placeholders too; one visual input per prompt")
            start, end = int(span[0]), int(span[-1]) + 1
            before, after = embed(ids[:start]), embed(ids[end:])  # the placeholders themselves are never embedded
            kept = projected[b, : visual.lengths[b]].to(before.dtype)  # [n_b, d]
            rows.append(torch.cat([before, kept, after]))  # [L_b − T·S_f + n_b, d]
            if positions == "contiguous":
                row_positions.append(torch.arange(rows[-1].shape[0], device=before.device))  # [S_b]
            else:  # where each token sat in the untouched prompt
                n_b = kept.shape[0]
                slot = visual.frame_index[b, :n_b] * visual.tokens_per_frame + visual.token_index[b, :n_b]  # [n_b]
                row_positions.append(torch.cat([
                    torch.arange(start, device=before.device), start + slot.to(before.device),
                    end + torch.arange(after.shape[0], device=before.device),
                ]))  # [S_b]
            flag = torch.zeros(rows[-1].shape[0], dtype=torch.bool, device=before.device)
            flag[start : start + kept.shape[0]] = True
            visual_rows.append(flag)
        width = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])  # [B, S, d]
        valid = torch.zeros(len(rows), width, dtype=torch.bool, device=embeds.device)  # [B, S]
        is_visual = torch.zeros_like(valid)
        position_ids = torch.zeros(valid.shape, dtype=torch.long, device=valid.device)  # [B, S]; padding stays 0
        for b, (row, flag, pos) in enumerate(zip(rows, visual_rows, row_positions, strict=True)):
            embeds[b, : row.shape[0]] = row
            valid[b, : row.shape[0]] = True
            is_visual[b, : row.shape[0]] = flag
            position_ids[b, : row.shape[0]] = pos
        return PackedSequence(embeds, valid, position_ids, is_visual)

    @staticmethod
    def _as_batch(visual_tokens: VisualTokens | Sequence[VisualTokens]) -> VisualTokens:
        if isinstance(visual_tokens, VisualTokens):
            return visual_tokens
        return VisualTokens.cat(list(visual_tokens))

    @torch.no_grad()
    def forward_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        visual_tokens: VisualTokens | Sequence[VisualTokens],
        config: PruningConfig | None = None,
    ) -> LogitsOutput:
        """Logits at every token the last layer sees (no cache): for scoring answers and for equivalence tests."""
        config = config or PruningConfig()
        config.check_against(self.config)
        visual = self._as_batch(visual_tokens)
        seq = self.build_prompt(input_ids, attention_mask, visual, config.positions)
        out = self.decoder.prefill(seq, config.fastv_k, config.fastv_ratio, use_cache=False)
        return LogitsOutput(self.lm_head(out.hidden), out.sequence, out)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        visual_tokens: VisualTokens | Sequence[VisualTokens],
        config: PruningConfig | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        stopping_criteria: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> GenerationResult:
        """Prefill (FastV when config.fastv_ratio > 0) then KV-cached decoding; rows stop on EOS or the criterion.

        stopping_criteria(generated [B, t]) -> bool [B]: True marks a row finished after its latest token.
        """
        config = config or PruningConfig()
        config.check_against(self.config)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        visual = self._as_batch(visual_tokens)
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
        device = input_ids.device

        _sync(device)
        start = time.perf_counter()
        seq = self.build_prompt(input_ids, attention_mask, visual, config.positions)
        _sync(device)
        project_s = time.perf_counter() - start

        start = time.perf_counter()
        pre = self.decoder.prefill(seq, config.fastv_k, config.fastv_ratio, use_cache=True)
        last = pre.sequence.valid.long().cumsum(1).argmax(dim=1)  # [B]
        rows = torch.arange(last.shape[0], device=last.device)
        logits = self.lm_head(pre.hidden[rows, last])  # [B, V]
        token = self._next_token(logits, do_sample, temperature, top_k, top_p, generator)  # [B]
        _sync(device)
        prefill_s = time.perf_counter() - start

        start = time.perf_counter()
        generated = [token]
        finished = self._finished(token, eos, torch.zeros_like(token, dtype=torch.bool))
        if stopping_criteria is not None:
            finished |= stopping_criteria(torch.stack(generated, dim=1)).to(device)
        embed = self.language_model.get_input_embeddings()
        while len(generated) < max_new_tokens and not bool(finished.all()):
            hidden = self.decoder.decode_step(embed(token[:, None]), pre.state)  # [B, 1, d]
            logits = self.lm_head(hidden[:, 0])  # [B, V]
            token = self._next_token(logits, do_sample, temperature, top_k, top_p, generator)
            token = torch.where(finished, torch.full_like(token, pad), token)
            generated.append(token)
            finished = self._finished(token, eos, finished)
            if stopping_criteria is not None:
                finished |= stopping_criteria(torch.stack(generated, dim=1)).to(device)
        _sync(device)
        decode_s = time.perf_counter() - start

        sequences = torch.stack(generated, dim=1)  # [B, t]
        lengths = self._lengths(sequences, eos)
        record = self._record(input_ids, attention_mask, visual, seq, pre, config, lengths)
        record.timings_s.update(visual.timings_s)
        record.timings_s.update({"project_s": project_s, "prefill_s": prefill_s, "decode_s": decode_s})
        return GenerationResult(sequences, lengths, record)

    @staticmethod
    def _finished(token: torch.Tensor, eos: set[int], finished: torch.Tensor) -> torch.Tensor:
        if not eos:
            return finished
        hit = torch.isin(token, torch.tensor(sorted(eos), device=token.device))
        return finished | hit

    @staticmethod
    def _lengths(sequences: torch.Tensor, eos: set[int]) -> list[int]:
        lengths = []
        for row in sequences.tolist():
            n = len(row)
            for i, tok in enumerate(row):
                if tok in eos:
                    n = i + 1
                    break
            lengths.append(n)
        return lengths

    @staticmethod
    def _next_token(logits, do_sample: bool, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(dim=-1)
        logits = logits.float() / temperature  # [B, V]
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix reaching top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
        # the generator, when given, must live on the logits' device (the caller's choice, like the model's)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).flatten()  # [B]

    def _record(self, input_ids, attention_mask, visual, seq, pre, config, lengths) -> PruningRecord:
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        prompt_in = [int(n) for n in mask.sum(dim=1)]
        prompt_kept = [int(n) for n in seq.valid.sum(dim=1)]
        after_fastv = [int(n) for n in pre.sequence.valid.sum(dim=1)]
        k = pre.state.prune_layer if pre.state is not None else self.llm_shape.num_layers
        vs, ls = self.vision_shape, self.llm_shape
        layers_run = ClsAttentionScorer.layers_needed(self.config.vision_feature_layer, vs.num_layers)
        stages = ("vision", "projector", "prefill", "decode")
        dv, d = vs.hidden, ls.hidden
        per_row: list[dict[str, dict[str, float]]] = []
        for b in range(len(prompt_in)):
            new = lengths[b]
            kb = min(k, ls.num_layers)
            per_row.append({
                "vision": {"unpruned": vision_flops(vs, visual.num_frames),
                           "pruned": vision_flops(vs, visual.num_frames, layers_run)},
                "projector": {"unpruned": projector_flops(visual.tokens_in, dv, d),
                              "pruned": projector_flops(visual.lengths[b], dv, d)},
                "prefill": {"unpruned": prefill_flops(ls, prompt_in[b]),
                            "pruned": prefill_flops(ls, prompt_kept[b], after_fastv[b], kb)},
                "decode": {"unpruned": decode_flops(ls, prompt_in[b], prompt_in[b], 0, new),
                           "pruned": decode_flops(ls, prompt_kept[b], after_fastv[b], kb, new)},
            })
        flops = {s: {kind: sum(row[s][kind] for row in per_row) for kind in ("unpruned", "pruned")} for s in stages}
        return PruningRecord(
            config=config.to_dict(),
            modality=visual.modality,
            cls_policy=CLS_POLICY,
            span_has_cls=visual.span_has_cls,
            num_frames=visual.num_frames,
            visual_tokens_in=[visual.tokens_in] * len(prompt_in),
            visual_tokens_kept=list(visual.lengths),
            kept_per_frame=visual.kept_per_frame(),
            kept_patch_indices=visual.kept_patch_indices(),
            fastv_visual_in=list(pre.visual_in),
            fastv_visual_kept=[int(p.numel()) for p in pre.kept_visual_positions],
            fastv_kept_positions=[[int(i) for i in p] for p in pre.kept_visual_positions],
            prompt_tokens_in=prompt_in,
            prompt_tokens_after_encoder=prompt_kept,
            prompt_tokens_after_fastv=after_fastv,
            new_tokens=list(lengths),
            flops=flops,
            flops_per_row=per_row,
            timings_s={},
        )

    # ----- both halves -----------------------------------------------------------------------------------
    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        config: PruningConfig | None = None,
        processor: Any | None = None,
        **generate_kwargs: Any,
    ) -> RunResult:
        """encode_and_select + generate; texts decoded with ``processor`` (or a tokenizer) when given."""
        config = config or PruningConfig()
        visual = self.encode_and_select(pixel_values_videos=pixel_values_videos, pixel_values=pixel_values, config=config)
        result = self.generate(input_ids, attention_mask, visual, config, **generate_kwargs)
        texts = None
        if processor is not None:
            texts = [
                processor.decode(row[:n], skip_special_tokens=True)
                for row, n in zip(result.sequences.tolist(), result.lengths, strict=True)
            ]
        return RunResult(texts, result.sequences, result.record, visual)


# The name other modules use when they mean Video-LLaVA; the class handles LLaVA too.
PrunedVideoLlava = PrunedVLM
