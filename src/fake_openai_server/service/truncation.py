"""Cutting over-long inputs at their start (Cohere ``truncate=START``, TEI
``truncation_direction=left``), keeping the model's prefix.

The model's tokenizer (``TokenizerPool.encode``) cuts at the end, keeping the special
tokens. To keep the end of a text instead, this module looks for the longest tail of the
text that, behind its prefix, still fits: it only calls ``encode``, so it works over any
tokenizer, in tokenizer processes or not. It costs a few extra tokenizations (about
log2 of the tail's length), and only for inputs that are over-long and asked to be cut
at the start. A text over the characters the tokenizer reads of one text (it reads only
the first ones: ``Encoded.char_limit``) comes back truncated however few its tokens, so
such a text is cut here too and the tail kept is within those characters: its end, not
its start.

A tokenizer that can cut on the left itself (tokenize prefix and body apart, keep the
body's last ``max_length - len(prefix) - specials`` ids) would do this in one pass:
``keep_the_end`` is the one place to replace when the backend offers that.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from fake_openai_server.backends.base import Encoded
from fake_openai_server.families import Family

TruncateMode = Literal["end", "start", "none"]

Tokenize = Callable[[Sequence[str]], Awaitable[list[Encoded]]]


def split_prefix(family: Family, text: str) -> tuple[str, str]:
    """(prefix, body) of a text that ``apply_prefix`` produced."""
    for prefix in family.known_prefixes:
        if text.startswith(prefix):
            return prefix, text[len(prefix) :]
    return "", text


Prepare = Callable[[Sequence[tuple[str, str]]], Awaitable[list[Encoded]]]


def keep_the_end(tokenize: Tokenize, max_length: int) -> Prepare:
    """A ``prepare`` for the pipeline: tokenize (prefix, body) pairs, cut at the start."""

    async def prepare(items: Sequence[tuple[str, str]]) -> list[Encoded]:
        encoded = await tokenize([prefix + body for prefix, body in items])
        return [
            await _longest_tail(tokenize, prefix, body, max_length, first)
            if first.truncated
            else first
            for (prefix, body), first in zip(items, encoded, strict=True)
        ]

    return prepare


async def _longest_tail(
    tokenize: Tokenize, prefix: str, body: str, max_length: int, first: Encoded
) -> Encoded:
    async def probe(chars: int) -> Encoded:
        return (await tokenize([prefix + body[len(body) - chars :]]))[0]

    # Gallop up from a guess (a token covers about a character or more), then bisect
    # between the longest tail that fits and the shortest that does not.
    fits, fitting = 0, await probe(0)
    chars = min(len(body), max_length)
    too_long = len(body) + 1
    while chars < too_long:
        encoded = await probe(chars)
        if encoded.truncated:
            too_long = chars
            break
        fits, fitting = chars, encoded
        if chars == len(body):
            break
        chars = min(len(body), chars * 2)
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        encoded = await probe(middle)
        if encoded.truncated:
            too_long = middle
        else:
            fits, fitting = middle, encoded
    return Encoded(fitting.ids, fits < len(body), first.original_length, first.char_limit)
