"""scripts/probe_answers.py: its answers are `streamvlm eval`'s unpruned answers, its attention split is a
partition of the last prompt token's attention."""

from __future__ import annotations

import functools

import pytest
import torch

from pipeline.demo_model import demo_model_path
from pipeline.eval import RowSpec, evaluate
from pipeline.inference import VideoQA
from pipeline.synthetic import held_out_set


@pytest.fixture(scope="module")
def probe(load_script):
    return load_script("probe_answers")


@functools.cache
def _held_out():
    return held_out_set()


def _samples(qtype: str, n: int, objects: int | None = None):
    pool = [s for s in _held_out() if s.qa.qtype == qtype]
    if objects is not None:
        pool = [s for s in pool if len(s.clip.objects) == objects]
    return pool[:n]


def test_answers_are_the_eval_none_rows_answers(probe):
    samples = _samples("shape", 4) + _samples("colour", 4)
    given = probe.answers(VideoQA.load(demo_model_path()), samples, batch_size=3)
    (row,) = evaluate(VideoQA.load(demo_model_path()), samples, [RowSpec("none", None, 0.0, 0.0, 2)],
                      batch_size=8, max_new_tokens=8)
    assert [g == s.qa.answer for g, s in zip(given, samples, strict=True)] == row.correct
    assert all(g for g in given)


def test_answers_under_a_selection_are_that_eval_rows_answers(probe):
    samples = _samples("colour", 6)
    spec = RowSpec("cls", "uniform", 0.95, 0.0, 2)
    given = probe.answers(VideoQA.load(demo_model_path()), samples, batch_size=4, spec=spec)
    (row, unpruned) = evaluate(VideoQA.load(demo_model_path()), samples, [spec, probe.UNPRUNED],
                               batch_size=8, max_new_tokens=8)
    assert given == row.answers
    assert sum(row.kept_tokens) < sum(unpruned.kept_tokens) / 10  # the selection did apply


def test_reduction_goes_with_a_pruning_method(probe, monkeypatch, capsys):
    for argv in (["--method", "cls"], ["--reduction", "0.9"], ["--method", "random", "--reduction", "1"]):
        monkeypatch.setattr("sys.argv", ["probe_answers.py", str(demo_model_path()), *argv])
        with pytest.raises(SystemExit) as exit_:
            probe.main()
        assert exit_.value.code == 2
        assert "--reduction" in capsys.readouterr().err


def test_attention_shares_partition_the_row_and_one_object_clips_have_no_other_object(probe):
    one = _samples("shape", 2, objects=1)
    many = _samples("colour", 2, objects=4)
    qa = VideoQA.load(demo_model_path())
    layers = qa.model.config.text_config.num_hidden_layers
    shares = probe.attention_shares(qa, one)["shape"]  # (L, 6)
    assert shares.shape == (layers, 6)
    torch.testing.assert_close(shares[:, :5].sum(-1), torch.ones(layers), atol=1e-4, rtol=0)
    assert shares[:, 1].abs().max() == 0  # a one-object clip has no other object's patches
    area = shares[0, 5].item()
    assert 0 < area < 0.2  # a ~10 px object covers a few of 64 patches per frame
    shares4 = probe.attention_shares(qa, many)["colour"]
    torch.testing.assert_close(shares4[:, :5].sum(-1), torch.ones(layers), atol=1e-4, rtol=0)
    assert shares4[:, 1].sum() > 0


def test_training_samples_ask_the_first_question_of_each_type_including_position(probe):
    samples = probe.training_samples(3, ["position", "count"])
    assert [s.index for s in samples] == [0, 0, 1, 1, 2, 2]
    assert [s.qa.qtype for s in samples] == ["position", "count"] * 3
    assert all(s.qa.answer in ("left", "right", "up", "down") for s in samples if s.qa.qtype == "position")
    assert samples[1].qa.answer == ("zero", "one", "two", "three", "four")[len(samples[1].clip.objects)]
