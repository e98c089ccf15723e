"""Spend one clip's patch-token budget across its frames; return each frame's kept patches in raster order.

Strategies (selected by name, see STRATEGIES):
    uniform     the same count in every frame (FasterVLM's video recipe; the remainder goes to the first frames)
    global      one top-k over all frames' scores, each frame's scores first normalised to sum to 1
    redundancy  ours: a patch's value is its normalised score × its novelty, novelty = 1 − the highest cosine
                similarity to the same patch position in ANY earlier frame of the clip (DyCoke compares with the
                previous frame only; comparing with all earlier frames also catches A-B-A cuts and flicker).
                Features are centred on the clip mean first, because raw ViT features are anisotropic (unrelated
                patches already have a high cosine). Then one top-k over the clip, so frames whose content is
                new take the budget that repeated frames free.
Every strategy keeps exactly ``budget`` patches (or all of them when the budget exceeds T·P) and at least
``min_per_frame`` in every frame.

Shape legend: T frames, P patches per frame, D feature width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Redundant patches keep a tiny value so that, among themselves, the more salient still win.
NOVELTY_FLOOR = 1e-3


def _top_with_floor(values: torch.Tensor, budget: int, min_per_frame: int) -> torch.Tensor:
    """Keep mask [T, P]: the top ``min_per_frame`` of each frame, then the global top of what is left."""
    t, p = values.shape
    keep = torch.zeros(t, p, dtype=torch.bool, device=values.device)  # [T, P]
    if min_per_frame > 0:
        floor_idx = values.topk(min_per_frame, dim=1).indices  # [T, min]
        keep.scatter_(1, floor_idx, True)
    rest = budget - int(keep.sum())
    if rest > 0:
        masked = values.masked_fill(keep, float("-inf")).flatten()  # [T·P]
        keep.view(-1)[masked.topk(rest).indices] = True
    return keep


def uniform(scores: torch.Tensor, features: torch.Tensor | None, budget: int, min_per_frame: int) -> torch.Tensor:
    t, p = scores.shape
    counts = [budget // t + (1 if i < budget % t else 0) for i in range(t)]
    keep = torch.zeros(t, p, dtype=torch.bool, device=scores.device)  # [T, P]
    for i, count in enumerate(counts):
        keep[i, scores[i].topk(count).indices] = True
    return keep


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    # [CLS] rows of different frames spend different mass on the [CLS] key itself; a distribution over patches
    # per frame makes frames comparable.
    scores = scores.float().clamp_min(0)
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-12)  # [T, P]


def global_topk(scores: torch.Tensor, features: torch.Tensor | None, budget: int, min_per_frame: int) -> torch.Tensor:
    return _top_with_floor(_normalised(scores), budget, min_per_frame)


def patch_novelty(features: torch.Tensor) -> torch.Tensor:
    """Novelty [T, P] in [0, 2]: 1 − max cosine to the same patch position in earlier frames; 1 for frame 0."""
    t, p, _ = features.shape
    centred = features.float()
    centred = centred - centred.mean(dim=(0, 1), keepdim=True)  # [T, P, D]
    unit = torch.nn.functional.normalize(centred, dim=-1).transpose(0, 1)  # [P, T, D]
    sim = unit @ unit.transpose(1, 2)  # [P, T, T] cosine of patch p between frames t and s
    earlier = torch.ones(t, t, dtype=torch.bool, device=features.device).tril(-1)  # [T, T]: s < t
    best = sim.masked_fill(~earlier, float("-inf")).amax(dim=2).transpose(0, 1)  # [T, P]; frame 0: −inf
    return torch.where(torch.isinf(best), torch.ones_like(best), 1.0 - best)


def redundancy(scores: torch.Tensor, features: torch.Tensor | None, budget: int, min_per_frame: int) -> torch.Tensor:
    if features is None:
        raise ValueError("temporal_strategy='redundancy' needs the frames' features")
    value = _normalised(scores) * patch_novelty(features).clamp_min(NOVELTY_FLOOR)  # [T, P]
    return _top_with_floor(value, budget, min_per_frame)


Strategy = Callable[[torch.Tensor, "torch.Tensor | None", int, int], torch.Tensor]
STRATEGIES: dict[str, Strategy] = {"uniform": uniform, "global": global_topk, "redundancy": redundancy}


class TemporalBudget:
    """Choose the kept patches of every frame of one clip under a total budget."""

    def __init__(self, strategy: str, min_per_frame: int = 1):
        if strategy not in STRATEGIES:
            raise ValueError(f"temporal_strategy must be one of {tuple(STRATEGIES)}, got {strategy!r}")
        self.strategy = strategy
        self.min_per_frame = min_per_frame

    def keep_mask(self, scores: torch.Tensor, budget: int, features: torch.Tensor | None = None) -> torch.Tensor:
        """Bool [T, P] with exactly min(budget, T·P) True, ≥ min_per_frame per frame."""
        t, p = scores.shape
        if budget >= t * p:
            return torch.ones(t, p, dtype=torch.bool, device=scores.device)
        if budget < t * self.min_per_frame:
            raise ValueError(f"budget {budget} is below num_frames × min_per_frame = {t} × {self.min_per_frame}")
        return STRATEGIES[self.strategy](scores, features, budget, self.min_per_frame)

    def select(self, scores: torch.Tensor, budget: int, features: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Kept patch indices per frame, each sorted ascending (raster order)."""
        keep = self.keep_mask(scores, budget, features)  # [T, P]
        return [row.nonzero().flatten() for row in keep]


def merge_dropped(features: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Fold every dropped patch into its most similar kept patch of the same frame (score-weighted average).

    features [T, P, D], scores [T, P], keep [T, P] bool → merged features [T, P, D] (only kept rows are meaningful).
    """
    t, p, d = features.shape
    unit = torch.nn.functional.normalize(features.float(), dim=-1)  # [T, P, D]
    sim = unit @ unit.transpose(1, 2)  # [T, P, P]
    sim = sim.masked_fill(~keep[:, None, :], float("-inf"))
    target = sim.argmax(dim=-1)  # [T, P]: kept patch each patch folds into (a kept patch folds into itself)
    target = torch.where(keep, torch.arange(p, device=features.device).expand(t, p), target)
    weight = scores.float().clamp_min(1e-12)  # [T, P]
    summed = torch.zeros(t, p, d, device=features.device).scatter_add_(
        1, target[..., None].expand(t, p, d), features.float() * weight[..., None]
    )  # [T, P, D]
    mass = torch.zeros(t, p, device=features.device).scatter_add_(1, target, weight)  # [T, P]
    merged = summed / mass.clamp_min(1e-12)[..., None]
    return torch.where(keep[..., None], merged, features.float()).to(features.dtype)
