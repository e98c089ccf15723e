"""scripts/probe_tower.py: its labels say where each object is, and its probes read what the features carry."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import VideoLlavaForConditionalGeneration

from pipeline.demo_model import demo_model_path
from pipeline.synthetic import COLOURS, render_clip


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
