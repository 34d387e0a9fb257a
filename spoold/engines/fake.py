"""A deterministic stand-in engine for tests, demos and benchmarks (no GPU, no model)."""

from __future__ import annotations

import array
import base64
import functools
import itertools
import math
import os
import sys
import time
import zlib
from collections.abc import Iterator
from typing import Any

from spoold.config import FakeEngineConfig
from spoold.engines.base import (
    IDLE,
    Choice,
    Completion,
    Embedding,
    Engine,
    EngineDied,
    Failure,
    ModelLoadError,
    Outcome,
)
from spoold.validate import GENERATE, POOLING, SUPPORTED_URLS, Request

_WORDS = (
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
)

# A fixed pseudo-random stream of words: an answer is a slice of it (cheap, repeatable),
# cut from the stream joined once, at the offsets where its words start.
_STREAM = tuple(_WORDS[(i * 7919 + i // 26) % len(_WORDS)] for i in range(8192))
_JOINED = " ".join(_STREAM) + " "
_STARTS = tuple(itertools.accumulate((len(w) + 1 for w in _STREAM), initial=0))
_URL_SEEDS = {url: zlib.crc32(url.encode()) for url in SUPPORTED_URLS}


FAKE_DIMENSIONS = 8  # an embedding's length unless the request asks for `dimensions`
MAX_FAKE_DIMENSIONS = 4096  # what it offers: more is refused, as a real model would


@functools.lru_cache(maxsize=16)
def _unit_vectors(dimensions: int) -> tuple[list[float], ...]:
    """256 fixed unit vectors of float32 values (made once per size: the fake's own
    cost must not hide spoold's in the benchmarks)."""
    vectors = []
    for k in range(256):
        raw = [math.sin(k * 7919 + 31 * i + 1) for i in range(dimensions)]
        norm = math.sqrt(sum(x * x for x in raw)) or 1.0
        vectors.append(array.array("f", (x / norm for x in raw)).tolist())
    return tuple(vectors)


def fake_vector(item: Any, dimensions: int) -> list[float]:
    """A unit vector that depends only on one input (a string or a list of token ids),
    each component a float32 value, as a model's would be."""
    return _unit_vectors(dimensions)[zlib.crc32(repr(item).encode()) % 256]


def encode_vector(vector: list[float], encoding_format: str | None) -> Any:
    """A vector as an embeddings response carries it: floats, or base64 of float32
    little-endian bytes (`encoding_format: base64`)."""
    if encoding_format != "base64":
        return vector
    packed = array.array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


class FakeEngineError(RuntimeError):
    """Raised for a whole batch, the way vLLM fails a batch for one bad prompt."""


def fake_answer(request: Request, text: str, index: int = 0) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) that depend only on the request."""
    seed = zlib.crc32(text.encode(), _URL_SEEDS[request.url]) + 7919 * index
    natural = 3 + seed % 30
    body = request.body
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    count = min(natural, limit) if limit else natural
    start = seed % (len(_STREAM) - 256)
    finish = "length" if limit is not None and natural > limit else "stop"
    return _JOINED[_STARTS[start] : _STARTS[start + count] - 1], finish, count


class FakeEngine(Engine):
    backend = "fake"

    def __init__(self, model: str, cfg: FakeEngineConfig, runner: str = GENERATE) -> None:
        if cfg.load_fail_marker and cfg.load_fail_marker in model:
            raise ModelLoadError(f"fake engine: no model named {model!r} (load_fail_marker)")
        if cfg.crash_marker and cfg.crash_marker in model:
            os._exit(71)  # a load the kernel's OOM killer ends: no exception, no cleanup
        self.model = model
        self.cfg = cfg
        self.runner = runner
        self.dead = False

    def _answer(self, request: Request, text: str) -> Completion:
        choices = []
        completion_tokens = 0
        for i in range(request.body.get("n") or 1):
            answer, finish, count = fake_answer(request, text, i)
            choices.append(Choice(answer, finish))
            completion_tokens += count
        # Roughly a token per word, plus one.
        return Completion(request, self.model, choices, text.count(" ") + 2, completion_tokens)

    def _embed(self, request: Request) -> Outcome:
        if not request.is_embedding:
            msg = f"line {request.line}: {request.url} does not run on a pooling model"
            return Failure(request, "invalid_request", msg, 400)
        body = request.body
        given = body["input"]
        items = [given] if type(given) is str or type(given[0]) is int else given
        dims = body.get("dimensions") or FAKE_DIMENSIONS
        if dims > MAX_FAKE_DIMENSIONS:
            msg = (
                f"line {request.line}: the fake engine's vectors have at most "
                f"{MAX_FAKE_DIMENSIONS} dimensions, got dimensions={dims}"
            )
            return Failure(request, "invalid_request", msg, 400)
        fmt = body.get("encoding_format")
        data = [encode_vector(fake_vector(item, dims), fmt) for item in items]
        tokens = sum(len(i) if type(i) is list else i.count(" ") + 2 for i in items)
        return Embedding(request, self.model, data, tokens)

    def run(self, requests: Iterator[Request]) -> Iterator[Outcome]:
        size = self.cfg.batch_size
        while batch := list(itertools.islice(requests, size)):
            batch = [r for r in batch if r is not IDLE]  # a feed with nothing yet
            if batch:
                yield from self._run_batch(batch)

    def _run_batch(self, batch: list[Request]) -> list[Outcome]:
        if self.dead:
            raise EngineDied("fake engine: the engine died earlier; reload it")
        texts = [r.text() for r in batch]
        crash, fail, die = self.cfg.crash_marker, self.cfg.fail_marker, self.cfg.die_marker
        if crash and any(crash in t for t in texts):
            os._exit(70)  # what a CUDA fault does to the process: no cleanup, no flush
        if die and any(die in t for t in texts):
            self.dead = True  # as vLLM's engine core process exiting under the daemon
            raise EngineDied(f"fake engine died on a batch of {len(batch)} (die_marker)")
        if fail and any(fail in t for t in texts):
            raise FakeEngineError(f"fake engine failed a batch of {len(batch)} (fail_marker)")
        if self.cfg.delay_per_request_s:
            time.sleep(self.cfg.delay_per_request_s * len(batch))
        if self.on_step is not None:
            self.on_step()
        if self.runner == POOLING:
            return [self._embed(r) for r in batch]
        return [
            _not_generation(r) if r.is_embedding else self._answer(r, t)
            for r, t in zip(batch, texts, strict=True)
        ]


def _not_generation(request: Request) -> Failure:
    msg = f"line {request.line}: {request.url} does not run on a generating model"
    return Failure(request, "invalid_request", msg, 400)
