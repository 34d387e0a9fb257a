import io
import json
from pathlib import Path
from typing import Any

import pytest

from spoold import unique
from spoold.validate import (
    LineError,
    NotUtf8Error,
    Request,
    parse_line,
    read_request,
    scan_file,
)
from tests.helpers import chat, completion


def line(obj: Any) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def test_valid_chat_and_completion() -> None:
    r = parse_line(line(chat("a", max_tokens=5, temperature=0)), 1)
    assert isinstance(r, Request) and r.is_chat and r.custom_id == "a" and r.line == 1
    r = parse_line(line(completion("b", stop=["\n"])), 7)
    assert isinstance(r, Request) and not r.is_chat and r.text() == "Once upon"


def test_blank_lines_are_skipped() -> None:
    assert parse_line(b"   \r\n", 3) is None


def test_bom_and_crlf_accepted() -> None:
    r = parse_line(b"\xef\xbb\xbf" + line(chat("a")).rstrip(b"\n") + b"\r\n", 1)
    assert isinstance(r, Request)


def test_the_run_pass_reads_what_validation_accepted() -> None:
    # Lines orjson refuses as bytes (a BOM, Unicode spaces) take the slow path in both
    # passes: what validation accepted, the run pass must read the same way.
    for raw, n in [
        (b"\xef\xbb\xbf" + line(chat("a")), 1),
        ("\u00a0".encode() + line(chat("b")).rstrip(b"\n") + "\u3000\r\n".encode(), 2),
        ((json.dumps(chat("c", content="h\u00e9llo \U0001f600"), ensure_ascii=False)).encode(), 3),
    ]:
        checked = parse_line(raw, n)
        assert isinstance(checked, Request), raw
        assert read_request(raw, n) == checked
    late_bom = parse_line(b"\xef\xbb\xbf" + line(chat("a")), 2)  # a BOM only starts a file
    assert isinstance(late_bom, LineError) and late_bom.code == "invalid_json"
    assert read_request(b" \t\r\n", 4) is None


def test_non_utf8_raises() -> None:
    with pytest.raises(UnicodeDecodeError):
        parse_line(b'{"custom_id": "\xe9"}\n', 1)


@pytest.mark.parametrize(
    ("obj", "code", "custom_id", "needle"),
    [
        ("not json", "invalid_json", None, "not JSON"),
        ([1, 2], "invalid_request", None, "JSON object"),
        ({"method": "POST"}, "invalid_request", None, "custom_id"),
        ({**chat("x"), "custom_id": ""}, "invalid_request", None, "custom_id"),
        ({**chat("x"), "custom_id": 12}, "invalid_request", None, "custom_id"),
        ({**chat("x"), "method": "GET"}, "invalid_request", "x", "method"),
        ({**chat("x"), "url": "/v1/moderations"}, "invalid_request", "x", "url"),
        ({**chat("x"), "body": []}, "invalid_request", "x", "body"),
        ({**chat("x"), "body": {"model": "m"}}, "invalid_request", "x", "body.messages"),
        (chat("x", max_tokens="ten"), "invalid_request", "x", "body.max_tokens"),
        (chat("x", max_tokens=0), "invalid_request", "x", "body.max_tokens"),
        (chat("x", temperature=5), "invalid_request", "x", "body.temperature"),
        (chat("x", n=0), "invalid_request", "x", "body.n"),
        (chat("x", stream=True), "invalid_request", "x", "body.stream"),
        (chat("x", tools=[]), "invalid_request", "x", "body.tools"),
        (chat("x", stop=[1]), "invalid_request", "x", "body.stop"),
        (completion("x", prompt=5), "invalid_request", "x", "body.prompt"),
        (completion("x", prompt=["a", "b"]), "invalid_request", "x", "body.prompt"),
    ],
)
def test_invalid_lines_say_what_and_where(
    obj: Any, code: str, custom_id: str | None, needle: str
) -> None:
    raw = obj.encode() + b"\n" if isinstance(obj, str) else line(obj)
    err = parse_line(raw, 42)
    assert isinstance(err, LineError)
    assert (err.code, err.custom_id, err.line) == (code, custom_id, 42)
    assert "line 42" in err.message and needle in err.message


def test_messages_shapes() -> None:
    bad = chat("x")
    bad["body"]["messages"] = [{"role": "wizard", "content": "hi"}]
    assert isinstance(parse_line(line(bad), 1), LineError)
    bad["body"]["messages"] = [{"role": "user", "content": 5}]
    assert isinstance(parse_line(line(bad), 1), LineError)
    ok = chat("x")
    ok["body"]["messages"] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None},
    ]
    r = parse_line(line(ok), 1)
    assert isinstance(r, Request) and r.text() == "be brief\nhi"


def test_harmless_fields_are_accepted() -> None:
    assert isinstance(parse_line(line(chat("x", user="u", metadata={"a": 1})), 1), Request)


def test_vllm_sampling_extras_are_accepted_and_checked() -> None:
    """SPEC §4: '… and what else vLLM supports' map onto SamplingParams."""
    ok = chat(
        "x",
        logit_bias={"42": -100},
        stop_token_ids=[2],
        allowed_token_ids=[1, 2, 3],
        bad_words=["darn"],
        include_stop_str_in_output=True,
        spaces_between_special_tokens=False,
        truncate_prompt_tokens=100,
    )
    assert isinstance(parse_line(line(ok), 1), Request)
    for bad, key in [
        (chat("x", stop_token_ids=["2"]), "body.stop_token_ids"),
        (chat("x", logit_bias={"42": "lots"}), "body.logit_bias"),
        (chat("x", prompt_logprobs=1), "body.prompt_logprobs"),  # no place in the output
        (chat("x", chat_template_kwargs={}), "body.chat_template_kwargs"),
    ]:
        err = parse_line(line(bad), 1)
        assert isinstance(err, LineError) and key in err.message, (key, err)


def test_scan_file_catches_duplicates_and_long_lines() -> None:
    data = (
        line(chat("a"))
        + b"\n"
        + line(chat("b"))
        + line(chat("a"))
        + b"x" * 5000
        + b"\n"
        + line(completion("c"))
    )
    items = list(scan_file(io.BytesIO(data), max_line_bytes=1000))
    # One item per line in order, then the duplicate replacing line 4's request.
    assert [(type(i).__name__, i.line) for i in items] == [
        ("Request", 1),
        ("Request", 3),
        ("Request", 4),
        ("LineError", 5),
        ("Request", 6),
        ("LineError", 4),
    ]
    long, dup = items[3], items[5]
    assert isinstance(dup, LineError) and dup.code == "duplicate_custom_id"
    assert "line 1" in dup.message and "line 4" in dup.message
    assert isinstance(long, LineError) and long.code == "line_too_long"


@pytest.mark.parametrize("spill", [False, True])
def test_duplicates_found_alike_in_memory_and_spilled(
    spill: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past IN_MEMORY ids, buckets on disk bound the memory; the answer is the same."""
    if spill:
        monkeypatch.setattr(unique, "IN_MEMORY", 10)
        monkeypatch.setattr(unique, "PER_BUCKET", 16)
    ids = [f"id-{i % 150}" for i in range(200)] + ["", "é-ünïcode"] * 2
    records = [chat(i) if i else {"custom_id": 5} for i in ids]
    data = b"".join(line(r) for r in records)
    items = list(scan_file(io.BytesIO(data), 1 << 20, tmp_path, expected=len(records)))
    dupes = sorted(
        i.line for i in items if isinstance(i, LineError) and i.code != "invalid_request"
    )
    # Lines 151..200 repeat ids 0..49; line 204 repeats line 202's id.
    assert dupes == [*range(151, 201), 204]
    assert not list(tmp_path.iterdir())  # bucket files removed


def test_scan_file_not_utf8_names_line() -> None:
    data = line(chat("a")) + b'{"custom_id": "\xff"}\n'
    with pytest.raises(NotUtf8Error) as err:
        list(scan_file(io.BytesIO(data), 1000))
    assert err.value.line == 2


def test_every_problem_of_a_line_is_named_in_one_error() -> None:
    """A field that is wrong hides no other: the error names them all, in the line's
    order, and keeps the first one's code for errors.jsonl's consumers."""
    obj = {**chat("x", tools=[], temperature="hot", top_p=5), "method": "GET"}
    err = parse_line(line(obj), 9)
    assert isinstance(err, LineError)
    assert (err.code, err.custom_id) == ("invalid_request", "x")
    assert err.problems == (
        'method must be "POST", got "GET"',
        "body.tools is not supported by spoold (remove it from the request)",
        'body.temperature must be a number in [0, 2], got "hot"',
        "body.top_p must be a number in (0, 1], got 5",
    )
    assert err.message == "line 9: " + "; ".join(err.problems)
    bad_messages = chat("y")
    bad_messages["body"]["messages"] = [{"role": "wizard", "content": 5}, "hi"]
    err = parse_line(line({**bad_messages, "url": "/v1/chat/completions"}), 2)
    assert isinstance(err, LineError) and len(err.problems) == 3, err
    missing = parse_line(line({"custom_id": "z", "body": {"temperature": 9}}), 3)
    assert isinstance(missing, LineError)
    assert missing.problems == (
        'method is missing: it must be "POST"',
        "url is missing: it must be one of /v1/chat/completions, /v1/completions, /v1/embeddings",
        "body.temperature must be a number in [0, 2], got 9",  # checked without a url
    )


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("nonsense", "not JSON: expected a JSON object, starting with '{', found 'nonsense'"),
        ("{oops", "not JSON: expected a string key at column 2, found 'oops'"),
        ('{"a": 1', "not JSON: the line ends before the JSON object is closed"),
        ('{"a": 1} x', "not JSON: more text after the end of the JSON object, at column 10"),
        ('{"a": 1,}', "not JSON: a comma before a closing bracket at column 8"),
        ("{'a': 1}", "not JSON: a single quote at column 2; JSON strings and keys take double"),
        ('{"a": tru}', "not JSON: unexpected 'tru' at column 7; a JSON value is an object"),
        ('{"a": NaN}', "not JSON: unexpected 'NaN' at column 7"),
        ('{"a": "\t"}', "not JSON: a raw control character (a tab, a newline…) in a string at"),
        (
            '   {"é": 1 2}',
            "not JSON: expected ',' or '}' at column 12, found '2'",
        ),  # characters, not bytes
    ],
)
def test_a_line_that_is_not_json_is_explained_in_plain_words(raw: str, says: str) -> None:
    err = parse_line(raw.encode() + b"\n", 4)
    assert isinstance(err, LineError) and err.code == "invalid_json"
    (problem,) = err.problems
    assert problem.startswith(says), problem
    assert "(char " not in problem and "line 1" not in problem  # not the decoder's words


def test_a_line_that_is_not_an_object_says_what_it_is() -> None:
    for raw, kind in [("[1, 2]", "an array"), ('"s"', "a string"), ("7", "a number")]:
        err = parse_line(raw.encode(), 1)
        assert isinstance(err, LineError)
        assert err.problems == (f'expected a JSON object ({{"custom_id": …}}), found {kind}',)
