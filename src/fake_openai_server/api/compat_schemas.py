"""Request and response models of the other APIs: text-embeddings-inference, Ollama,
Cohere embed. Field names, defaults and reply shapes follow each API's reference and
what its clients send and read (huggingface_hub, the ollama and cohere SDKs, Dify's
TEI and Ollama providers). Unknown fields are ignored, as on the OpenAI routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator
from pydantic.json_schema import SkipJsonSchema

from fake_openai_server.api.schemas import (
    Count,
    Documents,
    Text,
    Texts,
    TokenId,
    counted,
    reject_lone_surrogates,
)
from fake_openai_server.errors import ErrorKind, ServiceError

_LOOSE = ConfigDict(extra="ignore")
_valid_unicode = model_validator(mode="before")(reject_lone_surrogates)

OptionalInt = Annotated[
    Count | None,
    Field(json_schema_extra={"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]}),
]

# --- text-embeddings-inference ------------------------------------------------------------

TruncationDirection = Literal["left", "right", "Left", "Right"]


class TeiError(BaseModel):
    error: str
    error_type: str


class TeiTextOptions(BaseModel):
    """How TEI reads texts to embed: /embed's fields, /similarity's ``parameters``."""

    model_config = _LOOSE

    truncate: StrictBool | None = Field(
        None, description="Cut over-long inputs (default: the server's TRUNCATE)"
    )
    truncation_direction: TruncationDirection = Field(
        "right", description="right: cut the end; left: cut the start (the prefix is kept)"
    )
    prompt_name: StrictStr | None = Field(
        None,
        description="query | document (or passage, search_query, ...): the ruri prefix to add",
    )


class TeiEmbedRequest(TeiTextOptions):
    inputs: Text | Texts = Field(description="A string or a list of strings")
    normalize: StrictBool = Field(True, description="L2-normalise (TEI's default: true)")
    dimensions: OptionalInt = Field(None, description="Keep the first N dimensions")
    model: StrictStr | None = Field(None, description="Not in TEI: a served model name")

    _valid_unicode = _valid_unicode
    _counted = counted(inputs=["inputs"])


class TeiRerankRequest(BaseModel):
    model_config = _LOOSE

    query: Text
    texts: Documents
    truncate: StrictBool | None = Field(
        None,
        description="false: refuse pairs over the model's length (default: the server's TRUNCATE)",
    )
    truncation_direction: TruncationDirection = Field(
        "right", description="Only right: the document's end is cut"
    )
    raw_scores: StrictBool = Field(False, description="Logits instead of sigmoid scores")
    return_text: StrictBool = Field(False, description="Echo each text")
    model: StrictStr | None = Field(None, description="Not in TEI: a served model name")

    _valid_unicode = _valid_unicode
    _counted = counted(documents=["texts"])


class TeiSimilarityInputs(BaseModel):
    model_config = _LOOSE

    source_sentence: Text = Field(description="The text the others are compared with")
    sentences: Texts = Field(description="The texts to compare with it")


class TeiSimilarityRequest(BaseModel):
    model_config = _LOOSE

    inputs: TeiSimilarityInputs
    parameters: TeiTextOptions | None = None
    model: StrictStr | None = Field(None, description="Not in TEI: a served model name")

    _valid_unicode = _valid_unicode


class TeiTokenizeRequest(BaseModel):
    model_config = _LOOSE

    inputs: (
        StrictStr
        | Annotated[list[StrictStr], Field(fail_fast=True, json_schema_extra={"minItems": 1})]
    )
    add_special_tokens: StrictBool = True
    prompt_name: StrictStr | None = None
    model: StrictStr | None = None

    _valid_unicode = _valid_unicode
    _counted = counted(inputs=["inputs"])


class TeiToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


TokenIdRow = Annotated[list[TokenId], Field(fail_fast=True, json_schema_extra={"minItems": 1})]


class TeiDecodeRequest(BaseModel):
    model_config = _LOOSE
    _valid_unicode = _valid_unicode
    _counted = counted(inputs=["ids"])

    ids: (
        TokenIdRow
        | Annotated[list[TokenIdRow], Field(fail_fast=True, json_schema_extra={"minItems": 1})]
    )
    skip_special_tokens: StrictBool = True
    model: StrictStr | None = None


# --- Ollama ---------------------------------------------------------------------------------


class OllamaError(BaseModel):
    error: str


class OllamaEmbedRequest(BaseModel):
    model_config = _LOOSE

    model: StrictStr | None = Field(None, description="A served model name; ':latest' is ignored")
    input: StrictStr | Annotated[list[StrictStr], Field(fail_fast=True)] | None = Field(
        "",
        description="A string or a list of strings; empty or null: only checks the model (Ollama)",
    )
    truncate: StrictBool | None = Field(
        None, description="Cut over-long inputs (default: the server's TRUNCATE)"
    )
    dimensions: OptionalInt = None
    options: Any = Field(None, description="Accepted and ignored")
    keep_alive: Any = Field(None, description="Accepted and ignored")

    _valid_unicode = _valid_unicode
    _counted = counted(inputs=["input"])


class OllamaEmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class OllamaEmbeddingsRequest(BaseModel):
    model_config = _LOOSE

    model: StrictStr | None = None
    prompt: StrictStr = Field("", description="Empty: only checks the model (Ollama)")
    options: Any = None
    keep_alive: Any = None

    _valid_unicode = _valid_unicode


class OllamaEmbeddingsResponse(BaseModel):
    embedding: list[float]


class OllamaDetails(BaseModel):
    parent_model: str
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class OllamaListedModel(BaseModel):
    """A model as /api/tags and /api/ps list it."""

    name: str
    model: str
    size: int
    digest: str
    details: OllamaDetails


class OllamaModel(OllamaListedModel):
    modified_at: str


class OllamaTags(BaseModel):
    models: list[OllamaModel]


class OllamaRunningModel(OllamaListedModel):
    expires_at: str = Field(description="Never, in effect: the models stay loaded")
    size_vram: int
    context_length: int


class OllamaRunning(BaseModel):
    models: list[OllamaRunningModel]


class OllamaVersion(BaseModel):
    version: str


class OllamaShowRequest(BaseModel):
    model_config = _LOOSE
    _valid_unicode = _valid_unicode

    model: StrictStr | None = Field(None, description="A served model (absent: the first)")
    name: StrictStr | None = Field(None, description="The older name of `model`")
    verbose: Any = None


class OllamaShowResponse(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: OllamaDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class OllamaPullRequest(BaseModel):
    """Ollama's PullRequest (api/types.go); its deprecated username and password are
    ignored, as Ollama ignores them."""

    model_config = _LOOSE
    _valid_unicode = _valid_unicode

    model: StrictStr | None = Field(
        None, description="A served model; ':latest' is ignored (this or `name` is required)"
    )
    name: StrictStr | None = Field(
        None, description="The older name of `model` (the ollama CLI still sends it)"
    )
    insecure: StrictBool | None = Field(None, description="Accepted and ignored")
    stream: StrictBool | None = Field(
        None,
        description="false: one JSON object; true or absent (Ollama's default): "
        "NDJSON progress lines",
    )


class OllamaProgress(BaseModel):
    """One progress line of /api/pull (Ollama's ProgressResponse); the last is success."""

    status: str


class OllamaRerankRequest(BaseModel):
    """Dify's Ollama provider posts this to /api/rerank (Ollama itself has no rerank)."""

    model_config = _LOOSE

    model: StrictStr | None = None
    query: Text
    documents: Documents
    top_n: Count | None = Field(
        None, json_schema_extra={"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}]}
    )

    _valid_unicode = _valid_unicode
    _counted = counted(documents=["documents"])


class OllamaRerankResult(BaseModel):
    index: int
    relevance_score: float


class OllamaRerankResponse(BaseModel):
    model: str
    results: list[OllamaRerankResult]


# --- Cohere embed ---------------------------------------------------------------------------

CohereEmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CohereError(BaseModel):
    id: str
    message: str


class CohereContent(BaseModel):
    model_config = _LOOSE

    type: StrictStr
    text: StrictStr | None = None


class CohereInput(BaseModel):
    model_config = _LOOSE

    content: Annotated[
        list[CohereContent], Field(fail_fast=True, json_schema_extra={"minItems": 1})
    ]


def _texts_required(schema: dict[str, Any]) -> None:
    # The OpenAPI document asks for texts; v2's inputs (text parts only) are accepted
    # instead, but left out of it: "texts or inputs, not both" is more than the fuzzer
    # (and most readers) handle.
    schema["required"] = ["texts"]
    texts = schema["properties"]["texts"]
    texts["anyOf"] = [part for part in texts["anyOf"] if part.get("type") != "null"]


class CohereEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra=_texts_required)

    texts: Texts | None = Field(None, description="The texts to embed")
    inputs: SkipJsonSchema[Annotated[list[CohereInput], Field(fail_fast=True)] | None] = None
    images: SkipJsonSchema[Any] = Field(None, description="Refused: a text model")
    model: StrictStr | None = None
    input_type: (
        Literal["search_document", "search_query", "classification", "clustering"] | None
    ) = Field(None, description="Selects the ruri prefix")
    embedding_types: (
        Annotated[list[CohereEmbeddingType], Field(fail_fast=True, min_length=1)] | None
    ) = None
    truncate: Literal["NONE", "START", "END"] | None = Field(
        None,
        description=(
            "END: cut the end; START: cut the start; NONE: refuse "
            "(default: the server's TRUNCATE, as END)"
        ),
    )
    output_dimension: OptionalInt = Field(None, description="v2: keep the first N dimensions")
    # Cohere v2: only values at or above the model's maximum are accepted (undocumented
    # here, since that depends on the model).
    max_tokens: SkipJsonSchema[Count | None] = None

    _valid_unicode = _valid_unicode
    _counted = counted(inputs=["texts", "inputs"])

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        """Cohere's image embeddings (``images``, v1's ``input_type: "image"``) are
        refused for what they are, before the fields' own checks word it otherwise."""
        if not isinstance(data, dict):
            return data
        if data.get("images") is not None:
            param = "images"
        elif data.get("input_type") == "image":
            param = "input_type"
        else:
            return data
        raise ServiceError(
            ErrorKind.INVALID_REQUEST,
            f"{param} asks for image embeddings: this server embeds text only.",
            param=param,
        )


class CohereBilledUnits(BaseModel):
    input_tokens: int


class CohereApiVersion(BaseModel):
    version: str


class CohereMeta(BaseModel):
    api_version: CohereApiVersion
    billed_units: CohereBilledUnits


class CohereEmbeddingsByType(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    float_: list[list[float]] | None = Field(None, alias="float")
    int8: list[list[int]] | None = None
    uint8: list[list[int]] | None = None
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None
    base64: list[str] | None = None


class CohereEmbedResponse(BaseModel):
    id: str
    response_type: Literal["embeddings_floats", "embeddings_by_type"]
    embeddings: list[list[float]] | CohereEmbeddingsByType
    texts: list[str]
    meta: CohereMeta
