"""Cutting over-long inputs at the start (``service/truncation.py``), with a tokenizer
whose cut is easy to predict: one token per character, plus two special tokens."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from fake_openai_server.backends.base import Encoded
from fake_openai_server.families import family_for
from fake_openai_server.service.truncation import keep_the_end, split_prefix

MAX = 12


async def tokenize(texts: Sequence[str]) -> list[Encoded]:
    out = []
    for text in texts:
        ids = [1, *(ord(c) for c in text), 2]
        if len(ids) <= MAX:
            out.append(Encoded.of(ids))
        else:
            out.append(Encoded.of([*ids[: MAX - 1], 2], True, len(ids)))
    return out


@pytest.mark.parametrize("length", [0, 5, 10, 11, 40, 1000])
@pytest.mark.parametrize("prefix", ["", "Q: "])
def test_the_longest_tail_that_fits_is_kept_behind_the_prefix(length: int, prefix: str) -> None:
    body = "".join(chr(0x3041 + i % 80) for i in range(length))
    [encoded] = asyncio.run(keep_the_end(tokenize, MAX)([(prefix, body)]))
    room = MAX - 2 - len(prefix)
    kept = body if len(body) <= room else body[len(body) - room :]
    assert encoded.ids.tolist() == [1, *(ord(c) for c in prefix + kept), 2]
    assert encoded.truncated == (len(body) > room)
    assert len(encoded.ids) <= MAX


def test_split_prefix_finds_the_familys_prefix() -> None:
    ruri = family_for("cl-nagoya/ruri-large")
    assert split_prefix(ruri, "クエリ: 東京") == ("クエリ: ", "東京")
    assert split_prefix(ruri, "東京") == ("", "東京")
    v3 = family_for("cl-nagoya/ruri-v3-310m")
    assert split_prefix(v3, "検索クエリ: 東京") == ("検索クエリ: ", "東京")
