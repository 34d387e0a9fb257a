import json

from spoold.engines.base import Choice, Completion
from spoold.formats import batch_request_id, error_line, output_line
from spoold.validate import Request
from tests.helpers import chat, completion


def req(obj: dict[str, object], line: int = 1) -> Request:
    return Request(
        line=line, custom_id=str(obj["custom_id"]), url=str(obj["url"]), body=obj["body"]
    )  # type: ignore[arg-type]


def test_chat_output_line_is_openai_batch_format() -> None:
    c = Completion(req(chat("r1")), "served-model", [Choice("hi there", "stop")], 9, 12)
    raw = output_line("job-1", c, 1764000000)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    rec = json.loads(raw)
    assert set(rec) == {"id", "custom_id", "response", "error"}
    assert rec["id"].startswith("batch_req_") and rec["custom_id"] == "r1"
    assert rec["error"] is None
    resp = rec["response"]
    assert resp["status_code"] == 200 and resp["request_id"]
    body = resp["body"]
    assert body["object"] == "chat.completion" and body["created"] == 1764000000
    assert body["model"] == "any"  # as sent by the client
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi there"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}


def test_completion_output_line_has_text_choices() -> None:
    c = Completion(req(completion("r2")), "m", [Choice("a", "length"), Choice("b", "stop")], 3, 4)
    body = json.loads(output_line("job", c, 1))["response"]["body"]
    assert body["object"] == "text_completion"
    assert [ch["text"] for ch in body["choices"]] == ["a", "b"]
    assert [ch["index"] for ch in body["choices"]] == [0, 1]


def test_ids_are_stable_per_line_so_a_redone_line_is_the_same() -> None:
    assert batch_request_id("job", 5) == batch_request_id("job", 5)
    assert batch_request_id("job", 5) != batch_request_id("job", 6)


def test_error_line_shapes() -> None:
    rec = json.loads(error_line("job", 3, None, "invalid_json", "line 3: bad"))
    assert rec["response"] is None and rec["custom_id"] is None
    assert rec["error"] == {"code": "invalid_json", "message": "line 3: bad"}
    rec = json.loads(error_line("job", 4, "x", "engine_error", "boom", 500))
    assert rec["response"]["status_code"] == 500
    assert rec["response"]["body"]["error"]["message"] == "boom"


def test_non_ascii_is_kept_as_utf8() -> None:
    c = Completion(req(chat("r", content="héllo")), "m", [Choice("ça va", "stop")], 1, 1)
    raw = output_line("job", c, 1)
    assert "ça va".encode() in raw


def test_lines_break_at_newline_alone_for_every_reader() -> None:
    """SPEC §4: U+2028, U+2029, U+0085 (str.splitlines() splits on them), the other C1
    controls and DEL are written escaped; other non-ASCII text stays UTF-8."""
    odd = "a\x85b\u2028c\u2029d\x7fe\x80f\x9fg\x1ch é“”"
    c = Completion(req(chat(odd, content="q")), "m", [Choice(odd, "stop")], 1, 1)
    for raw in (output_line("job", c, 1), error_line("job", 2, odd, "x", odd, 500)):
        text = raw.decode()
        assert text.splitlines() == [text[:-1]]
        assert "\\u0085" in text and "\\u2028" in text and "\\u007f" in text and "é“”" in text
        rec = json.loads(text)
        assert rec["custom_id"] == odd
