"""One-row scores equal the rows of eager attention maps: [CLS] row in the vision tower, last-token row in the LLM."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IMAGE_SIZE, PATCHES, build_causal_lm

from pruning.cls_scorer import ClsAttentionScorer
from pruning.fastv import FastVDecoder, PackedSequence


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cls_row_equals_eager_attention_row_and_features_equal_the_tower(video_llava, video_llava_eager):
    assert same_weights(video_llava, video_llava_eager)
    frames = torch.randn(6, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    tower = video_llava.model.video_tower
    assert tower.config._attn_implementation == "sdpa"
    scorer = ClsAttentionScorer(tower, video_llava.config.vision_feature_layer)
    out = scorer(frames)
    assert out.cls_scores.shape == (6, PATCHES)

    eager = video_llava_eager.model.video_tower(frames, output_attentions=True, output_hidden_states=True)
    layer = len(eager.attentions) + video_llava.config.vision_feature_layer  # attentions[-2]: the layer making hs[-2]
    expected = eager.attentions[layer][:, :, 0, 1:].mean(dim=1)  # [N, P]
    assert torch.allclose(out.cls_scores, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, expected.mean(dim=1, keepdim=True))  # scores are not trivially flat

    reference = tower(frames, output_hidden_states=True).hidden_states[video_llava.config.vision_feature_layer]
    assert torch.allclose(out.features, reference, atol=1e-6, rtol=0)


def test_scorer_never_runs_layers_past_the_feature_layer(video_llava):
    tower = video_llava.model.video_tower
    calls = []
    handle = tower.encoder.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    try:
        ClsAttentionScorer(tower, -2)(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))
        assert calls == []
        ClsAttentionScorer(tower, -1)(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))
        assert calls == [1]
    finally:
        handle.remove()


def packed(embeds_rows: list[torch.Tensor], visual_rows: list[torch.Tensor]) -> PackedSequence:
    width = max(r.shape[0] for r in embeds_rows)
    b, d = len(embeds_rows), embeds_rows[0].shape[-1]
    embeds = torch.zeros(b, width, d)
    valid = torch.zeros(b, width, dtype=torch.bool)
    visual = torch.zeros(b, width, dtype=torch.bool)
    for i, (row, vis) in enumerate(zip(embeds_rows, visual_rows, strict=True)):
        embeds[i, : row.shape[0]] = row
        valid[i, : row.shape[0]] = True
        visual[i, : row.shape[0]] = vis
    positions = (valid.long().cumsum(1) - 1).clamp_min(0) * valid
    return PackedSequence(embeds, valid, positions, visual)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_fastv_row_equals_eager_attention_row(tmp_path, model_type):
    lm = build_causal_lm(tmp_path / model_type, model_type, attn_implementation="eager")
    base = lm.model
    decoder = FastVDecoder(base)
    g = torch.Generator().manual_seed(4)
    lengths = [30, 21]
    rows = [torch.randn(n, base.config.hidden_size, generator=g) for n in lengths]
    visual = [torch.zeros(n, dtype=torch.bool) for n in lengths]
    for vis in visual:
        vis[3:15] = True
    seq = packed(rows, visual)
    for k in (1, 2, 3):
        for b, n in enumerate(lengths):
            ref = base(inputs_embeds=rows[b][None], output_attentions=True, output_hidden_states=True)
            expected = ref.attentions[k - 1][0, :, -1, :].mean(dim=0)  # [n]: last token's row, head mean
            layer_input = torch.zeros(len(lengths), seq.embeds.shape[1], base.config.hidden_size)
            layer_input[b, :n] = ref.hidden_states[k - 1][0]
            got = decoder.last_query_scores(layer_input, seq, k - 1, cache=None)[b, :n]
            assert torch.allclose(got, expected, atol=1e-5, rtol=0), (k, b)


def test_fastv_row_from_the_cache_equals_recomputed_keys(video_llava):
    base = video_llava.model.language_model
    decoder = FastVDecoder(base)
    g = torch.Generator().manual_seed(5)
    rows = [torch.randn(n, base.config.hidden_size, generator=g) for n in (26, 17)]
    visual = [torch.arange(r.shape[0]) % 3 == 0 for r in rows]
    seq = packed(rows, visual)
    out = decoder.prefill(seq, fastv_k=2, fastv_ratio=0.5, use_cache=True)
    cache = out.state.cache
    # layers < K hold every token, layers ≥ K only the kept ones
    assert cache.get_seq_length(0) == cache.get_seq_length(1) == 26
    kept = [26 - 9 + 9 - round(0.5 * 9), 17 - 6 + 6 - round(0.5 * 6)]
    assert [int(n) for n in out.sequence.valid.sum(1)] == kept
    assert all(cache.get_seq_length(i) == max(kept) for i in range(2, len(base.layers)))
    assert out.visual_in == [9, 6]
    # kept visual tokens keep their original position ids (RoPE sees the gaps)
    for b in range(2):
        got = out.sequence.positions[b][out.sequence.visual[b]]
        assert torch.equal(got, out.kept_visual_positions[b])
        assert set(got.tolist()) <= set(seq.positions[b][seq.visual[b]].tolist())
