"""SIGKILL of a whole ``streamvlm serve`` mid-caption; a second one finishes the job (separate processes)."""

from __future__ import annotations

import pytest

from workers.bench import reliability as rel


@pytest.mark.slow
def test_sigkill_of_serve_and_a_second_serve_finishes_the_job(tmp_path):
    row = rel.kill_serve(tmp_path)
    assert (row.lost, row.duplicates, row.missing, row.pending_after) == (0, 0, 0, 0), row
    assert row.detail["deliveries"] >= 2 and row.detail["second_exit_code"] == 0
