"""Temporal budget strategies: exact budget, raster order, range, per-frame minimum; redundancy favours new content."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IMAGE_SIZE

from pruning.config import PruningConfig
from pruning.temporal_budget import STRATEGIES, TemporalBudget, merge_dropped, patch_novelty
from pruning.vlm import PrunedVLM

T, P, D = 6, 40, 16


def clip_features(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(T, P, D, generator=generator)  # [T, P, D]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("budget", [6, 7, 13, 60, 120, 239])
@pytest.mark.parametrize("min_per_frame", [0, 1, 2])
def test_exact_budget_sorted_in_range_with_minimum(strategy, budget, min_per_frame):
    if budget < T * min_per_frame:
        return
    g = torch.Generator().manual_seed(budget * 10 + min_per_frame)
    scores = torch.rand(T, P, generator=g) ** 4  # skewed, like [CLS] attention
    scores[2] *= 50  # one frame dominates the global ranking
    selector = TemporalBudget(strategy, min_per_frame)
    kept = selector.select(scores, budget, clip_features(g))
    assert len(kept) == T
    assert sum(k.numel() for k in kept) == budget
    for k in kept:
        assert k.numel() >= min_per_frame
        assert torch.equal(k, k.sort().values) and k.unique().numel() == k.numel()
        assert bool(((k >= 0) & (k < P)).all())


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_budget_above_total_keeps_everything(strategy):
    scores = torch.rand(T, P)
    kept = TemporalBudget(strategy).select(scores, T * P + 5, torch.randn(T, P, D))
    assert all(torch.equal(k, torch.arange(P)) for k in kept)


def test_budget_below_minimum_raises():
    with pytest.raises(ValueError, match="min_per_frame"):
        TemporalBudget("global", 3).select(torch.rand(T, P), T * 3 - 1, None)


def test_unknown_strategy_raises():
    with pytest.raises(ValueError, match="temporal_strategy"):
        TemporalBudget("best")


def test_uniform_keeps_each_frames_top_scores():
    scores = torch.rand(T, P)
    kept = TemporalBudget("uniform").select(scores, T * 5)
    for frame, k in zip(scores, kept, strict=True):
        assert torch.equal(k, frame.topk(5).indices.sort().values)


def test_global_follows_salience_across_frames():
    scores = torch.full((T, P), 1.0)
    scores[3, :10] = 100.0  # frame 3 has ten patches far above everything else
    kept = TemporalBudget("global", min_per_frame=1).select(scores, T - 1 + 10)
    assert kept[3].numel() == 10 + 1 - 1  # its own minimum is among its ten salient patches
    assert [k.numel() for i, k in enumerate(kept) if i != 3] == [1] * (T - 1)


def test_redundancy_gives_a_repeated_frame_less_than_a_novel_one():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(P, D, generator=g) for _ in range(3))
    features = torch.stack([a, a, b, a + 0.01 * torch.randn(P, D, generator=g), c, b])  # [T, P, D]
    scores = torch.rand(T, P, generator=g)
    kept = TemporalBudget("redundancy", min_per_frame=1).select(scores, 60, features)
    counts = [k.numel() for k in kept]
    # frames 1, 3 repeat frame 0 and frame 5 repeats frame 2 (A-B-A: not only the previous frame)
    for repeated in (1, 3, 5):
        for novel in (0, 2, 4):
            assert counts[repeated] < counts[novel], counts
    assert counts[1] == counts[3] == counts[5] == 1
    uniform = [k.numel() for k in TemporalBudget("uniform").select(scores, 60)]
    assert uniform == [10] * T


def test_patch_novelty_is_local_to_the_patch():
    g = torch.Generator().manual_seed(1)
    first = torch.randn(P, D, generator=g)
    second = first.clone()
    second[7] = torch.randn(D, generator=g)  # one patch changes
    novelty = patch_novelty(torch.stack([first, second]))
    assert torch.allclose(novelty[0], torch.ones(P))
    assert novelty[1, 7] > 0.5
    assert novelty[1].masked_fill(torch.arange(P) == 7, 0).abs().max() < 1e-5


def test_merge_dropped_folds_dropped_patches_into_their_nearest_kept_patch():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(1, 4, D, generator=g)
    features[0, 1] = features[0, 0] * 2 + 0.01  # patch 1 is nearest to patch 0
    scores = torch.tensor([[1.0, 3.0, 1.0, 1.0]])
    keep = torch.tensor([[True, False, True, True]])
    merged = merge_dropped(features, scores, keep)
    sim = torch.nn.functional.normalize(features[0], dim=-1) @ torch.nn.functional.normalize(features[0], dim=-1).T
    assert int(sim[1, [0, 2, 3]].argmax()) == 0
    expected = (1.0 * features[0, 0] + 3.0 * features[0, 1]) / 4.0
    assert torch.allclose(merged[0, 0], expected, atol=1e-6)
    assert torch.equal(merged[0, 2:], features[0, 2:])
    assert torch.allclose(merge_dropped(features, scores, torch.ones_like(keep)), features, atol=1e-6)


def test_redundancy_on_a_real_clip_with_repeated_frames(video_llava):
    vlm = PrunedVLM(video_llava)
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g) for _ in range(2))
    clip = torch.stack([a, a, b, a])[None]  # [1, T=4, C, H, W]: frames 1 and 3 repeat frame 0
    config = PruningConfig("cls", encoder_budget=24, temporal_strategy="redundancy", min_per_frame=1)
    visual = vlm.encode_and_select(clip, config=config)
    patches = [n - 1 for n in visual.kept_per_frame()[0]]  # minus each frame's [CLS]
    assert sum(patches) == 24
    assert patches[1] == patches[3] == 1
    assert patches[0] > 1 and patches[2] > 1
