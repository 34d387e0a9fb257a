"""`spoold serve`: the OpenAI Files and Batches API over the spool (SPEC §10, design §11).

A Starlette app under uvicorn (the `api` extra). It keeps no state of its own: every
answer comes from the spool through `spoold.batches.Store`. `spoold run` and
`spool-status` never import this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from spoold.batches import ApiError, Content, Invalid, NotFound, Store, TooLarge, Upload
from spoold.config import Config, ConfigError

log = structlog.get_logger()

SWEEP_INTERVAL_S = 2.0
MAX_FIELD_BYTES = 4096  # a form field other than the file (purpose)
READ_BLOCK = 1 << 20
Endpoint = Callable[[Request], Awaitable[Response]]
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class Unauthorized(ApiError):
    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Keys:
    """`api.keys_file`: one `TOKEN [OWNER]` a line (`#` comments and blank lines skipped).
    Read again when the file changes; a broken new version keeps the last good one."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._keys: dict[bytes, str | None] = {}
        if path is not None:
            self._keys = self._read()  # a broken file at start: ConfigError

    def _read(self) -> dict[bytes, str | None]:
        assert self.path is not None
        try:
            st = self.path.stat()
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"api.keys_file: {self.path}: cannot be read: {e}") from None
        keys: dict[bytes, str | None] = {}
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) > 2:
                raise ConfigError(
                    f"api.keys_file: {self.path} line {number}: expected TOKEN [OWNER], "
                    f"got {len(words)} words"
                )
            keys[_digest(words[0])] = words[1] if len(words) == 2 else None
        if not keys:
            raise ConfigError(f"api.keys_file: {self.path}: holds no key (TOKEN [OWNER] a line)")
        self._seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        return keys

    def _refresh(self) -> None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except OSError:
            return  # gone for a moment (an editor's rename): the keys in force stay
        if (st.st_mtime_ns, st.st_size, st.st_ino) == self._seen:
            return
        try:
            self._keys = self._read()
            log.info("api keys read again", keys_file=str(self.path), keys=len(self._keys))
        except ConfigError as e:
            self._seen = (st.st_mtime_ns, st.st_size, st.st_ino)
            log.error("api keys file broken; the keys read before stay in force", error=str(e))

    def owner(self, request: Request) -> str | None:
        """The owner of the request's key (None: a key without an owner, or no keys file);
        Unauthorized without a valid key."""
        if self.path is None:
            return None
        self._refresh()
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(
                "You didn't provide an API key. Pass it as 'Authorization: Bearer TOKEN' "
                "(a token from the server's api.keys_file)"
            )
        digest = _digest(token.strip())
        if digest not in self._keys:
            raise Unauthorized("Incorrect API key provided (not in the server's api.keys_file)")
        return self._keys[digest]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(cfg: Config) -> None:
    """Without a keys file the API is anyone's: it listens on loopback only."""
    if cfg.api.keys_file is None and not is_loopback(cfg.api.host):
        raise ConfigError(
            f"api.host: {cfg.api.host} is not a loopback address, and api.keys_file is not "
            "set: without keys anyone who reaches the port could read and submit batches; "
            "set api.keys_file (TOKEN [OWNER] a line), or listen on 127.0.0.1"
        )


class _FormReader:
    """The callbacks of python-multipart's streaming parser: the `file` part goes into an
    Upload as it arrives, the other fields (small) are kept."""

    def __init__(self, upload: Upload) -> None:
        self.upload = upload
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_done = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._name: str | None = None
        self._is_file = False
        self._data = bytearray()

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_header_field": lambda d, s, e: self._header_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
        }

    def _part_begin(self) -> None:
        self._disposition, self._name, self._is_file = b"", None, False
        self._data.clear()

    def _header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise Invalid("Malformed multipart body: a part has no name", param="file")
        self._name = name.decode("utf-8", "replace")
        if self._name == "file":
            if self.filename is not None:
                raise Invalid("Only one file may be uploaded at a time", param="file")
            raw = options.get(b"filename", b"upload.jsonl")
            self.filename = os.path.basename(raw.decode("utf-8", "replace")) or "upload.jsonl"
            self._is_file = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.upload.write(data[start:end])
            return
        self._data.extend(data[start:end])
        if len(self._data) > MAX_FIELD_BYTES:
            raise Invalid(f"Form field {self._name!r} is too long", param=self._name)

    def _part_end(self) -> None:
        if self._is_file:
            self.file_done = True
        elif self._name is not None:
            self.fields[self._name] = self._data.decode("utf-8", "replace")


async def _drain(request: Request) -> None:
    """Read and drop the rest of a refused body, so that the client reads the answer
    rather than a reset connection."""
    # RuntimeError: the body was read to its end already.
    with contextlib.suppress(ClientDisconnect, RuntimeError):
        async for _ in request.stream():
            pass


def _content_response(content: Content) -> StreamingResponse:
    def blocks() -> Iterator[bytes]:
        with open(content.path, "rb") as f:
            left = content.length
            while left > 0 and (block := f.read(min(READ_BLOCK, left))):
                left -= len(block)
                yield block

    return StreamingResponse(
        iterate_in_threadpool(blocks()),
        media_type="application/octet-stream",
        headers={
            "content-length": str(content.length),
            # The name is the uploader's: only safe characters go into a header.
            "content-disposition": f'attachment; filename="{_SAFE.sub("_", content.filename)}"',
        },
    )


def _int_param(request: Request, name: str, default: int, top: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Invalid(f"Invalid '{name}': expected an integer, got {raw!r}", param=name) from None
    if not 1 <= value <= top:
        raise Invalid(f"Invalid '{name}': must be between 1 and {top}", param=name)
    return value


def _listing(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def create_app(cfg: Config) -> Starlette:
    """The ASGI app for the spool `cfg` names."""
    store = Store(cfg.spool_dir, cfg.limits.max_file_bytes)
    keys = Keys(cfg.api.keys_file)
    started = int(time.time())

    async def owner_of(request: Request) -> str | None:
        return keys.owner(request)

    def by_id(call: Callable[[str, str | None], dict[str, Any]], param: str) -> Endpoint:
        """An endpoint that answers `call(<path param>, <the key's owner>)` as JSON."""

        async def endpoint(request: Request) -> Response:
            owner = await owner_of(request)
            return JSONResponse(await run_in_threadpool(call, request.path_params[param], owner))

        return endpoint

    async def health(request: Request) -> Response:
        from spoold.status import DOWN, build_report

        report = await run_in_threadpool(build_report, cfg.spool_dir, cfg.heartbeat.stale_after_s)
        body = report.to_dict()
        return JSONResponse(body, status_code=503 if report.exit_code >= DOWN else 200)

    async def models(request: Request) -> Response:
        await owner_of(request)
        names = [cfg.engine.model, *cfg.engine.models]
        data = [
            {
                "id": name,
                "object": "model",
                "created": started,
                "owned_by": "spoold",
                "root": cfg.engine.models.get(name, cfg.engine.model),
            }
            for name in dict.fromkeys(names)
        ]
        return JSONResponse({"object": "list", "data": data})

    async def upload_file(request: Request) -> Response:
        owner = await owner_of(request)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cfg.limits.max_file_bytes + (1 << 20):
            await _drain(request)
            raise TooLarge(
                f"File too large: the body is {declared} bytes, over limits.max_file_bytes "
                f"({cfg.limits.max_file_bytes}); split it into several batches",
                param="file",
                code="file_too_large",
            )
        ctype, params = parse_options_header(request.headers.get("content-type", ""))
        boundary = params.get(b"boundary")
        if ctype != b"multipart/form-data" or not boundary:
            await _drain(request)
            raise Invalid(
                "Expected a multipart/form-data body with a 'file' and 'purpose'", param="file"
            )
        upload = await run_in_threadpool(store.new_upload, owner)
        reader = _FormReader(upload)
        parser = MultipartParser(boundary, reader.callbacks())  # type: ignore[arg-type]
        try:
            async for chunk in request.stream():
                parser.write(chunk)
                if upload.pending():
                    await run_in_threadpool(upload.flush)
            parser.finalize()
            purpose = reader.fields.get("purpose")
            if not reader.file_done:
                raise Invalid("Missing required parameter: 'file' (a complete part)", "file")
            if purpose is None:
                raise Invalid("Missing required parameter: 'purpose'.", param="purpose")
            if purpose != "batch":
                raise Invalid(
                    f"Invalid value for 'purpose': {purpose!r}; spoold takes only 'batch'",
                    param="purpose",
                    code="invalid_value",
                )
            assert reader.filename is not None
            file = await run_in_threadpool(upload.finish, reader.filename, purpose)
        except FormParserError as e:
            await run_in_threadpool(upload.abort)
            raise Invalid(f"Malformed multipart body: {e}", param="file") from None
        except ApiError:
            await run_in_threadpool(upload.abort)
            await _drain(request)
            raise
        except BaseException:  # a client gone mid-upload, a full disk: nothing stays
            await run_in_threadpool(upload.abort)
            raise
        log.info("file uploaded", file_id=file["id"], bytes=file["bytes"], owner=owner)
        return JSONResponse(file)

    async def list_files(request: Request) -> Response:
        owner = await owner_of(request)
        q = request.query_params
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise Invalid("Invalid 'order': asc or desc", param="order")
        data, more = await run_in_threadpool(
            store.list_files,
            owner,
            q.get("purpose"),
            _int_param(request, "limit", 10_000, 10_000),
            q.get("after"),
            order,
        )
        return JSONResponse(_listing(data, more))

    async def file_content(request: Request) -> Response:
        owner = await owner_of(request)
        file_id = request.path_params["file_id"]
        content = await run_in_threadpool(store.file_content, file_id, owner)
        return _content_response(content)

    async def create_batch(request: Request) -> Response:
        owner = await owner_of(request)
        try:
            body = await request.json()
        except ValueError:
            raise Invalid("The body is not valid JSON") from None
        if not isinstance(body, dict):
            raise Invalid("The body must be a JSON object")
        batch = await run_in_threadpool(
            store.create_batch,
            owner,
            body.get("input_file_id"),
            body.get("endpoint"),
            body.get("completion_window"),
            body.get("metadata"),
        )
        return JSONResponse(batch)

    async def list_batches(request: Request) -> Response:
        owner = await owner_of(request)
        limit = _int_param(request, "limit", 20, 100)
        after = request.query_params.get("after")
        data, more = await run_in_threadpool(store.list_batches, owner, limit, after)
        return JSONResponse(_listing(data, more))

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code in (404, 405):
            error: ApiError = NotFound(
                f"Invalid URL ({request.method} {request.url.path}): spoold serves the Files "
                "and Batches API (/v1/files, /v1/batches), /v1/models and /health"
            )
            return JSONResponse(error.body(), status_code=404)
        error = ApiError(str(exc.detail))
        return JSONResponse(error.body(), status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("request failed", path=request.url.path, error=repr(exc))
        error = ApiError(f"The server could not answer: {exc}")
        error.kind = "server_error"
        return JSONResponse(error.body(), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(store.ensure_layout)
        stop = threading.Event()
        sweeper = threading.Thread(target=_sweep_loop, args=(store, stop), daemon=True)
        sweeper.start()
        log.info(
            "api serving",
            spool=str(cfg.spool_dir),
            keys_file=str(cfg.api.keys_file) if cfg.api.keys_file else None,
        )
        try:
            yield
        finally:
            stop.set()
            sweeper.join(timeout=5)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/files", upload_file, methods=["POST"]),
        Route("/v1/files", list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", by_id(store.get_file, "file_id"), methods=["GET"]),
        Route("/v1/files/{file_id}", by_id(store.delete_file, "file_id"), methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
        Route("/v1/batches", create_batch, methods=["POST"]),
        Route("/v1/batches", list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", by_id(store.get_batch, "batch_id"), methods=["GET"]),
        Route(
            "/v1/batches/{batch_id}/cancel",
            by_id(store.cancel_batch, "batch_id"),
            methods=["POST"],
        ),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        ApiError: api_error,
        HTTPException: http_error,
        Exception: server_error,
    }
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


def _sweep_loop(store: Store, stop: threading.Event) -> None:
    """Design §11 "the sweep": cancels carried forward, leftovers of crashes removed."""
    while True:
        try:
            store.sweep()
        except Exception as e:  # a spool that cannot be read now: try again
            log.warning("sweep failed", error=repr(e))
        if stop.wait(SWEEP_INTERVAL_S):
            return


def serve(cfg: Config) -> int:
    """Run the API in the foreground until SIGTERM/SIGINT."""
    import uvicorn

    check_listen(cfg)
    app = create_app(cfg)  # a broken keys file stops here (ConfigError)
    uvicorn.run(
        app,
        host=cfg.api.host,
        port=cfg.api.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0
