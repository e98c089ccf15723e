"""What a checkpoint answers, unpruned or under one encoder selection, split by how many objects the clip holds.

`streamvlm eval` gives one accuracy per question type. This splits each type by the clip's object count
(with one object no binding is needed: the only shape in the clip is the answer to "what shape is the red
object ?") and counts the answers given to each expected answer, so a type at chance can be told apart as
"reads nothing" (one answer for everything), "reads the object but not the binding" (right on one-object
clips only) or "guesses among the clip's objects".

    python scripts/probe_answers.py pipeline/assets/demo_model [/path/to/other/model ...] --types shape,colour

``--training-clips N`` asks the first question of each type about each of the first N training clips instead
(types may then include the training-only ``position``): a type at chance there too was never learnt, one
right there and at chance held out was memorised.

Answers are `streamvlm eval`'s ``none`` row (``pipeline.eval.evaluate``), each model loaded once;
``--method random|cls --reduction R [--strategy S]`` gives that row's answers instead, to see what an
answer that pruning breaks turns into (one wrong word for everything, or a guess among the clip's objects).

``--attention`` adds where the language model looks (rendered frames only: the object masks come from the
scene): for questions about one object, the last prompt token's attention in each layer (heads averaged)
split into the asked object's patches, the other objects' patches, the frames' [CLS] tokens, background
patches and text, next to the share of visual tokens the asked object covers. Retrieval keyed by the
question's word shows as attention on the asked object well above its area.

Shapes: L layers, B = 1 question, H heads, S prompt tokens, T frames, P patches per frame, K objects.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.eval import RowSpec, evaluate, through_h264  # noqa: E402
from pipeline.inference import VideoQA  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from pipeline.synthetic import EVAL_TYPES, HELD_OUT_SIZE, TRAIN_TYPES, Sample, held_out_set, training_clip  # noqa: E402
from pipeline.synthetic.language import questions_of_type  # noqa: E402
from pruning.config import TEMPORAL_STRATEGIES, PruningConfig  # noqa: E402

UNPRUNED = RowSpec("none", None, 0.0, 0.0, 2)


def answers(qa_model: VideoQA, samples, batch_size: int, spec: RowSpec = UNPRUNED) -> list[str]:
    (row,) = evaluate(qa_model, samples, [spec], batch_size, max_new_tokens=8)
    return row.answers


def training_samples(clips: int, types: list[str]) -> list[Sample]:
    """The first question (drawn with the clip index as seed) of each of ``types`` about training clips
    0 .. clips − 1, where the clip has one."""
    out = []
    for i in range(clips):
        clip = training_clip(i)
        for qtype in types:
            if pool := questions_of_type(clip, qtype, np.random.default_rng(i)):
                out.append(Sample(clip=clip, qa=pool[0], index=i))
    return out


PARTS = ("asked object", "other objects", "[CLS]", "background", "text")


@torch.no_grad()
def attention_shares(qa_model: VideoQA, samples) -> dict[str, torch.Tensor]:
    """Per question type, (L, len(PARTS) + 1): mean attention shares of the last prompt token, then the
    asked object's share of the visual tokens. Switches ``qa_model`` to eager attention."""
    qa_model.model.set_attn_implementation("eager")  # attention weights need the eager kernel
    untouched = PruningConfig(encoder_method="none")
    sums: dict[str, list[torch.Tensor]] = defaultdict(list)
    for sample in samples:
        if sample.qa.subject is None:
            continue
        frames = sample.clip.frames  # (T, H, W, 3)
        owner = torch.from_numpy(sample.clip.object_pixel_counts())  # (T, P, K)
        t, p, _ = owner.shape
        # The prompt exactly as the service builds it, over every visual token.
        ids, _ = qa_model.prompt_inputs([sample.qa.question], qa_model.encode(frames, untouched))  # (B, S)
        out = qa_model.model(input_ids=ids, pixel_values_videos=qa_model.pixel_values(frames),
                             output_attentions=True)
        row = torch.stack(out.attentions)[:, :, :, -1, :].mean(2)  # (L, B, S) last token, heads averaged
        visual = ids == qa_model.pruned.video_token_id  # (B, S); each frame's span is its [CLS] then P patches in raster order
        asked = owner[..., sample.qa.subject] > 0  # (T, P)
        other = (owner.sum(-1) > 0) & ~asked  # (T, P)
        cls = torch.zeros(t, p + 1, dtype=torch.bool)
        cls[:, 0] = True
        pad = torch.zeros(t, 1, dtype=torch.bool)
        span = {name: torch.cat([pad, m], 1).reshape(-1) for name, m in (("asked", asked), ("other", other))}
        span["cls"] = cls.reshape(-1)
        span["background"] = ~(span["asked"] | span["other"] | span["cls"])
        vis = row[:, visual]  # (L, T·(P+1))
        shares = [vis[:, span[k]].sum(-1) for k in ("asked", "other", "cls", "background")]
        shares.append(row[:, ~visual].sum(-1))  # (L,) text
        area = torch.full_like(shares[0], span["asked"].float().mean().item())
        sums[sample.qa.qtype].append(torch.stack([*shares, area], -1))  # (L, 6)
    return {k: torch.stack(v).mean(0) for k, v in sums.items()}


def report_attention(name: str, shares: dict[str, torch.Tensor]) -> None:
    print(f"== {name}: last prompt token's attention by layer ({' / '.join(PARTS)}; asked object's area)")
    for qtype, table in sorted(shares.items()):
        for layer, values in enumerate(table.tolist()):
            print(f"{qtype:10s} layer {layer}: " + " / ".join(f"{v:.3f}" for v in values))


def report(name: str, samples, given: list[str]) -> None:
    print(f"== {name}")
    by_count: dict[tuple[str, int], list[bool]] = defaultdict(list)
    confusion: dict[str, Counter] = defaultdict(Counter)
    for sample, answer in zip(samples, given, strict=True):
        by_count[sample.qa.qtype, len(sample.clip.objects)].append(answer == sample.qa.answer)
        confusion[sample.qa.qtype][(sample.qa.answer, answer)] += 1
    for qtype in sorted({s.qa.qtype for s in samples}):
        cells = [f"{n} objects: {100 * sum(v) / len(v):.1f}% of {len(v)}"
                 for (t, n), v in sorted(by_count.items()) if t == qtype]
        print(f"{qtype:10s} " + " | ".join(cells))
        expected = sorted({a for a, _ in confusion[qtype]})
        for want in expected:
            row = {got: c for (a, got), c in confusion[qtype].items() if a == want}
            print(f"  {want:>9s} -> " + ", ".join(f"{g} {c}" for g, c in sorted(row.items(), key=lambda x: -x[1])))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--types", default="shape,colour", help=f"comma-separated, from {','.join(TRAIN_TYPES)}")
    ap.add_argument("--training-clips", type=int, default=0,
                    help="ask about the first N training clips instead of the held-out set")
    ap.add_argument("--limit", type=int, default=HELD_OUT_SIZE)
    ap.add_argument("--video", choices=("frames", "h264"), default="frames")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--attention", action="store_true", help="also measure the LM's attention (rendered frames)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--method", choices=("none", "random", "cls"), default="none",
                    help="encoder selection the answers are given under (default none)")
    ap.add_argument("--strategy", choices=TEMPORAL_STRATEGIES, default="uniform",
                    help="temporal strategy of --method cls (default uniform)")
    ap.add_argument("--reduction", type=float, default=0.0, help="encoder reduction of --method random|cls")
    args = ap.parse_args()
    if (args.method == "none") != (args.reduction == 0.0) or not 0.0 <= args.reduction < 1.0:
        ap.error("--reduction: give a value in (0, 1) with --method random|cls, and none without")
    spec = RowSpec(args.method, args.strategy if args.method == "cls" else None, args.reduction, 0.0, 2)
    types = [t for t in args.types.split(",") if t]
    allowed = TRAIN_TYPES if args.training_clips else EVAL_TYPES
    if unknown := set(types) - set(allowed):
        ap.error(f"--types: unknown {sorted(unknown)}; choose from {allowed}")
    if args.training_clips < 0:
        ap.error("--training-clips must be >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.training_clips:
        samples = training_samples(args.training_clips, types)
    else:
        samples = [s for s in held_out_set(args.limit) if s.qa.qtype in types]
    if args.attention and args.video != "frames":
        ap.error("--attention needs --video frames (object masks come from the rendered scene)")
    if args.video == "h264":
        samples = through_h264(samples, Settings())
    for path in args.models:
        qa_model = VideoQA.load(path)
        name = str(path) if args.method == "none" else f"{path} ({spec.label} at {spec.reduction:.0%} reduction)"
        report(name, samples, answers(qa_model, samples, args.batch_size, spec))
        if args.attention:
            report_attention(str(path), attention_shares(qa_model, samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
