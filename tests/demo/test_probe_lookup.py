"""scripts/probe_lookup.py: its clips hold exactly the objects asked for, its model keeps the tower and starts
the language model fresh, and a short probe learns what the shipped tower's patches carry (colour)."""

from __future__ import annotations

import pytest
import torch
from transformers import VideoLlavaForConditionalGeneration

from pipeline.demo_model import demo_model_path


@pytest.fixture(scope="module")
def lookup(load_script):
    return load_script("probe_lookup")


def test_clips_hold_exactly_the_objects_asked_for_and_no_event(lookup):
    for n in (1, 3):
        clips = lookup.clips(lookup.EVAL_CLIPS_SEED, 4, n)
        assert [len(c.objects) for c in clips] == [n] * 4
        assert all(c.event == "none" and all(o.always_visible for o in c.objects) for c in clips)
    with pytest.raises(ValueError, match="objects must be in"):
        lookup.clips(lookup.EVAL_CLIPS_SEED, 1, 0)


def test_fresh_model_keeps_the_frozen_tower_and_starts_the_language_model_from_its_seed(lookup):
    saved = VideoLlavaForConditionalGeneration.from_pretrained(demo_model_path()).state_dict()
    a = lookup.fresh_model(demo_model_path(), seed=0)
    b = lookup.fresh_model(demo_model_path(), seed=0)
    c = lookup.fresh_model(demo_model_path(), seed=1)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    towers = [k for k in saved if "tower" in k]
    assert towers and all(torch.equal(state_a[k], saved[k]) for k in towers)
    lm = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state_a[lm], saved[lm])
    assert torch.equal(state_a[lm], state_b[lm]) and not torch.equal(state_a[lm], state_c[lm])
    assert all(p.requires_grad == ("tower" not in n) for n, p in a.named_parameters())
    wide = lookup.fresh_model(demo_model_path(), seed=0, rope_theta=1e6)
    slowest = wide.model.language_model.rotary_emb.inv_freq[-1]  # the rotary base sets the slowest frequency
    assert slowest < a.model.language_model.rotary_emb.inv_freq[-1] / 10
    assert torch.equal(wide.state_dict()[lm], state_a[lm])  # same weights from the same seed


def test_a_short_probe_learns_colour_on_one_object_clips_from_the_shipped_tower(lookup):
    history = lookup.probe(demo_model_path(), ["colour"], 1, steps=45, train_clips=64, eval_clips=32, batch=8,
                           lr=3e-3, projector_lr_scale=0.1, eval_every=45, video="frames", seed=0,
                           text_layers=4, log=lambda _msg: None)  # the 4-layer probe docs/demo_model.md ran
    assert [h["step"] for h in history] == [0, 45]
    before, after = history[0]["by_type"]["colour"], history[-1]["by_type"]["colour"]
    assert before["questions"] == after["questions"] == 32  # one colour question per one-object clip
    # Chance is 1/6; a linear probe reads colour from these features at 1.0 (docs/demo_model.md).
    assert after["accuracy"] > 0.6 and after["accuracy"] > before["accuracy"] + 0.3
    assert history[0]["loss"] is None and history[-1]["loss"] > 0  # mean answer-token loss of steps 1..45
    assert history[-1]["lookup_loss"] == 0.0  # not asked for


def test_the_lookup_loss_is_trained_beside_the_answers_when_asked_for(lookup):
    history = lookup.probe(demo_model_path(), ["shape"], 3, steps=4, train_clips=16, eval_clips=8, batch=4,
                           lr=3e-3, projector_lr_scale=0.1, eval_every=4, video="frames", seed=0,
                           lookup_loss=1.0, lookup_layers=(1,), log=lambda _msg: None)
    # −log of head 0's attention mass on the asked object: objects hold a few percent of the video tokens.
    assert history[-1]["lookup_loss"] > 1.0 and history[-1]["loss"] > 0


def test_lookup_layers_must_be_layer_indices_of_the_language_model(lookup, capsys):
    with pytest.raises(SystemExit):
        lookup.main([str(demo_model_path()), "--lookup-layers", "1,x"])
    assert "--lookup-layers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lookup_layers: the language model has layers 0..3"):
        lookup.probe(demo_model_path(), ["shape"], 3, steps=1, train_clips=1, eval_clips=1, batch=1, lr=1e-3,
                     projector_lr_scale=0.1, eval_every=1, video="frames", seed=0, lookup_loss=1.0,
                     lookup_layers=(1, 4), text_layers=4)


def test_types_outside_the_training_types_are_refused(lookup, capsys):
    with pytest.raises(SystemExit):
        lookup.main([str(demo_model_path()), "--types", "shape,smell"])
    assert "--types" in capsys.readouterr().err
