"""Property tests of the worker's JSON for handler outputs (server/workers/child/service.py to_json).

It is orjson's rather than ``json.dumps(indent=2)``'s, as TorchServe writes it: for any output
both accept, it must read back as the same value, laid out line for line the same.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from server.errors import WorkerError
from server.workers.child.service import to_json

SETTINGS = settings(max_examples=400, deadline=None)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and infinities included
    st.text(),  # lone surrogates included
)
keys = st.one_of(st.text(max_size=8), st.integers(min_value=-5, max_value=5))
outputs = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=20,
)


def _canonical(text: str | bytes) -> str:
    # NaN != NaN, so values are compared by the standard library's compact spelling of them.
    return json.dumps(json.loads(text), sort_keys=True)


def _layout(text: str) -> list[int]:
    return [len(line) - len(line.lstrip(" ")) for line in text.split("\n")]  # not splitlines: U+0085 is text


@SETTINGS
@given(outputs)
@example({"3": 0.99, "8": 1.2e-07, "label": "chat noir é"})
@example({"x": float("nan")})
@example([{}, [], {"a": None}])
def test_outputs_read_back_the_same_as_torchserves_json(value: Any) -> None:
    expected = json.dumps(value, indent=2)
    got = to_json(value).decode()
    assert _canonical(got) == _canonical(expected)
    assert _layout(got) == _layout(expected)


def test_nan_stays_nan_rather_than_becoming_null() -> None:
    assert to_json([float("nan"), float("inf")]) == b"[\n  NaN,\n  Infinity\n]"


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value", [object(), {1j: 1}, [{1, 2}], _nested(100_000)], ids=["object", "complex key", "set", "deep"]
)
def test_what_no_encoder_takes_is_the_unsupported_type_error(value: Any) -> None:
    # A nesting too deep for either encoder must not escape as a RecursionError: that would end the worker.
    with pytest.raises(WorkerError) as caught:
        to_json(value)
    assert (caught.value.status_code, caught.value.message) == (503, "Unsupported model output data type.")


def test_a_uuid_is_written_as_its_text() -> None:
    # Refused by json.dumps; orjson writes it, a difference the README lists.
    value = uuid.UUID(int=7)
    assert json.loads(to_json({"id": value})) == {"id": str(value)}
