from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from pipeline.synthetic import (
    CAPTION_PROMPT,
    COLOURS,
    DIRECTIONS,
    EVAL_TYPES,
    HELD_OUT_SEED,
    NO_EVENT,
    SHAPES,
    TRAIN_SEED,
    TRAIN_TYPES,
    VALIDATION_SEED,
    caption,
    held_out_sample,
    held_out_set,
    questions_of_type,
    render_clip,
    training_clip,
    training_conversation,
    vocabulary,
)


def _digest(frames: np.ndarray) -> str:
    return hashlib.sha1(frames.tobytes()).hexdigest()


def test_clips_are_seeded_and_deterministic():
    a, b = training_clip(3), training_clip(3)
    assert np.array_equal(a.frames, b.frames)
    assert caption(a) == caption(b)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert training_conversation(a, rng_a) == training_conversation(b, rng_b)
    assert not np.array_equal(training_clip(4).frames, a.frames)
    assert held_out_sample(7).qa == held_out_sample(7).qa


def test_clip_layout_and_small_objects():
    clip = training_clip(0)
    assert clip.frames.shape == (8, 64, 64, 3) and clip.frames.dtype == np.uint8
    mask = clip.patch_mask()
    assert mask.shape == (8, 64)  # 8 x 8 patches of 8 px
    shares = [training_clip(i).patch_mask().mean() for i in range(40)]
    # Objects are a few patches each: well under a quarter of the frame even with four of them.
    assert 0.02 < float(np.mean(shares)) < 0.25
    assert max(shares) < 0.4


def test_background_is_textured_not_flat():
    frame = training_clip(1).frames[0].astype(float)
    background = frame[~training_clip(1).masks[0]]
    assert background.std(axis=0).mean() > 5.0


def test_direction_answers_match_the_motion():
    for i in range(30):
        clip = training_clip(i)
        for qa in questions_of_type(clip, "direction", np.random.default_rng(i)):
            obj = clip.objects[qa.subject]
            moved = obj.positions[-1] - obj.positions[0]
            assert np.sign(moved).astype(int).tolist() == list(DIRECTIONS[qa.answer])


def test_time_answers_live_in_the_event_frames():
    seen = Counter()
    for i in range(60):
        clip = render_clip(np.random.default_rng([1, i]))
        for qa in questions_of_type(clip, "time", np.random.default_rng(i)):
            seen[clip.event] += 1
            if clip.event == "none":
                assert qa.answer == NO_EVENT
                continue
            obj = clip.objects[clip.event_object]
            if clip.event == "appear":
                assert not obj.visible[: clip.event_frame].any() and obj.visible[clip.event_frame :].all()
            elif clip.event == "disappear":
                assert obj.visible[: clip.event_frame].all() and not obj.visible[clip.event_frame :].any()
            else:
                assert obj.colours[clip.event_frame - 1] != obj.colours[clip.event_frame]
            assert qa.answer in (obj.shape, obj.colour, obj.colours[-1])
    assert set(seen) == {"none", "appear", "disappear", "change"}


def test_held_out_set_is_balanced_and_disjoint_from_training_and_validation():
    held = held_out_set(60)
    types = Counter(s.qa.qtype for s in held)
    assert set(types) == set(EVAL_TYPES) and len(set(types.values())) == 1
    words = set(vocabulary())
    assert all(s.qa.answer in words and len(s.qa.answer.split()) == 1 for s in held)
    assert HELD_OUT_SEED != TRAIN_SEED
    train = {_digest(training_clip(i).frames) for i in range(150)}
    assert not train & {_digest(s.clip.frames) for s in held}
    validation = held_out_set(60, seed=VALIDATION_SEED)  # picks the training checkpoint
    assert len({HELD_OUT_SEED, TRAIN_SEED, VALIDATION_SEED}) == 3
    assert not {_digest(s.clip.frames) for s in validation} & ({_digest(s.clip.frames) for s in held} | train)
    answers = Counter(s.qa.answer for s in held if s.qa.qtype == "shape")
    assert set(answers) <= set(SHAPES) and len(answers) >= 3


def test_training_conversations_cover_types_without_leaking_pairs():
    rng = np.random.default_rng(0)
    types = Counter()
    for i in range(40):
        turns = training_conversation(training_clip(i), rng, max_turns=10)
        assert len({t.question for t in turns}) == len(turns)
        asked = [t.subject for t in turns if t.qtype in ("colour", "shape")]
        assert len(asked) == len(set(asked))
        types.update(t.qtype for t in turns)
    assert set(EVAL_TYPES) <= set(types) and "caption" in types


def test_caption_is_one_sentence_naming_every_object():
    clip = training_clip(2)
    text = caption(clip)
    assert text.endswith(" .") and text.count(".") == 1
    for obj in clip.objects:
        assert f"{obj.colour} {obj.shape}" in text
    assert set(text.split()) <= set(vocabulary()) and set(CAPTION_PROMPT.split()) <= set(vocabulary())


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: render_clip(np.random.default_rng(0), event="explode"), "event"),
        (lambda: render_clip(np.random.default_rng(0), num_objects=9), "num_objects"),
        (lambda: held_out_set(0), "num_questions"),
        (lambda: training_conversation(training_clip(0), np.random.default_rng(0), max_turns=0), "max_turns"),
        (lambda: questions_of_type(training_clip(0), "smell", np.random.default_rng(0)), "qtype"),
    ],
)
def test_bad_input_names_the_parameter(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_frame_labels_name_what_each_frame_shows():
    clip = render_clip(np.random.default_rng(11), event="appear")
    labels = clip.frame_labels()
    assert labels.shape == (8, 6 * 4 + 6 + 4)
    obj = clip.objects[clip.event_object]
    shape_col = 6 * 4 + 6 + SHAPES.index(obj.shape)
    assert labels[: clip.event_frame, shape_col].sum() == 0 and labels[clip.event_frame :, shape_col].all()
    visible = np.stack([o.visible for o in clip.objects]).sum(0)  # (T,) objects shown per frame
    assert (labels[:, :24].sum(1) == visible).all()


def test_frame_place_labels_put_each_colour_and_shape_under_its_centre():
    clip = render_clip(np.random.default_rng(13), event="disappear", num_objects=3)
    labels = clip.frame_place_labels()  # (T, (6 + 4) · 2 · 8)
    assert labels.shape == (8, 10 * 16)
    obj = clip.objects[clip.event_object]
    x, y = obj.positions[0]
    colour = list(COLOURS).index(obj.colour)
    assert labels[0, colour * 16 + int(x) // 8] == 1 and labels[0, colour * 16 + 8 + int(y) // 8] == 1
    shape = 6 + SHAPES.index(obj.shape)
    assert labels[0, shape * 16 : shape * 16 + 16].sum() == 2
    # Gone after it disappears; every shown object sets one column and one row for its colour and its shape.
    assert labels[clip.event_frame :, shape * 16 : shape * 16 + 16].sum() == 0
    visible = np.stack([o.visible for o in clip.objects]).sum(0)  # (T,)
    assert (labels.sum(1) == 4 * visible).all()


def test_patch_labels_name_the_object_in_each_patch():
    clip = render_clip(np.random.default_rng(12), event="change", num_objects=2)
    labels = clip.patch_labels()  # (T, P, 2)
    assert labels.shape == (8, 64, 2)
    assert ((labels[..., 0] > 0) == clip.patch_mask()).all()  # labelled exactly where object pixels are
    obj = clip.objects[clip.event_object]
    for t in (0, 7):
        x, y = obj.positions[t]
        centre = int(y) // 8 * 8 + int(x) // 8  # raster index of the patch under the object's centre
        assert labels[t, centre, 0] == 1 + SHAPES.index(obj.shape)
        assert labels[t, centre, 1] == 1 + list(COLOURS).index(obj.colours[t])
    assert obj.colours[0] != obj.colours[7]  # the change event shows up in the colour labels


def test_object_pixel_counts_place_each_object_in_its_own_patches():
    clip = render_clip(np.random.default_rng(5), event="disappear", num_objects=3)
    counts = clip.object_pixel_counts()  # (T, P, K)
    assert counts.shape == (8, 64, 3)
    assert ((counts.sum(-1) > 0) == clip.patch_mask()).all()  # some object's pixels exactly where the mask is
    leaver = clip.objects[clip.event_object]
    gone = np.flatnonzero(~leaver.visible)
    assert len(gone) > 0 and (counts[gone, :, clip.event_object] == 0).all()  # no pixels once it has left
    x, y = leaver.positions[0]
    assert counts[0, int(y) // 8 * 8 + int(x) // 8, clip.event_object] > 0  # its centre's patch holds its pixels


def test_training_conversation_asks_only_the_given_types_and_defaults_to_what_it_always_drew():
    clip = training_clip(3)
    default = training_conversation(clip, np.random.default_rng(0), 10)
    assert default == training_conversation(clip, np.random.default_rng(0), 10, types=TRAIN_TYPES)
    only = training_conversation(clip, np.random.default_rng(0), 10, caption_share=0.0, types=("position", "count"))
    assert only and {qa.qtype for qa in only} <= {"position", "count"}
    with pytest.raises(ValueError, match="types"):
        training_conversation(clip, np.random.default_rng(0), 10, types=("weather",))
