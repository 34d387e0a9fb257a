"""The body fields spoold accepts beside the prompt, and what each must be.

Sampling and output fields map onto the engines' sampling parameters (SPEC §4: a field
that cannot be honoured is a per-request error, not a silent drop); `validate` checks
every request's body against this table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# These run for every field of every line: exact type() checks inline (a bool is not a
# number here; parsed JSON has no subclasses), no helper calls.
_NUM = (int, float)


def _int_list(v: Any) -> bool:
    return type(v) is list and all(type(i) is int for i in v)


def _str_or_str_list(v: Any) -> bool:
    return type(v) is str or (type(v) is list and len(v) <= 16 and all(type(s) is str for s in v))


# Sampling and output fields the engines honour: name → (check, what it must be).
FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: type(v) is str, "a string"),
    "max_tokens": (lambda v: v is None or (type(v) is int and v >= 1), "an integer >= 1"),
    "max_completion_tokens": (
        lambda v: v is None or (type(v) is int and v >= 1),
        "an integer >= 1",
    ),
    "temperature": (
        lambda v: v is None or (type(v) in _NUM and 0 <= v <= 2),
        "a number in [0, 2]",
    ),
    "top_p": (lambda v: v is None or (type(v) in _NUM and 0 < v <= 1), "a number in (0, 1]"),
    "top_k": (
        lambda v: v is None or (type(v) is int and (v == -1 or v >= 0)),
        "-1 or an integer >= 0",
    ),
    "min_p": (lambda v: v is None or (type(v) in _NUM and 0 <= v <= 1), "a number in [0, 1]"),
    "n": (lambda v: v is None or (type(v) is int and 1 <= v <= 128), "an integer in [1, 128]"),
    "stop": (lambda v: v is None or _str_or_str_list(v), "a string or a list of strings"),
    "seed": (lambda v: v is None or type(v) is int, "an integer"),
    "presence_penalty": (
        lambda v: v is None or (type(v) in _NUM and -2 <= v <= 2),
        "a number in [-2, 2]",
    ),
    "frequency_penalty": (
        lambda v: v is None or (type(v) in _NUM and -2 <= v <= 2),
        "a number in [-2, 2]",
    ),
    "repetition_penalty": (lambda v: v is None or (type(v) in _NUM and v > 0), "a number > 0"),
    "logprobs": (
        lambda v: v is None or type(v) is bool or type(v) is int,
        "a boolean or integer",
    ),
    "top_logprobs": (
        lambda v: v is None or (type(v) is int and 0 <= v <= 20),
        "an integer in [0, 20]",
    ),
    "response_format": (lambda v: type(v) is dict and "type" in v, "an object with 'type'"),
    "stream": (lambda v: v is None or v is False, "false (batch jobs cannot stream)"),
    "echo": (lambda v: v is None or v is False, "false"),
    "suffix": (lambda v: v is None, "null"),
    "best_of": (lambda v: v is None or v == 1, "1"),
    "ignore_eos": (lambda v: type(v) is bool, "a boolean"),
    "min_tokens": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    "skip_special_tokens": (lambda v: type(v) is bool, "a boolean"),
    # vLLM's own sampling extras (what `vllm serve` accepts beside OpenAI's fields).
    "logit_bias": (
        lambda v: v is None or (type(v) is dict and all(type(b) in _NUM for b in v.values())),
        "an object of token id → bias",
    ),
    "stop_token_ids": (lambda v: v is None or _int_list(v), "a list of token ids"),
    "allowed_token_ids": (lambda v: v is None or _int_list(v), "a list of token ids"),
    "bad_words": (lambda v: v is None or _str_or_str_list(v), "a list of strings"),
    "include_stop_str_in_output": (lambda v: type(v) is bool, "a boolean"),
    "spaces_between_special_tokens": (lambda v: type(v) is bool, "a boolean"),
    "truncate_prompt_tokens": (
        lambda v: v is None or (type(v) is int and v >= -1),
        "-1 or an integer >= 0",
    ),
    "structured_outputs": (lambda v: v is None or type(v) is dict, "an object"),
}
# Accepted and ignored: they do not change what the engine computes.
HARMLESS = {"user", "metadata", "store", "service_tier", "stream_options"}
