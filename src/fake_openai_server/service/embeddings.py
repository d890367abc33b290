"""Embeddings: resolve the model, prefix, tokenize once, batch, post-process."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import cast

import numpy as np

from fake_openai_server.backends.base import Encoded, FloatArray, ModelInfo, Tokenizer
from fake_openai_server.engine.core import Engine, Flow
from fake_openai_server.errors import ErrorKind, ServiceError, excerpt
from fake_openai_server.families import INPUT_TYPE_ALIASES, Family, apply_prefix
from fake_openai_server.service.common import (
    ModelNames,
    RequestTokens,
    check_texts,
    check_token_ids,
    no_truncation_reason,
    pipeline,
    too_long,
)
from fake_openai_server.service.tokenizing import TokenizerPool
from fake_openai_server.service.truncation import TruncateMode, keep_the_end, split_prefix
from fake_openai_server.settings import InputType, Limits

LANGCHAIN_HINT = (
    "Token ids are not accepted: clients such as LangChain's OpenAIEmbeddings send "
    "tiktoken (OpenAI) token ids, which mean nothing to this model. Send text instead "
    "(LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False)), or start the "
    "server with ALLOW_TOKEN_IDS=true if you send this model's own token ids."
)


@dataclass
class EmbeddingModel:
    info: ModelInfo
    tokenizer: Tokenizer
    family: Family


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: FloatArray
    prompt_tokens: int
    normalized: bool = False  # made unit length (NORMALIZE, or the request's choice)


def normalize_input_type(value: str | None, param: str = "input_type") -> str | None:
    """Our name for a client's input type (``param``: the field it came in)."""
    if value is None:
        return None
    try:
        return INPUT_TYPE_ALIASES[value.lower()]
    except KeyError:
        allowed = ", ".join(sorted(INPUT_TYPE_ALIASES))
        raise ServiceError(
            ErrorKind.INVALID_REQUEST, f"{param} must be one of: {allowed}.", param=param
        ) from None


class EmbeddingsService:
    def __init__(
        self,
        models: dict[str, EmbeddingModel],
        engine: Engine,
        tokenizers: TokenizerPool,
        *,
        limits: Limits,
        aliases: dict[str, str],
        default_input_type: InputType | None,
        normalize: bool,
        allow_token_ids: bool,
    ) -> None:
        """``default_input_type``, ``normalize`` and ``allow_token_ids``: the server's
        DEFAULT_INPUT_TYPE, NORMALIZE and ALLOW_TOKEN_IDS."""
        self.models = models
        self.names = ModelNames(list(models), aliases, "embeddings")
        self.limits = limits
        self.default_input_type = default_input_type
        self.normalize = normalize
        self.allow_token_ids = allow_token_ids
        self._engine = engine
        self._tokenizers = tokenizers

    def check_dimensions(self, name: str, dimensions: int | None) -> None:
        """A requested vector size (``dimensions``) the model ``name`` can cut to."""
        dimension = self.models[name].info.dimension or 0
        if dimensions is not None and not 1 <= dimensions <= dimension:
            raise ServiceError(
                ErrorKind.INVALID_REQUEST,
                f"dimensions must be between 1 and {dimension} for this model; "
                f"got {excerpt(str(dimensions), 20)}.",
                param="dimensions",
            )

    async def embed(
        self,
        inputs: Sequence[str] | Sequence[Sequence[int]],
        *,
        model: str | None = None,
        input_type: str | None = None,
        dimensions: int | None = None,
        truncate: TruncateMode | None = None,
        normalize: bool | None = None,
        param: str = "input",
        indexed: bool = True,
    ) -> EmbeddingResult:
        """``truncate`` and ``normalize`` are per-request choices of the other APIs (TEI,
        Cohere, Ollama, Voyage); ``None`` keeps the server's TRUNCATE / NORMALIZE.
        ``param`` names the field the inputs came in, for the error messages (``indexed``:
        a list, whose items they name by index; else one text)."""
        if not inputs:
            raise ServiceError(
                ErrorKind.INVALID_REQUEST, f"{param} must not be an empty list.", param=param
            )
        name = self.names.resolve(model)
        entry = self.models[name]
        limits = self.limits
        if len(inputs) > limits.max_inputs:
            raise ServiceError(
                ErrorKind.INVALID_REQUEST,
                f"{param} has {len(inputs)} items, over the limit MAX_INPUTS={limits.max_inputs}.",
                param=param,
            )
        self.check_dimensions(name, dimensions)

        tokens = RequestTokens(limits.max_request_tokens)
        flow = Flow()  # the request's place in the queue, across its chunks
        mode = truncate or ("end" if limits.truncate else "none")
        why = no_truncation_reason(truncate)

        async def run(encoded: list[Encoded]) -> FloatArray:
            for item in encoded:
                if item.truncated and mode == "none":
                    raise ServiceError(
                        ErrorKind.INVALID_REQUEST,
                        too_long(item, entry.info.max_length, "An input") + f"{why}.",
                        param=param,
                    )
            tokens.add(encoded)
            return await self._engine.submit(name, [item.ids for item in encoded], flow)

        if not isinstance(inputs[0], str):
            rows = cast(Sequence[Sequence[int]], inputs)
            preparer = self._token_id_preparer(entry)

            async def prepare(chunk: Sequence[Sequence[int]]) -> list[Encoded]:
                return await asyncio.to_thread(preparer, chunk)

            vectors = await pipeline(prepare, rows, run)
        else:
            texts = [str(text) for text in inputs]
            check_texts(texts, param, limits.max_input_chars, indexed)
            kind = normalize_input_type(input_type) or self.default_input_type
            prefixed = [apply_prefix(entry.family, text, kind) for text in texts]
            encode = partial(self._tokenizers.encode, name)
            sizes = self._tokenizers.chunk_sizes(len(texts))
            parallel = self._tokenizers.parallel()
            if mode == "start":
                cut_start = keep_the_end(encode, entry.info.max_length)
                parts = [split_prefix(entry.family, text) for text in prefixed]
                vectors = await pipeline(cut_start, parts, run, sizes, parallel)
            else:
                vectors = await pipeline(encode, prefixed, run, sizes, parallel)

        if dimensions is not None:
            vectors = vectors[:, :dimensions]
        normalized = self.normalize if normalize is None else normalize
        if normalized:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, np.float32(1e-12))
        _check_vectors(vectors)
        return EmbeddingResult(
            np.ascontiguousarray(vectors, dtype=np.float32), tokens.total, normalized
        )

    def _token_id_preparer(self, entry: EmbeddingModel) -> _TokenIdPreparer:
        if not self.allow_token_ids:
            raise ServiceError(ErrorKind.INVALID_REQUEST, LANGCHAIN_HINT, param="input")
        return _TokenIdPreparer(entry)


class _TokenIdPreparer:
    """Checks raw token ids against the vocabulary and adds the special tokens."""

    def __init__(self, model: EmbeddingModel) -> None:
        self.model = model

    def __call__(self, rows: Sequence[Sequence[int]]) -> list[Encoded]:
        vocab = self.model.info.vocab_size
        for row in rows:
            if not row:
                raise ServiceError(
                    ErrorKind.INVALID_REQUEST, "A token id list is empty.", param="input"
                )
            check_token_ids(row, vocab, "input")
        return [self.model.tokenizer.wrap_ids(row) for row in rows]


def _check_vectors(vectors: FloatArray) -> None:
    """Never return NaN or all-zero vectors: Dify normalises them into NaN."""
    if not np.isfinite(vectors).all() or not np.abs(vectors).max(axis=1).all():
        raise ServiceError(
            ErrorKind.MODEL_FAILURE,
            "The model produced an invalid (non-finite or zero) vector; retry (if it keeps "
            "happening, the server's operator can set DTYPE=float32).",
        )
