"""Train the bundled demo Video-LLaVA on seeded synthetic clips, the way such models are made.

Stage 1  pretrain the CLIP vision tower on its [CLS] output: multi-label "which colour-shape pairs
         are in this frame" (BCE). Then measure where layer −2's [CLS] attention goes: the share on
         patches that hold objects is what FasterVLM's pruning relies on.
Stage 2  freeze the tower, cache its layer −2 hidden states for every training clip once (the tower
         never runs again), and train projector + Llama on several questions per clip (every type,
         captions), loss on answer tokens only, on ALL visual tokens. The questions share the clip's
         prefix but each sees only that prefix and itself (a turn mask), so every turn is exactly
         Video-LLaVA's single-turn inference prompt and no answer can be read off another turn.
         --lookup-loss adds an auxiliary loss pointing one head at the object a question names
         (--lookup-types: on the turns of those question types only); --cls-read-loss one pointing one
         head of --cls-read-layer at the frames' [CLS] tokens on every turn; --background-loss one
         keeping every head's attention off the patches no object is drawn in.

Both stages see each clip as the service reads it (--video h264, the default): written as the 4 s H.264
file and decoded at the frames the service samples; stage-1 labels come from the rendered scene.

The best checkpoint so far (by accuracy on a fixed validation subset, its own seed, never the held-out
set) is saved with save_pretrained into
pipeline/assets/demo_model as training goes, so a stopped run still leaves a usable model.

    python scripts/train_demo_model.py > train.log 2>&1    # the shipped recipe's defaults (85 min here)

The shipped stage 2 started from the previous checkpoint's tower (--tower-from): docs/demo_model.md.

Shapes: B clips, T frames, N = 1 + P tokens per frame ([CLS] + patches), V = T·N video tokens,
C vision width, D text width, S sequence length.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, VideoLlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import rotate_half

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.demo_model import (  # noqa: E402
    FRAME_MEAN,
    FRAME_STD,
    DemoModelShape,
    build_config,
    build_tokenizer,
    demo_model_path,
    prompt,
    save_processor_files,
)
from pipeline.loopback import h264_round_trip  # noqa: E402
from pipeline.synthetic import (  # noqa: E402
    COLOURS,
    EVAL_TYPES,
    NUM_FRAMES,
    SHAPES,
    TRAIN_SEED,
    TRAIN_TYPES,
    VALIDATION_SEED,
    held_out_set,
    training_clip,
    training_conversation,
)

_MEAN = torch.tensor(FRAME_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(FRAME_STD).view(1, 3, 1, 1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pixels(frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F, 3, H, W) float, normalised exactly as the saved image processor does."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    return (x - _MEAN) / _STD


def cls_attention(tower, pixel_values: torch.Tensor) -> torch.Tensor:
    """(F, P) head-averaged attention of the [CLS] query on patch keys inside layer −2."""
    out = tower(pixel_values, output_hidden_states=True)
    layer = tower.encoder.layers[-2]
    h = layer.layer_norm1(out.hidden_states[-3])  # (F, N, C): the input of layer −2
    attn = layer.self_attn
    f, n, c = h.shape
    heads = attn.num_heads
    q = attn.q_proj(h[:, :1]).view(f, 1, heads, c // heads).transpose(1, 2)  # (F, h, 1, c/h)
    k = attn.k_proj(h).view(f, n, heads, c // heads).transpose(1, 2)  # (F, h, N, c/h)
    probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)  # (F, h, 1, N)
    return probs.mean(1)[:, 0, 1:]  # (F, P)


def as_served(clips_frames: list[np.ndarray], args) -> list[np.ndarray]:
    """Each clip's (T, H, W, 3) frames as the service reads them (--video h264: through the 4 s H.264
    file), so the tower and LLM learn the codec's chroma bleed on 64 px frames instead of meeting it
    first at inference (a model trained on rendered frames lost 12.7 points that way)."""
    if args.video == "frames":
        return clips_frames
    with tempfile.TemporaryDirectory(prefix="streamvlm-train-") as tmp:
        return [h264_round_trip(f, tmp) for f in clips_frames]


# ---------------------------------------------------------------- stage 1: vision tower


def cls_features(tower, out, layer: int) -> torch.Tensor:
    """(F, C) the [CLS] features the stage-1 objective reads.

    layer -1 is CLIP's own ``pooler_output`` (last layer). Layer -2 puts the objective on the features
    the projector actually reads (``vision_feature_layer=-2``): trained on the last layer, the tower bound
    shapes to colours mostly in its last block, which the language model never sees (docs/demo_model.md).
    """
    if layer == -1:
        return out.pooler_output
    return tower.post_layernorm(out.hidden_states[-2][:, 0])  # (F, C)


def patch_column_probe(patches: torch.Tensor, on_object: np.ndarray) -> float:
    """How well layer −2's object patch tokens say where they are: a least-squares linear probe fit on the
    first half of (F, P, C) ``patches``' object patches, the share of the second half's columns it gets
    right (chance 1/G). The language model reads an object's place, which direction needs, from these."""
    f, p, c = patches.shape
    grid = math.isqrt(p)
    m = torch.from_numpy(on_object).reshape(-1)  # (F·P,)
    x = patches.reshape(f * p, c)[m].double()  # (K, C) object patch tokens
    column = (torch.arange(p).repeat(f) % grid)[m]  # (K,)
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    half = len(x) // 2
    y = F.one_hot(column[:half], grid).double()
    w = torch.linalg.solve(x[:half].T @ x[:half] + 1e-2 * torch.eye(c + 1, dtype=x.dtype), x[:half].T @ y)
    return ((x[half:] @ w).argmax(-1) == column[half:]).double().mean().item()


def pretrain_tower(model, args) -> dict:
    tower = model.model.video_tower
    num_labels = len(COLOURS) * len(SHAPES) + len(COLOURS) + len(SHAPES)
    head = torch.nn.Linear(tower.config.hidden_size, num_labels)
    # Dense auxiliary heads on layer −2's patch tokens (the features the projector reads): which shape
    # and which colour covers each patch. A [CLS]-only objective left shape out of the patch tokens, but
    # with these heads at weight 1 the model fell apart under 90% [CLS] pruning (docs/demo_model.md).
    shape_head = torch.nn.Linear(tower.config.hidden_size, 1 + len(SHAPES))
    colour_head = torch.nn.Linear(tower.config.hidden_size, 1 + len(COLOURS))
    # A second multi-label head on layer −2's [CLS] beside --cls-layer -1's: the last layer keeps the
    # sharp [CLS] attention it learns there, and layer −2 (what the LLM reads) is still asked to name
    # the frame's contents.
    second_head = torch.nn.Linear(tower.config.hidden_size, num_labels)
    grid = tower.config.image_size // tower.config.patch_size
    # Where each colour and shape is (patch column and row of its centre), read from the same [CLS] as
    # `head`: direction needs the place, which layer −2's object patches lose under the [CLS] objectives
    # (column probe 0.2, chance 0.125). Alone this head did not bring it back (docs/demo_model.md).
    place_head = torch.nn.Linear(tower.config.hidden_size, (len(COLOURS) + len(SHAPES)) * 2 * grid)
    # Each layer −2 patch token names its own column and row: the place its position embedding gave it.
    patch_place_head = torch.nn.Linear(tower.config.hidden_size, 2 * grid)
    params = [*tower.parameters(), *head.parameters(), *shape_head.parameters(), *colour_head.parameters(),
              *second_head.parameters(), *place_head.parameters(), *patch_place_head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.tower_lr, weight_decay=0.01)
    log(f"stage 1: rendering {args.tower_clips} clips")
    clips = [training_clip(i, seed=TRAIN_SEED + 1) for i in range(args.tower_clips)]
    frames = np.concatenate(as_served([c.frames for c in clips], args))  # (F, H, W, 3)
    labels = torch.from_numpy(np.concatenate([c.frame_labels() for c in clips]))  # (F, L)
    place_labels = torch.from_numpy(np.concatenate([c.frame_place_labels() for c in clips]))  # (F, (C + S)·2G)
    masks = np.concatenate([c.patch_mask() for c in clips])  # (F, P)
    patch_labels = torch.from_numpy(np.concatenate([c.patch_labels() for c in clips]))  # (F, P, 2)
    x_all = pixels(frames)
    g = torch.Generator().manual_seed(args.seed)
    n_val = 512
    budget_s = args.tower_minutes * 60
    reads_layer_minus_2 = bool(args.patch_loss or args.second_cls_loss or args.patch_place_loss) or args.cls_layer == -2
    patch_index = torch.arange(grid * grid)  # (P,) raster order
    t0 = time.time()
    step = 0
    tower.train()
    while time.time() - t0 < budget_s:
        idx = torch.randint(n_val, len(x_all), (args.tower_batch,), generator=g)
        lr = args.tower_lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(
            math.pi * min(1.0, (time.time() - t0) / budget_s))))
        for group in opt.param_groups:
            group["lr"] = lr
        out = tower(x_all[idx], output_hidden_states=reads_layer_minus_2)
        cls = cls_features(tower, out, args.cls_layer)  # (B, C)
        loss = F.binary_cross_entropy_with_logits(head(cls), labels[idx])
        if args.place_loss:
            loss = loss + args.place_loss * F.binary_cross_entropy_with_logits(place_head(cls), place_labels[idx])
        if args.second_cls_loss:
            loss = loss + args.second_cls_loss * F.binary_cross_entropy_with_logits(
                second_head(cls_features(tower, out, -2)), labels[idx])
        if args.patch_place_loss:
            place = patch_place_head(out.hidden_states[-2][:, 1:]).flatten(0, 1)  # (B·P, 2G)
            b = len(idx)
            loss = loss + args.patch_place_loss * (
                F.cross_entropy(place[:, :grid], (patch_index % grid).repeat(b))
                + F.cross_entropy(place[:, grid:], (patch_index // grid).repeat(b)))
        if args.patch_loss:
            patches = out.hidden_states[-2][:, 1:]  # (B, P, C) layer −2 patch tokens
            target = patch_labels[idx]  # (B, P, 2)
            loss = loss + args.patch_loss * (
                F.cross_entropy(shape_head(patches).flatten(0, 1), target[..., 0].flatten())
                + F.cross_entropy(colour_head(patches).flatten(0, 1), target[..., 1].flatten()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0:
            log(f"stage 1 step {step} loss {loss.item():.4f} lr {lr:.2e} {time.time() - t0:.0f}s")
    tower.eval()
    with torch.no_grad():
        out = tower(x_all[:n_val], output_hidden_states=True)
        cls = cls_features(tower, out, args.cls_layer)  # (F, C)
        logits = head(cls)
        place_exact = ((place_head(cls) > 0) == (place_labels[:n_val] > 0.5)).all(-1).float().mean().item()
        column_probe = patch_column_probe(out.hidden_states[-2][:, 1:], masks[:n_val])
        patches = out.hidden_states[-2][:, 1:]  # (F, P, C)
        target = patch_labels[:n_val]
        on_object = target[..., 0] > 0
        patch_shape_acc = (shape_head(patches).argmax(-1) == target[..., 0])[on_object].float().mean().item()
        patch_colour_acc = (colour_head(patches).argmax(-1) == target[..., 1])[on_object].float().mean().item()
        right = (logits > 0) == (labels[:n_val] > 0.5)  # (F, L)
        second_exact = ((second_head(cls_features(tower, out, -2)) > 0) == (labels[:n_val] > 0.5)).all(-1)
        pairs, colours = len(COLOURS) * len(SHAPES), len(COLOURS) * len(SHAPES) + len(COLOURS)
        exact = right[:, :pairs].all(-1).float().mean().item()
        colours_exact = right[:, pairs:colours].all(-1).float().mean().item()
        shapes_exact = right[:, colours:].all(-1).float().mean().item()
        attn = cls_attention(tower, x_all[:n_val])  # (F, P)
        m = torch.from_numpy(masks[:n_val])
        share = (attn * m).sum(-1) / attn.sum(-1)
        top4 = attn.topk(4, dim=-1).indices
        top4_hit = m.gather(1, top4).float().mean().item()
    stats = {
        "tower_steps": step,
        "frame_exact_match": exact,
        "frame_colours_exact": colours_exact,
        "frame_shapes_exact": shapes_exact,
        "cls_attention_share_on_objects": share.mean().item(),
        "object_patch_fraction": m.float().mean().item(),
        "top4_patches_on_objects": top4_hit,
        "object_patch_column_probe": column_probe,
    }
    if args.place_loss:
        stats.update(frame_place_exact_match=place_exact)
    if args.patch_loss:  # the dense heads' own accuracy; untrained heads would report noise
        stats.update(object_patch_shape_accuracy=patch_shape_acc, object_patch_colour_accuracy=patch_colour_acc)
    if args.second_cls_loss:
        stats.update(layer_minus_2_cls_exact_match=second_exact.float().mean().item())
    log(f"stage 1 done: {json.dumps(stats)}")
    # Video-LLaVA has separate image and video towers; both get the same pretrained weights.
    model.model.image_tower.load_state_dict(tower.state_dict())
    return stats


# ---------------------------------------------------------------- stage 2: projector + LLM


@torch.no_grad()
def cache_features(tower, clips_frames: list[np.ndarray], batch_clips: int = 32) -> torch.Tensor:
    """(num_clips, V, C) fp16 layer −2 hidden states, [CLS] kept per frame (transformers' video path)."""
    out = []
    for i in range(0, len(clips_frames), batch_clips):
        frames = np.stack(clips_frames[i : i + batch_clips])  # (B, T, H, W, 3)
        b, t = frames.shape[:2]
        hs = tower(pixels(frames.reshape(b * t, *frames.shape[2:])), output_hidden_states=True).hidden_states[-2]
        out.append(hs.reshape(b, t * hs.shape[1], hs.shape[2]).half())  # (B, V, C)
    return torch.cat(out)


class Encoder:
    """Token ids for conversations, built through the tokenizer the way the processor builds them."""

    def __init__(self, tokenizer, video_tokens: int):
        self.tok = tokenizer
        self.video_tokens = video_tokens
        self.video_id = tokenizer.convert_tokens_to_ids("<video>")
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str, special: bool) -> list[int]:
        key = f"{special}|{text}"
        if key not in self._cache:
            self._cache[key] = self.tok(text, add_special_tokens=special).input_ids
        return self._cache[key]

    def first_prompt(self, question: str) -> list[int]:
        text = prompt(question).replace("<video>", "<video>" * self.video_tokens)
        return self._ids(text, True)

    def conversation(self, turns) -> tuple[list[int], list[int], list[int], list[int]]:
        """One clip's questions as independent single-turn prompts that share the clip's prefix.

        Returns ids, labels, position ids and a segment id per token (0: the shared ``<s> USER:
        <video>…`` prefix, i + 1: turn i). With ``turn_mask`` each turn sees the prefix and itself
        only, at the positions the inference prompt gives it: every turn trains exactly what the
        single-turn prompt computes, and no answer can be read off an earlier turn's text (a caption
        names every object; "what colour does the cross turn" names the shape that changes).
        """
        first = [self.first_prompt(qa.question) for qa in turns]
        split = first[0].index(self.video_id) + self.video_tokens  # end of the shared prefix
        prefix = first[0][:split]
        ids, labels = list(prefix), [-100] * split
        positions, segments = list(range(split)), [0] * split
        for i, (p, qa) in enumerate(zip(first, turns, strict=True)):
            assert p[:split] == prefix, "every single-turn prompt starts with the same prefix"
            a = self._ids(qa.answer, False) + [self.eos]
            tail = p[split:] + a
            ids += tail
            labels += [-100] * (len(p) - split) + a
            positions += range(split, split + len(tail))
            segments += [i + 1] * len(tail)
        return ids, labels, positions, segments


def collate(seqs, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Encoder.conversation`` outputs -> right-padded (B, S) ids, labels, position ids, segment ids (-1: padding)."""
    width = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    position_ids = torch.zeros((len(seqs), width), dtype=torch.long)
    segments = torch.full((len(seqs), width), -1, dtype=torch.long)
    for r, (s, lab, p, seg) in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        labels[r, : len(s)] = torch.tensor(lab)
        position_ids[r, : len(s)] = torch.tensor(p)
        segments[r, : len(s)] = torch.tensor(seg)
    return ids, labels, position_ids, segments


def turn_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) segment ids (0 prefix, k turn k, -1 padding) -> (B, 1, S, S) additive attention mask.

    Causal, and a turn's tokens see only the shared prefix and their own turn. Padding attends to
    itself so that no softmax row is empty (an all-masked row would put NaN into the batch).
    """
    s = segments.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()  # (S, S)
    q, k = segments.unsqueeze(2), segments.unsqueeze(1)  # (B, S, 1), (B, 1, S)
    allowed = causal & ((k == 0) | (k == q)) & (k >= 0)  # (B, S, S)
    allowed |= torch.eye(s, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)  # (B, 1, S, S)


def embed(model, ids: torch.Tensor, feats: torch.Tensor, video_id: int) -> torch.Tensor:
    """(B, S) ids + (B, V, C) cached features -> (B, S, D) inputs_embeds, as the model's forward builds them."""
    emb = model.get_input_embeddings()(ids)  # (B, S, D)
    vis = model.model.multi_modal_projector(feats.float())  # (B, V, D)
    mask = (ids == video_id).unsqueeze(-1).expand_as(emb)
    return emb.masked_scatter(mask, vis.to(emb.dtype))


def lm_logits(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, positions: torch.Tensor,
              position_ids: torch.Tensor | None = None):
    """(B, S, D) -> logits (K, vocab) at the K flattened (batch, pos) positions given."""
    hidden = model.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                        position_ids=position_ids).last_hidden_state
    return model.lm_head(hidden[positions[:, 0], positions[:, 1]])


@torch.no_grad()
def first_answer_tokens(model, enc: Encoder, feats: torch.Tensor, questions: list[str], batch: int = 16) -> list[int]:
    """Greedy first answer token to each question about the clip of the same row of ``feats`` (N, V, C):
    Video-LLaVA's single-turn prompt on all visual tokens."""
    was_training = model.training
    model.eval()
    out: list[int] = []
    for i in range(0, len(questions), batch):
        seqs = [enc.first_prompt(q) for q in questions[i : i + batch]]
        ids = torch.full((len(seqs), max(map(len, seqs))), enc.pad, dtype=torch.long)  # (B, S)
        for r, s in enumerate(seqs):  # right padding: causal attention keeps real tokens exact
            ids[r, : len(s)] = torch.tensor(s)
        x = embed(model, ids, feats[i : i + len(seqs)], enc.video_id)  # (B, S, D)
        last = torch.tensor([[r, len(s) - 1] for r, s in enumerate(seqs)])  # (B, 2) last prompt token
        out += lm_logits(model, x, None, last).argmax(-1).tolist()
    model.train(was_training)
    return out


def evaluate(model, enc: Encoder, feats: torch.Tensor, samples, batch: int = 16) -> dict:
    """Greedy first answer token vs the one-word answer, single-turn prompt, all visual tokens."""
    hits: dict[str, list[int]] = defaultdict(list)
    pred = first_answer_tokens(model, enc, feats, [s.qa.question for s in samples], batch)
    for s, p in zip(samples, pred, strict=True):
        hits[s.qa.qtype].append(int(p == enc._ids(s.qa.answer, False)[0]))
    by_type = {t: float(np.mean(v)) for t, v in hits.items()}
    overall = float(np.mean([h for v in hits.values() for h in v]))
    return {"accuracy": overall, "by_type": by_type, "n": len(samples)}


def args_record(args: argparse.Namespace) -> dict[str, str]:
    """The run's arguments as the checkpoint's training_summary.json records them."""
    return {k: str(v) for k, v in vars(args).items() if k != "start_time"}


def copy_towers(saved, model, source: Path) -> None:
    """Load ``saved``'s vision towers into ``model``, leaving its projector and language model as they are."""
    towers = {k: v for k, v in saved.state_dict().items() if "tower" in k}
    try:  # another width fails inside load_state_dict; another depth leaves keys over or missing
        missing, unexpected = model.load_state_dict(towers, strict=False)
    except RuntimeError as e:
        raise SystemExit(f"{source}: its vision tower does not fit this model's shape ({e})") from e
    if unexpected or any("tower" in k for k in missing):
        raise SystemExit(f"{source}: its vision tower does not fit this model's shape")


def load_continued(saved, model, source: Path) -> int:
    """Load every weight of ``saved`` into ``model``; returns how many language-model layers ``model`` has
    beyond ``saved``'s. Those come after the saved ones, each with its attention output and MLP down projection
    zeroed: a residual block whose output is zero adds nothing, so the grown model computes exactly what the
    saved one did at step 0, and the added layers learn from there (``--text-layers`` deeper than the saved
    checkpoint's). Any other difference of shape is refused."""
    try:
        missing, unexpected = model.load_state_dict(saved.state_dict(), strict=False)
    except RuntimeError as e:
        raise SystemExit(f"{source}: its weights do not fit this model's shape ({e})") from e
    layers = model.model.language_model.layers
    kept = saved.config.text_config.num_hidden_layers
    added = {f"model.language_model.layers.{i}.{k}" for i in range(kept, len(layers))
             for k, _ in layers[i].named_parameters()}
    if unexpected or set(missing) != added:
        raise SystemExit(f"{source}: its weights do not fit this model's shape (missing {sorted(set(missing) - added)[:4]},"
                         f" unexpected {sorted(unexpected)[:4]}); only --text-layers may grow")
    with torch.no_grad():
        for layer in layers[kept:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return len(layers) - kept


def save_checkpoint(model, tokenizer, shape, out_dir: Path, summary: dict) -> None:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    save_processor_files(tmp, tokenizer, shape)
    (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def step_checkpoint(out_dir: Path, step: int) -> Path:
    """Where ``--keep-every-eval`` saves the checkpoint evaluated at ``step``: beside ``out_dir``."""
    return out_dir.with_name(f"{out_dir.name}-step{step:05d}")


class StepLoss(NamedTuple):
    answer: torch.Tensor  # cross-entropy on the answer tokens
    lookup: torch.Tensor  # lookup_loss (0 when not asked for)
    cls_read: torch.Tensor  # cls_read_loss (0 when not asked for)
    background: torch.Tensor  # background_loss (0 when not asked for)
    answering_background: torch.Tensor  # answering_background_loss (0 when not asked for)
    seq: int  # padded sequence length S, for the log
    visual_norm: float  # mean norm of the projected visual tokens, for the log


# The question types that name one object (QA.subject): the only turns the lookup loss can point at.
LOOKUP_TYPES = ("colour", "shape", "direction", "position")
# The one head of each --lookup-layers layer that the lookup loss trains; the layers' other heads stay free.
LOOKUP_HEAD = 0
# The one head of --cls-read-layer that the [CLS]-read loss trains: another head than LOOKUP_HEAD, so that
# both losses can train the same layer.
CLS_READ_HEAD = 1


def object_tokens(clip) -> torch.Tensor:
    """(K, V) bool: the video tokens that hold a pixel of object k. Each frame's span is its [CLS] (never an
    object's) then its P patches in raster order, as transformers' video path lays the tokens out."""
    owner = clip.object_pixel_counts() > 0  # (T, P, K)
    t, _, k = owner.shape
    spans = np.concatenate([np.zeros((t, 1, k), dtype=bool), owner], axis=1)  # (T, N, K)
    return torch.from_numpy(spans.reshape(-1, k).T.copy())  # (K, V)


def cls_tokens(frames: int, span: int) -> torch.Tensor:
    """(V,) bool: each frame's [CLS], the first of its ``span`` = 1 + P video tokens."""
    return (torch.arange(frames * span) % span) == 0


def background_tokens(objects: torch.Tensor, cls: torch.Tensor, with_cls: bool = False) -> torch.Tensor:
    """(V,) bool: the video tokens that are neither a frame's [CLS] (``cls`` (V,)) nor hold a pixel of any
    object (``objects`` (K, V), ``object_tokens``); ``with_cls``: the [CLS] tokens too, every token but the
    objects' patches (``--background-cls``)."""
    outside = ~objects.any(0)  # (V,)
    return outside if with_cls else outside & ~cls


def answering_positions(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, t), each (N,): the position of every turn that predicts the turn's first answer token (its last
    prompt token, the one inference answers from), from ``target`` (B, S-1), the labels shifted by one."""
    before = F.pad(target, (1, 0), value=-100)[:, :-1]  # (B, S-1) the label one position earlier
    b, t = ((target != -100) & (before == -100)).nonzero().unbind(1)  # (N,)
    return b, t


def head_attention(attn, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                   b: torch.Tensor, t: torch.Tensor, head: int) -> torch.Tensor:
    """(N, S) softmax weights of head ``head`` of Llama attention module ``attn`` for the N query rows
    (b, t), from what the module was called with: hidden (B, S, D) after its layernorm, rotary cos / sin
    (B, S, hd), additive mask (B, 1, S, S). The same scores as the module's eager path, on N rows instead of
    B·H·S, so the forward keeps its fused kernel."""
    hd = attn.head_dim
    kv = head // attn.num_key_value_groups
    q = attn.q_proj(hidden[b, t])[:, head * hd : (head + 1) * hd]  # (N, hd)
    k = attn.k_proj(hidden)[..., kv * hd : (kv + 1) * hd]  # (B, S, hd)
    q = q * cos[b, t] + rotate_half(q) * sin[b, t]
    k = k * cos + rotate_half(k) * sin
    scores = torch.einsum("nd,nsd->ns", q, k[b]).float() * attn.scaling + mask[b, 0, t].float()  # (N, S)
    return scores.softmax(-1)


def rows_attention(attn, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
    """(B, H, R, S) softmax weights of every head of Llama attention module ``attn`` for the query rows
    ``rows`` (B, R) of each sequence, from what the module was called with (as ``head_attention``): the
    module's eager scores on R rows, while its forward keeps the fused kernel."""
    bsz, s, d = hidden.shape
    hd = attn.head_dim
    at = rows.unsqueeze(-1)  # (B, R, 1)
    q = attn.q_proj(hidden.gather(1, at.expand(-1, -1, d))).view(bsz, rows.shape[1], -1, hd).transpose(1, 2)
    k = attn.k_proj(hidden).view(bsz, s, -1, hd).transpose(1, 2)  # (B, Hkv, S, hd); q (B, H, R, hd)
    q_cos, q_sin = cos.gather(1, at.expand(-1, -1, hd)), sin.gather(1, at.expand(-1, -1, hd))  # (B, R, hd)
    q = q * q_cos.unsqueeze(1) + rotate_half(q) * q_sin.unsqueeze(1)
    k = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)  # (B, H, S, hd)
    row_mask = mask[:, 0].gather(1, at.expand(-1, -1, s)).unsqueeze(1)  # (B, 1, R, S)
    scores = (q @ k.transpose(2, 3)).float() * attn.scaling + row_mask.float()  # (B, H, R, S)
    return scores.softmax(-1)


def lookup_loss(model, inputs: dict[int, tuple], mask: torch.Tensor, ids: torch.Tensor, target: torch.Tensor,
                segments: torch.Tensor, convs, objects: list[torch.Tensor], video_id: int,
                types: tuple[str, ...] = LOOKUP_TYPES) -> torch.Tensor:
    """Mean over the lookup layers and asked-about turns of −log(attention mass on the asked object's video
    tokens), in head LOOKUP_HEAD at the token that predicts the turn's first answer token (the last prompt
    token, the one inference answers from). ``inputs[layer]`` is what that layer's attention module was
    called with (hidden, (cos, sin)), ``mask`` (B, 1, S, S) the turn mask it applied; ``objects[b]`` is
    conversation b's (K, V) ``object_tokens``. Only turns asking a question of ``types`` count.

    Departs from LLaVA-style training on purpose: an auxiliary objective for the lookup that the answer loss
    alone teaches too slowly here (docs/demo_model.md). It only shapes attention; every visual token stays in.
    """
    b, t = answering_positions(target)  # (N,)
    turn = segments[b, t] - 1  # (N,) turn index in its conversation
    rows, masks = [], []
    for n, (r, k) in enumerate(zip(b.tolist(), turn.tolist(), strict=True)):
        qa = convs[r][k]
        # An object hidden all clip long has no tokens to look at.
        if qa.qtype in types and qa.subject is not None and bool(objects[r][qa.subject].any()):
            rows.append(n)
            masks.append(objects[r][qa.subject])
    if not rows:
        return torch.zeros(())
    keep = torch.tensor(rows)
    b, t = b[keep], t[keep]  # (N',)
    asked = torch.stack(masks).float()  # (N', V)
    start = (ids == video_id).int().argmax(1)  # (B,) first video token of each row
    cols = start[b].unsqueeze(1) + torch.arange(asked.shape[1])  # (N', V)
    losses = []
    for layer, (hidden, (cos, sin)) in inputs.items():
        attn = model.model.language_model.layers[layer].self_attn
        weights = head_attention(attn, hidden, cos, sin, mask, b, t, LOOKUP_HEAD)  # (N', S)
        losses.append(-torch.log((weights.gather(1, cols) * asked).sum(-1) + 1e-6).mean())
    return torch.stack(losses).mean()


def cls_read_loss(model, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], layer: int,
                  mask: torch.Tensor, ids: torch.Tensor, target: torch.Tensor, cls: torch.Tensor,
                  video_id: int) -> torch.Tensor:
    """Mean over every turn of −log(attention mass on the frames' [CLS] tokens ``cls`` (V,) bool), in head
    CLS_READ_HEAD of ``layer`` at the token that predicts the turn's first answer token; ``hidden`` and
    ``rotary`` are what that layer's attention module was called with, ``mask`` (B, 1, S, S) its turn mask.

    Our addition, not in LLaVA-style training: [CLS] tokens are never pruned, and the runs that read them kept
    count under pruning, while the lookup loss alone lets that reading fade. Reading them is not enough by
    itself for [CLS] pruning (docs/demo_model.md, the s5 experiment)."""
    b, t = answering_positions(target)  # (N,)
    start = (ids == video_id).int().argmax(1)  # (B,) first video token of each row
    cols = start[b].unsqueeze(1) + cls.nonzero().squeeze(1)  # (N, T)
    attn = model.model.language_model.layers[layer].self_attn
    weights = head_attention(attn, hidden, *rotary, mask, b, t, CLS_READ_HEAD)  # (N, S)
    return -torch.log(weights.gather(1, cols).sum(-1) + 1e-6).mean()


def background_loss(model, inputs: dict[int, tuple], mask: torch.Tensor, ids: torch.Tensor,
                    segments: torch.Tensor, background: torch.Tensor, video_id: int,
                    sample: int = 0) -> torch.Tensor:
    """Mean over the layers of ``inputs``, their heads and every query row that is not itself background of
    the attention mass on background video tokens (``background`` (B, V), ``background_tokens``). The rows
    are every token from the first video token on that is not background ([CLS], object patches, each turn's
    question and answer tokens): what [CLS] pruning mostly keeps. ``inputs[layer]`` is what that layer's
    attention module was called with, ``mask`` (B, 1, S, S) its turn mask. ``sample`` > 0: that many of
    each sequence's rows, drawn at random (the mean's estimate at a fraction of its cost: the full
    (B, H, S, S) weights of every layer made steps 4x slower).

    Our addition, not in LLaVA-style training: a model that averages over background patches answers from an
    average that [CLS] pruning (which keeps objects, not background) shifts and random selection keeps (the
    s5 experiment, docs/demo_model.md). Every visual token stays in; only where attention goes is shaped, and
    a row may still put its mass on the prompt, the [CLS] tokens or objects."""
    bsz, s = ids.shape
    keys = background_keys(ids, background, video_id)  # (B, S)
    start = (ids == video_id).int().argmax(1)  # (B,) first video token of each row
    eligible = (torch.arange(s) >= start.unsqueeze(1)) & ~keys & (segments >= 0)  # (B, S)
    # Eligible rows first (at random when sampling); the rest of a short sequence's R fill is left out by `valid`.
    order = (torch.rand(bsz, s) if sample else torch.zeros(bsz, s)).masked_fill(~eligible, -1.0)
    rows = order.topk(min(sample, s) if sample else int(eligible.sum(1).max()), dim=1).indices  # (B, R)
    return background_mass(model, inputs, mask, keys, rows, eligible.gather(1, rows))


def answering_background_loss(model, inputs: dict[int, tuple], mask: torch.Tensor, ids: torch.Tensor,
                              target: torch.Tensor, background: torch.Tensor, video_id: int) -> torch.Tensor:
    """``background_loss`` on the answering rows alone: the mean over the layers of ``inputs``, their heads and
    every turn's answering token (``answering_positions``) of the attention mass on ``background`` (B, V).

    Our addition, not in LLaVA-style training: ``background_loss`` draws its rows from every non-background
    token, of which the answering tokens are one in tens, and in s12 it moved layers 1-3 of the answering
    token off the [CLS] tokens but left layer 0 reading them (0.44 of its attention, docs/demo_model.md);
    this term weighs the rows inference answers from on their own."""
    keys = background_keys(ids, background, video_id)  # (B, S)
    b, t = answering_positions(target)  # (N,) sorted by b, then t
    per_row = torch.bincount(b, minlength=ids.shape[0])  # (B,)
    rank = torch.arange(len(b)) - (per_row.cumsum(0) - per_row)[b]  # (N,) the turn's index in its row
    rows = torch.zeros(ids.shape[0], int(per_row.max()), dtype=torch.long)  # (B, R)
    valid = torch.zeros_like(rows, dtype=torch.bool)
    rows[b, rank] = t
    valid[b, rank] = True
    return background_mass(model, inputs, mask, keys, rows, valid)


def background_keys(ids: torch.Tensor, background: torch.Tensor, video_id: int) -> torch.Tensor:
    """(B, S) bool: ``background`` (B, V) placed at each sequence's video tokens, found by token id."""
    start = (ids == video_id).int().argmax(1)  # (B,) first video token of each row
    cols = start.unsqueeze(1) + torch.arange(background.shape[1])  # (B, V)
    return torch.zeros(ids.shape, dtype=torch.bool).scatter(1, cols, background)


def background_mass(model, inputs: dict[int, tuple], mask: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor,
                    valid: torch.Tensor) -> torch.Tensor:
    """Mean over the layers of ``inputs``, their heads and the ``valid`` (B, R) query rows ``rows`` (B, R) of
    the attention mass on ``keys`` (B, S)."""
    losses = []
    for layer, (hidden, (cos, sin)) in inputs.items():
        attn = model.model.language_model.layers[layer].self_attn
        weights = rows_attention(attn, hidden, cos, sin, mask, rows)  # (B, H, R, S)
        mass = torch.einsum("bhrk,bk->brh", weights, keys.float()).mean(-1)  # (B, R) heads averaged
        losses.append(mass[valid].mean())
    return torch.stack(losses).mean()


def answer_loss(model, enc: Encoder, convs, feats: torch.Tensor, bf16: bool,
                objects: list[torch.Tensor] | None = None, lookup_layers: tuple[int, ...] = (),
                lookup_types: tuple[str, ...] = LOOKUP_TYPES, cls: torch.Tensor | None = None,
                cls_read_layer: int = 0, background: torch.Tensor | None = None,
                background_rows: int = 0, answering_background: bool = False,
                sampled_background: bool = True) -> StepLoss:
    """Cross-entropy on the answer tokens (and their ``</s>``) of B conversations about the B clips of
    ``feats`` (B, V, C); with ``objects`` (each conversation's ``object_tokens``) and ``lookup_layers``, also
    ``lookup_loss`` over the turns of ``lookup_types``; with ``cls`` (V,) (``cls_tokens``), also
    ``cls_read_loss`` in ``cls_read_layer``; with ``background`` (B, V) (``background_tokens``), also
    ``background_loss`` over every layer (on ``background_rows`` rows per clip drawn at random; 0: all; not
    with ``sampled_background`` False) and, with ``answering_background``, ``answering_background_loss``."""
    ids, labels, position_ids, segments = collate([enc.conversation(c) for c in convs], enc.pad)
    target = labels[:, 1:]  # token t is predicted at position t−1; a turn's labels start after its own prompt
    pos = (target != -100).nonzero()  # (K, 2)
    inputs: dict[int, tuple] = {}
    hooks = []
    hooked = set(lookup_layers if objects is not None else ()) | ({cls_read_layer} if cls is not None else set())
    if background is not None:
        hooked |= set(range(len(model.model.language_model.layers)))
    for layer in sorted(hooked):  # a pre-hook sees what the attention module gets; nothing is replaced
        def keep(_module, _args, kwargs, layer=layer):
            inputs[layer] = (kwargs["hidden_states"], kwargs["position_embeddings"])
        attn = model.model.language_model.layers[layer].self_attn
        hooks.append(attn.register_forward_pre_hook(keep, with_kwargs=True))
    # bf16 matmuls with fp32 weights, optimizer state and loss: ~1.4x the steps where the CPU has avx512_bf16.
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            x = embed(model, ids, feats, enc.video_id)  # (B, S, D)
            mask = turn_mask(segments, x.dtype)  # (B, 1, S, S)
            logits = lm_logits(model, x, mask, pos, position_ids)  # (K, vocab)
            looked = {layer: inputs[layer] for layer in lookup_layers} if objects is not None else {}
            extra = (lookup_loss(model, looked, mask, ids, target, segments, convs, objects, enc.video_id,
                                 lookup_types) if looked else torch.zeros(()))
            read = (cls_read_loss(model, *inputs[cls_read_layer], cls_read_layer, mask, ids, target, cls,
                                  enc.video_id) if cls is not None else torch.zeros(()))
            away = (background_loss(model, inputs, mask, ids, segments, background, enc.video_id, background_rows)
                    if background is not None and sampled_background else torch.zeros(()))
            away_answering = (answering_background_loss(model, inputs, mask, ids, target, background, enc.video_id)
                              if background is not None and answering_background else torch.zeros(()))
    finally:
        for hook in hooks:
            hook.remove()
    loss = F.cross_entropy(logits.float(), target[pos[:, 0], pos[:, 1]])
    return StepLoss(loss, extra, read, away, away_answering, ids.shape[1],
                    x[ids == enc.video_id].detach().norm(dim=-1).mean().item())


def train_lm(model, tokenizer, shape, args, tower_stats: dict) -> dict:
    enc = Encoder(tokenizer, shape.num_frames * shape.tokens_per_frame)
    tower = model.model.video_tower
    for p in tower.parameters():
        p.requires_grad_(False)
    for p in model.model.image_tower.parameters():
        p.requires_grad_(False)

    t0 = time.time()
    log(f"stage 2: rendering + caching layer -2 features of {args.clips} training clips")
    clips = []
    feats_parts = []
    for i in range(0, args.clips, 500):
        part = [training_clip(j) for j in range(i, min(args.clips, i + 500))]
        feats_parts.append(cache_features(tower, as_served([c.frames for c in part], args)))
        clips.extend(part)
        log(f"  cached {len(clips)} clips ({time.time() - t0:.0f}s)")
    feats = torch.cat(feats_parts)  # (num_clips, V, C)
    val = held_out_set(args.eval_questions, seed=VALIDATION_SEED)
    val_feats = cache_features(tower, as_served([s.clip.frames for s in val], args))
    log(f"cached {feats.shape} train + {val_feats.shape} validation features in {time.time() - t0:.0f}s")

    projector = [p for n, p in model.named_parameters() if "multi_modal_projector" in n]
    rest = [p for n, p in model.named_parameters() if "tower" not in n and "multi_modal_projector" not in n]
    trainable = rest + projector
    log(f"trainable parameters: {sum(p.numel() for p in trainable):,}")
    # The projector reads the tower's raw layer −2 residual stream (token norms 35–49 here, no layernorm),
    # so one Adam step moves its output far more than it moves any other layer's; `lr_scale` slows it.
    opt = torch.optim.AdamW([{"params": rest, "lr_scale": 1.0},
                             {"params": projector, "lr_scale": args.projector_lr_scale}],
                            lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = np.random.default_rng(args.seed)
    # --first-minutes: clips of --first-objects objects. With one object no question needs binding a word to
    # one of several objects, so a type can only be learnt by reading what the object's tokens carry; with
    # two to four, shape and colour questions teach that binding before the full mix's other types crowd it.
    first_pool = np.array([i for i, c in enumerate(clips) if len(c.objects) in args.first_objects])
    if args.first_minutes and not len(first_pool):
        raise SystemExit(f"--first-minutes: no clip of {sorted(args.first_objects)} objects among the cached training clips")
    budget_s = args.minutes * 60 - (time.time() - args.start_time)
    t_start = time.time()
    best = -1.0
    history = []
    step = 0
    next_eval = args.eval_every_s
    run_loss = run_lookup = run_read = run_away = run_away_answering = 0.0
    every_cls = cls_tokens(shape.num_frames, shape.tokens_per_frame)  # (V,)
    cls = every_cls if args.cls_read_loss else None
    out_dir = Path(args.out)
    tokens_cache: dict[int, torch.Tensor] = {}

    def object_tokens_of(i: int) -> torch.Tensor:
        if i not in tokens_cache:
            tokens_cache[i] = object_tokens(clips[i])
        return tokens_cache[i]
    model.train()
    while True:
        elapsed = time.time() - t_start
        done = elapsed >= budget_s or (args.max_steps and step >= args.max_steps)
        if elapsed >= next_eval or done:
            res = evaluate(model, enc, val_feats, val)
            res.update(step=step, minutes=round((time.time() - args.start_time) / 60, 1))
            history.append(res)
            log(f"EVAL step {step}: acc {res['accuracy']:.3f} " + " ".join(
                f"{t}={res['by_type'].get(t, 0):.2f}" for t in EVAL_TYPES))
            summary = {"args": args_record(args), "tower": tower_stats, "eval": res, "history": history}
            if args.keep_every_eval:
                # Robustness to pruning is not what validation picks on; keeping every checkpoint lets
                # `streamvlm eval` measure it along the run.
                save_checkpoint(model, tokenizer, shape, step_checkpoint(out_dir, step), summary)
            if res["accuracy"] > best:
                best = res["accuracy"]
                save_checkpoint(model, tokenizer, shape, out_dir, summary)
                log(f"saved best checkpoint (acc {best:.3f}) to {out_dir}")
            next_eval = elapsed + args.eval_every_s
            if done:
                break
        frac = min(1.0, elapsed / budget_s)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        if elapsed < args.first_minutes * 60:  # the first stage: --first-objects clips, --first-types only
            idx = first_pool[rng.integers(0, len(first_pool), size=args.batch)]
            convs = [training_conversation(clips[i], rng, args.turns, caption_share=0.0, types=args.first_types)
                     for i in idx]
        else:
            idx = rng.integers(0, len(clips), size=args.batch)
            convs = [training_conversation(clips[i], rng, args.turns) for i in idx]
        objects = [object_tokens_of(int(i)) for i in idx] if args.lookup_loss else None
        background = (torch.stack([background_tokens(object_tokens_of(int(i)), every_cls, args.background_cls)
                                   for i in idx])
                      if args.background_loss or args.answering_background_loss else None)  # (B, V)
        part = answer_loss(model, enc, convs, feats[torch.from_numpy(idx)], args.bf16, objects, args.lookup_layers,
                           args.lookup_types, cls, args.cls_read_layer, background, args.background_rows,
                           args.answering_background_loss > 0, args.background_loss > 0)
        opt.zero_grad(set_to_none=True)
        (part.answer + args.lookup_loss * part.lookup + args.cls_read_loss * part.cls_read
         + args.background_loss * part.background
         + args.answering_background_loss * part.answering_background).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        run_loss += part.answer.item()
        run_lookup += part.lookup.item()
        run_read += part.cls_read.item()
        run_away += part.background.item()
        run_away_answering += part.answering_background.item()
        if step % args.log_every == 0:
            lookup = f" lookup {run_lookup / args.log_every:.3f}" if args.lookup_loss else ""
            lookup += f" cls-read {run_read / args.log_every:.3f}" if args.cls_read_loss else ""
            lookup += f" background {run_away / args.log_every:.3f}" if args.background_loss else ""
            lookup += (f" answering-background {run_away_answering / args.log_every:.3f}"
                       if args.answering_background_loss else "")
            log(f"step {step} loss {run_loss / args.log_every:.4f}{lookup} lr {lr:.2e} seq {part.seq} "
                f"visual-token norm {part.visual_norm:.1f} "
                f"{(time.time() - t_start) / step:.2f}s/step elapsed {(time.time() - args.start_time) / 60:.1f}min")
            run_loss = run_lookup = run_read = run_away = run_away_answering = 0.0
    return {"best_accuracy": best, "steps": step, "history": history}


@torch.no_grad()
def evaluate_checkpoint(path: Path, num_questions: int, batch: int = 8) -> dict:
    """Held-out accuracy of a saved checkpoint through the model's own forward (pixels in, tower run)."""
    from transformers import AutoTokenizer

    model = VideoLlavaForConditionalGeneration.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    per_frame = model.config.video_seq_length // NUM_FRAMES
    enc = Encoder(tokenizer, NUM_FRAMES * per_frame)
    samples = held_out_set(num_questions)
    hits: dict[str, list[int]] = defaultdict(list)
    t0 = time.time()
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        seqs = [enc.first_prompt(s.qa.question) for s in chunk]
        width = max(len(q) for q in seqs)
        ids = torch.full((len(seqs), width), enc.pad, dtype=torch.long)
        for r, q in enumerate(seqs):
            ids[r, : len(q)] = torch.tensor(q)
        frames = np.stack([s.clip.frames for s in chunk])  # (B, T, H, W, 3)
        b, t = frames.shape[:2]
        pix = pixels(frames.reshape(b * t, *frames.shape[2:])).reshape(b, t, 3, *frames.shape[2:4])
        logits = model(input_ids=ids, pixel_values_videos=pix).logits  # (B, S, vocab)
        pred = logits[torch.arange(b), torch.tensor([len(q) - 1 for q in seqs])].argmax(-1)
        for s, p in zip(chunk, pred.tolist(), strict=True):
            hits[s.qa.qtype].append(int(p == enc._ids(s.qa.answer, False)[0]))
        if (i // batch) % 20 == 0:
            log(f"  evaluated {i + len(chunk)}/{len(samples)} ({time.time() - t0:.0f}s)")
    by_type = {t: float(np.mean(v)) for t, v in hits.items()}
    return {"accuracy": float(np.mean([h for v in hits.values() for h in v])), "by_type": by_type,
            "n": len(samples)}


def use_bf16(asked: bool | None, native: bool) -> bool:
    """``--bf16`` / ``--no-bf16`` as asked; unasked, bf16 autocast only where the CPU multiplies bf16 natively.
    Measured on one demo-model step: 0.80 s bf16 / 1.11 s fp32 with avx512_bf16, but 13.5 s bf16 / 1.31 s fp32 on
    an AVX2-only CPU, where bf16 is emulated."""
    return native if asked is None else asked


def native_bf16() -> bool:
    # torch.cpu has no public query for these; torch._inductor picks its bf16 kernels by the same two.
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def object_counts(text: str) -> frozenset[int]:
    """``--first-objects``: comma-separated object counts, each at least 1."""
    counts = frozenset(int(n) for n in text.split(","))  # int("") and int("x") raise ValueError: argparse's error
    if min(counts) < 1:
        raise ValueError(text)
    return counts


def layer_indices(text: str) -> tuple[int, ...]:
    """``--lookup-layers``: comma-separated language-model layer indices, each at least 0."""
    layers = tuple(sorted({int(n) for n in text.split(",")}))  # int("") raises ValueError: argparse's error
    if layers[0] < 0:
        raise ValueError(text)
    return layers


def question_types(text: str) -> tuple[str, ...]:
    """``--first-types``: a comma-separated, non-empty subset of the training question types."""
    types = tuple(t for t in text.split(",") if t)
    if not types or set(types) - set(TRAIN_TYPES):
        raise ValueError(f"a comma-separated subset of {','.join(TRAIN_TYPES)}")
    return types


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=85.0, help="wall-time budget for the whole run")
    ap.add_argument("--tower-minutes", type=float, default=6.0)
    ap.add_argument("--tower-clips", type=int, default=3000)
    ap.add_argument("--tower-batch", type=int, default=32)
    ap.add_argument("--tower-lr", type=float, default=1.5e-3)
    ap.add_argument("--cls-layer", type=int, choices=(-1, -2), default=-1,
                    help="the tower layer whose [CLS] the stage-1 objective reads (-2: the one the LLM reads)")
    ap.add_argument("--second-cls-loss", type=float, default=0.0,
                    help="weight of a second [CLS] head on layer -2 beside --cls-layer's (0: none, as shipped)")
    ap.add_argument("--place-loss", type=float, default=0.0,
                    help="weight of a stage-1 head on the same [CLS] naming each colour's and shape's patch column and row")
    ap.add_argument("--patch-place-loss", type=float, default=0.0,
                    help="weight of a stage-1 head on every layer −2 patch token naming its own column and row")
    ap.add_argument("--patch-loss", type=float, default=0.0,
                    help="weight of the per-patch shape/colour loss (0: the shipped checkpoint's [CLS]-only stage 1)")
    ap.add_argument("--video", choices=("h264", "frames"), default="h264",
                    help="train and validate on frames as the service reads them from H.264 (default) or as rendered")
    ap.add_argument("--tower-only", action="store_true",
                    help="stop after stage 1 and its statistics, saving a checkpoint for --tower-from")
    ap.add_argument("--clips", type=int, default=4000, help="training clips whose features are cached")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--turns", type=int, default=10, help="questions per training conversation")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="stage-2 forward/backward under bf16 autocast (weights stay fp32; validation runs fp32); "
                         "default: on where the CPU has native bf16 matmuls (avx512_bf16 or AMX), else off")
    ap.add_argument("--projector-lr-scale", type=float, default=0.1,
                    help="the projector's learning rate as a fraction of --lr")
    ap.add_argument("--first-minutes", type=float, default=0.0,
                    help="train the first M minutes of stage 2 on --first-objects clips and --first-types only")
    ap.add_argument("--first-objects", type=object_counts, default=frozenset({1}),
                    help="comma-separated object counts of the clips the --first-minutes stage trains on")
    ap.add_argument("--first-types", type=question_types, default=("position", "shape", "direction", "colour"),
                    help="comma-separated question types of the --first-minutes stage")
    ap.add_argument("--lookup-loss", type=float, default=0.0,
                    help="weight of the auxiliary loss that trains one head of each --lookup-layers layer to look, "
                         "from the answering token, at the object the question names (0: none)")
    ap.add_argument("--lookup-layers", type=layer_indices, default=(1, 2),
                    help="comma-separated language-model layers (0-based) whose head 0 --lookup-loss trains")
    ap.add_argument("--lookup-types", type=question_types, default=LOOKUP_TYPES,
                    help=f"comma-separated question types whose turns --lookup-loss trains, from {','.join(LOOKUP_TYPES)}")
    ap.add_argument("--cls-read-loss", type=float, default=0.0,
                    help=f"weight of the auxiliary loss that trains head {CLS_READ_HEAD} of --cls-read-layer to look, "
                         "from the answering token, at the frames' [CLS] tokens on every turn (0: none)")
    ap.add_argument("--cls-read-layer", type=int, default=0,
                    help="the language-model layer (0-based) whose head --cls-read-loss trains")
    ap.add_argument("--background-loss", type=float, default=0.0,
                    help="weight of the auxiliary loss that trains every head of every layer to put little attention, "
                         "from every token but background patches, on the patches no object is drawn in (0: none)")
    ap.add_argument("--background-cls", action="store_true",
                    help="--background-loss (and --answering-background-loss) keeps attention off the frames' [CLS] "
                         "tokens too, so the language model answers from the object patches, which [CLS] selection "
                         "keeps and random selection drops")
    ap.add_argument("--answering-background-loss", type=float, default=0.0,
                    help="weight of the auxiliary loss that trains every head of every layer to put little attention, "
                         "from each turn's answering token alone, on the patches no object is drawn in (0: none)")
    ap.add_argument("--background-rows", type=int, default=64,
                    help="query rows per clip, drawn at random each step, that --background-loss averages over")
    ap.add_argument("--max-steps", type=int, default=0, help="stop stage 2 after this many steps (0: time only)")
    ap.add_argument("--eval-questions", type=int, default=200,
                    help="validation questions checked while training (own seed: the held-out set stays unseen)")
    ap.add_argument("--eval-every-s", type=float, default=600.0)
    ap.add_argument("--keep-every-eval", action="store_true",
                    help="also save the checkpoint of every validation run as OUT-stepNNNNN (the best stays at OUT)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=demo_model_path())
    for field in ("text_width", "text_heads", "text_ffn", "vision_width", "vision_layers"):
        ap.add_argument("--" + field.replace("_", "-"), type=int, default=getattr(DemoModelShape(), field))
    ap.add_argument("--text-layers", type=int, default=None,
                    help=f"language-model layers (default: --init-from's own, else {DemoModelShape().text_layers})")
    start = ap.add_mutually_exclusive_group()
    start.add_argument("--init-from", type=Path, default=None,
                    help="continue from a saved checkpoint: load all its weights and skip the tower stage; a --text-layers "
                         "above its own adds layers after its own, each starting as the identity")
    start.add_argument("--tower-from", type=Path, default=None,
                    help="take the vision tower of a saved checkpoint, skip the tower stage, train projector + LLM afresh")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="only measure the saved checkpoint at --out on --eval-questions held-out questions")
    args = ap.parse_args(argv)
    if args.text_layers is None:  # continuing a checkpoint keeps its depth unless told to grow it
        args.text_layers = (AutoConfig.from_pretrained(args.init_from).text_config.num_hidden_layers
                            if args.init_from is not None else DemoModelShape().text_layers)
    if args.lookup_loss < 0:
        ap.error(f"--lookup-loss must be >= 0, got {args.lookup_loss}")
    if set(args.lookup_types) - set(LOOKUP_TYPES):
        ap.error(f"--lookup-types: only {','.join(LOOKUP_TYPES)} questions name an object, got {args.lookup_types}")
    if max(args.lookup_layers) >= args.text_layers:
        ap.error(f"--lookup-layers: the language model has layers 0..{args.text_layers - 1}, got {args.lookup_layers}")
    if args.cls_read_loss < 0:
        ap.error(f"--cls-read-loss must be >= 0, got {args.cls_read_loss}")
    if not 0 <= args.cls_read_layer < args.text_layers:
        ap.error(f"--cls-read-layer: the language model has layers 0..{args.text_layers - 1}, got {args.cls_read_layer}")
    if args.cls_read_loss and args.text_heads <= CLS_READ_HEAD:
        ap.error(f"--cls-read-loss trains head {CLS_READ_HEAD}: needs --text-heads > {CLS_READ_HEAD}")
    if args.background_loss < 0:
        ap.error(f"--background-loss must be >= 0, got {args.background_loss}")
    if args.background_rows < 1:
        ap.error(f"--background-rows must be >= 1, got {args.background_rows}")
    if args.answering_background_loss < 0:
        ap.error(f"--answering-background-loss must be >= 0, got {args.answering_background_loss}")
    if args.background_cls and not (args.background_loss or args.answering_background_loss):
        ap.error("--background-cls needs --background-loss or --answering-background-loss > 0: it widens their keys")
    native = native_bf16()
    args.bf16 = use_bf16(args.bf16, native)
    if args.bf16 and not native:
        log("--bf16 on a CPU without native bf16 matmuls: each step is about 10x slower than --no-bf16")
    args.start_time = time.time()
    torch.set_num_threads(2)
    if args.evaluate_only:
        res = evaluate_checkpoint(args.out, args.eval_questions)
        log(f"held-out accuracy of {args.out}: {json.dumps(res)}")
        return 0
    torch.manual_seed(args.seed)
    shape = DemoModelShape(text_width=args.text_width, text_layers=args.text_layers, text_heads=args.text_heads,
                           text_ffn=args.text_ffn, vision_width=args.vision_width, vision_layers=args.vision_layers)
    tokenizer = build_tokenizer()
    model = VideoLlavaForConditionalGeneration(build_config(tokenizer, shape))
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; args {vars(args)}")
    if args.init_from is not None:
        saved = VideoLlavaForConditionalGeneration.from_pretrained(args.init_from)
        added = load_continued(saved, model, args.init_from)
        summary = json.loads((args.init_from / "training_summary.json").read_text())
        tower_stats = {**summary.get("tower", {}), "continued_from": summary.get("eval", {}), "added_layers": added}
        log(f"continuing from {args.init_from} (validation accuracy then {summary.get('eval', {}).get('accuracy')})"
            + (f" with {added} language-model layers added after its {args.text_layers - added}" if added else ""))
    elif args.tower_from is not None:
        copy_towers(VideoLlavaForConditionalGeneration.from_pretrained(args.tower_from), model, args.tower_from)
        summary = json.loads((args.tower_from / "training_summary.json").read_text())
        tower_stats = {**summary.get("tower", {}), "tower_from": str(args.tower_from)}
        log(f"vision tower from {args.tower_from}; projector and language model start from seed {args.seed}")
    else:
        tower_stats = pretrain_tower(model, args)
        if args.tower_only:
            # Projector and language model stay at their seed: a later --tower-from run takes only the tower.
            save_checkpoint(model, tokenizer, shape, args.out, {"args": args_record(args), "tower": tower_stats})
            log(f"saved the tower (projector and language model untrained) to {args.out}")
            return 0
    result = train_lm(model, tokenizer, shape, args, tower_stats)
    log(f"done: best validation accuracy {result['best_accuracy']:.3f} after {result['steps']} steps, "
        f"{(time.time() - args.start_time) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
