"""FastVDecoder on bare Llama / Mistral / Qwen2 decoders: exactness at R=0, cache = recomputation, padded batches."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_causal_lm

from pruning.fastv import FastVDecoder, PackedSequence

MODEL_TYPES = ["llama", "mistral", "qwen2"]


@pytest.fixture(scope="module", params=MODEL_TYPES)
def causal_lm(request, tmp_path_factory):
    return build_causal_lm(tmp_path_factory.mktemp(request.param), request.param, seed=7)


def one_row(embeds: torch.Tensor, visual: torch.Tensor) -> PackedSequence:
    n = embeds.shape[0]
    return PackedSequence(embeds[None], torch.ones(1, n, dtype=torch.bool), torch.arange(n)[None], visual[None])


def prompt(lm, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(6, lm.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))
    visual = torch.zeros(n, dtype=torch.bool)
    visual[2 : n - 5] = True  # a visual span between a short prefix and a short question
    return lm.model.embed_tokens(ids).detach(), visual


def greedy(decoder: FastVDecoder, lm, seq: PackedSequence, k: int, ratio: float, steps: int):
    out = decoder.prefill(seq, k, ratio, use_cache=True)
    last = out.sequence.valid.long().cumsum(1).argmax(1)
    rows = torch.arange(seq.embeds.shape[0])
    token = lm.lm_head(out.hidden[rows, last]).argmax(-1)
    tokens = [token]
    for _ in range(steps - 1):
        hidden = decoder.decode_step(lm.model.embed_tokens(token[:, None]), out.state)
        token = lm.lm_head(hidden[:, 0]).argmax(-1)
        tokens.append(token)
    return torch.stack(tokens, 1), out


@torch.no_grad()
def test_ratio_zero_reproduces_the_model(causal_lm):
    decoder = FastVDecoder(causal_lm.model)
    embeds, visual = prompt(causal_lm, 40, 0)
    out = decoder.prefill(one_row(embeds, visual), fastv_k=2, fastv_ratio=0.0, use_cache=False)
    ref = causal_lm(inputs_embeds=embeds[None]).logits
    assert torch.allclose(causal_lm.lm_head(out.hidden), ref, atol=1e-5, rtol=0)
    tokens, _ = greedy(decoder, causal_lm, one_row(embeds, visual), 2, 0.0, 6)
    expected = causal_lm.generate(inputs_embeds=embeds[None], max_new_tokens=6, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    assert torch.equal(tokens, expected[:, -6:])


@torch.no_grad()
def test_cache_equals_recomputation_over_the_same_kept_set(causal_lm):
    decoder = FastVDecoder(causal_lm.model)
    embeds, visual = prompt(causal_lm, 48, 1)
    tokens, out = greedy(decoder, causal_lm, one_row(embeds, visual), 2, 0.6, 6)
    assert out.visual_in == [41] and out.kept_visual_positions[0].numel() == 41 - round(0.6 * 41)
    forced = out.kept_visual_positions
    seen: list[int] = []
    for step in range(6):
        extra = causal_lm.model.embed_tokens(torch.tensor(seen, dtype=torch.long))
        full = torch.cat([embeds, extra])
        vis = torch.cat([visual, torch.zeros(len(seen), dtype=torch.bool)])
        ref = decoder.prefill(one_row(full, vis), 2, 0.6, use_cache=False, forced_visual_positions=forced)
        seen.append(int(causal_lm.lm_head(ref.hidden[0, -1]).argmax()))
        assert seen[-1] == int(tokens[0, step])


@torch.no_grad()
def test_padded_batch_equals_each_row_alone(causal_lm):
    decoder = FastVDecoder(causal_lm.model)
    rows = [prompt(causal_lm, n, 10 + n) for n in (44, 31, 38)]
    width = 44
    d = rows[0][0].shape[-1]
    embeds = torch.zeros(3, width, d)
    valid = torch.zeros(3, width, dtype=torch.bool)
    visual = torch.zeros(3, width, dtype=torch.bool)
    for i, (e, v) in enumerate(rows):
        embeds[i, : e.shape[0]], valid[i, : e.shape[0]], visual[i, : e.shape[0]] = e, True, v
    positions = (valid.long().cumsum(1) - 1).clamp_min(0) * valid
    batch, _ = greedy(decoder, causal_lm, PackedSequence(embeds, valid, positions, visual), 2, 0.5, 5)
    for i, (e, v) in enumerate(rows):
        alone, _ = greedy(decoder, causal_lm, one_row(e, v), 2, 0.5, 5)
        assert torch.equal(batch[i], alone[0])


def test_contexts_past_a_sliding_window_are_refused(tmp_path):
    from tiny_models import save_load, text_config
    from transformers import AutoModelForCausalLM

    lm = save_load(AutoModelForCausalLM.from_config(text_config("mistral", sliding_window=30)), tmp_path,
                   AutoModelForCausalLM)
    decoder = FastVDecoder(lm.model)
    embeds, visual = prompt(lm, 30, 3)
    out = decoder.prefill(one_row(embeds, visual), 2, 0.0)
    with pytest.raises(ValueError, match="sliding_window"):
        decoder.decode_step(lm.model.embed_tokens(torch.tensor([[7]])), out.state)
    embeds, visual = prompt(lm, 31, 3)
    with pytest.raises(ValueError, match="sliding_window"):
        decoder.prefill(one_row(embeds, visual), 2, 0.0)
