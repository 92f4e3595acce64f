"""The HTTP contract of the retrieval service (docs/architecture.md, "Serving"), as pure functions.

``POST /recommend`` with a JSON object:

    {"history": ["B0001", "B0042", 17], "top_n": 50}

* ``history`` (required): raw item ids, oldest first; each a string or an integer (an integer is matched by
  its decimal string). Unknown ids are ignored and listed in ``ignored``; the model reads the last t known
  items (t = its history length), so a longer history keeps its last t.
* ``top_n`` (optional, default min(50, the maximum)): an integer in 1..maximum (SEATER: the beam size).

Every refusal is JSON naming the field and the problem, e.g. ``{"error": "invalid request", "field":
"top_n", "problem": "must be an integer in 1..50, got 0"}``: 413 for a body above the size limit, 400 for JSON
nested too deeply to parse (``[[[[...`` thousands of levels deep), 422 for invalid JSON, wrong types, missing or
unknown fields, values out of range.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_BODY_BYTES = 64 * 1024
DEFAULT_TOP_N = 50
FIELDS = ("history", "top_n")


class RequestError(Exception):
    """A refused request: HTTP status, the field at fault and what is wrong with it."""

    def __init__(self, status: int, field: str, problem: str, error: str = "invalid request") -> None:
        super().__init__(f"{field}: {problem}")
        self.status, self.field, self.problem, self.error = status, field, problem, error

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "field": self.field, "problem": self.problem}


@dataclass(frozen=True)
class RecommendRequest:
    history: list[str]
    top_n: int


def check_size(content_length: str | None, limit: int = MAX_BODY_BYTES) -> None:
    """413 before reading when the declared Content-Length exceeds ``limit``."""
    if content_length is None:
        return
    try:
        size = int(content_length)
    except ValueError:
        raise RequestError(400, "Content-Length", f"not an integer: {content_length[:40]!r}") from None
    if size > limit:
        raise RequestError(413, "body", f"{size} bytes; the limit is {limit}", error="request body too large")


def parse_recommend(body: bytes, max_top_n: int, limit: int = MAX_BODY_BYTES) -> RecommendRequest:
    """Raw body -> a validated request, or RequestError (413 / 422) naming the field and the problem."""
    if len(body) > limit:
        raise RequestError(413, "body", f"more than {limit} bytes", error="request body too large")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(422, "body", f"not valid JSON ({err})") from None
    except RecursionError:  # the parser recurses once per level: a 60 KB body can nest 30,000 deep
        raise RequestError(400, "body", "JSON nested too deeply; a request is an object holding a list of item ids",
                           error="bad request") from None
    if not isinstance(data, dict):
        raise RequestError(422, "body", f"must be a JSON object with {FIELDS[0]!r} (and optionally "
                           f"{FIELDS[1]!r}), got {_type(data)}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RequestError(422, unknown[0], f"unknown field; the fields are {', '.join(FIELDS)}")
    if "history" not in data:
        raise RequestError(422, "history", "missing (a list of raw item ids, oldest first)")
    history = data["history"]
    if not isinstance(history, list):
        raise RequestError(422, "history", f"must be a list of item ids (strings or integers), got {_type(history)}")
    raw: list[str] = []
    for i, item in enumerate(history):
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise RequestError(422, f"history[{i}]", f"must be a string or an integer item id, got {_type(item)}")
        raw.append(item if isinstance(item, str) else str(item))
    top_n = data.get("top_n", min(DEFAULT_TOP_N, max_top_n))
    if isinstance(top_n, bool) or not isinstance(top_n, int):
        raise RequestError(422, "top_n", f"must be an integer in 1..{max_top_n}, got {_type(top_n)}")
    if not 1 <= top_n <= max_top_n:
        shown = str(top_n) if abs(top_n) < 10**12 else f"{str(top_n)[:12]}... ({len(str(abs(top_n)))} digits)"
        raise RequestError(422, "top_n", f"must be an integer in 1..{max_top_n}, got {shown}")
    return RecommendRequest(raw, top_n)


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            float: "a number", int: "an integer"}.get(type(value), type(value).__name__)
