"""`streamvlm bench pruning --quick` runs end to end and its rows are consistent (no timing thresholds here)."""

from __future__ import annotations

import argparse
import json

import pytest

from pipeline.bench import pruning as bench

KEYS = {"method", "reduction", "kept_tokens", "theoretical_flops_ratio", "measured_time_ratio", "overhead_share"}


@pytest.mark.slow
def test_quick_bench_prints_json_rows(capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--quick", "--json", "--new-tokens", "2"])) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["method"] == "none" and rows[0]["measured_time_ratio"] == 1.0
    for row in rows:
        assert KEYS <= set(row)
        assert 0 < row["theoretical_flops_ratio"] <= 1 and row["measured_time_ratio"] > 0
    by_method = {(r["method"], r["reduction"], r["fastv_ratio"]): r for r in rows}
    assert by_method[("encoder-uniform", 0.9, 0.0)]["kept_tokens"] == 8 * (1 + 26)
    assert by_method[("fastv-k2", 0.0, 0.5)]["kept_tokens"] == 8 * 257 // 2
    assert by_method[("encoder-uniform", 0.9, 0.0)]["theoretical_flops_ratio"] < by_method[("fastv-k2", 0.0, 0.5)][
        "theoretical_flops_ratio"]


def test_bad_arguments_raise():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with pytest.raises(ValueError, match="repeats"):
        bench.run(parser.parse_args(["--quick", "--repeats", "0"]))
