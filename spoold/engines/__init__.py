"""Inference engines behind one small interface (`base.Engine`)."""

from __future__ import annotations

from spoold.config import EngineConfig
from spoold.engines.base import Engine


def make_engine(cfg: EngineConfig, model: str) -> Engine:
    """Build the engine named by `engine.backend` for `model` (vLLM is imported lazily)."""
    if cfg.backend == "ray":
        from spoold.engines.rayengine import RayEngine

        return RayEngine(cfg, model)
    if cfg.backend == "vllm":
        from spoold.engines.vllm import VllmEngine

        return VllmEngine(cfg, model)
    from spoold.engines.fake import FakeEngine

    return FakeEngine(model, cfg.fake)
