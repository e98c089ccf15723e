"""Fixtures for the demo-model tests."""

from __future__ import annotations

import importlib.util

import pytest

from pipeline.demo_model import demo_model_path

SCRIPTS = demo_model_path().parents[2] / "scripts"


@pytest.fixture(scope="session")
def load_script():
    """``load_script(name)`` imports scripts/<name>.py, which is not in a package."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
