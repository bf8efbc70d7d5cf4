"""A seeded generator of invalid messages: each one is a valid event of its topic, broken in one way.

Categories: truncated JSON, a field of the wrong type, a number of more than 4,300 digits, arrays nested
thousands deep, bytes that are not UTF-8, event times far in the future or the past, products (or versions)
that do not exist, and the envelope's own faults (not an object, unknown schema version, unknown or missing
fields). Every message is invalid by construction; the fuzz test checks that each reaches the dead-letter
topic (or the follower's ignored count) and that nothing crashes.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel

Template = Callable[[random.Random], BaseModel]
PLACEHOLDER = "\u0000PLACEHOLDER\u0000"
TIME_FIELDS = ("event_time", "at")


def _dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"))


def _with(payload: dict[str, Any], key: str, raw: bytes) -> bytes:
    """``payload`` with ``key``'s value replaced by raw bytes (what json.dumps cannot write)."""
    replaced = dict(payload, **{key: PLACEHOLDER})
    return _dumps(replaced).encode().replace(json.dumps(PLACEHOLDER).encode(), raw)


def _time_field(payload: dict[str, Any]) -> str | None:
    return next((k for k in TIME_FIELDS if k in payload), None)


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S") + "Z"


def truncated(rng: random.Random, payload: dict[str, Any], model: type[BaseModel]) -> bytes:
    raw = _dumps(payload).encode()
    return raw[: rng.randrange(1, len(raw) - 1)]


def wrong_type(rng: random.Random, payload: dict[str, Any], model: type[BaseModel]) -> bytes:
    key = rng.choice([k for k in payload if k != "schema_version"])
    value = [True] if isinstance(payload[key], dict) else {"wrong": rng.choice([True, 1, "x", None])}
    return _dumps(dict(payload, **{key: value})).encode()


def huge_number(rng: random.Random, payload: dict[str, Any], model: type[BaseModel]) -> bytes:
    key = rng.choice([k for k in payload if k != "schema_version"])
    length = rng.randrange(4301, 5000)
    digits = (str(rng.randrange(10**18, 10**19)) * (length // 19 + 1))[:length]
    return _with(payload, key, digits.encode())


def deep_nesting(rng: random.Random, payload: dict[str, Any], model: type[BaseModel]) -> bytes:
    key = rng.choice(list(payload))
    depth = rng.randrange(1100, 2000)
    return _with(payload, key, b"[" * depth + b"]" * depth)


def bad_utf8(rng: random.Random, payload: dict[str, Any], model: type[BaseModel]) -> bytes:
    key = rng.choice([k for k, v in payload.items() if isinstance(v, str)])
    junk = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"])
    return _with(payload, key, b'"' + payload[key].encode()[:8] + junk + b'"')


def future_time(rng: random.Random, payload: dict[str, Any], model: type[BaseModel]) -> bytes:
    key = _time_field(payload)
    assert key is not None
    ahead = timedelta(seconds=rng.uniform(600, 5000 * 365 * 86400))
    when = min(datetime.now(UTC) + ahead, datetime(9999, 12, 31, tzinfo=UTC))
    return _dumps(dict(payload, **{key: _iso(when)})).encode()


def past_time(rng: random.Random, payload: dict[str, Any], model: type[BaseModel]) -> bytes:
    key = _time_field(payload)
    assert key is not None
    behind = timedelta(seconds=rng.uniform(8 * 86400, 2000 * 365 * 86400))
    return _dumps(dict(payload, **{key: _iso(datetime.now(UTC) - behind)})).encode()


def not_an_object(rng: random.Random, payload: dict[str, Any], model: type[BaseModel]) -> bytes:
    return rng.choice([b"[]", b"42", b'"event"', b"null", b"", b"true", _dumps(payload).encode() * 2])


def bad_version(rng: random.Random, payload: dict[str, Any], model: type[BaseModel]) -> bytes:
    return _dumps(dict(payload, schema_version=rng.choice([0, 2, 99, "1", True, None, 1.5]))).encode()


def unknown_field(rng: random.Random, payload: dict[str, Any], model: type[BaseModel]) -> bytes:
    return _dumps(dict(payload, **{f"surprise_{rng.randrange(100)}": 1})).encode()


def missing_field(rng: random.Random, payload: dict[str, Any], model: type[BaseModel]) -> bytes:
    required = [k for k, f in model.model_fields.items() if f.is_required()]
    key = rng.choice(required)
    return _dumps({k: v for k, v in payload.items() if k != key}).encode()


CATEGORIES: dict[str, Callable[[random.Random, dict[str, Any], type[BaseModel]], bytes]] = {
    "truncated": truncated,
    "wrong_type": wrong_type,
    "huge_number": huge_number,
    "deep_nesting": deep_nesting,
    "bad_utf8": bad_utf8,
    "future_time": future_time,
    "past_time": past_time,
    "not_an_object": not_an_object,
    "bad_version": bad_version,
    "unknown_field": unknown_field,
    "missing_field": missing_field,
}


def messages(
    template: Template,
    n: int,
    seed: int,
    categories: list[str],
    unknown: Callable[[random.Random, BaseModel], bytes] | None = None,
) -> Iterator[tuple[str, bytes]]:
    """``n`` (category, bytes) pairs, round-robin over ``categories`` (plus ``"unknown"`` when given: a
    structurally valid event naming a product or version that does not exist)."""
    rng = random.Random(seed)
    names = [*categories, *(["unknown"] if unknown else [])]
    base: BaseModel | None = None
    for i in range(n):
        name = names[i % len(names)]
        if name == "unknown":  # a fresh event each time: its key must be new, or it is a duplicate
            assert unknown is not None
            yield name, unknown(rng, template(rng))
            continue
        if base is None or i % 50 == 0:  # building events is most of the cost: one base per 50 messages
            base = template(rng)
        yield name, CATEGORIES[name](rng, base.model_dump(mode="json"), type(base))


def fresh_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128)))
