"""Linear probes: what a checkpoint's vision tower hands the language model, frame by frame.

The language model reads the tower's layer −2 hidden states (``vision_feature_layer=-2``), one [CLS] and
P patch tokens per frame. Two probes on those features, fitted on three quarters of the frames of unseen
training-seed clips (rendered frames) and scored on the rest:

- [CLS]: multi-label logistic regression, frames whose colour–shape pairs / colours / shapes are all right;
- object patches: softmax regression, the shape and the colour of the object covering each patch, and the
  patch's own column and row in the frame's grid (where the object is: what direction questions need; the
  tower's position embeddings put it in every token, and the layers above may wash it out);
- [CLS] again: whether each frame's objects are in its left or right half (multi-label over colours).

Scales on the same frames: the mean norm of the layer −2 [CLS] and patch features, of the visual tokens the
projector makes of them, and of the text token embeddings they sit beside in the language model's input.

Then what encoder pruning keeps, on the first ``--selection-clips`` held-out clips read through H.264 as the
service reads them: for random, [CLS] uniform and [CLS] redundancy selection at 90 and 95% reduction, the
share of kept patches that hold an object pixel and the share of (frame, visible object) pairs with at
least one kept patch (objects covered).

Last, per object (``--object-clips``, through H.264): its shape and colour from the mean of the patch
features that hold its pixels over the clip, by a linear and an MLP probe, and whether the MLP finds the
object a shape word names among its clip's objects. That estimates how much of an object reaches a language
model that attends to exactly that object's tokens (a reader trained on more objects may get more).

    python scripts/probe_tower.py pipeline/assets/demo_model /path/to/other/model

Shapes: F frames, N = 1 + P tokens per frame, C vision width, L labels per frame, T frames per clip, K objects.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import VideoLlavaForConditionalGeneration

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.loopback import h264_round_trip  # noqa: E402
from pipeline.sources.preprocess import ClipPreprocessor  # noqa: E402
from pipeline.synthetic import COLOURS, SHAPES, TRAIN_SEED, held_out_sample, training_clip  # noqa: E402
from pruning.cls_scorer import ClsAttentionScorer  # noqa: E402
from pruning.config import PruningConfig  # noqa: E402
from pruning.temporal_budget import TemporalBudget  # noqa: E402

PROBE_SEED = TRAIN_SEED + 7  # clips no training run renders


def standardise(x: torch.Tensor, fit: torch.Tensor) -> torch.Tensor:
    return (x - fit.mean(0)) / (fit.std(0) + 1e-6)


def train_probe(probe: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                multi_label: bool, steps: int) -> torch.nn.Module:
    """Full-batch steps on (x, y): BCE for multi-hot targets, softmax cross-entropy for class indices."""
    for _ in range(steps):
        logits = probe(x)
        loss = F.binary_cross_entropy_with_logits(logits, y) if multi_label else F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return probe


def fit_linear(x: torch.Tensor, y: torch.Tensor, multi_label: bool, steps: int) -> torch.nn.Module:
    probe = torch.nn.Linear(x.shape[1], y.shape[1] if multi_label else int(y.max()) + 1)
    return train_probe(probe, torch.optim.Adam(probe.parameters(), lr=1e-2), x, y, multi_label, steps)


def fit_mlp(x: torch.Tensor, y: torch.Tensor, steps: int, hidden: int = 256) -> torch.nn.Module:
    """A one-hidden-layer softmax probe: what a small non-linear reader gets out of the features."""
    probe = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(),
                                torch.nn.Linear(hidden, int(y.max()) + 1))
    opt = torch.optim.AdamW(probe.parameters(), lr=3e-3, weight_decay=1e-2)
    return train_probe(probe, opt, x, y, multi_label=False, steps=steps)


@torch.no_grad()
def layer_features(model, path: Path, frames: np.ndarray, batch: int = 256) -> torch.Tensor:
    """(F, N, C) the tower's layer −2 hidden states, the features the projector reads."""
    x = ClipPreprocessor.from_pretrained(path)(frames)  # (F, 3, H, W), the checkpoint's own preprocessing
    tower = model.model.video_tower
    layer = model.config.vision_feature_layer
    return torch.cat([tower(x[i : i + batch], output_hidden_states=True).hidden_states[layer]
                      for i in range(0, len(x), batch)])


def left_half_labels(clip) -> np.ndarray:
    """(T, 2·colours) multi-hot: colour c shown in the left half (2c) or the right half (2c + 1)."""
    labels = np.zeros((len(clip.frames), 2 * len(COLOURS)), dtype=np.float32)
    width = clip.frames.shape[2]
    for obj in clip.objects:
        for t in np.flatnonzero(obj.visible):
            labels[t, 2 * list(COLOURS).index(obj.colours[t]) + int(obj.positions[t][0] >= width / 2)] = 1.0
    return labels


def probe(model, path: Path, clips: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    scenes = [training_clip(i, seed=PROBE_SEED) for i in range(clips)]
    frames = np.concatenate([s.frames for s in scenes])  # (F, H, W, 3)
    labels = torch.from_numpy(np.concatenate([s.frame_labels() for s in scenes]))  # (F, L)
    patch_labels = torch.from_numpy(np.concatenate([s.patch_labels() for s in scenes]))  # (F, P, 2)
    hs = layer_features(model, path, frames)  # (F, N, C)
    n_fit = len(frames) * 3 // 4

    cls = standardise(hs[:, 0], hs[:n_fit, 0])  # (F, C)
    head = fit_linear(cls[:n_fit], labels[:n_fit], multi_label=True, steps=steps)
    with torch.no_grad():
        right = (head(cls[n_fit:]) > 0) == (labels[n_fit:] > 0.5)  # (F_test, L)
    pairs, colours_end = len(COLOURS) * len(SHAPES), len(COLOURS) * len(SHAPES) + len(COLOURS)
    halves = torch.from_numpy(np.concatenate([left_half_labels(s) for s in scenes]))  # (F, 2·colours)
    half_head = fit_linear(cls[:n_fit], halves[:n_fit], multi_label=True, steps=steps)
    with torch.no_grad():
        half_right = ((half_head(cls[n_fit:]) > 0) == (halves[n_fit:] > 0.5)).all(-1)  # (F_test,)
    out = {
        "cls_halves_exact": half_right.float().mean().item(),
        "cls_pairs_exact": right[:, :pairs].all(-1).float().mean().item(),
        "cls_colours_exact": right[:, pairs:colours_end].all(-1).float().mean().item(),
        "cls_shapes_exact": right[:, colours_end:].all(-1).float().mean().item(),
    }
    with torch.no_grad():
        visual = model.model.multi_modal_projector(hs)  # (F, N, D) what the language model reads per frame
    out |= {
        "norm_cls_feature": hs[:, 0].norm(dim=-1).mean().item(),
        "norm_patch_feature": hs[:, 1:].norm(dim=-1).mean().item(),
        "norm_visual_token": visual.norm(dim=-1).mean().item(),
        "norm_text_embedding": model.get_input_embeddings().weight.norm(dim=-1).mean().item(),
    }

    on_object = patch_labels[..., 0] > 0  # (F, P)
    frame_of = torch.arange(len(frames)).unsqueeze(1).expand_as(on_object)[on_object]  # (K,)
    fit_rows = frame_of < n_fit
    patches = hs[:, 1:][on_object]  # (K, C) object patches only
    patches = standardise(patches, patches[fit_rows])
    grid = math.isqrt(on_object.shape[1])
    index = torch.arange(on_object.shape[1]).expand_as(on_object)  # (F, P) raster index
    targets = {"patch_shape_accuracy": patch_labels[..., 0][on_object], "patch_colour_accuracy":
               patch_labels[..., 1][on_object], "patch_column_accuracy": (index % grid)[on_object],
               "patch_row_accuracy": (index // grid)[on_object]}  # each (K,)
    for name, target in targets.items():
        head = fit_linear(patches[fit_rows], target[fit_rows], multi_label=False, steps=steps)
        with torch.no_grad():
            out[name] = (head(patches[~fit_rows]).argmax(-1) == target[~fit_rows]).float().mean().item()
    return out


def pooled_object_features(patches: torch.Tensor, counts: torch.Tensor, fuller_half: bool) -> torch.Tensor:
    """(K, C) each object's mean patch feature over the patches that hold its pixels in any frame; with
    ``fuller_half``, only those holding at least its median pixel count (its edges dropped): what a lookup
    of the asked object that weighs its own visual tokens evenly hands the layers above."""
    pooled = []
    for k in range(counts.shape[-1]):
        c = counts[..., k]  # (T, P) pixels of object k
        held = c > 0
        if fuller_half:
            held &= c >= c[held].float().median()
        pooled.append(patches[held].mean(0))  # (C,); every object has a pixel in some frame (checked by caller)
    return torch.stack(pooled)


def found_by_name(probs: torch.Tensor, target: torch.Tensor, clip_of: torch.Tensor) -> torch.Tensor:
    """(K,) bool: among its clip's objects, the one the probe rates likeliest to be ``target[k]`` is k itself.

    That is finding "the square" in the clip, which colour questions ("what colour is the square ?"), and
    direction questions half the time, must do before they can read anything off the object.
    probs (K, classes), target (K,), clip_of (K,) the clip each object is in.
    """
    found = torch.zeros(len(target), dtype=torch.bool)
    for c in clip_of.unique():
        objs = (clip_of == c).nonzero().squeeze(-1)  # (K_c,)
        rated = probs[objs][:, target[objs]]  # (K_c, K_c): [j, k] = P(object j is named as object k is)
        found[objs] = rated.argmax(0) == torch.arange(len(objs))
    return found


def object_probe(model, path: Path, clips: int, steps: int) -> dict[str, float]:
    """Shape and colour of each object from its pooled layer −2 patch features, frames read through H.264.

    Fitted on the objects of the first three quarters of the clips, scored on the rest, with a linear and a
    256-wide MLP softmax probe; colour only on objects whose colour does not change during the clip.
    """
    torch.manual_seed(0)
    scenes = [training_clip(i, seed=PROBE_SEED) for i in range(clips)]
    with tempfile.TemporaryDirectory() as workdir:
        frames = np.concatenate([h264_round_trip(s.frames, workdir) for s in scenes])  # (F, H, W, 3)
    patches = layer_features(model, path, frames)[:, 1:]  # (F, P, C)
    t = len(scenes[0].frames)
    rows: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    shape_ids, colour_ids, fit_rows, clip_ids = [], [], [], []
    for i, scene in enumerate(scenes):
        counts = torch.from_numpy(scene.object_pixel_counts())  # (T, P, K)
        drawn = counts.sum((0, 1)) > 0  # (K,) objects covered in every frame by later ones have no pixels
        for fuller_half in rows:
            rows[fuller_half].append(pooled_object_features(patches[i * t : (i + 1) * t], counts[..., drawn], fuller_half))
        objects = [obj for obj, d in zip(scene.objects, drawn, strict=True) if d]
        shape_ids += [SHAPES.index(obj.shape) for obj in objects]
        colour_ids += [-1 if obj.changes_colour else list(COLOURS).index(obj.colour) for obj in objects]
        fit_rows += [i < clips * 3 // 4] * len(objects)
        clip_ids += [i] * len(objects)
    shapes, colours, fit = torch.tensor(shape_ids), torch.tensor(colour_ids), torch.tensor(fit_rows)  # each (K,)
    clip_of = torch.tensor(clip_ids)  # (K,)
    out = {"objects_fitted": float(fit.sum()), "objects_scored": float((~fit).sum())}
    for fuller_half, pooled in rows.items():
        x = torch.cat(pooled)  # (K, C)
        x = standardise(x, x[fit])
        prefix = "object_fuller_half" if fuller_half else "object"
        for name, target in (("shape", shapes), ("colour", colours)):
            known = target >= 0  # (K,)
            train, test = fit & known, ~fit & known
            for kind, head in (("linear", fit_linear(x[train], target[train], multi_label=False, steps=steps)),
                               ("mlp", fit_mlp(x[train], target[train], steps=steps))):
                with torch.no_grad():
                    probs = head(x[test]).softmax(-1)  # (K_test, classes)
                right = probs.argmax(-1) == target[test]  # (K_test,)
                out[f"{prefix}_{name}_{kind}"] = right.float().mean().item()
                if name == "shape" and kind == "mlp" and not fuller_half:  # which shapes the features tell apart
                    out |= {f"object_shape_mlp_recall_{shape}": right[target[test] == s].float().mean().item()
                            for s, shape in enumerate(SHAPES)}
                    found = found_by_name(probs, target[test], clip_of[test])  # (K_test,)
                    in_clip = torch.bincount(clip_of[test])[clip_of[test]]  # (K_test,) objects in the same clip
                    out["object_found_by_shape_mlp"] = found.float().mean().item()
                    out |= {f"object_found_by_shape_mlp_{n}_objects": found[in_clip == n].float().mean().item()
                            for n in in_clip.unique().tolist()}
    return out


SELECTIONS = (("random", "uniform"), ("cls", "uniform"), ("cls", "redundancy"))


@torch.no_grad()
def selection(model, path: Path, clips: int, reductions: tuple[float, ...] = (0.9, 0.95)) -> dict[str, float]:
    """Share of kept patches on objects and of (frame, object) pairs covered, per selection and reduction."""
    scorer = ClsAttentionScorer(model.model.video_tower, model.config.vision_feature_layer)
    preprocess = ClipPreprocessor.from_pretrained(path)
    random_scores = torch.Generator().manual_seed(0)
    on_objects: dict[str, list[float]] = {}
    covered: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for i in range(clips):
            clip = held_out_sample(i).clip
            out = scorer(preprocess(h264_round_trip(clip.frames, workdir)))  # features (T, 1+P, C)
            present = torch.from_numpy(clip.object_pixel_counts() > 0)  # (T, P, K)
            visible = present.any(1)  # (T, K) objects with a pixel in the frame
            on_object = present.any(-1)  # (T, P) patches holding an object pixel
            t, p = out.cls_scores.shape
            for method, strategy in SELECTIONS:
                scores = out.cls_scores if method == "cls" else torch.rand(t, p, generator=random_scores)  # (T, P)
                for r in reductions:
                    budget = PruningConfig(encoder_method=method, encoder_reduction=r).patch_budget(t, p)
                    keep = TemporalBudget(strategy).keep_mask(scores, budget, out.features[:, 1:])  # (T, P)
                    name = f"{method} {strategy} {round(r * 100)}%"
                    on_objects.setdefault(name, []).append(on_object[keep].float().mean().item())
                    hit = (present & keep.unsqueeze(-1)).any(1)  # (T, K) object with a kept patch
                    covered.setdefault(name, []).append((hit[visible].sum() / visible.sum()).item())
    return {f"{name}: on_objects": float(np.mean(on_objects[name])) for name in on_objects} | {
        f"{name}: objects_covered": float(np.mean(covered[name])) for name in covered}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", type=Path, nargs="+", help="checkpoint folders (save_pretrained)")
    ap.add_argument("--clips", type=int, default=400, help="clips of 8 frames; 3/4 of the frames fit the probes")
    ap.add_argument("--steps", type=int, default=400, help="full-batch Adam steps per probe")
    ap.add_argument("--selection-clips", type=int, default=150, help="held-out clips for the selection shares")
    ap.add_argument("--object-clips", type=int, default=800,
                    help="clips for the per-object probes (through H.264); 0 skips them")
    ap.add_argument("--object-steps", type=int, default=600, help="full-batch steps per per-object probe")
    args = ap.parse_args()
    for path in args.models:
        model = VideoLlavaForConditionalGeneration.from_pretrained(path).eval()
        res = probe(model, path, args.clips, args.steps)
        print(path, " ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
        for name, value in selection(model, path, args.selection_clips).items():
            print(f"{path} {name}={value:.3f}", flush=True)
        if args.object_clips:
            res = object_probe(model, path, args.object_clips, args.object_steps)
            print(path, " ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
