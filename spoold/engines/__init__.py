"""Inference engines behind one small interface (`base.Engine`)."""

from __future__ import annotations

from spoold.config import EngineConfig
from spoold.engines.base import Engine
from spoold.validate import GENERATE


def make_engine(cfg: EngineConfig, model: str, runner: str = GENERATE) -> Engine:
    """Build the engine named by `engine.backend` for `model`, loaded with `runner`
    ("generate" or "pooling", SPEC §6 Endpoints); vLLM is imported lazily."""
    if cfg.backend == "ray":
        from spoold.engines.rayengine import RayEngine

        return RayEngine(cfg, model, runner)
    if cfg.backend == "vllm":
        from spoold.engines.vllm import VllmEngine

        return VllmEngine(cfg, model, runner)
    from spoold.engines.fake import FakeEngine

    return FakeEngine(model, cfg.fake, runner)
