"""Can a fresh language model learn a question type from a tower's features, on clips of exactly N objects?

A full stage-2 run takes 80 minutes and mixes every type and object count, so when a type stays at chance
it does not say why. This takes a checkpoint's vision tower (frozen, as stage 2 keeps it), puts a fresh
projector + language model on top (initialised from ``--seed``), and trains them for a few hundred steps
on one-turn conversations about clips that all hold ``--objects`` objects and no event, asking only
``--types``, with stage 2's own code (`scripts/train_demo_model.py`: feature cache, prompt, turn mask,
bf16 where the CPU has it). Held-out clips of the same kind (their own seed) are scored every
``--eval-every`` steps.

With one object no binding is needed ("what shape is the red object ?" has the clip's only shape as its
answer), so a type learnt there but not with three objects is limited by the lookup the language model
has to learn, not by what the features carry; a type not learnt even with one object is not in the
features (or not readable by the language model). ``--lookup-loss W`` adds stage 2's auxiliary loss that
points one head at the asked object, to tell "cannot find the object" from "cannot read it once found".

    python scripts/probe_lookup.py /work/exp/m14/model --types shape --objects 1 --steps 300
    python scripts/probe_lookup.py /work/exp/m14/model --types shape --objects 3 --steps 600
    python scripts/probe_lookup.py /work/exp/q2/model --types shape --objects 3 --steps 600 --lookup-loss 1

Shapes: B conversations, S sequence length, V video tokens per clip, C vision width, K answer tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, VideoLlavaForConditionalGeneration

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import train_demo_model as stage2  # noqa: E402

from pipeline.synthetic import TRAIN_TYPES, Clip, render_clip  # noqa: E402
from pipeline.synthetic.language import QA, questions_of_type  # noqa: E402
from pipeline.synthetic.scene import MAX_OBJECTS  # noqa: E402

# Seeds of their own: these clips are neither training, validation nor held-out clips.
TRAIN_CLIPS_SEED = 31_000_013
EVAL_CLIPS_SEED = 31_000_031


def clips(seed: int, count: int, objects: int) -> list[Clip]:
    """``count`` clips of exactly ``objects`` objects, no event (every object always visible, one colour)."""
    if not 1 <= objects <= MAX_OBJECTS:
        raise ValueError(f"objects must be in [1, {MAX_OBJECTS}], got {objects}")
    return [render_clip(np.random.default_rng([seed, i]), event="none", num_objects=objects) for i in range(count)]


def fresh_model(path: Path, seed: int, rope_theta: float | None = None,
                text_layers: int | None = None) -> VideoLlavaForConditionalGeneration:
    """The checkpoint's towers, frozen, under a projector and language model initialised from ``seed``
    (with ``rope_theta`` as the language model's rotary base and ``text_layers`` layers when given)."""
    saved = VideoLlavaForConditionalGeneration.from_pretrained(path)
    config = copy.deepcopy(saved.config)
    if text_layers is not None:
        config.text_config.num_hidden_layers = text_layers
    if rope_theta is not None:
        config.text_config.rope_parameters["rope_theta"] = rope_theta
    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(config)
    stage2.copy_towers(saved, model, path)
    for name, p in model.named_parameters():
        p.requires_grad_("tower" not in name)
    return model


def questions(clip: Clip, types: list[str], rng: np.random.Generator) -> list[QA]:
    return [qa for t in types for qa in questions_of_type(clip, t, rng)]


def score(model, enc: stage2.Encoder, feats: torch.Tensor, asked: list[tuple[int, QA]], tokenizer) -> dict:
    """Per type: accuracy of the greedy first answer token to each (clip index, question), and how spread
    the answers are (a type at chance with one answer for everything reads nothing)."""
    pred = stage2.first_answer_tokens(model, enc, feats[[c for c, _ in asked]], [qa.question for _, qa in asked], 32)
    given: dict[str, list[tuple[str, str]]] = defaultdict(list)  # type -> (answer, expected)
    for (_, qa), p in zip(asked, pred, strict=True):
        given[qa.qtype].append((tokenizer.decode([p]).strip(), qa.answer))
    out = {}
    for qtype, pairs in given.items():
        counts = Counter(a for a, _ in pairs)
        out[qtype] = {"accuracy": float(np.mean([a == e for a, e in pairs])), "questions": len(pairs),
                      "distinct_answers": len(counts), "top_answer_share": counts.most_common(1)[0][1] / len(pairs)}
    return out


def probe(path: Path, types: list[str], objects: int, *, steps: int, train_clips: int, eval_clips: int,
          batch: int, lr: float, projector_lr_scale: float, eval_every: int, video: str, seed: int,
          rope_theta: float | None = None, lookup_loss: float = 0.0, lookup_layers: tuple[int, ...] = (1, 2),
          text_layers: int | None = None, log=print) -> list[dict]:
    """Train a fresh language model on ``path``'s tower for ``steps`` steps; the scores along the way.
    ``lookup_loss`` > 0 adds stage 2's auxiliary lookup loss on ``lookup_layers`` with that weight."""
    model = fresh_model(path, seed, rope_theta, text_layers)
    layers = model.config.text_config.num_hidden_layers
    if lookup_loss and max(lookup_layers) >= layers:
        raise ValueError(f"lookup_layers: the language model has layers 0..{layers - 1}, got {lookup_layers}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tower = model.model.video_tower
    t0 = time.time()
    train, held = clips(TRAIN_CLIPS_SEED, train_clips, objects), clips(EVAL_CLIPS_SEED, eval_clips, objects)
    served = argparse.Namespace(video=video)
    with torch.no_grad():
        feats = stage2.cache_features(tower, stage2.as_served([c.frames for c in train], served))  # (N, V, C)
        held_feats = stage2.cache_features(tower, stage2.as_served([c.frames for c in held], served))
    log(f"cached {tuple(feats.shape)} + {tuple(held_feats.shape)} features in {time.time() - t0:.0f}s")
    enc = stage2.Encoder(tokenizer, feats.shape[1])
    rng = np.random.default_rng(seed)
    asked = [(i, qa) for i, c in enumerate(held) for qa in questions(c, types, rng)]
    pools = [questions(c, types, rng) for c in train]
    tokens = [stage2.object_tokens(c) for c in train] if lookup_loss else []  # (K, V) each
    if not asked or not all(pools):
        raise ValueError(f"clips of {objects} object(s) without an event have no {types} question")
    trainable = [p for p in model.parameters() if p.requires_grad]
    projector = list(model.model.multi_modal_projector.parameters())
    rest = [p for p in trainable if all(p is not q for q in projector)]
    opt = torch.optim.AdamW([{"params": rest, "lr_scale": 1.0},
                             {"params": projector, "lr_scale": projector_lr_scale}],
                            lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    history = [{"step": 0, "loss": None, "by_type": score(model, enc, held_feats, asked, tokenizer)}]
    model.train()
    bf16 = stage2.native_bf16()  # stage 2's default: emulated bf16 made this probe ~10x slower on an AVX2 CPU
    run_loss, run_lookup, t_train = 0.0, 0.0, time.time()
    for step in range(1, steps + 1):
        for group in opt.param_groups:  # stage 2's warm-up, then a constant rate: a probe, not a schedule
            group["lr"] = lr * min(1.0, step / 50) * group["lr_scale"]
        idx = rng.integers(0, len(train), size=batch)  # (B,)
        convs = [[pools[i][int(rng.integers(len(pools[i])))]] for i in idx]
        objects = [tokens[i] for i in idx] if lookup_loss else None
        part = stage2.answer_loss(model, enc, convs, feats[torch.from_numpy(idx)], bf16, objects,
                                   lookup_layers)
        opt.zero_grad(set_to_none=True)
        (part.answer + lookup_loss * part.lookup).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        run_loss += part.answer.item()
        run_lookup += part.lookup.item()
        if step % eval_every == 0 or step == steps:
            n = step - history[-1]["step"]
            history.append({"step": step, "loss": run_loss / n, "lookup_loss": run_lookup / n,
                            "by_type": score(model, enc, held_feats, asked, tokenizer)})
            run_loss = run_lookup = 0.0
            log(f"step {step} loss {history[-1]['loss']:.3f} lookup {history[-1]['lookup_loss']:.3f} ({(time.time() - t_train) / step:.2f} s/step) " + " ".join(
                f"{t} {r['accuracy']:.2f} ({r['distinct_answers']} answers, top {r['top_answer_share']:.2f})"
                for t, r in history[-1]["by_type"].items()))
    return history


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="a saved checkpoint whose vision tower is probed")
    ap.add_argument("--types", default="shape", help=f"comma-separated subset of {','.join(TRAIN_TYPES)}")
    ap.add_argument("--objects", type=int, default=1, help=f"objects in every clip, 1..{MAX_OBJECTS}")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--train-clips", type=int, default=1200)
    ap.add_argument("--eval-clips", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--projector-lr-scale", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--video", choices=("h264", "frames"), default="h264")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rope-theta", type=float, default=None,
                    help="the language model's rotary base (default: the checkpoint's)")
    ap.add_argument("--lookup-loss", type=float, default=0.0,
                    help="weight of stage 2's auxiliary lookup loss (train_demo_model.py --lookup-loss; 0: none)")
    ap.add_argument("--lookup-layers", type=stage2.layer_indices, default=(1, 2),
                    help="comma-separated layers whose head 0 the lookup loss trains")
    ap.add_argument("--text-layers", type=int, default=None,
                    help="layers of the fresh language model (default: the checkpoint's own)")
    ap.add_argument("--json", type=Path, default=None, help="write the history here")
    args = ap.parse_args(argv)
    types = [t for t in args.types.split(",") if t]
    if not types or set(types) - set(TRAIN_TYPES):
        ap.error(f"--types: a comma-separated subset of {','.join(TRAIN_TYPES)}, got {args.types!r}")
    if not 1 <= args.objects <= MAX_OBJECTS:
        ap.error(f"--objects must be in [1, {MAX_OBJECTS}], got {args.objects}")
    if args.lookup_loss < 0:
        ap.error(f"--lookup-loss must be >= 0, got {args.lookup_loss}")
    if args.text_layers is not None and args.text_layers < 1:
        ap.error(f"--text-layers must be >= 1, got {args.text_layers}")
    if args.steps < 1 or args.eval_every < 1 or args.batch < 1 or args.train_clips < 1 or args.eval_clips < 1:
        ap.error("--steps, --eval-every, --batch, --train-clips and --eval-clips must be positive")
    torch.set_num_threads(2)
    history = probe(args.model, types, args.objects, steps=args.steps, train_clips=args.train_clips,
                    eval_clips=args.eval_clips, batch=args.batch, lr=args.lr,
                    projector_lr_scale=args.projector_lr_scale, eval_every=args.eval_every, video=args.video,
                    seed=args.seed, rope_theta=args.rope_theta, lookup_loss=args.lookup_loss,
                    lookup_layers=args.lookup_layers, text_layers=args.text_layers)
    if args.json is not None:
        args.json.write_text(json.dumps(history, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
