"""Pieces shared by the embeddings and rerank services."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from fake_openai_server.backends.base import Encoded, FloatArray
from fake_openai_server.errors import ErrorKind, ServiceError, excerpt
from fake_openai_server.settings import model_by_name

T = TypeVar("T")

# A large request is tokenized in chunks, each going to the model as soon as it is ready,
# so that the model starts while the rest is still being tokenized. Where the model has a
# GPU to itself, the first round of chunks (one per tokenizer) is FIRST_CHUNK texts, so
# that the GPU waits for a few texts' tokenizing, not TOKENIZE_CHUNK's (~60 ms per 64
# texts of ruri-large's tokenizer on the H200 host); each later round is twice as large,
# up to TOKENIZE_CHUNK, which keeps the GPU fed while the chunks stay few.
FIRST_CHUNK = 8
TOKENIZE_CHUNK = 64


class ModelNames:
    """Names a client may send as ``model``: the id, its last path part, aliases.

    ``task`` says what the models do ("embeddings", "reranking"); ``others``, the names
    of the server's models of the other kind (SERVICE_TYPE=all), which a request for one
    of them here is told: /v1/models lists them too.
    """

    def __init__(self, model_ids: Sequence[str], aliases: Mapping[str, str], task: str) -> None:
        self.task = task
        self.others: ModelNames | None = None
        self.model_ids = list(model_ids)
        self._names = model_by_name(self.model_ids)
        # An alias may name its model as clients may (``ruri-large``); one naming a model
        # of another service (SERVICE_TYPE=all shares the setting) is that one's.
        self.aliases = {
            alias: self._names[target] for alias, target in aliases.items() if target in self._names
        }
        self._names.update(self.aliases)

    @property
    def default(self) -> str:
        return self.model_ids[0]

    @property
    def listed(self) -> list[str]:
        """The names /v1/models lists: the models, then the aliases."""
        return self.model_ids + sorted(self.aliases)

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is a name ``resolve`` knows."""
        return name in self._names

    def resolve(self, requested: str | None) -> str:
        if requested is None or requested == "":
            return self.default
        try:
            return self._names[requested]
        except KeyError:
            pass
        if self.others is not None and requested in self.others:
            raise ServiceError(
                ErrorKind.MODEL_NOT_FOUND,
                f"The model '{excerpt(requested, 80)}' is for {self.others.task}, not for "
                f"{self.task}: send one of {', '.join(self.listed)}.",
                param="model",
            )
        raise unknown_model(requested, self.listed)


def unknown_model(requested: str, served: Sequence[str]) -> ServiceError:
    """The 404 for a model this server does not serve, naming those it does."""
    return ServiceError(
        ErrorKind.MODEL_NOT_FOUND,
        f"The model '{excerpt(requested, 80)}' does not exist on this server. "
        f"Served models: {', '.join(served)}.",
        param="model",
    )


def check_texts(
    texts: Sequence[str],
    param: str,
    max_chars: int,
    indexed: bool = True,
    allow_blank: bool = False,
) -> None:
    """Reject empty texts (unless ``allow_blank``) and texts over MAX_INPUT_CHARS, naming
    the index (``indexed``: ``param`` is a list, not one text)."""
    for index, text in enumerate(texts):
        name = f"{param}[{index}]" if indexed else param
        if not allow_blank and not text.strip():
            raise ServiceError(
                ErrorKind.INVALID_REQUEST,
                f"{name} is empty; every text must contain at least one non-whitespace character.",
                param=param,
            )
        if len(text) > max_chars:
            raise ServiceError(
                ErrorKind.INVALID_REQUEST,
                f"{name} has {len(text)} characters, over the limit MAX_INPUT_CHARS={max_chars}.",
                param=param,
            )


def check_token_ids(row: Sequence[int], size: int, param: str) -> None:
    """Refuse a token id outside a vocabulary of ``size`` ids."""
    bad = next((token for token in row if not 0 <= token < size), None)
    if bad is not None:
        raise ServiceError(
            ErrorKind.INVALID_REQUEST,
            f"Token id {excerpt(str(bad), 20)} is outside this model's vocabulary (0..{size - 1}).",
            param=param,
        )


def no_truncation_reason(asked: object) -> str:
    """The end of a refusal of an over-long input: why it was not cut. ``asked``: the
    request's own truncation choice, or None when the server's TRUNCATE=false decided."""
    return " (TRUNCATE=false)" if asked is None else ", and the request asked not to truncate"


def too_long(item: Encoded, max_length: int, what: str) -> str:
    """Why ``what`` (a text, as tokenized into ``item``) was cut, for a refusal: over the
    model's maximum length in tokens, or over the characters its tokenizer reads of one
    text (``Encoded.char_limit``), however few tokens those gave."""
    if item.original_length > max_length:
        over = "over " if item.char_limit else ""  # counted in the characters read only
        return (
            f"{what} has {over}{item.original_length} tokens, over this model's maximum "
            f"of {max_length}"
        )
    if item.char_limit:
        return (
            f"{what} has over {item.char_limit} characters, the most this model reads of one "
            f"text (for its maximum of {max_length} tokens; a long run of blank lines makes "
            "many characters but few tokens)"
        )
    return f"{what} is over this model's maximum of {max_length} tokens"


def chunk_sizes(count: int, parallel: int = 1, first: int = TOKENIZE_CHUNK) -> list[int]:
    """How ``count`` items are cut for ``parallel`` tokenizers: one chunk up to
    TOKENIZE_CHUNK; beyond, rounds of ``parallel`` chunks of ``first`` items, doubling
    every round up to TOKENIZE_CHUNK."""
    if count <= TOKENIZE_CHUNK:
        return [count]
    sizes: list[int] = []
    size = first
    while count:
        for _ in range(max(1, parallel)):
            sizes.append(min(size, count))
            count -= sizes[-1]
            if not count:
                break
        size = min(2 * size, TOKENIZE_CHUNK)
    return sizes


async def pipeline(
    prepare: Callable[[Sequence[T]], Awaitable[list[Encoded]]],
    items: Sequence[T],
    run: Callable[[list[Encoded]], Awaitable[FloatArray]],
    sizes: Sequence[int] = (),
    parallel: int = 0,
) -> FloatArray:
    """Prepare (tokenize) ``items`` in chunks of ``sizes`` (by default ``chunk_sizes``'s)
    and run each chunk as soon as it is ready.

    A large request starts on the model while the rest is still being tokenized. At
    most ``parallel`` of its chunks are being prepared at once (0: all of them), one per
    tokenizer: the others wait here, not in the tokenizers' own queues, where a short
    request arriving after a bulk one would wait behind all of its chunks.
    If any chunk fails, the others are cancelled (their queued work is dropped).
    Returns the outputs stacked in input order.
    """
    if len(items) <= TOKENIZE_CHUNK:
        return await run(await prepare(items))  # one chunk (Dify's one text): no tasks to spare
    turns = asyncio.Semaphore(parallel) if parallel > 0 else contextlib.nullcontext()

    async def one(chunk: Sequence[T]) -> FloatArray:
        async with turns:
            encoded = await prepare(chunk)
        return await run(encoded)

    chunks = []
    start = 0
    for size in sizes or chunk_sizes(len(items)):
        chunks.append(items[start : start + size])
        start += size
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(chunk)) for chunk in chunks]
    except ExceptionGroup as group_error:
        raise group_error.exceptions[0] from None
    return np.concatenate([task.result() for task in tasks])


class RequestTokens:
    """A request's tokens, counted chunk by chunk against MAX_REQUEST_TOKENS."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0

    def add(self, encoded: Sequence[Encoded]) -> None:
        self.total += sum(len(item.ids) for item in encoded)
        if self.total > self.limit:
            raise ServiceError(
                ErrorKind.INVALID_REQUEST,
                f"The request has {self.total} tokens, over the limit "
                f"MAX_REQUEST_TOKENS={self.limit}; send fewer or shorter inputs per request.",
            )
