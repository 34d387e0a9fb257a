"""`spoold serve` (SPEC §10, design §11), driven with the real `openai` client against a
real server and a real daemon on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import (
    SPOOLD,
    _env,
    chat,
    make_config,
    run_spoold,
    start_spoold,
    wait_for,
    write_jsonl,
)

FINAL = ("completed", "failed", "cancelled")
ORDER = ["validating", "in_progress", "finalizing", "cancelling", "completed", "cancelled"]
KEYS = "tok-alice alice\ntok-bob bob\n# an operator's key sees everything\ntok-admin\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Api:
    base: str
    spool: Path
    config: Path
    server: subprocess.Popen[bytes]
    log: Path

    def client(self, key: str = "tok-admin") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0)


@contextlib.contextmanager
def _serving(config: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        server = start_spoold("serve", "--config", str(config), "--port", str(port), log=out)
    try:
        wait_for(
            lambda: _answers(f"http://127.0.0.1:{port}/health") or server.poll() is not None,
            timeout=30,
            what="spoold serve to answer",
            detail=log.read_text,
        )
        assert server.poll() is None, log.read_text()
        yield server
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=20)


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return True


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One server and one daemon (fake engine, slow enough to see each state)."""
    tmp = tmp_path_factory.mktemp("api")
    (tmp / "keys").write_text(KEYS)
    port = _free_port()
    config = make_config(
        tmp,
        engine={"backend": "fake", "fake": {"delay_per_request_s": 0.01}},
        processing={"chunk_size": 5},
        api={"port": port, "keys_file": str(tmp / "keys")},
    )
    log = tmp / "serve.log"
    with open(tmp / "run.log", "wb") as run_log:
        daemon = start_spoold("run", "--config", str(config), log=run_log)
    try:
        with _serving(config, port, log) as server:
            yield Api(f"http://127.0.0.1:{port}", tmp / "spool", config, server, log)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)


def _requests(n: int, prefix: str = "r") -> list[dict[str, object]]:
    return [chat(f"{prefix}{i}", f"question {i}") for i in range(n)]


def _upload(client: openai.OpenAI, path: Path) -> str:
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="batch").id


def _poll(client: openai.OpenAI, batch_id: str, timeout: float = 60) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.batches.retrieve(batch_id).status
        if not seen or seen[-1] != status:
            seen.append(status)
        if status in FINAL:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"batch {batch_id} not final after {timeout}s: {seen}")


def _lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line]


def test_a_batch_from_upload_to_results_with_the_openai_client(api: Api, tmp_path: Path) -> None:
    """Upload, create, poll (states in order, never back), download output and errors
    line by line; the metadata comes back; the batch id is the job id on the spool."""
    client = api.client("tok-alice")
    records: list[dict[str, object] | str] = [*_requests(60), "not json at all"]
    path = write_jsonl(tmp_path / "questions.jsonl", records)
    file_id = _upload(client, path)
    uploaded = client.files.retrieve(file_id)
    assert uploaded.bytes == path.stat().st_size and uploaded.filename == "questions.jsonl"
    assert client.files.content(file_id).content == path.read_bytes()

    batch = client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"project": "atlas", "run": "7"},
    )
    assert batch.status == "validating" and batch.metadata == {"project": "atlas", "run": "7"}
    seen = _poll(client, batch.id)
    assert seen[-1] == "completed", seen
    assert seen == sorted(seen, key=ORDER.index), f"a status went back: {seen}"
    assert "in_progress" in seen

    done = client.batches.retrieve(batch.id)
    assert (api.spool / "done" / batch.id).is_dir()  # the batch id is the job id
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (61, 60)
    assert done.request_counts.failed == 1
    assert done.in_progress_at and done.completed_at and done.completed_at >= done.created_at
    assert done.metadata == {"project": "atlas", "run": "7"}
    assert done.input_file_id == file_id and done.output_file_id and done.error_file_id

    output = _lines(client.files.content(done.output_file_id).text)
    assert sorted(str(r["custom_id"]) for r in output) == sorted(f"r{i}" for i in range(60))
    for line in output:
        response = line["response"]
        assert isinstance(response, dict) and response["status_code"] == 200
    on_disk = (api.spool / "done" / batch.id / "output.jsonl").read_bytes()
    assert client.files.content(done.output_file_id).content == on_disk
    errors = _lines(client.files.content(done.error_file_id).text)
    assert len(errors) == 1 and errors[0]["custom_id"] is None
    error = errors[0]["error"]
    assert isinstance(error, dict) and "line 61" in str(error["message"])
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_an_embeddings_batch_with_the_openai_client(api: Api, tmp_path: Path) -> None:
    """SPEC §6 Endpoints through §10: a /v1/embeddings batch runs as an embeddings job;
    its output lines parse as the client's own embedding response type."""
    from openai.types import CreateEmbeddingResponse

    client = api.client("tok-alice")
    records = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "any", "input": [f"sentence {i}", "another"]},
        }
        for i in range(10)
    ]
    records.append(chat("not-here", "hi"))
    batch = client.batches.create(
        input_file_id=_upload(client, write_jsonl(tmp_path / "emb.jsonl", records)),
        endpoint="/v1/embeddings",
        completion_window="24h",
    )
    assert _poll(client, batch.id)[-1] == "completed"
    done = client.batches.retrieve(batch.id)
    assert done.endpoint == "/v1/embeddings"
    assert done.output_file_id and done.error_file_id
    output = _lines(client.files.content(done.output_file_id).text)
    assert len(output) == 10
    for line in output:
        body = CreateEmbeddingResponse.model_validate(line["response"]["body"])  # type: ignore[index]
        assert [d.index for d in body.data] == [0, 1] and body.usage.prompt_tokens > 0
    errors = _lines(client.files.content(done.error_file_id).text)
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [  # type: ignore[index]
        ("not-here", "endpoint_mismatch")
    ]


def test_batches_list_newest_first_with_pagination(api: Api, tmp_path: Path) -> None:
    client = api.client("tok-bob")
    made = []
    for i in range(5):
        path = write_jsonl(tmp_path / f"b{i}.jsonl", _requests(1, f"b{i}-"))
        made.append(
            client.batches.create(
                input_file_id=_upload(client, path),
                endpoint="/v1/chat/completions",
                completion_window="24h",
            ).id
        )
        time.sleep(1.05)  # created_at has whole seconds: a clear order
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    second = client.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in second.data] == made[::-1][2:4]
    # The client's own pagination walks every page.
    assert [b.id for b in client.batches.list(limit=2)] == made[::-1]
    for batch_id in made:
        assert _poll(client, batch_id)[-1] == "completed"


def test_cancel_a_running_batch_keeps_its_partial_results(api: Api, tmp_path: Path) -> None:
    client = api.client("tok-alice")
    path = write_jsonl(tmp_path / "long.jsonl", _requests(2000))
    batch = client.batches.create(
        input_file_id=_upload(client, path),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    wait_for(
        lambda: client.batches.retrieve(batch.id).request_counts.completed > 0,  # type: ignore[union-attr]
        what="the batch to make progress",
    )
    answer = client.batches.cancel(batch.id)
    assert answer.status in ("cancelling", "cancelled")
    seen = _poll(client, batch.id)
    assert seen[-1] == "cancelled"
    final = client.batches.retrieve(batch.id)
    assert final.cancelled_at and final.cancelling_at
    assert final.request_counts is not None and 0 < final.request_counts.completed < 2000
    assert final.output_file_id is not None
    partial = _lines(client.files.content(final.output_file_id).text)
    assert len(partial) == final.request_counts.completed
    assert len({r["custom_id"] for r in partial}) == len(partial)


def test_owners_see_only_their_own_and_an_operator_sees_all(api: Api, tmp_path: Path) -> None:
    alice, bob, admin = api.client("tok-alice"), api.client("tok-bob"), api.client()
    path = write_jsonl(tmp_path / "mine.jsonl", _requests(3, "alice-"))
    file_id = _upload(alice, path)
    batch = alice.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    for call in (
        lambda: bob.files.retrieve(file_id),
        lambda: bob.files.content(file_id),
        lambda: bob.files.delete(file_id),
        lambda: bob.batches.retrieve(batch.id),
        lambda: bob.batches.cancel(batch.id),
        lambda: bob.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):  # 404, never 403: ids do not leak
            call()
    assert batch.id not in {b.id for b in bob.batches.list()}
    assert file_id not in {f.id for f in bob.files.list()}
    assert admin.batches.retrieve(batch.id).id == batch.id
    assert file_id in {f.id for f in admin.files.list()}
    # A job dropped by other means is a batch to the operator's key only.
    dropped = write_jsonl(tmp_path / "dropped.jsonl", _requests(2, "dropped-"))
    run_spoold("submit", "--config", str(api.config), str(dropped), check=True)
    job_id = wait_for(
        lambda: next(
            (p.name for d in ("processing", "done") for p in (api.spool / d).glob("dropped-*")),
            None,
        ),
        what="the dropped file to be claimed",
    )
    assert _poll(admin, job_id)[-1] == "completed"
    as_batch = admin.batches.retrieve(job_id)
    assert as_batch.endpoint == "/v1/chat/completions"
    assert admin.files.content(as_batch.input_file_id).content == dropped.read_bytes()
    with pytest.raises(openai.NotFoundError):
        alice.batches.retrieve(job_id)
    assert job_id not in {b.id for b in alice.batches.list(limit=100)}


def test_keys_errors_and_models(api: Api) -> None:
    with pytest.raises(openai.AuthenticationError):
        api.client("tok-wrong").batches.list()
    assert httpx.get(f"{api.base}/v1/batches").status_code == 401
    health = httpx.get(f"{api.base}/health")  # no key needed
    assert health.status_code == 200 and "daemons" in health.json()
    client = api.client()
    assert [m.id for m in client.models.list()] == ["fake-model"]

    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_" + "0" * 32)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-" + "0" * 24)
    with pytest.raises(openai.NotFoundError) as unknown_input:
        client.batches.create(
            input_file_id="file-" + "1" * 24,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
    assert unknown_input.value.body["param"] == "input_file_id"  # type: ignore[index]
    file_id = client.files.create(file=("x.jsonl", b"{}\n"), purpose="batch").id
    for bad, param in (
        ({"endpoint": "/v1/responses", "completion_window": "24h"}, "endpoint"),
        ({"endpoint": "/v1/completions", "completion_window": "48h"}, "completion_window"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.batches.create(input_file_id=file_id, **bad)  # type: ignore[arg-type]
        assert e.value.body["param"] == param  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as purpose:
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert purpose.value.body["param"] == "purpose"  # type: ignore[index]

    headers = {"Authorization": "Bearer tok-admin"}
    nowhere = httpx.get(f"{api.base}/v1/assistants", headers=headers)
    assert nowhere.status_code == 404 and set(nowhere.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    broken = httpx.post(
        f"{api.base}/v1/files",
        headers={**headers, "Content-Type": "multipart/form-data; boundary=xyz"},
        content=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nab',
    )
    assert broken.status_code == 400 and broken.json()["error"]["param"] == "file"
    assert not [p for p in (api.spool / "files").iterdir() if p.name.startswith(".upload-")]


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_150_mb_upload_keeps_the_servers_memory_flat(api: Api, tmp_path: Path) -> None:
    client = api.client()
    client.files.create(file=("warm.jsonl", b"{}\n" * 1000), purpose="batch")
    before = _hwm_kib(api.server.pid)
    big = tmp_path / "big.jsonl"
    line = json.dumps(chat("x", "y" * 900)).encode() + b"\n"
    with open(big, "wb") as f:
        for _ in range(150 * 1024 * 1024 // len(line)):
            f.write(line)
    with open(big, "rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    grown_mib = (_hwm_kib(api.server.pid) - before) / 1024
    assert uploaded.bytes == big.stat().st_size
    assert grown_mib < 40, f"the server's peak RSS grew by {grown_mib:.0f} MiB for 150 MB"
    assert (api.spool / "files" / uploaded.id / "content").stat().st_size == uploaded.bytes
    client.files.delete(uploaded.id)
    assert not (api.spool / "files" / uploaded.id).exists()


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[Api]:
    """A server with no daemon and no keys (loopback), files up to 4 KB."""
    port = _free_port()
    config = make_config(tmp_path, limits={"max_file_bytes": 4096}, api={"port": port})
    with _serving(config, port, tmp_path / "serve.log") as server:
        yield Api(f"http://127.0.0.1:{port}", tmp_path / "spool", config, server, tmp_path / "l")


def test_oversize_upload_is_413_and_leaves_nothing(bare: Api) -> None:
    client = bare.client()
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", b"x" * 5000), purpose="batch")
    assert e.value.status_code == 413
    assert list((bare.spool / "files").iterdir()) == []
    assert list((bare.spool / "incoming").iterdir()) == []


def test_without_a_daemon_health_is_503_and_a_waiting_batch_cancels_at_once(
    bare: Api, tmp_path: Path
) -> None:
    assert httpx.get(f"{bare.base}/health").status_code == 503
    client = bare.client()
    file_id = client.files.create(file=("w.jsonl", b"\n".join([b"{}"] * 3)), purpose="batch").id
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert (bare.spool / "incoming" / f"{batch.id}.jsonl").exists()
    assert client.batches.cancel(batch.id).status == "cancelled"
    assert list((bare.spool / "incoming").iterdir()) == []
    run_spoold("run", "--config", str(bare.config), "--drain", check=True)
    assert client.batches.retrieve(batch.id).status == "cancelled"
    assert not (bare.spool / "done").exists() or list((bare.spool / "done").iterdir()) == []


def test_a_server_killed_mid_upload_leaves_nothing_that_could_become_a_batch_a1(
    tmp_path: Path,
) -> None:
    """A1: SIGKILL while the body streams in: only a dot-named upload dir in files/,
    nothing in incoming/; the next server's sweep removes it."""
    port = _free_port()
    config = make_config(tmp_path, api={"port": port})
    spool = tmp_path / "spool"
    with _serving(config, port, tmp_path / "serve.log") as server:
        head = (
            b'--b0undary\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--b0undary\r\nContent-Disposition: form-data; name="file"; '
            b'filename="big.jsonl"\r\n\r\n'
        )
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b0undary\r\nContent-Length: 100000000\r\n\r\n" + head
        )
        for _ in range(40):
            sock.sendall(json.dumps(chat("x", "y" * 2000)).encode() * 64 + b"\n")
        wait_for(
            lambda: any(p.name.startswith(".upload-") for p in (spool / "files").iterdir()),
            what="the upload to reach the disk",
        )
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        sock.close()
    left = list((spool / "files").iterdir())
    assert [p.name.startswith(".upload-") for p in left] == [True]
    assert list((spool / "incoming").iterdir()) == []
    with _serving(config, port, tmp_path / "serve2.log"):
        wait_for(lambda: not any((spool / "files").iterdir()), what="the sweep", timeout=10)
        assert api_files(port) == []
    run_spoold("run", "--config", str(config), "--drain", check=True)
    assert not (spool / "done").exists() or list((spool / "done").iterdir()) == []


def api_files(port: int) -> list[str]:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
    return [f.id for f in client.files.list()]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_batch_record_without_input_is_not_a_batch_b1(tmp_path: Path) -> None:
    """B1: the server SIGKILLed (by strace) at the link(2) that puts the input into
    incoming/: the record is there, nothing else; the batch is nowhere (404, not listed)
    and the sweep removes the record once it is old."""
    port = _free_port()
    config = make_config(tmp_path, api={"port": port})
    spool = tmp_path / "spool"
    log = tmp_path / "serve.log"
    server = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "inject=link,linkat:signal=KILL",
         *SPOOLD, "serve", "--config", str(config)],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        env={**_env(), "PYTHONDONTWRITEBYTECODE": "1"},
    )  # fmt: skip
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/health"), detail=log.read_text)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        file_id = client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch").id
        with pytest.raises(openai.APIConnectionError):
            client.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        server.wait(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    records = [p for p in (spool / "batches").iterdir() if p.name.endswith(".json")]
    # The input's copy was killed at its publish: a dot-named temp, which no daemon takes.
    left = list((spool / "incoming").iterdir())
    assert len(records) == 1 and all(p.name.startswith(".") for p in left), left
    batch_id = records[0].name[: -len(".json")]
    with _serving(config, port, tmp_path / "serve2.log"):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve(batch_id)
        assert batch_id not in {b.id for b in client.batches.list()}
    from spoold.batches import ORPHAN_AFTER_S, Store

    run_spoold("run", "--config", str(config), "--drain", check=True)
    assert not (spool / "done").exists() or list((spool / "done").iterdir()) == []
    Store(spool, 1 << 20).sweep(now=time.time() + ORPHAN_AFTER_S + 60)
    assert not records[0].exists()
    assert list((spool / "incoming").iterdir()) == []
    assert (spool / "files" / file_id / "content").exists()  # the upload is untouched


def test_no_keys_means_loopback_only_and_a_broken_keys_file_stops_the_start(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    exposed = run_spoold("serve", "--config", str(config), "--host", "0.0.0.0", timeout=60)
    assert exposed.returncode == 2 and "api.keys_file" in exposed.stderr, exposed.stderr
    (tmp_path / "keys").write_text("tok-1 alice\ntok-2 bob extra words\n")
    keyed = make_config(tmp_path, api={"keys_file": str(tmp_path / "keys")})
    broken = run_spoold("serve", "--config", str(keyed), timeout=60)
    assert broken.returncode == 2 and "line 2" in broken.stderr, broken.stderr
    missing = make_config(tmp_path, api={"keys_file": str(tmp_path / "nope")})
    gone = run_spoold("serve", "--config", str(missing), timeout=60)
    assert gone.returncode == 2 and "api.keys_file" in gone.stderr, gone.stderr


def test_two_servers_on_one_spool_answer_alike(api: Api, tmp_path: Path) -> None:
    """No state but the spool: a batch made through one server is retrieved, listed and
    cancelled through another, started later on another port."""
    port = _free_port()
    with _serving(api.config, port, tmp_path / "second.log"):
        first, second = (
            api.client("tok-alice"),
            openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="tok-alice", max_retries=0
            ),
        )
        path = write_jsonl(tmp_path / "shared.jsonl", _requests(1500, "s"))
        batch = first.batches.create(
            input_file_id=_upload(first, path),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        assert second.batches.retrieve(batch.id).id == batch.id
        assert batch.id in {b.id for b in second.batches.list(limit=100)}
        second.batches.cancel(batch.id)
        assert _poll(first, batch.id)[-1] == "cancelled"


def test_the_daemon_and_spool_status_never_import_the_http_stack(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    code = (
        "import sys\n"
        "from spoold.cli import main\n"
        f"main(['run', '--config', {str(cfg)!r}, '--drain'])\n"
        "import spoold.status as s\n"
        f"s.main(['--config', {str(cfg)!r}])\n"
        "web = ('starlette', 'uvicorn', 'python_multipart', 'multipart', 'openai', 'httpx')\n"
        "print('WEB', [m for m in sys.modules if m.split('.')[0] in web])\n"
    )
    proc = subprocess.run(
        [SPOOLD[0], "-c", code], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert "WEB []" in proc.stdout, proc.stdout + proc.stderr


def test_deleting_the_upload_or_reusing_it_leaves_a_running_batch_alone(
    api: Api, tmp_path: Path
) -> None:
    """Each batch's input is its own copy: a second batch made from the same upload, and
    the upload deleted, while the first runs, change nothing of the first (a shared
    inode's ctime would have made the daemon restart it from scratch)."""
    client = api.client("tok-alice")
    path = write_jsonl(tmp_path / "shared-upload.jsonl", _requests(800, "u"))
    file_id = _upload(client, path)
    first = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    progress = [0]

    def moved_on() -> bool:
        counts = client.batches.retrieve(first.id).request_counts
        assert counts is not None and counts.completed >= progress[-1], "progress went back"
        progress.append(counts.completed)
        return counts.completed > 0

    wait_for(moved_on, what="the first batch to make progress")
    second = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    client.files.delete(file_id)
    while client.batches.retrieve(first.id).status not in FINAL:
        moved_on()
        time.sleep(0.05)
    for batch_id in (first.id, second.id):
        assert _poll(client, batch_id)[-1] == "completed"
        done = client.batches.retrieve(batch_id)
        assert done.output_file_id is not None
        lines = _lines(client.files.content(done.output_file_id).text)
        assert sorted(str(r["custom_id"]) for r in lines) == sorted(f"u{i}" for i in range(800))
    run_log = (api.spool.parent / "run.log").read_text()
    restarts = [line for line in run_log.splitlines() if "input changed after the claim" in line]
    assert restarts == [], restarts
