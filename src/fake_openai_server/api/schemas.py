"""Request and response models: the wire contract, in one place.

Requests ignore unknown fields (clients send ``user``, ``drop_params``,
``max_chunks_per_doc``...). Responses are serialised by hand for speed (see
``api/serialize.py``); the models below document them in the OpenAPI spec.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from fake_openai_server.errors import ErrorKind, ServiceError, excerpt

_SURROGATE = re.compile("[\ud800-\udfff]")


def reject_lone_surrogates(data: Any) -> Any:
    """Refuse text that is not valid Unicode: JSON's ``\\ud800`` escapes decode to lone
    surrogates, which no tokenizer, encoder or reply can carry (they used to cause 500s)."""
    try:
        orjson.dumps(data)  # fast path, in C: fails on surrogates (and on ints over 64 bits)
        return data
    except orjson.JSONEncodeError:
        pass
    stack = [data]
    while stack:  # no recursion: bodies may be deeply nested
        value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise ServiceError(
                    ErrorKind.INVALID_REQUEST,
                    "The request contains a lone UTF-16 surrogate escape (such as \\ud800), "
                    "which is not valid Unicode text.",
                )
        elif isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return data


@dataclass(frozen=True)
class ItemLimits:
    """MAX_INPUTS and MAX_DOCUMENTS of the app reading the request."""

    max_inputs: int
    max_documents: int


# The limits of the request whose body is being validated: set around each request by the
# middleware (``BodyLimit``), which both ways of reading a body (``api/hot.py`` and
# FastAPI's) run inside. None outside a server: no count is checked here.
ITEM_LIMITS: ContextVar[ItemLimits | None] = ContextVar("fos_item_limits", default=None)


def counted(*, inputs: Sequence[str] = (), documents: Sequence[str] = ()) -> Any:
    """A request model's before-validator refusing a list of ``inputs`` over MAX_INPUTS, or
    of ``documents`` over MAX_DOCUMENTS (the fields so named), before pydantic builds its
    items: 8 MiB of ``{"input": [{}, {}, ...]}`` had 2.8 million objects built (10 s of the
    event loop, 1.8 GB) to be refused for its first item, or for its count after. The
    service counts again (and words it the same way): this only comes first. A flat list
    of token ids is one input."""
    limited = [(field, "MAX_INPUTS") for field in inputs]
    limited += [(field, "MAX_DOCUMENTS") for field in documents]

    def check(data: Any) -> Any:
        limits = ITEM_LIMITS.get()
        if limits is None or not isinstance(data, dict):
            return data
        for field, setting in limited:
            value = data.get(field)
            if not isinstance(value, list) or not value:
                continue
            if setting == "MAX_INPUTS" and isinstance(value[0], int):  # one input's ids
                continue
            limit = limits.max_inputs if setting == "MAX_INPUTS" else limits.max_documents
            if len(value) > limit:
                raise ServiceError(
                    ErrorKind.INVALID_REQUEST,
                    f"{field} has {len(value)} items, over the limit {setting}={limit}.",
                    param=field,
                )
        return data

    return model_validator(mode="before")(check)


# --- errors -------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


# --- embeddings ---------------------------------------------------------------

# Documented constraints that the service layer enforces with its own, more precise
# messages ("input[3] is empty..."): they go into the OpenAPI document only, so that
# the document tells clients (and the schema fuzzer) what is accepted.
Text = Annotated[StrictStr, Field(json_schema_extra={"minLength": 1, "pattern": r"\S"})]
# Every list a request holds stops at its first wrong item (fail_fast): pydantic otherwise
# checks every item and keeps an error for each, and for each shape a union allows, and
# FastAPI turns them all into dicts before the first is read. 8 MiB of
# {"input": [null, null, ...]} made 8.4 million errors, held the event loop 46 s and took
# the server to 12 GB (tests/hardening/test_bad_lists.py checks every request model).
Texts = Annotated[list[Text], Field(fail_fast=True, json_schema_extra={"minItems": 1})]
TokenId = Annotated[StrictInt, Field(json_schema_extra={"minimum": 0})]
# A document to rerank: any string, a blank one included (it is scored like any other),
# as Cohere takes them: only a list without a single non-blank text is refused. A blank
# chunk (an image-only page, a whitespace-only split) in a retrieval's results had made
# the whole rerank a 400.
_SOME_TEXT: dict[str, Any] = {"type": "string", "pattern": r"\S"}
Documents = Annotated[
    list[StrictStr],
    Field(fail_fast=True, json_schema_extra={"minItems": 1, "contains": _SOME_TEXT}),
]


def _whole(value: object) -> object:
    """216.0 as 216: JSON Schema's integer is any number without a fraction, and the
    OpenAPI document says integer. Strings and booleans stay refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# A count or size field (dimensions, top_n, ...): an integer, or a number that is one.
# (Not token ids: a list of thousands, where a Python call each would cost.)
Count = Annotated[StrictInt, BeforeValidator(_whole)]
TokenIds = Annotated[list[TokenId], Field(fail_fast=True, min_length=1)]


class JinaInput(BaseModel):
    """One of Jina's input objects: ``{"text": ...}`` (its v3/v4 and CLIP models' form, which
    Dify's Jina provider and LlamaIndex send); ``image``, ``url`` and ``bytes`` are
    refused by name, as this server embeds text."""

    model_config = ConfigDict(extra="ignore")

    text: Text | None = None
    image: SkipJsonSchema[Any] = None
    url: SkipJsonSchema[Any] = None
    bytes: SkipJsonSchema[Any] = None


EmbeddingInput = (
    Text
    | Texts
    | TokenIds
    | Annotated[list[TokenIds], Field(fail_fast=True, json_schema_extra={"minItems": 1})]
    | Annotated[list[Text | JinaInput], Field(fail_fast=True, json_schema_extra={"minItems": 1})]
)
JinaEmbeddingType = Literal["float", "base64", "int8", "uint8", "binary", "ubinary"]


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: EmbeddingInput = Field(
        description="A string, a list of strings, a list of token ids or a list of such lists"
    )
    model: StrictStr | None = Field(None, description="A served model name or alias")
    encoding_format: Literal["float", "base64"] | None = Field(
        None, description="float (default) or base64 (little-endian float32)"
    )
    dimensions: Count | None = Field(
        None,
        description="Keep the first N dimensions",
        json_schema_extra={"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]},
    )
    input_type: StrictStr | None = Field(
        None,
        description="query | document (aliases search_query, search_document, passage) | "
        "classification | clustering | similarity: selects the model's prefix",
    )
    user: Any = Field(None, description="Accepted and ignored")
    # Voyage AI (its client posts to {base_url}/embeddings) and Jina AI fields.
    task: StrictStr | None = Field(
        None,
        description="Jina: retrieval.query | retrieval.passage | text-matching | "
        "classification | separation | code.query | code.passage, as input_type "
        "(which wins when both are given)",
    )
    output_dtype: Literal["float", "int8", "uint8", "binary", "ubinary"] | None = Field(
        None, description="Voyage: the vectors as float, int8, uint8 or packed bits"
    )
    embedding_type: JinaEmbeddingType | None = Field(
        None, description="Jina: the vectors as float, base64 (float32) or quantized"
    )
    encoding_type: JinaEmbeddingType | None = Field(
        None, description="Jina: the older name of embedding_type (LlamaIndex sends it)"
    )
    output_dimension: Count | None = Field(
        None,
        description="Voyage: keep the first N dimensions (as dimensions)",
        json_schema_extra={"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]},
    )
    truncation: StrictBool | None = Field(
        None, description="Voyage: false answers 400 for an over-long input instead of cutting it"
    )
    normalized: StrictBool | None = Field(
        None, description="Jina: L2-normalise the vectors, or not (default: the server's NORMALIZE)"
    )

    _valid_unicode = model_validator(mode="before")(reject_lone_surrogates)
    _counted = counted(inputs=["input"])

    def output(self) -> tuple[str, str | None]:
        """(embedding type, encoding_format) from OpenAI's, Voyage's and Jina's fields."""
        encoding = self.encoding_format
        jina = self.embedding_type or self.encoding_type
        if self.encoding_type not in (None, jina):
            raise ServiceError(
                ErrorKind.INVALID_REQUEST,
                "embedding_type and encoding_type disagree; send one of them.",
                param="embedding_type",
            )
        if jina == "base64":
            jina, encoding = "float", "base64"
        if self.output_dtype is not None and jina is not None and self.output_dtype != jina:
            raise ServiceError(
                ErrorKind.INVALID_REQUEST,
                "output_dtype and embedding_type disagree; send one of them.",
                param="output_dtype",
            )
        return self.output_dtype or jina or "float", encoding

    def output_dimensions(self) -> int | None:
        if None not in (self.dimensions, self.output_dimension) and (
            self.dimensions != self.output_dimension
        ):
            raise ServiceError(
                ErrorKind.INVALID_REQUEST,
                "dimensions and output_dimension disagree; send one of them.",
                param="dimensions",
            )
        return self.dimensions if self.dimensions is not None else self.output_dimension

    def items(self) -> list[str] | list[list[int]]:
        """``input`` as a list of texts or a list of token-id lists."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and isinstance(value[0], int):
            return [value]
        if any(isinstance(item, JinaInput) for item in value):
            return [_jina_text(item, i) for i, item in enumerate(value)]
        return value  # type: ignore[return-value]


def _jina_text(item: object, index: int) -> str:
    if isinstance(item, str):
        return item
    assert isinstance(item, JinaInput)
    if item.text is not None:
        return item.text
    given = [name for name in ("image", "url", "bytes") if getattr(item, name) is not None]
    what = f"gives {given[0]!r}" if given else "has no 'text'"
    raise ServiceError(
        ErrorKind.INVALID_REQUEST,
        f"input[{index}] {what}: this server embeds text only; send {{'text': ...}} or a string.",
        param="input",
    )


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


# --- rerank -------------------------------------------------------------------


class DocumentObject(BaseModel):
    model_config = ConfigDict(extra="allow")

    # What the document is ranked on by default (unless rank_fields names other fields);
    # blank, as a string document may be.
    text: StrictStr | None = None


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: Text
    documents: Annotated[
        list[StrictStr | DocumentObject],
        Field(
            fail_fast=True,
            json_schema_extra={
                "minItems": 1,
                # Not only blank strings (an object's text is checked when it is ranked).
                "contains": {"anyOf": [_SOME_TEXT, {"type": "object"}]},
            },
        ),
    ]
    model: StrictStr | None = None
    top_n: Count | None = Field(
        None,
        description="Results to return; absent, null, 0 or >= the count: every document",
        json_schema_extra={"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}]},
    )
    return_documents: StrictBool | None = Field(
        None,
        description="Echo each document (default: true on /v1 and /rerank, false on /v2 "
        "and on Voyage requests, those with top_k)",
    )
    rank_fields: Annotated[list[StrictStr], Field(fail_fast=True)] | None = Field(
        None, description="For object documents: the fields to rank on (default: text)"
    )
    raw_scores: StrictBool = Field(False, description="Return logits instead of sigmoid scores")
    top_k: Count | None = Field(
        None,
        description="Voyage's name for top_n; a request with it gets Voyage's reply (data)",
        json_schema_extra={"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}]},
    )
    truncation: StrictBool | None = Field(
        None, description="Voyage: false answers 400 for an over-long pair instead of cutting"
    )
    max_tokens_per_doc: Count | None = Field(
        None,
        description="Cohere v2: score each document's first this many tokens only "
        "(absent: the model's whole length)",
        json_schema_extra={"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]},
    )

    _valid_unicode = model_validator(mode="before")(reject_lone_surrogates)
    _counted = counted(documents=["documents"])

    @property
    def voyage(self) -> bool:
        """The voyageai client always sends top_k (null when unset)."""
        return "top_k" in self.model_fields_set

    def texts(self) -> list[str]:
        """The text to rank for each document (``rank_fields`` joins several fields)."""
        texts: list[str] = []
        for index, doc in enumerate(self.documents):
            if isinstance(doc, str):
                texts.append(doc)
                continue
            fields = doc.model_dump(exclude_none=True)
            text: object = None
            if self.rank_fields:
                parts = [f"{name}: {fields[name]}" for name in self.rank_fields if name in fields]
                text = "\n".join(parts) if parts else None
            else:
                text = fields.get("text")
            if not isinstance(text, str):
                wanted = excerpt(", ".join(self.rank_fields or ["text"]), 80)
                raise ServiceError(
                    ErrorKind.INVALID_REQUEST,
                    f"documents[{index}] has no usable text (fields: {wanted}).",
                    param="documents",
                )
            texts.append(text)
        return texts


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="allow")

    text: str | None = None


class RerankResultItem(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | str | None = Field(
        None,
        description="The document, when returned: an object with its text; on Voyage "
        "requests (top_k), a document sent as a string comes back as that string",
    )


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class BilledUnits(BaseModel):
    search_units: int


class MetaTokens(BaseModel):
    input_tokens: int
    output_tokens: int


class ApiVersion(BaseModel):
    version: str


class RerankMeta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits
    tokens: MetaTokens


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResultItem]
    usage: RerankUsage
    meta: RerankMeta
    object: Literal["list"] | None = Field(None, description="Cohere v1's path (/v1/rerank) only")
    data: list[RerankResultItem] | None = Field(
        None,
        description="Cohere v1's path (/v1/rerank) only: the results again as Voyage gives "
        "them (documents sent as strings come back as strings), for Voyage's clients",
    )


# --- models, health ----------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelDetail(ModelCard):
    """One model: OpenAI's fields, and Xinference's that Dify's Xinference provider reads."""

    model_type: Literal["embedding", "rerank"]
    model_ability: list[str]
    context_length: int = Field(description="The model's maximum tokens per input")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: Literal["loading", "ready", "restarting", "failed", "failing", "stopping"]
    detail: str | None = None
