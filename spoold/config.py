"""Configuration: dataclasses with defaults, loaded from YAML, every error naming its key."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG_PATH = Path("/etc/spoold/spoold.yaml")


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the key."""


@dataclass
class FakeEngineConfig:
    delay_per_request_s: float = 0.0
    fail_marker: str | None = None
    crash_marker: str | None = None
    # A request whose text includes this kills the engine but not the process, as
    # vLLM's engine core dying does (EngineDeadError); the engine must be reloaded.
    die_marker: str | None = None
    # A model whose name includes this cannot be loaded (as one missing from the hub).
    load_fail_marker: str | None = None
    batch_size: int = 64


@dataclass
class RayConfig:
    """engine.ray (SPEC §6, design §10): where the replicas run and how many."""

    # null: a local Ray started by the daemon; "auto": the cluster on this host;
    # else a cluster address (host:port of its GCS, or ray://head:10001).
    address: str | None = None
    replicas: int | None = None  # None: one per GPU of the cluster (per tensor_parallel_size), ≥ 1
    resources_per_replica: dict[str, float] | None = None  # None: {GPU: tp}, or {CPU: 1}


@dataclass
class EngineConfig:
    backend: str = "fake"
    model: str = "fake-model"
    models: dict[str, str] = field(default_factory=dict)
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    extra_args: dict[str, Any] = field(default_factory=dict)
    fake: FakeEngineConfig = field(default_factory=FakeEngineConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def resolve_model(self, requested: object) -> str:
        """The engine model for a request's body.model: a mapped alias, else engine.model."""
        if isinstance(requested, str) and requested in self.models:
            return self.models[requested]
        return self.model


@dataclass
class WatchConfig:
    settle_seconds: float = 5.0
    rescan_interval_s: float = 30.0
    polling: bool = False


@dataclass
class LimitsConfig:
    max_requests_per_job: int = 50_000
    max_file_bytes: int = 200_000_000
    max_queue_depth: int = 5
    max_total_queued_requests: int = 100_000
    max_line_bytes: int = 16 * 1024 * 1024
    min_free_disk_mb: int = 0


@dataclass
class ProcessingConfig:
    chunk_size: int = 5000
    max_job_attempts: int = 3
    stop_timeout_s: float = 60.0
    # A chunk also commits once its uncommitted results pass this many bytes.
    max_chunk_bytes: int = 256 * 1024 * 1024
    # A model that fails to load is tried again after this, doubling up to 1800 s …
    model_retry_s: float = 30.0
    # … and after this many failed loads its queued jobs fail.
    max_model_load_attempts: int = 5
    # A job whose run hit an I/O error (EIO, EACCES, ESTALE…) waits this long before
    # it is tried again, doubling up to 300 s; its attempt is not counted.
    io_retry_s: float = 5.0
    # SPEC: jobs start in arrival order. True lets queued jobs for the loaded model go
    # before older ones for another model (fewer model switches, not FIFO).
    prefer_loaded_model: bool = False


@dataclass
class HeartbeatConfig:
    interval_s: float = 10.0
    stale_after_s: float = 60.0


@dataclass
class GpuConfig:
    max_memory_percent: float = 95.0
    max_temperature_c: float = 85.0
    resume_temperature_c: float = 80.0


@dataclass
class MetricsConfig:
    textfile: str | None = None


@dataclass
class LoggingConfig:
    format: str = "auto"
    level: str = "info"


@dataclass
class ApiConfig:
    """`spoold serve` (SPEC §10)."""

    host: str = "127.0.0.1"
    port: int = 8080
    keys_file: Path | None = None


@dataclass
class Config:
    spool_dir: Path = Path("/var/spool/spoold")
    instance: str = "default"
    engine: EngineConfig = field(default_factory=EngineConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    processing: ProcessingConfig = field(default_factory=ProcessingConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    api: ApiConfig = field(default_factory=ApiConfig)

    @property
    def heartbeat_path(self) -> Path:
        return self.spool_dir / "heartbeats" / f"{self.instance}.json"


# Values that must be strictly positive / within a set. Keys are dotted paths.
_POSITIVE = {
    "limits.max_requests_per_job",
    "limits.max_file_bytes",
    "limits.max_queue_depth",
    "limits.max_total_queued_requests",
    "limits.max_line_bytes",
    "processing.chunk_size",
    "processing.max_job_attempts",
    "processing.stop_timeout_s",
    "processing.max_chunk_bytes",
    "processing.model_retry_s",
    "processing.max_model_load_attempts",
    "processing.io_retry_s",
    "heartbeat.interval_s",
    "heartbeat.stale_after_s",
    "engine.tensor_parallel_size",
    "engine.fake.batch_size",
    "engine.ray.replicas",
    "watch.rescan_interval_s",
    "gpu.max_memory_percent",
    "gpu.max_temperature_c",
    "gpu.resume_temperature_c",
}
_CHOICES = {
    "engine.backend": ("fake", "vllm", "ray"),
    "logging.format": ("auto", "json", "console"),
    "logging.level": ("debug", "info", "warning", "error"),
}


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_hint = typing.get_args(hint)
        return {
            str(k): _check_type(v, val_hint, f"{key}.{k}") if val_hint is not Any else v
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)  # type: ignore[arg-type]
    raise AssertionError(f"unsupported config type {hint} for {key}")


def _build(cls: type[Any], raw: Any, prefix: str) -> Any:
    where = prefix or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            also = ""
            if prefix == "engine":
                also = (
                    "; with engine.backend: vllm or ray, any vLLM engine argument may be set here"
                )
            raise ConfigError(
                f"unknown key {dotted!r} (known keys in {where}: {', '.join(sorted(names))}{also})"
            )
    values = {}
    for name in names:
        if name not in raw:
            continue
        dotted = f"{prefix}.{name}" if prefix else name
        value = _check_type(raw[name], hints[name], dotted)
        if dotted in _POSITIVE and value is not None and value <= 0:
            raise ConfigError(f"{dotted}: must be greater than 0, got {value!r}")
        if dotted in _CHOICES and value not in _CHOICES[dotted]:
            raise ConfigError(f"{dotted}: must be one of {', '.join(_CHOICES[dotted])}")
        values[name] = value
    return cls(**values)


def _check_relations(cfg: Config) -> None:
    if not 0 < cfg.engine.gpu_memory_utilization <= 1:
        raise ConfigError("engine.gpu_memory_utilization: must be in (0, 1]")
    if cfg.gpu.max_memory_percent > 100:
        raise ConfigError("gpu.max_memory_percent: must be at most 100")
    local_gpus = cfg.engine.backend == "vllm" or (
        cfg.engine.backend == "ray" and cfg.engine.ray.address is None
    )
    if local_gpus and (cfg.engine.gpu_memory_utilization * 100 >= cfg.gpu.max_memory_percent):
        # vLLM takes that share of the GPU for itself: the guard would then see the GPU
        # over its limit before every chunk, and throttle forever once the model loaded.
        raise ConfigError(
            f"engine.gpu_memory_utilization ({cfg.engine.gpu_memory_utilization}) must stay "
            f"below gpu.max_memory_percent ({cfg.gpu.max_memory_percent:g} %): the loaded "
            "model alone would hold the GPU over the limit and every chunk would wait"
        )
    if cfg.limits.min_free_disk_mb < 0:
        raise ConfigError("limits.min_free_disk_mb: must not be negative (0 turns the check off)")
    if cfg.gpu.resume_temperature_c > cfg.gpu.max_temperature_c:
        raise ConfigError("gpu.resume_temperature_c: must not exceed gpu.max_temperature_c")
    if cfg.heartbeat.stale_after_s <= cfg.heartbeat.interval_s:
        raise ConfigError("heartbeat.stale_after_s: must be longer than heartbeat.interval_s")
    res = cfg.engine.ray.resources_per_replica
    if res is not None:
        if not res:
            raise ConfigError(
                "engine.ray.resources_per_replica: empty; name what one replica needs, "
                "e.g. {GPU: 1} or {CPU: 4} (or leave the key out for the default)"
            )
        for name, amount in res.items():
            if amount < 0:
                raise ConfigError(
                    f"engine.ray.resources_per_replica.{name}: must not be negative, got {amount:g}"
                )
    if cfg.engine.fake.delay_per_request_s < 0:
        raise ConfigError("engine.fake.delay_per_request_s: must not be negative")
    if not 0 < cfg.api.port < 65536:
        raise ConfigError(f"api.port: must be a TCP port (1 to 65535), got {cfg.api.port}")
    if cfg.watch.settle_seconds < 0:
        raise ConfigError("watch.settle_seconds: must not be negative")
    safe = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    if not set(cfg.instance) <= safe or cfg.instance.startswith("."):
        raise ConfigError(
            f"instance: {cfg.instance!r} may use only letters, digits, '.', '_' and '-'"
        )
    for reserved in (".fenced-", ".lease", ".json", ".grave"):  # spoold's own names
        if reserved in cfg.instance:
            raise ConfigError(
                f"instance: {cfg.instance!r} must not contain {reserved!r} (spoold names "
                "its heartbeat and lease files with it): choose another name"
            )


def _split_engine_args(raw: Any) -> tuple[Any, dict[str, Any]]:
    """With `engine.backend: vllm` (or `ray`, whose replicas are vLLM engines), keys
    under `engine` that are not spoold's own are vLLM engine arguments (SPEC §6): (raw
    without them, them)."""
    engine = raw.get("engine") if isinstance(raw, dict) else None
    if not isinstance(engine, dict) or engine.get("backend") not in ("vllm", "ray"):
        return raw, {}
    if "model" not in engine:
        raise ConfigError(
            f"engine.model: required with engine.backend: {engine['backend']} (a hub id such as "
            "Qwen/Qwen2.5-0.5B-Instruct, or a local path)"
        )
    own = {f.name for f in dataclasses.fields(EngineConfig)}
    direct = {str(k): v for k, v in engine.items() if k not in own}
    kept = {k: v for k, v in engine.items() if k in own}
    return {**raw, "engine": kept}, direct


def parse_config(raw: Any, source: str = "<config>") -> Config:
    """Build a Config from parsed YAML; raises ConfigError naming `source` and the key."""
    try:
        raw, direct = _split_engine_args(raw)
        cfg: Config = _build(Config, raw, "")
        for key in direct.keys() & cfg.engine.extra_args.keys():
            raise ConfigError(
                f"engine.{key}: set both under engine and under engine.extra_args; set it once"
            )
        cfg.engine.extra_args = {**direct, **cfg.engine.extra_args}
        _check_relations(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def resolve_config_path(arg: str | None) -> Path:
    """--config, else $SPOOLD_CONFIG, else /etc/spoold/spoold.yaml."""
    if arg:
        return Path(arg)
    env = os.environ.get("SPOOLD_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH


def config_for(config: str | None, spool: str | None) -> Config:
    """The config every command uses (SPEC §5): `--config PATH`, else $SPOOLD_CONFIG, else
    /etc/spoold/spoold.yaml; `--spool DIR` overrides its `spool_dir`. A file that was named
    must exist; the default one may be absent when `--spool` says where the spool is (the
    defaults apply then)."""
    path = resolve_config_path(config)
    named = bool(config or os.environ.get("SPOOLD_CONFIG"))
    if named or path.exists():
        try:
            cfg = load_config(path)
        except ConfigError as e:
            if path.exists():  # there, but not a config: its own message says why
                raise
            given = "--config" if config else "$SPOOLD_CONFIG"
            raise ConfigError(f"{path}: config file not found (named by {given})") from e
    elif spool:
        cfg = Config()
    else:
        raise ConfigError(
            f"{path}: config file not found: pass --config PATH, set SPOOLD_CONFIG, "
            "or name the spool with --spool DIR (the defaults apply then)"
        )
    if spool:
        cfg.spool_dir = Path(spool)
    return cfg


def load_config(path: Path) -> Config:
    """Read and check a YAML config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found (pass --config PATH or set SPOOLD_CONFIG)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_config(raw, str(path))
