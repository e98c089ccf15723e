"""The training script's shared-prefix batches compute exactly what single-turn inference prompts do."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, VideoLlavaForConditionalGeneration

from pipeline.demo_model import DemoModelShape, build_config, build_tokenizer, demo_model_path
from pipeline.synthetic import TRAIN_TYPES, training_clip, training_conversation
from pipeline.synthetic.language import questions_of_type

SCRIPT = demo_model_path().parents[2] / "scripts" / "train_demo_model.py"
# A language model small enough to train a few steps in a test, on the shipped frame layout (8 × (1 + 64)).
TINY = DemoModelShape(vision_width=32, vision_layers=2, vision_heads=2, text_width=32, text_layers=2, text_heads=2,
                      text_ffn=64)


def _script():
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_turn_of_a_shared_prefix_conversation_equals_its_single_turn_prompt():
    train = _script()
    torch.manual_seed(0)
    shape = TINY
    tokenizer = build_tokenizer()
    model = VideoLlavaForConditionalGeneration(build_config(tokenizer, shape)).eval()
    enc = train.Encoder(tokenizer, shape.num_frames * shape.tokens_per_frame)
    rng = np.random.default_rng(3)
    convs = [training_conversation(training_clip(i), rng, 10) for i in range(2)]
    assert all(len(c) >= 3 for c in convs)
    feats = torch.randn(2, shape.num_frames * shape.tokens_per_frame, shape.vision_width)  # (B, V, C)

    seqs = [enc.conversation(c) for c in convs]
    ids, _, position_ids, segments = train.collate(seqs, enc.pad)
    with torch.no_grad():
        x = train.embed(model, ids, feats, enc.video_id)  # (B, S, D)
        mask = train.turn_mask(segments, x.dtype)
        checked = 0
        for r, (conv, (_, labels, _, seg)) in enumerate(zip(convs, seqs, strict=True)):
            for turn, qa in enumerate(conv):
                # The last prompt token of this turn predicts its first answer token.
                last = max(i for i, (g, lab) in enumerate(zip(seg, labels, strict=True))
                           if g == turn + 1 and lab == -100)
                shared = train.lm_logits(model, x, mask, torch.tensor([[r, last]]), position_ids)
                single_ids = torch.tensor([enc.first_prompt(qa.question)])  # (1, S1)
                single_x = train.embed(model, single_ids, feats[r : r + 1], enc.video_id)
                single = train.lm_logits(model, single_x, None, torch.tensor([[0, single_ids.shape[1] - 1]]))
                torch.testing.assert_close(shared, single, atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked == sum(len(c) for c in convs)


def test_turn_mask_hides_other_turns_and_padding():
    train = _script()
    segments = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])  # (1, S)
    allowed = train.turn_mask(segments, torch.float32)[0, 0] == 0  # (S, S)
    assert allowed[4, :2].all() and not allowed[4, 2:4].any() and allowed[4, 4]  # prefix and itself
    assert not allowed[2, 3]  # causal inside a turn
    assert not allowed[:6, 6].any() and allowed[6, 6]  # padding is seen by nobody and sees itself


def test_stage1_objective_on_layer_minus_2_reads_what_the_projector_reads():
    train = _script()
    torch.manual_seed(0)
    shape = DemoModelShape(vision_width=32, vision_layers=3, vision_heads=2, text_width=32, text_layers=2,
                           text_heads=2, text_ffn=64)
    model = VideoLlavaForConditionalGeneration(build_config(build_tokenizer(), shape))
    tower = model.model.video_tower
    size = model.config.vision_config.image_size
    out = tower(torch.randn(3, 3, size, size), output_hidden_states=True)  # 3 frames

    torch.testing.assert_close(train.cls_features(tower, out, -1), out.pooler_output)
    feats = train.cls_features(tower, out, -2)  # (F, C)
    read = out.hidden_states[model.config.vision_feature_layer][:, 0]  # what the projector gets for [CLS]
    torch.testing.assert_close(feats, tower.post_layernorm(read))
    (feats * torch.randn_like(feats)).sum().backward()  # a plain sum is constant under LayerNorm
    # The gradient reaches layer −2's attention (the one [CLS] pruning scores) and skips the last block.
    assert tower.encoder.layers[-2].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert tower.encoder.layers[-1].self_attn.q_proj.weight.grad is None


def test_keep_every_eval_saves_each_validated_checkpoint_beside_the_best(tmp_path):
    import json

    from safetensors.torch import load_file

    train = _script()
    out = tmp_path / "model"
    # Two stage-2 steps from the bundled checkpoint, validated before, between and after them.
    assert train.main(["--init-from", str(demo_model_path()), "--out", str(out), "--video", "frames",
                       "--clips", "4", "--eval-questions", "4", "--max-steps", "2", "--eval-every-s", "0",
                       "--warmup", "1", "--keep-every-eval"]) == 0

    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("model-step"))
    assert kept == ["model-step00000", "model-step00001", "model-step00002"]
    summaries = [json.loads((tmp_path / k / "training_summary.json").read_text()) for k in kept]
    assert [s["eval"]["step"] for s in summaries] == [0, 1, 2]
    best = max(summaries, key=lambda s: s["eval"]["accuracy"])  # max() keeps the first of equals, as training does
    # Neither --bf16 nor --no-bf16 given: the run records what this CPU chose, never "None".
    assert {s["args"]["bf16"] for s in summaries} == {str(train.native_bf16())}
    assert json.loads((out / "training_summary.json").read_text())["eval"] == best["eval"]

    name = "language_model.model.layers.0.mlp.down_proj.weight"
    shipped, first, last = (load_file(p / "model.safetensors")[name]
                            for p in (demo_model_path(), tmp_path / kept[0], tmp_path / kept[-1]))
    torch.testing.assert_close(first, shipped)  # step 0: the weights it started from, saved before any update
    assert not torch.equal(last, first)  # each folder is its own snapshot, not the final model saved thrice


def test_init_from_with_more_text_layers_adds_layers_that_start_as_identity_and_then_learn(tmp_path):
    train = _script()
    out = tmp_path / "model"
    # The bundled checkpoint grown by one layer, with the auxiliary terms that hook every layer.
    depth = AutoConfig.from_pretrained(demo_model_path()).text_config.num_hidden_layers
    assert train.main(["--init-from", str(demo_model_path()), "--text-layers", str(depth + 1), "--out", str(out),
                       "--video", "frames", "--clips", "4", "--eval-questions", "4", "--max-steps", "2",
                       "--eval-every-s", "0", "--warmup", "1", "--keep-every-eval", "--lookup-loss", "0.3",
                       "--background-loss", "1.0"]) == 0

    shipped, start, end = (VideoLlavaForConditionalGeneration.from_pretrained(p)
                           for p in (demo_model_path(), tmp_path / "model-step00000", tmp_path / "model-step00002"))
    assert (shipped.config.text_config.num_hidden_layers, start.config.text_config.num_hidden_layers) == (depth, depth + 1)
    summary = json.loads((tmp_path / "model-step00000" / "training_summary.json").read_text())
    assert summary["tower"]["added_layers"] == 1
    grown_weights = start.state_dict()
    for k, v in shipped.state_dict().items():  # every saved weight carried over
        torch.testing.assert_close(grown_weights[k], v)
    added = start.model.language_model.layers[depth]
    assert not added.self_attn.o_proj.weight.any() and not added.mlp.down_proj.weight.any()
    assert added.self_attn.q_proj.weight.any()  # the rest of the block keeps its initialisation

    torch.manual_seed(1)
    x = torch.randn(2, 30, shipped.config.text_config.hidden_size)  # (B, S, D) any embeddings
    with torch.no_grad():
        before, grown, trained = (m.model.language_model(inputs_embeds=x).last_hidden_state
                                  for m in (shipped, start, end))
    torch.testing.assert_close(grown, before)  # the grown model starts as the saved one
    assert not torch.allclose(trained, before)
    assert end.model.language_model.layers[depth].self_attn.o_proj.weight.any()  # and the added layer learns


@pytest.mark.parametrize("argv", [["--text-layers", "3"], ["--text-width", "96"]], ids=["shallower", "narrower"])
def test_init_from_a_checkpoint_that_does_not_fit_is_refused(tmp_path, argv):
    with pytest.raises(SystemExit, match="do not fit"):
        _script().main(["--init-from", str(demo_model_path()), "--out", str(tmp_path / "model"), *argv,
                        "--lookup-layers", "1", "--max-steps", "1"])


def test_tower_from_keeps_the_tower_and_trains_a_fresh_language_model_with_a_slower_projector(tmp_path):
    train = _script()
    out = tmp_path / "model"
    assert train.main(["--tower-from", str(demo_model_path()), "--out", str(out), "--video", "frames",
                       "--clips", "4", "--eval-questions", "4", "--max-steps", "2", "--eval-every-s", "0",
                       "--warmup", "1", "--keep-every-eval", "--bf16", "--projector-lr-scale", "0.1"]) == 0

    shipped, start, end = (VideoLlavaForConditionalGeneration.from_pretrained(p).state_dict()
                           for p in (demo_model_path(), tmp_path / "model-step00000", tmp_path / "model-step00002"))
    towers = [k for k in shipped if "tower" in k]
    assert towers
    for k in towers:  # the tower is the saved one and stays frozen
        torch.testing.assert_close(start[k], shipped[k])
        torch.testing.assert_close(end[k], shipped[k])

    torch.manual_seed(0)  # the script's --seed: projector and LLM start where a run from scratch starts
    fresh = VideoLlavaForConditionalGeneration(build_config(build_tokenizer(), DemoModelShape())).state_dict()
    lm = next(k for k in fresh if k.endswith("layers.0.mlp.down_proj.weight"))
    proj = next(k for k in fresh if k.endswith("multi_modal_projector.linear_2.weight"))
    for k in (lm, proj):
        torch.testing.assert_close(start[k], fresh[k])
        assert not torch.equal(start[k], shipped[k])

    # Adam's first steps move every weight by about the learning rate, so the step size shows the scale.
    def moved(k):
        return (end[k] - start[k]).abs().max().item()

    assert 0 < moved(proj) < 0.2 * moved(lm)


@pytest.mark.parametrize("vision", [dict(vision_width=32, vision_heads=2), dict(vision_layers=2)],
                         ids=["narrower", "shallower"])
def test_tower_from_a_checkpoint_of_another_shape_is_refused(tmp_path, vision):
    shape = DemoModelShape(**vision, text_width=32, text_layers=2, text_heads=2, text_ffn=64)
    VideoLlavaForConditionalGeneration(build_config(build_tokenizer(), shape)).save_pretrained(tmp_path / "small")
    with pytest.raises(SystemExit, match="does not fit"):
        _script().copy_towers(VideoLlavaForConditionalGeneration.from_pretrained(tmp_path / "small"),
                              VideoLlavaForConditionalGeneration(build_config(build_tokenizer(), DemoModelShape())),
                              tmp_path / "small")


def test_tower_from_and_init_from_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        _script().main(["--tower-from", str(demo_model_path()), "--init-from", str(demo_model_path())])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_run_from_scratch_trains_the_tower_then_the_language_model(tmp_path):
    train = _script()
    out = tmp_path / "model"
    # 72 clips: stage 1 holds its first 512 frames (64 clips) back for its statistics and trains on the rest.
    assert train.main(["--out", str(out), "--video", "frames", "--tower-minutes", "0.02", "--tower-clips", "72",
                       "--clips", "4", "--eval-questions", "4", "--max-steps", "2", "--eval-every-s", "0",
                       "--warmup", "1", "--place-loss", "1", "--patch-place-loss", "1",
                       "--first-minutes", "10", "--first-types", "shape,colour", "--first-objects", "1,2,3,4"]) == 0

    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["tower"]["tower_steps"] >= 1 and "tower_from" not in summary["tower"]
    assert 0 <= summary["tower"]["frame_place_exact_match"] <= 1
    assert 0 <= summary["tower"]["object_patch_column_probe"] <= 1
    torch.manual_seed(0)
    fresh = VideoLlavaForConditionalGeneration(build_config(build_tokenizer(), DemoModelShape())).state_dict()
    trained = VideoLlavaForConditionalGeneration.from_pretrained(out).state_dict()
    tower = next(k for k in fresh if "video_tower" in k and k.endswith("layers.0.mlp.fc1.weight"))
    assert not torch.equal(trained[tower], fresh[tower])  # stage 1 moved the tower from its seed-0 start


def test_tower_only_saves_a_trained_tower_beside_an_untrained_language_model(tmp_path):
    out = tmp_path / "tower"
    assert _script().main(["--out", str(out), "--video", "frames", "--tower-only", "--tower-minutes", "0.02",
                           "--tower-clips", "72"]) == 0

    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["tower"]["tower_steps"] >= 1 and "eval" not in summary
    torch.manual_seed(0)
    fresh = VideoLlavaForConditionalGeneration(build_config(build_tokenizer(), DemoModelShape())).state_dict()
    saved = VideoLlavaForConditionalGeneration.from_pretrained(out).state_dict()
    tower = next(k for k in fresh if "video_tower" in k and k.endswith("layers.0.mlp.fc1.weight"))
    lm = next(k for k in fresh if k.endswith("layers.0.mlp.down_proj.weight"))
    assert not torch.equal(saved[tower], fresh[tower])
    torch.testing.assert_close(saved[lm], fresh[lm])  # stage 2 never ran


def test_patch_column_probe_reads_a_column_that_the_tokens_carry_and_not_one_they_lack():
    train = _script()
    g = torch.Generator().manual_seed(0)
    frames, patches, width = 40, 64, 16
    on_object = torch.rand(frames, patches, generator=g) < 0.3  # (F, P)
    noise = torch.randn(frames, patches, width, generator=g)  # (F, P, C)
    placed = noise.clone()
    placed[..., :8] += 4 * torch.nn.functional.one_hot(torch.arange(patches) % 8, 8)  # column written in
    assert train.patch_column_probe(placed, on_object.numpy()) > 0.95
    assert train.patch_column_probe(noise, on_object.numpy()) < 0.3  # chance is 1/8


@pytest.mark.parametrize(("asked", "native", "used"), [
    (None, True, True), (None, False, False), (True, False, True), (False, True, False), (True, True, True),
])
def test_bf16_autocast_is_on_where_the_cpu_has_bf16_matmuls_unless_a_flag_says_otherwise(asked, native, used):
    assert _script().use_bf16(asked, native) is used


@pytest.mark.parametrize(("argv", "message"), [
    (["--first-types", "position,weather"], "--first-types"),
    *[(["--first-objects", counts], "--first-objects") for counts in ("", "2,x", "0,2")],
    *[(["--lookup-layers", layers], "--lookup-layers") for layers in ("", "1,x", "-1,2")],
    (["--lookup-layers", "1,4", "--text-layers", "4"], "--lookup-layers: the language model has layers 0..3"),
    (["--lookup-loss", "-0.5"], "--lookup-loss must be >= 0"),
    (["--lookup-types", "shape,weather"], "--lookup-types"),
    (["--lookup-types", "shape,count"], "--lookup-types: only colour,shape,direction,position questions name an object"),
    (["--cls-read-loss", "-1"], "--cls-read-loss must be >= 0"),
    (["--background-loss", "-0.5"], "--background-loss must be >= 0"),
    (["--background-rows", "0"], "--background-rows must be >= 1"),
    (["--background-cls"], "--background-cls needs --background-loss or --answering-background-loss > 0"),
    (["--answering-background-loss", "-1"], "--answering-background-loss must be >= 0"),
    (["--cls-read-layer", "4", "--text-layers", "4"], "--cls-read-layer: the language model has layers 0..3"),
    (["--cls-read-layer", "-1"], "--cls-read-layer"),
    (["--cls-read-loss", "0.3", "--text-heads", "1"], "--cls-read-loss trains head 1: needs --text-heads > 1"),
])
def test_bad_arguments_are_refused_naming_the_flag(capsys, argv, message):
    train = _script()
    with pytest.raises(SystemExit):
        train.main(argv)
    assert message in capsys.readouterr().err


def test_object_tokens_are_the_patches_objects_are_drawn_in_and_never_a_cls():
    train = _script()
    clip = training_clip(5)
    tokens = train.object_tokens(clip)  # (K, V)
    t, h, w = clip.masks.shape
    size = h // 8  # 8 × 8 patches a frame
    drawn = clip.masks.reshape(t, 8, size, 8, size).any(axis=(2, 4)).reshape(t, 64)  # (T, P) any object pixel
    spans = tokens.reshape(len(clip.objects), t, 65)  # (K, T, N)
    assert not spans[:, :, 0].any()  # [CLS]
    assert torch.equal(spans[:, :, 1:].any(0), torch.from_numpy(drawn))
    assert all(spans[k].any() for k in range(len(clip.objects)))


def test_lookup_types_are_the_question_types_that_name_one_object():
    rng = np.random.default_rng(0)
    named = {qa.qtype for i in range(200) for t in TRAIN_TYPES for qa in questions_of_type(training_clip(i), t, rng)
             if qa.subject is not None}
    assert named == set(_script().LOOKUP_TYPES)


def _tiny_lookup_setup(train, seed: int = 0):
    torch.manual_seed(seed)
    shape = TINY
    tokenizer = build_tokenizer()
    model = VideoLlavaForConditionalGeneration(build_config(tokenizer, shape))
    enc = train.Encoder(tokenizer, shape.num_frames * shape.tokens_per_frame)
    rng = np.random.default_rng(4)
    clips = [training_clip(i) for i in range(2)]
    convs = [training_conversation(c, rng, 6, caption_share=0.0, types=("shape", "colour", "count")) for c in clips]
    objects = [train.object_tokens(c) for c in clips]
    feats = torch.randn(2, shape.num_frames * shape.tokens_per_frame, shape.vision_width)  # (B, V, C)
    return model, enc, convs, objects, feats


@pytest.mark.parametrize("types", [None, ("shape",)], ids=["every-type", "shape-only"])
def test_lookup_loss_is_the_single_turn_prompts_attention_on_the_asked_object(types):
    """The shared-prefix batch, recomputed on one head from a pre-hook, equals the eager attention weights
    of each single-turn prompt, as inference computes them; ``lookup_types`` keeps only those turns."""
    train = _script()
    model, enc, convs, objects, feats = _tiny_lookup_setup(train)
    model.eval()
    types = types or train.LOOKUP_TYPES
    with torch.no_grad():
        part = train.answer_loss(model, enc, convs, feats, False, objects, (1,), types)  # the fused sdpa forward
        model.set_attn_implementation("eager")  # the reference: the module's own attention weights
        expected = []
        for r, conv in enumerate(convs):
            for qa in conv:
                if qa.subject is None or qa.qtype not in types:  # count questions name no object
                    continue
                ids = torch.tensor([enc.first_prompt(qa.question)])  # (1, S1)
                x = train.embed(model, ids, feats[r : r + 1], enc.video_id)
                attn = model.model.language_model(inputs_embeds=x, output_attentions=True).attentions[1]
                start = int((ids == enc.video_id).int().argmax(1))
                row = attn[0, train.LOOKUP_HEAD, -1, start : start + objects[r].shape[1]]  # (V,) last prompt token
                expected.append(-torch.log(row[objects[r][qa.subject]].sum() + 1e-6))
    assert len(expected) >= 2 and any(qa.subject is None or qa.qtype not in types for c in convs for qa in c)
    torch.testing.assert_close(part.lookup, torch.stack(expected).mean(), atol=1e-5, rtol=1e-5)
    assert part.answer > 0 and part.seq > enc.video_tokens


def test_lookup_loss_trains_the_head_to_look_at_the_asked_object():
    train = _script()
    model, enc, convs, objects, feats = _tiny_lookup_setup(train, seed=1)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "tower" not in n], lr=3e-3)
    losses = []
    for _ in range(40):
        part = train.answer_loss(model, enc, convs, feats, False, objects, (1,))
        opt.zero_grad(set_to_none=True)
        part.lookup.backward()
        opt.step()
        losses.append(part.lookup.item())
    # Objects cover a few percent of the video tokens: about their area's share (−log ≈ 3) untrained.
    assert losses[0] > 2.0 and losses[-1] < 0.5 * losses[0]
    without = train.answer_loss(model, enc, convs, feats, False)
    assert without.lookup.item() == 0.0


def test_cls_tokens_are_the_first_token_of_every_frame_span():
    train = _script()
    cls = train.cls_tokens(3, 5)  # (V,) for 3 frames of [CLS] + 4 patches
    assert cls.nonzero().squeeze(1).tolist() == [0, 5, 10]
    clip = training_clip(0)
    span = clip.object_pixel_counts().shape[1] + 1
    assert not (train.object_tokens(clip) & train.cls_tokens(len(clip.frames), span)).any()


def test_cls_read_loss_is_the_single_turn_prompts_attention_on_the_frames_cls_tokens():
    """On every turn (count questions too), one head of the chosen layer, from the shared-prefix batch,
    equals the eager attention of each single-turn prompt on the frames' [CLS] tokens."""
    train = _script()
    model, enc, convs, objects, feats = _tiny_lookup_setup(train)
    model.eval()
    cls = train.cls_tokens(TINY.num_frames, TINY.tokens_per_frame)  # (V,)
    with torch.no_grad():
        part = train.answer_loss(model, enc, convs, feats, False, objects, (1,), cls=cls, cls_read_layer=0)
        only = train.answer_loss(model, enc, convs, feats, False, cls=cls, cls_read_layer=0)
        model.set_attn_implementation("eager")
        expected = []
        for r, conv in enumerate(convs):
            for qa in conv:
                ids = torch.tensor([enc.first_prompt(qa.question)])  # (1, S1)
                x = train.embed(model, ids, feats[r : r + 1], enc.video_id)
                attn = model.model.language_model(inputs_embeds=x, output_attentions=True).attentions[0]
                start = int((ids == enc.video_id).int().argmax(1))
                row = attn[0, train.CLS_READ_HEAD, -1, start : start + cls.shape[0]]  # (V,) last prompt token
                expected.append(-torch.log(row[cls].sum() + 1e-6))
    assert len(expected) == sum(len(c) for c in convs)
    torch.testing.assert_close(part.cls_read, torch.stack(expected).mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(only.cls_read, part.cls_read)
    assert only.lookup.item() == 0.0 and part.lookup.item() > 0.0


def test_cls_read_loss_trains_its_head_to_read_the_cls_tokens():
    train = _script()
    model, enc, convs, objects, feats = _tiny_lookup_setup(train, seed=2)
    cls = train.cls_tokens(TINY.num_frames, TINY.tokens_per_frame)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "tower" not in n], lr=3e-3)
    losses = []
    for _ in range(40):
        part = train.answer_loss(model, enc, convs, feats, False, cls=cls, cls_read_layer=0)
        opt.zero_grad(set_to_none=True)
        part.cls_read.backward()
        opt.step()
        losses.append(part.cls_read.item())
    # 8 of the ~520 video tokens (plus the prompt's): about −log(8 / 540) ≈ 4 untrained.
    assert losses[0] > 3.0 and losses[-1] < 0.5 * losses[0]
    assert train.answer_loss(model, enc, convs, feats, False).cls_read.item() == 0.0


def test_background_tokens_are_neither_a_cls_nor_a_patch_an_object_is_drawn_in():
    train = _script()
    clip = training_clip(0)
    span = clip.object_pixel_counts().shape[1] + 1
    objects, cls = train.object_tokens(clip), train.cls_tokens(len(clip.frames), span)  # (K, V), (V,)
    background = train.background_tokens(objects, cls)  # (V,)
    assert background.shape == cls.shape
    assert not (background & cls).any() and not (background & objects.any(0)).any()
    assert (background | cls | objects.any(0)).all()
    # Objects are small: most of the frame is background.
    assert 0.5 < background.float().mean() < 0.98


def test_background_cls_makes_every_token_but_the_objects_patches_background():
    train = _script()
    _, _, _, objects, _ = _tiny_lookup_setup(train)
    cls = train.cls_tokens(TINY.num_frames, TINY.tokens_per_frame)  # (V,)
    for o in objects:
        wide = train.background_tokens(o, cls, with_cls=True)  # (V,)
        assert torch.equal(wide, ~o.any(0))
        assert wide[cls].all()
        assert torch.equal(wide & ~cls, train.background_tokens(o, cls))


@pytest.mark.parametrize("with_cls", [False, True])
def test_background_loss_is_the_single_turn_prompts_attention_on_background_patches(with_cls):
    """Every layer, every head, every row from the video on that is not background (the clip's [CLS] and
    object rows once, each turn's question and answer tokens): from the shared-prefix batch, equal to the
    eager attention of each turn run alone on the background patches (with_cls: and the [CLS] tokens)."""
    train = _script()
    model, enc, convs, objects, feats = _tiny_lookup_setup(train)
    model.eval()
    cls = train.cls_tokens(TINY.num_frames, TINY.tokens_per_frame)  # (V,)
    background = torch.stack([train.background_tokens(o, cls, with_cls) for o in objects])  # (B, V)
    v = background.shape[1]
    with torch.no_grad():
        part = train.answer_loss(model, enc, convs, feats, False, background=background)
        model.set_attn_implementation("eager")
        rows_mass = []  # (L, R) per piece: the batch's rows, each once
        for r, conv in enumerate(convs):
            for turn, qa in enumerate(conv):
                prompt_ids = enc.first_prompt(qa.question)
                ids = torch.tensor([prompt_ids + enc.tok(qa.answer, add_special_tokens=False).input_ids
                                    + [enc.eos]])  # (1, S1) the turn alone, answer included
                x = train.embed(model, ids, feats[r : r + 1], enc.video_id)
                attns = model.model.language_model(inputs_embeds=x, output_attentions=True).attentions
                start = int((ids == enc.video_id).int().argmax(1))
                keys = torch.zeros(ids.shape[1], dtype=torch.bool)
                keys[start : start + v] = background[r]  # (S1,)
                mass = torch.stack([a[0, :, :, keys].sum(-1).mean(0) for a in attns])  # (L, S1) heads averaged
                if turn == 0:  # the shared video rows: [CLS] and object patches
                    rows_mass.append(mass[:, start : start + v][:, ~background[r]])
                rows_mass.append(mass[:, start + v :])  # this turn's question and answer tokens
        expected = torch.cat(rows_mass, 1).mean(1).mean()  # rows, then layers
    torch.testing.assert_close(part.background, expected, atol=1e-5, rtol=1e-5)
    # Untrained, attention spreads over a video that is mostly background.
    assert part.background.item() > 0.3
    assert train.answer_loss(model, enc, convs, feats, False).background.item() == 0.0


@pytest.mark.parametrize("with_cls", [False, True])
def test_answering_background_loss_is_each_single_turn_prompts_last_token_attention_on_the_background(with_cls):
    """Every layer, every head, the one row each turn answers from: from the shared-prefix batch, equal to the
    eager attention of the turn's prompt run alone, at its last token, on the background patches (with_cls:
    and the [CLS] tokens)."""
    train = _script()
    model, enc, convs, objects, feats = _tiny_lookup_setup(train)
    model.eval()
    # Conversations of different lengths: the shorter one's answering rows are padded, and a padded row
    # counted would pull the mean off.
    convs = [convs[0], convs[1][:3]]
    cls = train.cls_tokens(TINY.num_frames, TINY.tokens_per_frame)  # (V,)
    background = torch.stack([train.background_tokens(o, cls, with_cls) for o in objects])  # (B, V)
    v = background.shape[1]
    with torch.no_grad():
        part = train.answer_loss(model, enc, convs, feats, False, background=background, answering_background=True)
        model.set_attn_implementation("eager")
        turns_mass = []  # (L,) per turn
        for r, conv in enumerate(convs):
            for qa in conv:
                ids = torch.tensor([enc.first_prompt(qa.question)])  # (1, S1) the turn's prompt alone
                x = train.embed(model, ids, feats[r : r + 1], enc.video_id)
                attns = model.model.language_model(inputs_embeds=x, output_attentions=True).attentions
                start = int((ids == enc.video_id).int().argmax(1))
                keys = torch.zeros(ids.shape[1], dtype=torch.bool)
                keys[start : start + v] = background[r]  # (S1,)
                turns_mass.append(torch.stack([a[0, :, -1, keys].sum(-1).mean() for a in attns]))  # (L,)
        expected = torch.stack(turns_mass).mean()
    torch.testing.assert_close(part.answering_background, expected, atol=1e-5, rtol=1e-5)
    assert part.answering_background.item() > 0.3
    plain = train.answer_loss(model, enc, convs, feats, False, background=background)
    assert plain.answering_background.item() == 0.0
    torch.testing.assert_close(plain.background, part.background)
    alone = train.answer_loss(model, enc, convs, feats, False, background=background, answering_background=True,
                              sampled_background=False)  # --answering-background-loss without --background-loss
    assert alone.background.item() == 0.0
    torch.testing.assert_close(alone.answering_background, part.answering_background)


def test_answering_background_loss_trains_the_answering_rows_off_the_background():
    train = _script()
    model, enc, convs, objects, feats = _tiny_lookup_setup(train, seed=2)
    cls = train.cls_tokens(TINY.num_frames, TINY.tokens_per_frame)
    background = torch.stack([train.background_tokens(o, cls, with_cls=True) for o in objects])  # (B, V)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "tower" not in n], lr=3e-3)
    losses = []
    for _ in range(30):
        part = train.answer_loss(model, enc, convs, feats, False, background=background, answering_background=True)
        opt.zero_grad(set_to_none=True)
        part.answering_background.backward()
        opt.step()
        losses.append(part.answering_background.item())
    assert losses[0] > 0.3 and losses[-1] < 0.5 * losses[0]


def test_background_loss_on_rows_drawn_at_random_estimates_the_mean_over_every_row():
    train = _script()
    model, enc, convs, objects, feats = _tiny_lookup_setup(train)
    model.eval()
    cls = train.cls_tokens(TINY.num_frames, TINY.tokens_per_frame)
    background = torch.stack([train.background_tokens(o, cls) for o in objects])  # (B, V)
    torch.manual_seed(5)
    with torch.no_grad():
        every = train.answer_loss(model, enc, convs, feats, False, background=background).background
        # More rows asked for than a sequence has: every eligible row, once.
        torch.testing.assert_close(train.answer_loss(model, enc, convs, feats, False, background=background,
                                                     background_rows=4096).background, every)
        drawn = torch.stack([train.answer_loss(model, enc, convs, feats, False, background=background,
                                               background_rows=16).background for _ in range(12)])
    assert drawn.std() > 0  # the draws differ
    assert abs(drawn.mean().item() - every.item()) < 0.05


def test_background_loss_trains_attention_off_the_background():
    train = _script()
    model, enc, convs, objects, feats = _tiny_lookup_setup(train, seed=2)
    cls = train.cls_tokens(TINY.num_frames, TINY.tokens_per_frame)
    background = torch.stack([train.background_tokens(o, cls) for o in objects])  # (B, V)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "tower" not in n], lr=3e-3)
    losses = []
    for _ in range(30):
        part = train.answer_loss(model, enc, convs, feats, False, background=background)
        opt.zero_grad(set_to_none=True)
        part.background.backward()
        opt.step()
        losses.append(part.background.item())
    assert losses[0] > 0.3 and losses[-1] < 0.5 * losses[0]
