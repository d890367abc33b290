"""The one settings object: every field is an environment variable and a CLI flag.

Settings are read once, in ``cli.main`` (or in the ``create_*_app`` factories for
``uvicorn --factory``), and passed down explicitly. The engine process rebuilds them
from the values the server sends it. Other variables looked at are others' own:
OpenTelemetry's ``OTEL_*`` (``api/app.py``), Hugging Face's ``HF_HUB_*`` (checked in
``cli.py``, as huggingface_hub reads them) and, for an error message only, which GPUs
``CUDA_VISIBLE_DEVICES`` left (``backends/sentence_transformers.py``).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ServiceType = Literal["embeddings", "reranker", "all"]
Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["auto", "float32", "bfloat16", "float16", "int8"]
InputType = Literal["query", "document", "classification", "clustering", "similarity"]

DEFAULT_PORTS: dict[str, int] = {"embeddings": 8081, "reranker": 8082, "all": 8080}


def _split_csv(value: object) -> object:
    """A comma-separated list; or a JSON list of strings, as ``--help``'s ``list[str]``
    suggests (split at its commas, ``["a","b"]`` had given the keys ``["a"`` and ``"b"]``)."""
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not (isinstance(parsed, list) and all(isinstance(part, str) for part in parsed)):
            raise ValueError(f'{value!r} is not a JSON list of strings: write a,b or ["a", "b"]')
        return [part.strip() for part in parsed if part.strip()]
    return [part.strip() for part in value.split(",") if part.strip()]


CsvList = Annotated[list[str], NoDecode]
# A number of seconds: finite (``inf`` had passed, then crashed the start-up).
Seconds = Annotated[float, Field(allow_inf_nan=False)]


# A Hub commit as the Hub and the cache's folders write it (a branch or tag may move; a
# commit's files never change).
COMMIT = re.compile(r"[0-9a-f]{40}")


def model_by_name(model_ids: Iterable[str]) -> dict[str, str]:
    """Each name the models answer to as ``model``, and the model's id: its id, and its
    id's last path part (``ruri-large`` for ``cl-nagoya/ruri-large``; the first model's,
    where two share one). Requests are routed by it (``ModelNames``), and MODEL_ALIASES
    checked against it."""
    names: dict[str, str] = {}
    for model_id in model_ids:
        names[model_id] = model_id
        names.setdefault(model_id.rstrip("/").rsplit("/", 1)[-1], model_id)
    return names


class SettingsError(ValueError):
    """Settings that cannot work together; the message names the settings."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server: the services enforce it, /info prints it."""

    max_request_bytes: int
    max_inputs: int
    max_documents: int
    max_input_chars: int
    max_request_tokens: int
    max_batch_size: int
    max_batch_tokens: int
    max_queue_tokens: int
    truncate: bool


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="",
        case_sensitive=False,
        extra="ignore",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="fake-openai-server",
        validate_default=True,
    )

    # --- what to serve -------------------------------------------------------
    service_type: ServiceType = Field(
        "embeddings", description="embeddings | reranker | all (both in one process)"
    )
    embeddings_model: CsvList = Field(
        ["cl-nagoya/ruri-large"],  # a list default: pydantic copies it for each instance
        description="Embedding model(s): Hugging Face ids or local paths, comma-separated",
    )
    reranker_model: str = Field(
        "cl-nagoya/ruri-v3-reranker-310m", description="Reranker model: Hugging Face id or path"
    )
    model_aliases: CsvList = Field(
        [],
        description="Extra names clients may send as `model`, as alias=model pairs "
        "(e.g. text-embedding-3-small=cl-nagoya/ruri-large)",
    )
    model_revisions: CsvList = Field(
        [],
        description="The version of a Hugging Face model to load, as model=revision pairs, "
        "comma-separated: a commit (as /info's models.*.revision gives it), a tag or a branch "
        "(e.g. cl-nagoya/ruri-large=<commit>); a model not named: the latest, main",
    )

    # --- network ---------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Address to listen on")
    port: int | None = Field(
        None, ge=1, le=65535, description="Port; null: 8081 embeddings, 8082 reranker, 8080 all"
    )

    # --- model execution -----------------------------------------------------
    device: Device = Field("auto", description="auto → cuda, then mps, then cpu")
    dtype: DType = Field(
        "auto",
        description="auto → float16 on CUDA; on CPU bfloat16 when the processor has native "
        "bfloat16, else float32",
    )
    max_seq_length: int | None = Field(
        None, ge=8, description="Tokens per input seen by the model; null: the model's own"
    )
    truncate: bool = Field(
        True, description="Cut over-long inputs to max_seq_length (false: reply 400 instead)"
    )
    normalize: bool = Field(False, description="L2-normalise embeddings (ruri does not)")
    allow_token_ids: bool = Field(
        False, description="Accept `input` as token ids of this model's own tokenizer"
    )
    default_input_type: InputType | None = Field(
        None, description="Prefix family applied when a request has no input_type; null: none"
    )
    query_prefix: str | None = Field(None, description="Override the family's query prefix")
    document_prefix: str | None = Field(None, description="Override the family's document prefix")

    # --- engine --------------------------------------------------------------
    max_batch_size: int = Field(64, ge=1, description="Most items in one forward pass")
    max_batch_tokens: int = Field(
        16384,
        ge=1,
        description="Most padded tokens in one forward pass: items x longest (on a GPU, of "
        "the shape the batch is padded to, one warmed at start-up)",
    )
    max_queue_tokens: int = Field(
        2_000_000,
        ge=1,
        description="Tokens waiting in a model's queue before new requests for it get 429",
    )
    tokenizer_workers: int | None = Field(
        None,
        ge=0,
        description="Tokenizer processes; null: on a GPU host half the cores up to 8, a "
        "container's CPU limit counting; on a CPU host 0, tokenizing on two threads of the "
        "server",
    )
    request_timeout: Seconds = Field(
        300.0,
        gt=0,
        description="Seconds a request may take, queue included, before it is answered 504 "
        "(its queued work is dropped)",
    )
    stall_timeout: Seconds = Field(
        60.0,
        gt=0,
        description="A forward pass running longer than this (or ten times its expected time, "
        "if longer) is taken for a hung device: the engine process is restarted; a tokenizer "
        "process that has not answered a call for this long is replaced",
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads on CPU; null: torch's own, one a core, at most a "
        "container's CPU limit",
    )
    warmup: bool = Field(True, description="Run warm-up batches before reporting ready")
    cuda_graphs: bool = Field(
        True,
        description="On CUDA, capture the forward pass of every warmed batch shape as a CUDA "
        "graph at start-up (far less Python per pass); false runs every pass eagerly",
    )

    # --- limits --------------------------------------------------------------
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body")
    max_inputs: int = Field(2048, ge=1, description="Inputs per embeddings request")
    max_documents: int = Field(1000, ge=1, description="Documents per rerank request")
    max_input_chars: int = Field(
        1_000_000, ge=1, description="Characters per input or document (before cutting)"
    )
    max_request_tokens: int = Field(
        300_000, ge=1, description="Tokens per request, after truncation"
    )

    # --- security and operations ----------------------------------------------
    api_keys: CsvList = Field([], description="Accepted API keys, comma-separated (empty: no auth)")
    api_keys_file: Path | None = Field(None, description="File with one API key per line")
    cors_allow_origins: CsvList = Field(
        [],
        description="Origins of the browser pages that may call the API (CORS), "
        "comma-separated, e.g. https://app.example.com; * for any (empty: no CORS headers)",
    )
    shutdown_grace_seconds: Seconds = Field(
        30.0, ge=0, description="On SIGTERM, time given to in-flight requests"
    )
    keep_alive_seconds: Seconds = Field(
        75.0,
        gt=0,
        description="How long an idle keep-alive connection stays open (longer than clients' "
        "own idle limits, so that a client never reuses one the server is closing)",
    )
    read_timeout_seconds: Seconds = Field(
        60.0,
        gt=0,
        description="A request must arrive in full, headers and body, within this many "
        "seconds of its first byte (a new connection: of opening), and a reply must not sit "
        "untaken by the client for this long; a slower connection is closed",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug | info | warning | error (debug: an access log line per request)"
    )
    log_json: bool = Field(False, description="Log one JSON object per line")

    @field_validator(
        "embeddings_model",
        "model_aliases",
        "model_revisions",
        "api_keys",
        "cors_allow_origins",
        mode="before",
    )
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator(
        "port",
        "max_seq_length",
        "default_input_type",
        "tokenizer_workers",
        "cpu_threads",
        "api_keys_file",
        "query_prefix",
        "document_prefix",
        mode="before",
    )
    @classmethod
    def _unset(cls, value: object, info: ValidationInfo) -> object:
        """An optional setting given ``null``, as on the command line, or empty is left
        unset: compose's ``PORT: ${PORT:-}`` and a chart's empty value pass "" through,
        which had stopped the start-up ("not a valid integer"), and API_KEYS_FILE= had
        been read as the directory ``.``. An empty prefix is a value: none."""
        unset = (
            ("null",) if info.field_name in ("query_prefix", "document_prefix") else ("", "null")
        )
        if isinstance(value, str) and value.strip().lower() in unset:
            return None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: object) -> object:
        """LOG_LEVEL=DEBUG as Python and uvicorn write it."""
        return value.lower() if isinstance(value, str) else value

    @field_validator("reranker_model")
    @classmethod
    def _stripped(cls, value: str) -> str:
        """Without the blanks around it (a ``.env`` file saved on Windows ends the line
        with a carriage return, which had become part of the model's id)."""
        return value.strip()

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        """An address alone: a URL or a port in it had failed after start-up as a bare
        "Name or service not known", naming no setting. An IPv6 address may come in
        brackets, as in a URL ([::1]); uvicorn takes it without."""
        host = value.strip()
        if not host:
            raise ValueError(
                "is empty: write 0.0.0.0 for every interface, :: for IPv6 as well, or "
                "127.0.0.1 for this machine only"
            )
        if "/" in host:
            raise ValueError(
                f"{value!r} is not an address: write it without a scheme or a path "
                "(0.0.0.0 for every interface, 127.0.0.1 for this machine only)"
            )
        if host.startswith("["):
            host, _, after = host[1:].partition("]")
            has_port = bool(after)
        else:
            has_port = host.count(":") == 1  # an IPv6 address has more
        if has_port:
            raise ValueError(f"{value!r} has a port in it: set the port as PORT")
        return host

    @field_validator("cors_allow_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        """Origins as browsers send them (scheme and host in lower case): a path or a
        trailing slash would never match a browser's Origin header, so it is refused."""
        for origin in origins:
            if origin != "*" and not _is_origin(origin):
                raise ValueError(
                    f"{origin!r} is not an origin: write scheme://host[:port] without a "
                    "path (e.g. https://app.example.com), or *"
                )
        return [origin.lower() for origin in origins]

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.service_type in ("embeddings", "all") and not self.embeddings_model:
            raise SettingsError("EMBEDDINGS_MODEL is empty: name at least one embedding model")
        if self.service_type in ("reranker", "all") and not self.reranker_model:
            raise SettingsError("RERANKER_MODEL is empty: name the reranker model")
        for model in set(self.embeddings_model):
            if self.embeddings_model.count(model) > 1:
                raise SettingsError(f"EMBEDDINGS_MODEL names {model} twice: name each model once")
        self.aliases()  # each entry checked
        self.revisions()  # each entry checked
        if self.device == "mps" and self.dtype in ("bfloat16", "int8"):
            raise SettingsError(f"DTYPE={self.dtype} is not supported with DEVICE=mps")
        if self.device == "cuda" and self.dtype == "int8":
            raise SettingsError("DTYPE=int8 runs on CPU only: with DEVICE=cuda use DTYPE=auto")
        if self.device == "cpu" and self.dtype == "float16":
            raise SettingsError(
                "DTYPE=float16 needs DEVICE=cuda; on CPU use DTYPE=bfloat16 or float32"
            )
        if self.max_seq_length is not None and self.max_batch_tokens < self.max_seq_length:
            raise SettingsError(
                f"MAX_BATCH_TOKENS={self.max_batch_tokens} is smaller than "
                f"MAX_SEQ_LENGTH={self.max_seq_length}: one full-length input could never run"
            )
        if self.max_queue_tokens < self.max_batch_tokens:
            raise SettingsError(
                f"MAX_QUEUE_TOKENS={self.max_queue_tokens} is smaller than "
                f"MAX_BATCH_TOKENS={self.max_batch_tokens}: the queue could never fill one batch"
            )
        if self.max_queue_tokens < self.max_request_tokens:
            raise SettingsError(
                f"MAX_QUEUE_TOKENS={self.max_queue_tokens} is smaller than "
                f"MAX_REQUEST_TOKENS={self.max_request_tokens}: a request within its limit "
                "could be refused with 429 on an idle server"
            )
        return self

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else DEFAULT_PORTS[self.service_type]

    @property
    def serves_embeddings(self) -> bool:
        return self.service_type in ("embeddings", "all")

    @property
    def serves_rerank(self) -> bool:
        return self.service_type in ("reranker", "all")

    def limits(self) -> Limits:
        return Limits(
            max_request_bytes=self.max_request_bytes,
            max_inputs=self.max_inputs,
            max_documents=self.max_documents,
            max_input_chars=self.max_input_chars,
            max_request_tokens=self.max_request_tokens,
            max_batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens,
            max_queue_tokens=self.max_queue_tokens,
            truncate=self.truncate,
        )

    def aliases(self) -> dict[str, str]:
        """alias → model, from MODEL_ALIASES (SettingsError for an entry that is no pair,
        an alias given twice, or one that is already a configured model's name, its id or
        its last path part, for another model: requests naming that model would have gone
        to the alias's)."""
        names = model_by_name(self.configured_models())
        aliases: dict[str, str] = {}
        for pair in self.model_aliases:
            alias, _, model = (part.strip() for part in pair.partition("="))
            if not alias or not model:
                raise SettingsError(f"MODEL_ALIASES entry {pair!r} must look like alias=model")
            if alias in aliases:
                raise SettingsError(f"MODEL_ALIASES gives {alias} twice")
            if alias in names and names[alias] != names.get(model, model):
                taken = (
                    "is a configured model"
                    if alias == names[alias]
                    else f"is already a name of {names[alias]}"
                )
                raise SettingsError(
                    f"MODEL_ALIASES: {alias} {taken}; choose another alias for {model}"
                )
            aliases[alias] = model
        return aliases

    def revisions(self) -> dict[str, str]:
        """model → the revision MODEL_REVISIONS pins it to, a commit in lower case
        (SettingsError for an entry that is no pair, that names a model that is not
        configured, or a model twice, or that shortens a commit)."""
        configured = self.configured_models()
        pinned: dict[str, str] = {}
        for pair in self.model_revisions:
            model, _, revision = (part.strip() for part in pair.partition("="))
            if not model or not revision or any(blank.isspace() for blank in revision):
                raise SettingsError(
                    f"MODEL_REVISIONS entry {pair!r} must look like model=revision (a commit, "
                    "tag or branch)"
                )
            if model not in configured:
                raise SettingsError(
                    f"MODEL_REVISIONS names {model}, which is not a configured model "
                    f"(EMBEDDINGS_MODEL, RERANKER_MODEL: {', '.join(configured)}); pin the "
                    "models served, or set MODEL_REVISIONS empty (an image built with "
                    "--build-arg MODEL_REVISIONS sets it for the models baked in)"
                )
            if model in pinned:
                raise SettingsError(f"MODEL_REVISIONS pins {model} twice")
            if re.fullmatch(r"[0-9a-fA-F]{7,39}", revision) and not revision.isdigit():
                # The Hub takes a commit in full only (a short one is taken for a tag).
                raise SettingsError(
                    f"MODEL_REVISIONS: {revision} looks like a commit cut short: write all 40 "
                    f"hexadecimal digits (GET /info gives them, as models.*.revision)"
                )
            pinned[model] = revision.lower() if COMMIT.fullmatch(revision.lower()) else revision
        return pinned

    def pinned_to(self, commits: Mapping[str, str]) -> Settings:
        """These settings with each configured model of ``commits`` pinned to its commit
        (anything else in ``commits`` is left out: the result is as valid as these)."""
        configured = self.configured_models()
        revisions = self.revisions()
        for model, commit in commits.items():
            if model in configured and COMMIT.fullmatch(commit):
                revisions[model] = commit
        pairs = [f"{model}={revision}" for model, revision in revisions.items()]
        return self.model_copy(update={"model_revisions": pairs})

    def configured_models(self) -> list[str]:
        """EMBEDDINGS_MODEL's and RERANKER_MODEL's ids, served or not (a pin may name the
        other service's model: one environment for both)."""
        return [*self.embeddings_model, self.reranker_model]

    def served_models(self) -> list[str]:
        """The ids of the models this server serves."""
        embeddings = self.embeddings_model if self.serves_embeddings else []
        return [*embeddings, *([self.reranker_model] if self.serves_rerank else [])]

    def aliases_for_nothing(self) -> dict[str, str]:
        """MODEL_ALIASES' aliases whose model is none this server serves, by its id or
        its last path part (they are ignored: a client sending one gets 404)."""
        names = model_by_name(self.served_models())
        return {alias: model for alias, model in self.aliases().items() if model not in names}

    def all_api_keys(self) -> list[str]:
        """API_KEYS plus the lines of API_KEYS_FILE (blank lines and # comments skipped;
        a byte-order mark, as Windows editors write one, is not part of the first key)."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            try:
                text = self.api_keys_file.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
                raise SettingsError(
                    f"API_KEYS_FILE={self.api_keys_file} cannot be read: {why}"
                ) from None
            lines = (line.strip() for line in text.splitlines())
            keys += [line for line in lines if line and not line.startswith("#")]
        for number, key in enumerate(keys, 1):
            # A header carries ASCII: a key with other characters could never be sent.
            if not (key.isascii() and key.isprintable()):
                raise SettingsError(
                    f"API key {number} of {len(keys)} (API_KEYS, then API_KEYS_FILE's lines) "
                    "has characters other than printable ASCII: no client could send it"
                )
        return keys


def _is_origin(value: str) -> bool:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and not (parts.path or parts.query or parts.fragment or parts.username)
        and "@" not in parts.netloc
    )


def near_misses(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable, the setting it nearly spells) for each variable of ``environ`` that is
    no setting but looks like one (API_KEY for API_KEYS): it is ignored, and a misspelt
    API_KEYS would leave every route open."""
    names = [name.upper() for name in Settings.model_fields]
    found = []
    for variable in environ:
        if variable.upper() in names:
            continue
        close = difflib.get_close_matches(variable.upper(), names, n=1, cutoff=0.85)
        if close:
            found.append((variable, close[0]))
    return found


# Hugging Face's own variables that the README names, which huggingface_hub reads with
# int() when imported: a bad one had failed the start-up with tracebacks of two processes.
HUB_SECONDS = ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")


def hub_variable_errors(environ: Mapping[str, str]) -> list[str]:
    """One line per Hugging Face variable of ``environ`` that huggingface_hub cannot read."""
    return [
        f"{name}={environ[name]!r}: a whole number of seconds"
        for name in HUB_SECONDS
        if name in environ and not _whole_seconds(environ[name])
    ]


def _whole_seconds(value: str) -> bool:
    """Whether huggingface_hub's ``int()`` reads ``value`` as a number of seconds."""
    try:
        return int(value) >= 0
    except ValueError:
        return False
