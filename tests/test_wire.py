"""The frames between the server and its tokenizer processes carry exactly what was sent."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fake_openai_server import wire

# Any code point, lone surrogates included (a JSON body may carry "\ud800").
TEXTS = st.lists(st.text(st.characters(exclude_categories=())), max_size=40)
ROWS = st.lists(
    st.lists(st.integers(-(2**31), 2**31 - 1), max_size=30).map(
        lambda ids: np.array(ids, dtype=np.int32)
    ),
    max_size=40,
)


def _body(framed: bytes, kind: int) -> bytes:
    length, got_kind = wire._HEAD.unpack_from(framed)
    assert (length, got_kind) == (len(framed) - wire._HEAD.size + 1, kind)
    return framed[wire._HEAD.size :]


@settings(max_examples=300, deadline=None)
@given(
    call_id=st.integers(0, 2**64 - 1),
    target=st.integers(0, 2**16 - 1),
    operation=st.integers(0, 255),
    limit=st.integers(0, 2**32 - 1),
    texts=TEXTS,
)
def test_texts_arrive_as_sent(
    call_id: int, target: int, operation: int, limit: int, texts: list[str]
) -> None:
    body = _body(wire.pack_texts(call_id, target, operation, limit, texts), wire.Kind.CALL)
    assert wire.unpack_texts(body) == (call_id, target, operation, limit, texts)


@settings(max_examples=300, deadline=None)
@given(call_id=st.integers(0, 2**64 - 1), rows=ROWS, data=st.data())
def test_tokens_arrive_as_sent(call_id: int, rows: list[np.ndarray], data: st.DataObject) -> None:
    original = data.draw(
        st.lists(st.integers(0, 2**31 - 1), min_size=len(rows), max_size=len(rows))
    )
    truncated = data.draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows)))
    chars = data.draw(st.lists(st.integers(0, 2**31 - 1), min_size=len(rows), max_size=len(rows)))
    body = _body(wire.pack_tokens(call_id, rows, original, truncated, chars), wire.Kind.TOKENS)
    got_id, got_rows, got_original, got_truncated, got_chars = wire.unpack_tokens(body)
    assert (got_id, got_original, got_truncated, got_chars) == (
        call_id,
        original,
        truncated,
        chars,
    )
    assert len(got_rows) == len(rows)
    for got, sent in zip(got_rows, rows, strict=True):
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, sent)
