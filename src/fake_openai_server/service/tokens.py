"""Tokenize and decode with a served model's own tokenizer (TEI's /tokenize, /decode)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from fake_openai_server.backends.base import ModelInfo
from fake_openai_server.backends.vocabulary import (
    MAX_TOKENIZE_CHARS,
    Token,
    Vocabulary,
    vocabulary_of,
)
from fake_openai_server.errors import ErrorKind, ServiceError
from fake_openai_server.families import PLAIN, Family, apply_prefix
from fake_openai_server.service.common import check_token_ids
from fake_openai_server.service.embeddings import EmbeddingsService, normalize_input_type
from fake_openai_server.service.rerank import RerankService


class Tokens:
    """The tokenizers of the served models: embeddings models first, then the reranker.

    A request holds at most MAX_INPUTS texts (or id lists) and MAX_REQUEST_TOKENS tokens
    in all, as an embeddings request does: /tokenize answers every token as an object,
    and 8 MB of text had taken a core for half a minute and 2.7 GB of memory.
    """

    def __init__(
        self,
        embeddings: EmbeddingsService | None,
        rerank: RerankService | None,
        *,
        max_inputs: int,
        max_tokens: int,
    ) -> None:
        self._embeddings = embeddings
        self._rerank = rerank
        self._max_inputs = max_inputs
        self._max_tokens = max_tokens
        self._vocabularies: dict[str, Vocabulary | None] = {}

    def _resolve(self, model: str | None) -> tuple[str, object, ModelInfo, Family]:
        if self._embeddings is not None:
            try:
                name = self._embeddings.names.resolve(model)
            except ServiceError:
                if self._rerank is None:
                    raise
            else:
                entry = self._embeddings.models[name]
                return name, entry.tokenizer, entry.info, entry.family
        assert self._rerank is not None
        name = self._rerank.names.resolve(model)
        found = self._rerank.models[name]
        return name, found.tokenizer, found.info, PLAIN

    async def _vocabulary(self, name: str, tokenizer: object, info: ModelInfo) -> Vocabulary:
        if name not in self._vocabularies:
            # Opening a saved tokenizer reads files: off the event loop.
            self._vocabularies[name] = await asyncio.to_thread(vocabulary_of, tokenizer, info)
        vocabulary = self._vocabularies[name]
        if vocabulary is None:
            raise ServiceError(
                ErrorKind.INVALID_REQUEST,
                f"The tokenizer of {name} is not available to /tokenize and /decode.",
            )
        return vocabulary

    async def tokenize(
        self,
        texts: Sequence[str],
        *,
        model: str | None = None,
        prompt_name: str | None = None,
        add_special_tokens: bool = True,
    ) -> list[list[Token]]:
        name, tokenizer, info, family = self._resolve(model)
        vocabulary = await self._vocabulary(name, tokenizer, info)
        _check_count(len(texts), self._max_inputs, "inputs")
        kind = normalize_input_type(prompt_name) if prompt_name is not None else None
        prefixed = [apply_prefix(family, text, kind) for text in texts]
        for index, text in enumerate(prefixed):
            if len(text) > MAX_TOKENIZE_CHARS:
                raise ServiceError(
                    ErrorKind.INVALID_REQUEST,
                    f"inputs[{index}] has {len(text)} characters; /tokenize accepts at most "
                    f"{MAX_TOKENIZE_CHARS} per input.",
                    param="inputs",
                )

        def tokenize_all() -> list[list[Token]]:
            rows, total = [], 0
            for text in prefixed:  # stops as soon as the tokens are over the limit
                rows.append(vocabulary.tokenize(text, add_special_tokens))
                total += len(rows[-1])
                _check_tokens(total, self._max_tokens, "inputs")
            return rows

        return await asyncio.to_thread(tokenize_all)

    async def decode(
        self,
        rows: Sequence[Sequence[int]],
        *,
        model: str | None = None,
        skip_special_tokens: bool = True,
    ) -> list[str]:
        name, tokenizer, info, _ = self._resolve(model)
        vocabulary = await self._vocabulary(name, tokenizer, info)
        _check_count(len(rows), self._max_inputs, "ids")
        _check_tokens(sum(len(row) for row in rows), self._max_tokens, "ids")
        for row in rows:
            check_token_ids(row, vocabulary.size, "ids")
        return await asyncio.to_thread(
            lambda: [vocabulary.decode(row, skip_special_tokens) for row in rows]
        )


def _check_count(count: int, limit: int, param: str) -> None:
    if count == 0:
        raise ServiceError(ErrorKind.INVALID_REQUEST, f"{param} must not be empty.", param=param)
    if count > limit:
        raise ServiceError(
            ErrorKind.INVALID_REQUEST,
            f"{param} has {count} items, over the limit MAX_INPUTS={limit}.",
            param=param,
        )


def _check_tokens(count: int, limit: int, param: str) -> None:
    if count > limit:
        raise ServiceError(
            ErrorKind.INVALID_REQUEST,
            f"{param} hold over {limit} tokens in all, over the limit "
            f"MAX_REQUEST_TOKENS={limit}; send fewer or shorter texts per request.",
            param=param,
        )
