"""The whole-VLM entry point against the untouched transformers models: equivalence, cache, padding, decoding."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from tiny_models import (
    EOS,
    IMAGE_ID,
    IMAGE_SIZE,
    PATCHES,
    VIDEO_ID,
    build_tokenizer,
    left_pad,
    prompt_ids,
)

from pruning.config import PruningConfig
from pruning.fastv import PackedSequence
from pruning.visual_tokens import VisualTokens
from pruning.vlm import PrunedVLM

T = 4
VIDEO_SPAN = T * (PATCHES + 1)  # Video-LLaVA keeps each frame's [CLS] in the video span
QUESTION = ["what", "is", "in", "the", "video", "?"]


def clip(seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, T, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def video_prompt(words=QUESTION) -> torch.Tensor:
    return torch.tensor([prompt_ids(words, VIDEO_ID, VIDEO_SPAN)])


def test_no_pruning_matches_the_untouched_video_model(video_llava):
    vlm = PrunedVLM(video_llava)
    ids, pixels = video_prompt(), clip(0)
    config = PruningConfig("cls", 0.0, fastv_ratio=0.0)
    visual = vlm.encode_and_select(pixels, config=config)
    assert visual.lengths == [VIDEO_SPAN]
    ours = vlm.forward_logits(ids, None, visual, config).logits
    with torch.no_grad():
        ref = video_llava(input_ids=ids, pixel_values_videos=pixels).logits
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)

    got = vlm.generate(ids, None, visual, config, max_new_tokens=10)
    with torch.no_grad():
        expected = video_llava.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=10,
                                        do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    n = got.lengths[0]
    assert torch.equal(got.sequences[0, :n], expected[0, ids.shape[1]: ids.shape[1] + n])
    assert n == expected.shape[1] - ids.shape[1]


@pytest.mark.parametrize("fixture", ["llava", "llava_full", "video_llava"])
def test_no_pruning_matches_the_untouched_image_model(request, fixture):
    model = request.getfixturevalue(fixture)
    vlm = PrunedVLM(model)
    span = PATCHES + (1 if model.config.vision_feature_select_strategy == "full" else 0)
    ids = torch.tensor([prompt_ids(["what", "is", "in", "the", "image", "?"], IMAGE_ID, span)])
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    visual = vlm.encode_and_select(pixel_values=pixels)
    assert visual.span_has_cls == (span == PATCHES + 1)
    ours = vlm.forward_logits(ids, None, visual).logits
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels).logits
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    got = vlm.generate(ids, None, visual, max_new_tokens=6, eos_token_id=EOS)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False,
                                  eos_token_id=EOS, pad_token_id=EOS)[:, ids.shape[1]:]
    assert torch.equal(got.sequences[:, : expected.shape[1]], expected)


def test_encoder_pruning_keeps_each_frames_cls_and_the_budget(video_llava):
    vlm = PrunedVLM(video_llava)
    config = PruningConfig("cls", 0.75, temporal_strategy="uniform")
    visual = vlm.encode_and_select(clip(2, batch=2), config=config)
    assert visual.lengths == [T * (1 + 4)] * 2
    assert visual.kept_per_frame() == [[5] * T] * 2
    for row in range(2):
        tokens = visual.token_index[row, : visual.lengths[row]].view(T, 5)
        assert (tokens[:, 0] == 0).all()  # the [CLS] leads each frame
        assert (tokens[:, 1:].diff(dim=1) > 0).all()  # patches in raster order
    # the kept features are the tower's own features at those positions
    tower = video_llava.model.video_tower
    frames = clip(2, batch=2).flatten(0, 1)
    with torch.no_grad():
        full = tower(frames, output_hidden_states=True).hidden_states[-2].view(2, T, PATCHES + 1, -1)
    for row in range(2):
        f = visual.frame_index[row, : visual.lengths[row]]
        t = visual.token_index[row, : visual.lengths[row]]
        assert torch.allclose(visual.features[row, : visual.lengths[row]], full[row, f, t], atol=1e-6)


@pytest.mark.parametrize("positions", ["original", "contiguous"])
def test_encoder_pruning_equals_the_untouched_model_with_dropped_tokens_masked(video_llava, positions):
    """Pruned logits = the untouched model's, fed every token, with the dropped ones masked out of attention and
    position ids that are the untouched ones ("original") or renumbered around the kept tokens ("contiguous")."""
    vlm = PrunedVLM(video_llava)
    ids, pixels = video_prompt(), clip(5)
    config = PruningConfig("cls", 0.5, temporal_strategy="redundancy", positions=positions)
    visual = vlm.encode_and_select(pixels, config=config)
    out = vlm.forward_logits(ids, None, visual, config)
    start = int((ids[0] == VIDEO_ID).nonzero()[0])
    slots = start + visual.frame_index[:, : visual.lengths[0]] * (PATCHES + 1) + visual.token_index[:, : visual.lengths[0]]
    mask = torch.ones_like(ids)
    mask[:, start : start + VIDEO_SPAN] = 0
    mask.scatter_(1, slots, 1)  # [1, L]: 1 on text and kept visual tokens
    seen = mask.bool()
    position_ids = torch.arange(ids.shape[1])[None] if positions == "original" else mask.cumsum(dim=1) - 1
    with torch.no_grad():
        ref = video_llava(input_ids=ids, pixel_values_videos=pixels, attention_mask=mask,
                          position_ids=position_ids).logits  # [1, L, V]
    assert out.sequence.positions.tolist() == [position_ids[seen].tolist()]
    assert torch.allclose(out.logits, ref[seen][None], atol=1e-5, rtol=0)
    if positions == "original":  # the next token sits where it would with nothing pruned
        state = vlm.decoder.prefill(vlm.build_prompt(ids, None, visual), 2, 0.0, use_cache=True).state
        assert state.next_position.tolist() == [ids.shape[1]]


def test_random_method_is_seeded(video_llava):
    vlm = PrunedVLM(video_llava)
    a = vlm.encode_and_select(clip(3), config=PruningConfig("random", 0.5, seed=1)).kept_patch_indices()
    b = vlm.encode_and_select(clip(3), config=PruningConfig("random", 0.5, seed=1)).kept_patch_indices()
    c = vlm.encode_and_select(clip(3), config=PruningConfig("random", 0.5, seed=2)).kept_patch_indices()
    assert a == b and a != c


def no_cache_reference(vlm: PrunedVLM, ids, visual, config, kept_positions, steps: int) -> list[int]:
    """Greedy decoding recomputing FastV over the same kept set at every step, with no cache."""
    seq = vlm.build_prompt(ids, None, visual)
    embed = vlm.language_model.get_input_embeddings()
    tokens: list[int] = []
    forced = [torch.tensor(kept_positions[0])]
    for _ in range(steps):
        extra = embed(torch.tensor([tokens], dtype=torch.long))  # [1, t, d]
        n = seq.embeds.shape[1] + len(tokens)
        following = seq.positions[:, -1:] + 1 + torch.arange(len(tokens))[None]  # [1, t]
        full = PackedSequence(
            torch.cat([seq.embeds, extra], dim=1),
            torch.ones(1, n, dtype=torch.bool),
            torch.cat([seq.positions, following], dim=1),
            torch.cat([seq.visual, torch.zeros(1, len(tokens), dtype=torch.bool)], dim=1),
        )
        out = vlm.decoder.prefill(full, config.fastv_k, config.fastv_ratio, use_cache=False,
                                  forced_visual_positions=forced)
        tokens.append(int(vlm.lm_head(out.hidden[0, -1]).argmax()))
    return tokens


@pytest.mark.parametrize(("k", "ratio"), [(1, 0.5), (2, 0.75), (3, 0.9)])
def test_fastv_with_cache_equals_recomputation_without_cache(video_llava, k, ratio):
    vlm = PrunedVLM(video_llava)
    ids = video_prompt()
    config = PruningConfig("cls", 0.5, temporal_strategy="redundancy", fastv_k=k, fastv_ratio=ratio)
    visual = vlm.encode_and_select(clip(4), config=config)
    got = vlm.generate(ids, None, visual, config, max_new_tokens=8)
    n_vis = visual.lengths[0]
    assert got.record.fastv_visual_kept == [n_vis - round(ratio * n_vis)]
    reference = no_cache_reference(vlm, ids, visual, config, got.record.fastv_kept_positions, 8)
    assert got.sequences[0].tolist() == reference


def test_fastv_ratio_zero_changes_nothing(video_llava):
    vlm = PrunedVLM(video_llava)
    ids = video_prompt()
    visual = vlm.encode_and_select(clip(5))
    off = vlm.forward_logits(ids, None, visual, PruningConfig(fastv_k=2, fastv_ratio=0.0)).logits
    on = vlm.forward_logits(ids, None, visual, PruningConfig(fastv_k=2, fastv_ratio=0.5)).logits
    assert off.shape[1] == ids.shape[1] and on.shape[1] < off.shape[1]
    # text after the span still sees different context, so the last logits must move but stay finite
    assert torch.isfinite(on).all() and not torch.allclose(on[0, -1], off[0, -1])


@pytest.mark.parametrize("fastv_ratio", [0.0, 0.5])
def test_padded_batch_equals_each_row_alone(video_llava, fastv_ratio):
    vlm = PrunedVLM(video_llava)
    configs = [
        PruningConfig("cls", 0.75, temporal_strategy="uniform", fastv_k=2, fastv_ratio=fastv_ratio),
        PruningConfig("cls", encoder_budget=30, temporal_strategy="redundancy", fastv_k=2, fastv_ratio=fastv_ratio),
        PruningConfig("none", fastv_k=2, fastv_ratio=fastv_ratio),
    ]
    questions = [QUESTION, ["a", "cat", "?"], ["what", "runs", "in", "the", "video", "?", "a", "dog", "?"]]
    visuals = [vlm.encode_and_select(clip(10 + i), config=c) for i, c in enumerate(configs)]
    assert len({v.lengths[0] for v in visuals}) == 3  # every row its own kept count
    rows = [prompt_ids(q, VIDEO_ID, VIDEO_SPAN) for q in questions]
    ids, mask = left_pad(rows)
    batch = vlm.generate(ids, mask, visuals, configs[0], max_new_tokens=7)
    batch_logits = vlm.forward_logits(ids, mask, visuals, configs[0])
    last = batch_logits.sequence.valid.long().cumsum(1).argmax(1)
    for i, (row, visual) in enumerate(zip(rows, visuals, strict=True)):
        alone = vlm.generate(torch.tensor([row]), None, visual, configs[0], max_new_tokens=7)
        assert batch.sequences[i].tolist() == alone.sequences[0].tolist()
        alone_logits = vlm.forward_logits(torch.tensor([row]), None, visual, configs[0]).logits[0, -1]
        assert torch.allclose(batch_logits.logits[i, last[i]], alone_logits, atol=1e-5, rtol=0)
        assert batch.record.visual_tokens_kept[i] == visual.lengths[0]
        if batch.record.new_tokens[i] == alone.record.new_tokens[0]:
            assert batch.record.flops_ratio(row=i) == pytest.approx(alone.record.flops_ratio(), rel=1e-9)
    ratios = [batch.record.flops_ratio(row=i) for i in range(3)]
    assert ratios[2] > max(ratios[:2])  # the unpruned row costs the most
    assert min(ratios) <= batch.record.flops_ratio() <= max(ratios)


def test_sampling_stopping_and_eos(video_llava):
    vlm = PrunedVLM(video_llava)
    ids, mask = left_pad([prompt_ids(QUESTION, VIDEO_ID, VIDEO_SPAN), prompt_ids(["a", "cat"], VIDEO_ID, VIDEO_SPAN)])
    config = PruningConfig("cls", 0.5, fastv_ratio=0.5)
    visual = vlm.encode_and_select(clip(6, batch=2), config=config)

    def sample(seed: int, **kw):
        gen = torch.Generator().manual_seed(seed)
        return vlm.generate(ids, mask, visual, config, max_new_tokens=12, do_sample=True, generator=gen, **kw)

    assert torch.equal(sample(0).sequences, sample(0).sequences)
    assert not torch.equal(sample(0, temperature=5.0).sequences, sample(1, temperature=5.0).sequences)
    greedy = vlm.generate(ids, mask, visual, config, max_new_tokens=12)
    assert torch.equal(sample(3, top_k=1).sequences, greedy.sequences)
    assert torch.equal(sample(4, top_p=1e-6).sequences, greedy.sequences)

    stopped = vlm.generate(ids, mask, visual, config, max_new_tokens=12,
                           stopping_criteria=lambda generated: torch.full((2,), generated.shape[1] >= 3))
    assert stopped.sequences.shape[1] == 3
    assert torch.equal(stopped.sequences, greedy.sequences[:, :3])

    first = int(greedy.sequences[0, 0])
    eos_run = vlm.generate(ids, mask, visual, config, max_new_tokens=12, eos_token_id=first, pad_token_id=63)
    assert eos_run.lengths[0] == 1
    assert (eos_run.sequences[0, 1:] == 63).all()
    with pytest.raises(ValueError, match="max_new_tokens"):
        vlm.generate(ids, mask, visual, config, max_new_tokens=0)


def test_visual_tokens_ship_between_processes_and_cast(video_llava):
    vlm = PrunedVLM(video_llava)
    config = PruningConfig("cls", 0.75)
    visual = vlm.encode_and_select(clip(7, batch=2), config=config)
    shipped = pickle.loads(pickle.dumps(visual.to(dtype=torch.bfloat16)))
    assert shipped.features.dtype == torch.bfloat16 and shipped.lengths == visual.lengths
    rows = shipped.split()
    again = VisualTokens.cat(rows)
    assert torch.equal(again.features, shipped.features) and again.kept_patch_indices() == visual.kept_patch_indices()
    ids = torch.cat([video_prompt(), video_prompt()])
    out = vlm.generate(ids, None, rows, config, max_new_tokens=3)  # bf16 features cast to the model's dtype
    assert out.sequences.shape == (2, 3)


def test_bad_prompts_raise(video_llava):
    vlm = PrunedVLM(video_llava)
    visual = vlm.encode_and_select(clip(8))
    short = torch.tensor([prompt_ids(QUESTION, VIDEO_ID, VIDEO_SPAN - 1)])
    with pytest.raises(ValueError, match="placeholder"):
        vlm.generate(short, None, visual)
    split = torch.tensor([prompt_ids(["a"], VIDEO_ID, 10) + prompt_ids(["a"], VIDEO_ID, VIDEO_SPAN - 10)])
    with pytest.raises(ValueError, match="contiguous"):
        vlm.generate(split, None, visual)
    with pytest.raises(ValueError, match="pixel_values_videos"):
        vlm.encode_and_select(torch.randn(T, 3, IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(ValueError, match="rows"):
        vlm.generate(torch.cat([video_prompt(), video_prompt()]), None, visual)


def test_record_counts_and_flops(video_llava):
    vlm = PrunedVLM(video_llava)
    config = PruningConfig("cls", 0.75, fastv_k=2, fastv_ratio=0.5)
    result = vlm.run(video_prompt(), pixel_values_videos=clip(9), config=config, max_new_tokens=4)
    rec = result.record
    assert rec.visual_tokens_in == [VIDEO_SPAN] and rec.visual_tokens_kept == [T * 5]
    assert rec.kept_per_frame == [[5] * T] and all(len(f) == 4 for f in rec.kept_patch_indices[0])
    assert rec.fastv_visual_kept == [10]
    assert rec.prompt_tokens_after_encoder[0] == rec.prompt_tokens_in[0] - VIDEO_SPAN + 20
    assert rec.prompt_tokens_after_fastv[0] == rec.prompt_tokens_after_encoder[0] - 10
    assert rec.flops_ratio("prefill") < rec.flops_ratio("projector") < 1.0
    assert rec.flops["vision"]["pruned"] < rec.flops["vision"]["unpruned"]  # the last vision layer never runs
    assert set(rec.timings_s) >= {"vision_s", "score_s", "select_s", "project_s", "prefill_s", "decode_s"}
    assert rec.cls_policy and rec.to_dict()["config"]["fastv_ratio"] == 0.5


def test_through_the_llava_processor(llava):
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_processor = LlavaImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=7,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    inputs = processor(text=["USER: <image>\nwhat is in the image ? ASSISTANT:"], images=[image], return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE_ID).sum()) == PATCHES  # the processor expanded the placeholder
    vlm = PrunedVLM(llava)
    config = PruningConfig("cls", 0.75, fastv_k=1, fastv_ratio=0.5)
    result = vlm.run(inputs["input_ids"], inputs["attention_mask"], pixel_values=inputs["pixel_values"],
                     config=config, processor=processor, max_new_tokens=5)
    assert result.record.visual_tokens_kept == [4] and result.record.fastv_visual_kept == [2]
    assert isinstance(result.texts[0], str)
    assert result.texts[0] == processor.decode(result.sequences[0, : result.record.new_tokens[0]],
                                               skip_special_tokens=True)
    untouched = vlm.run(inputs["input_ids"], inputs["attention_mask"], pixel_values=inputs["pixel_values"],
                        max_new_tokens=5, eos_token_id=EOS)
    with torch.no_grad():
        expected = llava.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    n = untouched.record.new_tokens[0]
    assert untouched.sequences[0, :n].tolist() == expected[0, inputs["input_ids"].shape[1]:][:n].tolist()


def test_merge_dropped_changes_only_the_kept_features(video_llava):
    vlm = PrunedVLM(video_llava)
    plain = vlm.encode_and_select(clip(11), config=PruningConfig("cls", 0.75))
    merged = vlm.encode_and_select(clip(11), config=PruningConfig("cls", 0.75, merge_dropped=True))
    assert merged.lengths == plain.lengths and merged.kept_patch_indices() == plain.kept_patch_indices()
    cls_rows = plain.token_index[0] == 0
    assert torch.equal(merged.features[0, cls_rows], plain.features[0, cls_rows])  # [CLS] tokens untouched
    assert not torch.allclose(merged.features[0, ~cls_rows], plain.features[0, ~cls_rows])
