"""Inference engines behind one small interface (`base.Engine`)."""

from __future__ import annotations

from spoold.config import EngineConfig
from spoold.engines.base import Engine


def make_engine(cfg: EngineConfig) -> Engine:
    """Build the engine named by `engine.backend` (the vLLM one imports vLLM lazily)."""
    if cfg.backend == "fake":
        from spoold.engines.fake import FakeEngine

        return FakeEngine(cfg.model, cfg.fake)
    raise NotImplementedError(f"engine.backend {cfg.backend!r} is not available yet")
