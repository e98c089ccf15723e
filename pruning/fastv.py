"""FastV inside a Llama-family decoder: layers 0..K−1 see every token, layers ≥ K only the kept visual tokens.

We drive transformers' own decoder layers from this loop (embeddings → layers → norm), choosing positions, masks
and the cache ourselves; nothing in transformers is patched. Where we depart from the public FastV code:
    - the ranking is the last prompt token's query against layer K−1's cached (RoPE-rotated) keys, one row,
      averaged over heads; no eager attention maps anywhere;
    - layer K−1 runs once; pruning happens between layer K−1 and layer K, so layers ≥ K cache only kept
      tokens and layers < K cache all of them (DynamicCache holds each layer's length separately);
    - any batch size: rows are packed left-aligned ("valid" marks real tokens); every row keeps its own
      kept set and its original position ids (RoPE sees the gaps), and masks are explicit when rows differ.

Shape legend:
    B   rows in the batch
    S   packed sequence length (longest row; shorter rows padded at the end); S' after FastV pruning
    d   hidden size; H query heads, Hkv key/value heads, hd head size
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache


@dataclass
class PackedSequence:
    embeds: torch.Tensor  # [B, S, d]
    valid: torch.Tensor  # [B, S] bool: real token (False = padding)
    positions: torch.Tensor  # [B, S] long: position id of each token
    visual: torch.Tensor  # [B, S] bool: visual token (FastV candidates)

    def take(self, keep: torch.Tensor) -> PackedSequence:
        """Keep the tokens where keep [B, S] is True, re-packed left-aligned in their original order."""
        lengths = keep.sum(dim=1)  # [B]
        width = int(lengths.max())
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]  # [B, S']
        valid = torch.arange(width, device=keep.device)[None, :] < lengths[:, None]  # [B, S']
        embeds = self.embeds.gather(1, order[..., None].expand(-1, -1, self.embeds.shape[-1]))  # [B, S', d]
        return PackedSequence(
            embeds=embeds,
            valid=valid,
            positions=self.positions.gather(1, order).masked_fill(~valid, 0),
            visual=self.visual.gather(1, order) & valid,
        )


@dataclass
class DecodeState:
    cache: DynamicCache
    valid_low: torch.Tensor  # [B, S_low] keys of layers < K
    valid_high: torch.Tensor  # [B, S_high] keys of layers ≥ K
    next_position: torch.Tensor  # [B] position id of the next token
    prune_layer: int  # K (= number of layers when FastV is off)


@dataclass
class PrefillOutput:
    hidden: torch.Tensor  # [B, S', d] after the final norm
    sequence: PackedSequence  # the tokens layers ≥ K saw (S' ≤ S)
    kept_visual_positions: list[torch.Tensor]  # [B] × [kept] position ids of visual tokens kept by FastV
    visual_in: list[int]  # [B] visual tokens before FastV
    state: DecodeState | None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, hkv, s, hd = x.shape
    return x[:, :, None].expand(b, hkv, n_rep, s, hd).reshape(b, hkv * n_rep, s, hd)  # [B, H, S, hd]


class FastVDecoder:
    """Prefill with FastV and KV-cached decoding over a transformers Llama/Mistral/Qwen2 base model."""

    def __init__(self, language_model: nn.Module):
        self.model = language_model
        self.layers = language_model.layers
        # transformers 5.24 renamed the decoder layer's cache argument (past_key_values -> cache) and
        # warns on the old name; pass it under whichever name this version's layer takes.
        params = inspect.signature(type(self.layers[0]).forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.num_layers = len(self.layers)
        config = language_model.config
        self.eager = getattr(config, "_attn_implementation", "sdpa") == "eager"
        # Our explicit masks are full-causal: a sliding attention window (Mistral v0.1, Qwen2 with
        # use_sliding_window) is honoured only by refusing contexts longer than the window.
        window = getattr(config, "sliding_window", None)
        if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None
        self.window: int | None = window

    def _check_window(self, context: int) -> None:
        if self.window is not None and context > self.window:
            raise ValueError(
                f"context of {context} tokens exceeds the model's sliding_window={self.window}; "
                "shorten the prompt or max_new_tokens"
            )

    # ----- masks -------------------------------------------------------------------------------------------
    def _prefill_mask(self, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        if bool(valid.all()) and not self.eager:
            return None  # one row or equal rows: SDPA's own causal path, bit-identical to the untouched model
        s = valid.shape[1]
        idx = torch.arange(s, device=valid.device)
        allowed = valid[:, None, :] & (idx[None, None, :] <= idx[None, :, None])  # [B, S, S]
        allowed |= torch.eye(s, dtype=torch.bool, device=valid.device)[None]  # padding rows attend to themselves
        return self._additive(allowed[:, None], dtype)  # [B, 1, S, S]

    def _decode_mask(self, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        if bool(valid.all()):
            return None
        return self._additive(valid[:, None, None, :], dtype)  # [B, 1, 1, S]

    @staticmethod
    def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    # ----- layers ------------------------------------------------------------------------------------------
    def _run_layer(self, i: int, hidden, mask, positions, rope, cache) -> torch.Tensor:
        out = self.layers[i](
            hidden,
            attention_mask=mask,
            position_ids=positions,
            use_cache=cache is not None,
            position_embeddings=rope,
            **{self._cache_arg: cache},
        )
        return out[0] if isinstance(out, tuple) else out

    def last_query_scores(
        self, layer_input: torch.Tensor, seq: PackedSequence, layer_idx: int, cache: DynamicCache | None
    ) -> torch.Tensor:
        """Attention [B, S] (float32, head-averaged) of each row's last real token on every key of layer layer_idx.

        layer_input [B, S, d] is the input of that layer; its keys come from the cache when it holds them.
        """
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        b, s, _ = layer_input.shape
        hd = attn.head_dim
        last = seq.valid.long().cumsum(1).argmax(dim=1)  # [B] index of the last real token
        rows = torch.arange(b, device=last.device)
        x_last = layer_input[rows, last][:, None]  # [B, 1, d]
        pos_last = seq.positions[rows, last][:, None]  # [B, 1]
        cos, sin = self.model.rotary_emb(x_last, pos_last)  # [B, 1, hd]
        q = attn.q_proj(layer.input_layernorm(x_last)).view(b, 1, -1, hd).transpose(1, 2)  # [B, H, 1, hd]
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        if cache is not None and cache.get_seq_length(layer_idx) == s:
            keys = cache.layers[layer_idx].keys  # [B, Hkv, S, hd], already rotated
        else:
            cos_all, sin_all = self.model.rotary_emb(layer_input, seq.positions)  # [B, S, hd]
            keys = attn.k_proj(layer.input_layernorm(layer_input)).view(b, s, -1, hd).transpose(1, 2)
            keys = keys * cos_all[:, None] + _rotate_half(keys) * sin_all[:, None]  # [B, Hkv, S, hd]
        keys = _repeat_kv(keys, q.shape[1] // keys.shape[1])  # [B, H, S, hd]
        logits = (q.float() @ keys.float().transpose(-1, -2)) * attn.scaling  # [B, H, 1, S]
        logits = logits.masked_fill(~seq.valid[:, None, None, :], float("-inf"))
        return logits.softmax(dim=-1)[:, :, 0].mean(dim=1)  # [B, S]

    def _fastv_keep(
        self, scores: torch.Tensor, seq: PackedSequence, ratio: float, forced: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
        keep = seq.valid & ~seq.visual  # [B, S]: system and text tokens are never dropped
        kept_positions, visual_in = [], []
        for b in range(scores.shape[0]):
            vis = (seq.visual[b] & seq.valid[b]).nonzero().flatten()  # [n_img]
            visual_in.append(int(vis.numel()))
            if forced is not None:
                chosen = vis[torch.isin(seq.positions[b, vis], forced[b].to(vis.device))]
            else:
                n_keep = vis.numel() - int(round(ratio * vis.numel()))
                chosen = vis[scores[b, vis].topk(n_keep).indices]
            keep[b, chosen] = True
            kept_positions.append(seq.positions[b, chosen].sort().values)
        return keep, kept_positions, visual_in

    # ----- prefill / decode --------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self,
        seq: PackedSequence,
        fastv_k: int,
        fastv_ratio: float,
        use_cache: bool = True,
        forced_visual_positions: list[torch.Tensor] | None = None,
    ) -> PrefillOutput:
        """Run every layer over the packed prompt; drop visual tokens before layer K when FastV is on.

        forced_visual_positions: keep exactly these visual tokens (by position id) instead of ranking; used to
        recompute a cached run without its cache.
        """
        fastv_on = fastv_ratio > 0 or forced_visual_positions is not None
        prune_layer = fastv_k if fastv_on else self.num_layers
        if fastv_on and not 1 <= fastv_k < self.num_layers:
            raise ValueError(f"fastv_k={fastv_k} must be in [1, {self.num_layers})")
        self._check_window(int(seq.valid.sum(dim=1).max()))
        cache = DynamicCache(config=self.model.config) if use_cache else None
        hidden = seq.embeds
        mask = self._prefill_mask(seq.valid, hidden.dtype)
        rope = self.model.rotary_emb(hidden, seq.positions)
        valid_low = seq.valid
        kept_positions = [seq.positions[b, seq.visual[b] & seq.valid[b]] for b in range(hidden.shape[0])]
        visual_in = [int(k.numel()) for k in kept_positions]
        layer_input = hidden
        for i in range(self.num_layers):
            if i == prune_layer:  # layer K-1 has run once and its keys are cached: rank, then drop
                scores = self.last_query_scores(layer_input, seq, i - 1, cache)  # [B, S]
                keep, kept_positions, visual_in = self._fastv_keep(scores, seq, fastv_ratio, forced_visual_positions)
                seq = PackedSequence(hidden, seq.valid, seq.positions, seq.visual).take(keep)  # S -> S_kept
                hidden = seq.embeds
                mask = self._prefill_mask(seq.valid, hidden.dtype)
                rope = self.model.rotary_emb(hidden, seq.positions)
            layer_input = hidden
            hidden = self._run_layer(i, hidden, mask, seq.positions, rope, cache)
        hidden = self.model.norm(hidden)
        out_seq = PackedSequence(hidden, seq.valid, seq.positions, seq.visual)
        state = None
        if cache is not None:
            next_position = seq.positions.masked_fill(~seq.valid, -1).max(dim=1).values + 1  # [B]
            state = DecodeState(cache, valid_low, seq.valid, next_position, prune_layer)
        return PrefillOutput(hidden, out_seq, kept_positions, visual_in, state)

    @torch.no_grad()
    def decode_step(self, token_embeds: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """One token per row [B, 1, d] through all layers with the cache; returns the normed hidden [B, 1, d]."""
        b = token_embeds.shape[0]
        self._check_window(int(state.valid_low.sum(dim=1).max()) + 1)
        new = torch.ones(b, 1, dtype=torch.bool, device=token_embeds.device)
        state.valid_low = torch.cat([state.valid_low, new], dim=1)
        state.valid_high = torch.cat([state.valid_high, new], dim=1)
        positions = state.next_position[:, None]  # [B, 1]
        rope = self.model.rotary_emb(token_embeds, positions)
        mask_low = self._decode_mask(state.valid_low, token_embeds.dtype)
        mask_high = self._decode_mask(state.valid_high, token_embeds.dtype)
        hidden = token_embeds
        for i in range(self.num_layers):
            mask = mask_low if i < state.prune_layer else mask_high
            hidden = self._run_layer(i, hidden, mask, positions, rope, state.cache)
        state.next_position = state.next_position + 1
        return self.model.norm(hidden)
