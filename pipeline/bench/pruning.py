"""``streamvlm bench pruning``: time per stage of every pruning method, beside its theoretical FLOPs ratio.

The model is Video-LLaVA-shaped with random weights: 8 frames × 256 patches of 224 px / 14 (+ each frame's
[CLS], as transformers' Video-LLaVA keeps it), CLIP-style tower read at layer −2, Llama decoder; widths and depths
scaled down for a CPU so that the LLM prefill costs about as many times the vision tower as in Video-LLaVA-7B
(≈19× with the papers' FLOPs convention). Every method runs in the same process, interleaved over repeats;
ratios are taken within each round (method ÷ the unpruned run of the same round) and their median reported,
so load from other processes that drifts between rounds cancels out. Rows:
    measured_time_ratio      prefill time ÷ unpruned prefill time (prompt rebuild + prefill + first token)
    theoretical_flops_ratio  prefill FLOPs ÷ unpruned prefill FLOPs (REFERENCE.md §4 convention)
    speedup_efficiency       measured speed-up ÷ theoretical speed-up (goal ≥ 0.85 at 90% reduction)
    overhead_share           ([CLS] row + budget selection + gather) ÷ vision tower time (goal < 3%)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

from pruning.config import PruningConfig
from pruning.flops import LLMShape, VisionShape, prefill_flops, vision_flops
from pruning.vlm import PrunedVLM

FRAMES, IMAGE_SIZE, PATCH_SIZE = 8, 224, 14
TEXT_TOKENS = 55  # system prompt + question + "ASSISTANT:" around the video span, as in REFERENCE.md §4


@dataclass(frozen=True)
class BenchShape:
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    vocab: int


FULL = BenchShape(256, 5, 4, 768, 2048, 8, 12, 32064)
QUICK = BenchShape(128, 3, 2, 256, 688, 4, 4, 4096)


def build_model(shape: BenchShape, seed: int) -> VideoLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=4 * shape.vision_hidden,
        num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=shape.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.text_hidden, intermediate_size=shape.text_intermediate,
        num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_heads, max_position_embeddings=4096,
    )
    config = VideoLlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=shape.vocab - 2,
        video_token_index=shape.vocab - 1, vision_feature_layer=-2,
    )
    return VideoLlavaForConditionalGeneration(config).eval()


def methods(quick: bool) -> list[tuple[str, PruningConfig]]:
    rows: list[tuple[str, PruningConfig]] = [("none", PruningConfig())]
    reductions = (0.9,) if quick else (0.75, 0.9, 0.95)
    for r in reductions:
        for strategy in ("uniform", "redundancy"):
            rows.append((f"encoder-{strategy}", PruningConfig("cls", r, temporal_strategy=strategy)))
    for r in (0.5,) if quick else (0.5, 0.75, 0.9):
        rows.append(("fastv-k2", PruningConfig(fastv_k=2, fastv_ratio=r)))
    combined = [(0.75, 0.5)] if quick else [(0.75, 0.5), (0.9, 0.5)]
    for enc, fv in combined:
        rows.append(("encoder-redundancy+fastv-k2",
                     PruningConfig("cls", enc, temporal_strategy="redundancy", fastv_k=2, fastv_ratio=fv)))
    return rows


def measure(vlm: PrunedVLM, clip: torch.Tensor, ids: torch.Tensor, config: PruningConfig, new_tokens: int) -> dict:
    visual = vlm.encode_and_select(clip, config=config)
    result = vlm.generate(ids, None, visual, config, max_new_tokens=new_tokens)
    t = result.record.timings_s
    return {
        "vision_s": t["vision_s"],
        "overhead_s": t["score_s"] + t["select_s"],
        "prefill_s": t["project_s"] + t["prefill_s"],
        "decode_s_per_token": t["decode_s"] / max(len(result.sequences[0]) - 1, 1),
        "record": result.record,
    }


def run_bench(quick: bool, repeats: int, new_tokens: int, seed: int) -> tuple[list[dict], dict]:
    shape = QUICK if quick else FULL
    model = build_model(shape, seed)
    vlm = PrunedVLM(model)
    g = torch.Generator().manual_seed(seed)
    clip = torch.randn(1, FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)  # [B, T, C, H, W]
    span = FRAMES * ((IMAGE_SIZE // PATCH_SIZE) ** 2 + 1)
    text = torch.randint(2, shape.vocab - 2, (TEXT_TOKENS,), generator=g)
    ids = torch.cat([text[:5], torch.full((span,), model.config.video_token_id), text[5:]])[None]  # [1, L]
    rows = methods(quick)
    measure(vlm, clip, ids, PruningConfig(), new_tokens)  # warm-up: allocator, kernels
    samples: dict[int, list[dict]] = {i: [] for i in range(len(rows))}
    for _ in range(repeats):
        for i, (_, config) in enumerate(rows):  # interleaved, so drift hits every method alike
            samples[i].append(measure(vlm, clip, ids, config, new_tokens))

    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, pixel_values_videos=clip, logits_to_keep=1)
    hf_forward_s = time.perf_counter() - start

    def med(i: int, key: str) -> float:
        return statistics.median(s[key] for s in samples[i])

    def ratio_med(i: int, key: str) -> float:  # per-round ratio to the unpruned run, then the median
        return statistics.median(samples[i][r][key] / samples[0][r][key] for r in range(repeats))

    def ttft_of(sample: dict) -> float:
        return sample["vision_s"] + sample["overhead_s"] + sample["prefill_s"]

    base_prefill, base_vision = med(0, "prefill_s"), med(0, "vision_s")
    llm, vis = LLMShape.from_config(model.config.text_config), VisionShape.from_config(model.config.vision_config)
    out = []
    for i, (name, config) in enumerate(rows):
        rec = samples[i][0]["record"]
        theory = rec.flops_ratio("prefill")
        measured = ratio_med(i, "prefill_s")
        vision_s = med(i, "vision_s")
        ttft = vision_s + med(i, "overhead_s") + med(i, "prefill_s")
        ttft_theory = (rec.flops["vision"]["pruned"] + rec.flops["projector"]["pruned"] + rec.flops["prefill"]["pruned"]) / (
            samples[0][0]["record"].flops["vision"]["pruned"] + samples[0][0]["record"].flops["projector"]["pruned"]
            + samples[0][0]["record"].flops["prefill"]["pruned"])
        out.append({
            "method": name,
            "strategy": config.temporal_strategy if config.encoder_active else None,
            "reduction": config.encoder_reduction if config.encoder_active else 0.0,
            "fastv_k": config.fastv_k if config.fastv_active else None,
            "fastv_ratio": config.fastv_ratio,
            "visual_tokens_into_llm": rec.visual_tokens_kept[0],
            "kept_tokens": rec.fastv_visual_kept[0],
            "theoretical_flops_ratio": round(theory, 4),
            "measured_time_ratio": round(measured, 4),
            "speedup_efficiency": round(theory / measured, 3),
            "overhead_share": round(med(i, "overhead_s") / vision_s, 4) if config.encoder_active else 0.0,
            "vision_s": round(vision_s, 4),
            "prefill_s": round(med(i, "prefill_s"), 4),
            "ttft_s": round(ttft, 4),
            "ttft_ratio": round(statistics.median(
                ttft_of(samples[i][r]) / ttft_of(samples[0][r]) for r in range(repeats)), 4),
            "theoretical_ttft_flops_ratio": round(ttft_theory, 4),
            "decode_s_per_token": round(med(i, "decode_s_per_token"), 5),
        })
    n = ids.shape[1]
    llm_over_vision = prefill_flops(llm, n) / vision_flops(vis, FRAMES, vis.num_layers - 1)
    meta = {
        "shape": shape.__dict__, "frames": FRAMES, "patches_per_frame": vis.patches, "prompt_tokens": n,
        "repeats": repeats, "new_tokens": new_tokens, "threads": torch.get_num_threads(),
        "llm_prefill_flops_over_vision_flops": round(llm_over_vision, 2),
        "video_llava_7b_llm_over_vision": round(
            prefill_flops(LLMShape(32, 4096, 11008), 2048 + 8 + TEXT_TOKENS)
            / vision_flops(VisionShape(24, 1024, 4096, 256, 14, 3), FRAMES, 23), 2),
        "transformers_forward_s": round(hf_forward_s, 4),
        "ours_unpruned_vision_plus_prefill_s": round(base_vision + base_prefill, 4),
    }
    return out, meta


def print_table(rows: list[dict], meta: dict) -> None:
    print(f"Video-LLaVA-shaped random model: {meta['frames']} frames × {meta['patches_per_frame']} patches, "
          f"prompt {meta['prompt_tokens']} tokens, LLM/vision FLOPs {meta['llm_prefill_flops_over_vision_flops']} "
          f"(Video-LLaVA-7B: {meta['video_llava_7b_llm_over_vision']}), {meta['threads']} threads, "
          f"median of {meta['repeats']}")
    head = (f"{'method':<28}{'red.':>6}{'R':>6}{'vis→LLM':>9}{'kept':>6}{'FLOPs':>8}{'time':>8}{'eff.':>7}"
            f"{'ovh.':>8}{'vision s':>10}{'prefill s':>10}{'TTFT s':>8}{'TTFT×':>7}{'dec ms/t':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['method']:<28}{r['reduction']:>6.2f}{r['fastv_ratio']:>6.2f}{r['visual_tokens_into_llm']:>9}"
              f"{r['kept_tokens']:>6}{r['theoretical_flops_ratio']:>8.3f}{r['measured_time_ratio']:>8.3f}"
              f"{r['speedup_efficiency']:>7.2f}{r['overhead_share']:>8.2%}{r['vision_s']:>10.3f}{r['prefill_s']:>10.3f}"
              f"{r['ttft_s']:>8.3f}{r['ttft_ratio']:>7.3f}{1000 * r['decode_s_per_token']:>9.1f}")
    print(f"FLOPs/time: prefill pruned ÷ unpruned; eff. = theoretical ÷ measured ratio; ovh. = scoring+selection ÷ "
          f"vision tower. transformers' own forward (vision+prefill): {meta['transformers_forward_s']:.3f} s, "
          f"ours unpruned: {meta['ours_unpruned_vision_plus_prefill_s']:.3f} s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer methods: a CI smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 5, quick 1)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per run (default 8, quick 3)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: on a shared 2-core box a second OpenMP thread waits on a busy core and "
        "turns every small op into a scheduling stall, which swamps the ratios)",
    )
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace, settings: object = None) -> int:
    del settings  # this benchmark builds its own model and media: the service settings do not apply
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    new_tokens = args.new_tokens if args.new_tokens is not None else (3 if args.quick else 8)
    if repeats < 1 or new_tokens < 1:
        raise ValueError("--repeats and --new-tokens must be >= 1")
    if args.threads < 1:
        raise ValueError("--threads must be >= 1")
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows, meta = run_bench(args.quick, repeats, new_tokens, args.seed)
    finally:
        torch.set_num_threads(previous)  # callers in the same process (tests, the CLI) keep their setting
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, meta)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
