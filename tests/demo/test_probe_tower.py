"""scripts/probe_tower.py: its labels say where each object is, and its probes read what the features carry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import VideoLlavaForConditionalGeneration

from pipeline.demo_model import demo_model_path
from pipeline.synthetic import COLOURS, SHAPES, render_clip


@pytest.fixture(scope="module")
def probe_tower(load_script):
    return load_script("probe_tower")


def test_left_half_labels_follow_each_colour_across_the_middle(probe_tower):
    clip = render_clip(np.random.default_rng(21), event="change", num_objects=3)
    labels = probe_tower.left_half_labels(clip)  # (T, 2·colours)
    assert labels.shape == (8, 2 * len(COLOURS))
    assert (labels.sum(1) == 3).all()  # three objects, each in one half of every frame
    for obj in clip.objects:
        for t in (0, 7):
            c = list(COLOURS).index(obj.colours[t])
            right = obj.positions[t][0] >= 32
            assert labels[t, 2 * c + int(right)] == 1 and labels[t, 2 * c + int(not right)] == 0


def test_probes_read_colour_from_the_shipped_towers_object_patches(probe_tower):
    path = demo_model_path()
    model = VideoLlavaForConditionalGeneration.from_pretrained(path).eval()
    out = probe_tower.probe(model, path, clips=12, steps=150)
    assert set(out) >= {"patch_column_accuracy", "patch_row_accuracy", "cls_halves_exact", "patch_colour_accuracy"}
    # Colour is what every tower here carries in its patches (0.99 with the default 400 clips); chance is 1/6.
    assert out["patch_colour_accuracy"] > 0.5
    assert all(0 <= v <= 1 for k, v in out.items() if not k.startswith("norm_"))


def test_pooled_object_features_average_each_objects_own_patches(probe_tower):
    patches = torch.arange(2 * 3, dtype=torch.float32).reshape(2, 3, 1)  # (T=2, P=3, C=1): value = 3t + p
    counts = torch.zeros(2, 3, 2, dtype=torch.int64)  # (T, P, K)
    counts[0, 0, 0], counts[1, 1, 0], counts[1, 2, 0] = 40, 9, 64  # object 0: three patches, one mostly edge
    counts[0, 2, 1] = 5  # object 1: one patch
    pooled = probe_tower.pooled_object_features(patches, counts, fuller_half=False)  # (K, C)
    assert pooled.squeeze(-1).tolist() == [(0 + 4 + 5) / 3, 2.0]
    fuller = probe_tower.pooled_object_features(patches, counts, fuller_half=True)
    assert fuller.squeeze(-1).tolist() == [(0 + 5) / 2, 2.0]  # the 9-pixel patch is below object 0's median


def test_object_probe_reads_colour_off_the_shipped_towers_objects(probe_tower):
    path = demo_model_path()
    model = VideoLlavaForConditionalGeneration.from_pretrained(path).eval()
    out = probe_tower.object_probe(model, path, clips=16, steps=150)
    assert out["objects_fitted"] > 20 and out["objects_scored"] > 5
    accuracies = {k: v for k, v in out.items() if not k.startswith("objects_")}
    assert set(accuracies) >= {f"object{half}_{target}_{kind}" for half in ("", "_fuller_half")
                               for target in ("shape", "colour") for kind in ("linear", "mlp")} | {
        f"object_shape_mlp_recall_{shape}" for shape in SHAPES} | {"object_found_by_shape_mlp"}
    assert all(0 <= v <= 1 for v in accuracies.values())
    # Pooled over an object, colour is all but certain on every tower here (1.000 with 800 clips); chance 1/6.
    assert out["object_colour_linear"] > 0.5 and out["object_colour_mlp"] > 0.5


def test_found_by_name_picks_the_likeliest_object_within_each_clip(probe_tower):
    # Clip 0: objects 0 and 1 named 0 and 1; the probe rates object 1 likelier than object 0 to be name 0, so
    # object 0 is not found, object 1 is. Clip 1: one object, found whatever the probe says of it.
    probs = torch.tensor([[0.3, 0.2, 0.5], [0.4, 0.6, 0.0], [0.1, 0.0, 0.9]])  # (K=3, classes=3)
    target = torch.tensor([0, 1, 0])
    clip_of = torch.tensor([0, 0, 1])
    assert probe_tower.found_by_name(probs, target, clip_of).tolist() == [False, True, True]
