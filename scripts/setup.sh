#!/usr/bin/env bash
# Set up streamvlm in ./.venv from nothing: torch first (the CPU build 2.13.0 on machines like this
# one; set TORCH_SPEC to choose another build), then streamvlm with its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
# Pinned to the versions the suite last passed with (CONSTRAINTS= installs the newest in pyproject's ranges).
CONSTRAINTS=${CONSTRAINTS-scripts/constraints.txt}
.venv/bin/python -m pip install --quiet ${CONSTRAINTS:+-c "$CONSTRAINTS"} -e '.[test]'
