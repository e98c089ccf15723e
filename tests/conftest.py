from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_cli():
    """Run the installed ``streamvlm`` command in a subprocess, with a clean STREAMVLM_* environment."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith("STREAMVLM_")}
        base.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "streamvlm", *args],
            capture_output=True,
            text=True,
            env=base,
            cwd=REPO,
            timeout=timeout,
        )

    return run
