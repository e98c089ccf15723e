"""The user-facing commands that run the model: ``ask`` (no Redis, no Ray) and ``demo`` (everything)."""

from __future__ import annotations

import json

from service_helpers import clip_video


def test_ask_prints_the_answer_and_its_record_as_json(run_cli, tmp_path):
    path, sample = clip_video(tmp_path / "clip.mp4", 1)
    out = run_cli("--set", f"sources.allowed_roots=[{tmp_path}]", "ask", str(path), sample.qa.question,
                  "--reduction", "0.9", "--strategy", "redundancy", "--fastv-ratio", "0.5", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["answer"]
    assert res["visual_tokens_kept"] < res["visual_tokens_in"]
    assert 0 < res["flops_ratio"] < 1
    assert {"vision_s", "prefill_s", "video_decode_s"} <= set(res["timings"])
    assert res["pruning"]["temporal_strategy"] == "redundancy" and res["pruning"]["fastv_ratio"] == 0.5


def test_ask_bad_input_is_one_readable_line(run_cli, tmp_path):
    root = f"sources.allowed_roots=[{tmp_path}]"
    cases = [
        (["/etc/passwd", "q"], "outside the allowed roots"),
        ([str(tmp_path / "missing.mp4"), "q"], "SourceNotFound"),
        ([str(tmp_path / "x.mp4"), "q", "--reduction", "1.2"], "pruning.encoder_reduction"),
        ([str(tmp_path / "x.mp4"), "q", "--fastv-k", "50", "--fastv-ratio", "0.5"], "fastv_k=50"),
    ]
    (tmp_path / "x.mp4").write_bytes(b"not a video")
    for args, expected in cases:
        out = run_cli("--set", root, "ask", *args)
        assert out.returncode != 0
        assert expected in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_demo_runs_the_main_job_end_to_end(run_cli, tmp_path):
    out = run_cli("--set", f"redis.embedded_dir={tmp_path / 'redis'}", "--set", "service.health_port=0",
                  "demo", "--workdir", str(tmp_path / "demo"), "--windows", "2", timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[answer #0" in out.stdout
    assert out.stdout.count("[caption #") >= 2
    assert "pruning kept" in out.stdout and "caption job cancelled" in out.stdout
