"""Rerank: pair the query with each document, score in shared batches, sort."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from fake_openai_server.backends.base import (
    RERANK_COLUMNS,
    Encoded,
    FloatArray,
    ModelInfo,
    Tokenizer,
)
from fake_openai_server.engine.core import Engine, Flow
from fake_openai_server.errors import ErrorKind, ServiceError, excerpt
from fake_openai_server.service.common import (
    ModelNames,
    RequestTokens,
    check_texts,
    no_truncation_reason,
    pipeline,
    too_long,
)
from fake_openai_server.service.tokenizing import TokenizerPool
from fake_openai_server.settings import Limits


@dataclass
class RerankModel:
    info: ModelInfo
    tokenizer: Tokenizer


@dataclass(frozen=True)
class Ranked:
    index: int
    score: float


@dataclass(frozen=True)
class RerankResult:
    ranked: list[Ranked]  # highest score first, cut to top_n
    tokens: int


class RerankService:
    def __init__(
        self,
        models: dict[str, RerankModel],
        engine: Engine,
        tokenizers: TokenizerPool,
        *,
        limits: Limits,
        aliases: dict[str, str],
    ) -> None:
        self.models = models
        self.names = ModelNames(list(models), aliases, "reranking")
        self.limits = limits
        self._engine = engine
        self._tokenizers = tokenizers

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        model: str | None = None,
        top_n: int | None = None,
        raw_scores: bool = False,
        truncate: bool | None = None,
        document_tokens: int | None = None,
        documents_param: str = "documents",
        top_n_param: str = "top_n",
    ) -> RerankResult:
        """``truncate=False`` (TEI ``truncate``, Voyage ``truncation``) refuses pairs that
        fill the model's whole length instead of cutting them, ``True`` cuts them, and
        ``None`` does as the server's TRUNCATE says.
        ``document_tokens`` (Cohere's ``max_tokens_per_doc``) scores each document's first
        that many tokens only, as if it had been sent that short.
        ``documents_param`` and ``top_n_param`` name the fields the documents and top_n
        came in (Voyage: top_k), for the error messages."""
        name = self.names.resolve(model)
        limits = self.limits
        if not query.strip():
            raise ServiceError(ErrorKind.INVALID_REQUEST, "query is empty.", param="query")
        if not documents:
            raise ServiceError(
                ErrorKind.INVALID_REQUEST,
                f"{documents_param} must not be an empty list.",
                param=documents_param,
            )
        if len(documents) > limits.max_documents:
            raise ServiceError(
                ErrorKind.INVALID_REQUEST,
                f"{documents_param} has {len(documents)} items, over the limit "
                f"MAX_DOCUMENTS={limits.max_documents}.",
                param=documents_param,
            )
        if top_n is not None and top_n < 0:
            raise ServiceError(
                ErrorKind.INVALID_REQUEST,
                f"{top_n_param} must be 0 or more (0 or absent: every document); "
                f"got {excerpt(str(top_n), 20)}.",
                param=top_n_param,
            )
        if document_tokens is not None and document_tokens < 1:
            raise ServiceError(
                ErrorKind.INVALID_REQUEST,
                "max_tokens_per_doc must be 1 or more (absent: the model's whole length); "
                f"got {excerpt(str(document_tokens), 20)}.",
                param="max_tokens_per_doc",
            )
        if document_tokens is not None and document_tokens >= self.models[name].info.max_length:
            document_tokens = None  # no pair is longer than that anyway
        check_texts([query], "query", limits.max_input_chars, indexed=False)
        # Blank documents are scored like any other (Cohere takes them; a retrieval's
        # results may hold an empty chunk): only a list with no text at all is refused.
        check_texts(documents, documents_param, limits.max_input_chars, allow_blank=True)
        if not any(document.strip() for document in documents):
            raise ServiceError(
                ErrorKind.INVALID_REQUEST,
                f"{documents_param} has only empty texts; at least one must contain a "
                "non-whitespace character.",
                param=documents_param,
            )

        tokens = RequestTokens(limits.max_request_tokens)
        flow = Flow()  # the request's place in the queue, across its chunks
        refuse = not (limits.truncate if truncate is None else truncate)
        why = no_truncation_reason(truncate)

        async def run(encoded: list[Encoded]) -> FloatArray:
            if refuse:
                _refuse_cut_pairs(encoded, self.models[name].info.max_length, why, documents_param)
            tokens.add(encoded)
            return await self._engine.submit(name, [item.ids for item in encoded], flow)

        prepare = partial(
            self._tokenizers.encode_pairs, name, query, document_tokens=document_tokens
        )
        sizes = self._tokenizers.chunk_sizes(len(documents))
        rows = await pipeline(prepare, documents, run, sizes, self._tokenizers.parallel())
        # Each row holds the raw logit and the model's own activation of it.
        scores = rows[:, RERANK_COLUMNS.index("logit" if raw_scores else "score")]
        if not np.isfinite(scores).all():
            raise ServiceError(
                ErrorKind.MODEL_FAILURE,
                "The model produced a non-finite score; retry, or run with DTYPE=float32.",
            )
        # By score, then by logit: a sigmoid is 1.0 in float32 from a logit of 17 on, and
        # such documents had come back in document order, however far apart their logits
        # (the logit also ranks where an activation is flat elsewhere). Equal in both: in
        # document order (lexsort is stable; its last key sorts first).
        logits = rows[:, RERANK_COLUMNS.index("logit")]
        order = np.lexsort((-logits, -scores))
        if top_n:
            order = order[:top_n]
        ranked = [Ranked(int(i), float(scores[i])) for i in order]
        return RerankResult(ranked, tokens.total)


def _refuse_cut_pairs(encoded: Sequence[Encoded], max_length: int, why: str, param: str) -> None:
    # The pair tokenizer cuts to max_length without saying whether it cut, so a pair
    # that fills the whole length counts as cut (a pair of exactly that length is refused
    # too: one token's difference, on the safe side). It does say when it read only the
    # first characters of the query or the document (``Encoded.char_limit``).
    for item in encoded:
        if len(item.ids) >= max_length:
            raise ServiceError(
                ErrorKind.INVALID_REQUEST,
                f"A query and document pair reaches this model's maximum of {max_length} "
                f"tokens{why}; shorten the document or allow truncation.",
                param=param,
            )
        if item.truncated:
            raise ServiceError(
                ErrorKind.INVALID_REQUEST,
                too_long(item, max_length, "The query or a document")
                + f"{why}; shorten it or allow truncation.",
                param=param,
            )
