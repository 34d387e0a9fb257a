import re
from pathlib import Path

import pytest

from spoold.config import Config, ConfigError, load_config, parse_config
from tests.helpers import run_spoold


def test_defaults_match_spec() -> None:
    cfg = parse_config({})
    assert cfg.limits.max_requests_per_job == 50_000
    assert cfg.limits.max_file_bytes == 200_000_000
    assert cfg.processing.chunk_size == 5000
    assert cfg.processing.max_job_attempts == 3
    assert cfg.heartbeat.interval_s == 10
    assert cfg.heartbeat.stale_after_s == 60
    assert cfg.engine.gpu_memory_utilization == 0.85
    assert cfg.gpu.max_memory_percent == 95
    assert cfg.gpu.max_temperature_c == 85
    assert cfg.instance == "default"
    assert cfg.processing.max_chunk_bytes == 256 * 1024 * 1024
    assert cfg.processing.model_retry_s == 30
    assert cfg.processing.max_model_load_attempts == 5


def test_nested_values_are_read_and_typed() -> None:
    cfg = parse_config({"spool_dir": "/srv/spool", "engine": {"fake": {"delay_per_request_s": 1}}})
    assert cfg.spool_dir == Path("/srv/spool")
    assert cfg.engine.fake.delay_per_request_s == 1.0
    assert isinstance(cfg.engine.fake.delay_per_request_s, float)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"limts": {}}, "limts"),
        ({"limits": {"max_queue_dept": 3}}, "limits.max_queue_dept"),
        ({"engine": {"fake": {"delay_per_reqest_s": 1}}}, "engine.fake.delay_per_reqest_s"),
        ({"limits": {"max_queue_depth": "five"}}, "limits.max_queue_depth"),
        ({"limits": {"max_queue_depth": 0}}, "limits.max_queue_depth"),
        ({"processing": {"chunk_size": 2.5}}, "processing.chunk_size"),
        ({"watch": {"polling": "yes"}}, "watch.polling"),
        ({"engine": {"backend": "tensorrt"}}, "engine.backend"),
        ({"engine": {"gpu_memory_utilization": 1.5}}, "engine.gpu_memory_utilization"),
        ({"instance": "gpu/0"}, "instance"),
        ({"heartbeat": {"interval_s": 30, "stale_after_s": 10}}, "heartbeat.stale_after_s"),
        ({"engine": {"models": {"gpt-4": 3}}}, "engine.models.gpt-4"),
        ({"engine": {"backend": "vllm"}}, "engine.model"),
        ({"gpu": {"max_memory_percent": 250}}, "gpu.max_memory_percent"),
        ({"gpu": {"max_temperature_c": -5}}, "gpu.max_temperature_c"),
        ({"limits": {"min_free_disk_mb": -5}}, "limits.min_free_disk_mb"),
        ({"processing": {"max_chunk_bytes": 0}}, "processing.max_chunk_bytes"),
        ({"processing": {"model_retry_s": -1}}, "processing.model_retry_s"),
        ({"processing": {"max_model_load_attempts": 0}}, "processing.max_model_load_attempts"),
        # vLLM would hold the GPU over the guard's limit by itself: throttled forever.
        (
            {
                "engine": {"backend": "vllm", "model": "m", "gpu_memory_utilization": 0.96},
                "gpu": {"max_memory_percent": 95},
            },
            "gpu.max_memory_percent",
        ),
    ],
)
def test_bad_key_or_value_names_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "my.yaml")
    assert key in str(err.value)
    assert "my.yaml" in str(err.value)


def test_vllm_engine_arguments_go_directly_under_engine() -> None:
    """SPEC §6: 'the engine arguments as keys under engine (…, dtype, …)'."""
    cfg = parse_config(
        {
            "engine": {
                "backend": "vllm",
                "model": "m",
                "dtype": "float16",
                "enforce_eager": True,
                "extra_args": {"seed": 1},
            }
        }
    )
    assert cfg.engine.dtype == "float16"
    assert cfg.engine.extra_args == {"enforce_eager": True, "seed": 1}
    with pytest.raises(ConfigError, match=r"engine\.seed: set both"):
        parse_config(
            {"engine": {"backend": "vllm", "model": "m", "seed": 1, "extra_args": {"seed": 2}}}
        )
    # The fake engine takes no engine arguments: a key there is a typo, said so.
    with pytest.raises(ConfigError, match=r"'engine\.enforce_eager'.*engine\.backend: vllm"):
        parse_config({"engine": {"enforce_eager": True}})


def test_not_a_mapping_and_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    path.write_text("limits: {max_queue_depth: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert load_config(path) == Config()


def test_shipped_configs_load() -> None:
    root = Path(__file__).resolve().parent.parent
    for name in ("spoold.yaml", "fake.yaml"):
        load_config(root / "config" / name)


def test_spoold_run_with_bad_config_exits_2_before_touching_anything(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"spool_dir: {spool}\nprocessing:\n  chunk_sise: 10\n")
    proc = run_spoold("run", "--config", str(cfg), "--drain")
    assert proc.returncode == 2
    assert "processing.chunk_sise" in proc.stderr
    assert not spool.exists()


def test_config_from_environment_variable(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    cfg = tmp_path / "env.yaml"
    cfg.write_text("limits: {max_queue_depth: -1}\n")
    env = {**os.environ, "SPOOLD_CONFIG": str(cfg)}
    proc = subprocess.run(
        [sys.executable, "-m", "spoold", "run", "--drain"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert str(cfg) in proc.stderr and "limits.max_queue_depth" in proc.stderr


def test_the_ray_backends_keys_are_checked_at_load_naming_each(tmp_path: Path) -> None:
    from spoold.engines.rayengine import cluster_endpoint

    ok = parse_config(
        {"engine": {"backend": "ray", "model": "m", "enforce_eager": True,
                    "ray": {"address": "head:6379", "replicas": 4,
                            "resources_per_replica": {"GPU": 1, "CPU": 8}}}}
    )  # fmt: skip
    assert ok.engine.ray.replicas == 4 and ok.engine.ray.resources_per_replica == {
        "GPU": 1.0,
        "CPU": 8.0,
    }
    assert ok.engine.extra_args == {"enforce_eager": True}  # vLLM arguments, as for vllm
    for ray, key in (
        ({"replicas": 0}, "engine.ray.replicas"),
        ({"resources_per_replica": {}}, "engine.ray.resources_per_replica"),
        ({"resources_per_replica": {"GPU": -1}}, "engine.ray.resources_per_replica.GPU"),
        ({"resources_per_replica": {"GPU": "one"}}, "engine.ray.resources_per_replica.GPU"),
        ({"adress": "x:1"}, "engine.ray.adress"),
    ):
        with pytest.raises(ConfigError, match=re.escape(key)):
            parse_config({"engine": {"backend": "ray", "model": "m", "ray": ray}})
    with pytest.raises(
        ConfigError, match=re.escape("engine.model: required with engine.backend: ray")
    ):
        parse_config({"engine": {"backend": "ray"}})
    assert cluster_endpoint("ray://head:10001") == ("head", 10001)
    assert cluster_endpoint("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert cluster_endpoint("auto") is None
    with pytest.raises(ConfigError, match=re.escape("engine.ray.address")):
        cluster_endpoint("head")
