"""Deterministic fake models: a backend plugin (``backends/base.py``) that drives the whole
server fast, with no torch, and injects faults on purpose.

Vectors and scores are simple functions of the token ids, so tests can compute the
expected answer independently of the server. The engine process loads the models with
``load_models``; the server opens the tokenizers with ``open_tokenizer``. Tests choose
the behaviour with the plugin's options (``fake_plugin(...)``):

- ``delay``: seconds every forward pass takes;
- ``triggers``: {character: fault}: a batch holding that character's token id
  ``raise``s, runs out of memory (``oom``), returns ``nan`` or ``zero`` rows, ``too_few`` or
  ``too_many`` rows, ``hang``s, or ``die``s (the engine process kills itself);
- ``tokenizer_raise``: a text holding this character makes the tokenizer raise;
- ``tokenizer_delay``: seconds every tokenizer call takes;
- ``gpu``: [fixed ms, ms per token]: the models say they run on ``cuda`` and each pass runs
  on an emulated GPU: ``launch`` returns at once, the passes run one after another, each
  taking the fixed time plus the per-token time of its padded shape (``padding``), and
  ``result()`` waits for its own (no CPU spent meanwhile);
- ``max_length``: the embedding models' maximum length in tokens (the reranker's is 4×;
  default ``MAX_LENGTH``);
- ``dimension``: the embedding models' vectors have this many floats (default ``DIM``);
- ``tokenizer_ms_per_text``: every text (or query + document pair) takes this long to
  tokenize (a sleep: the tokenizer processes of a many-core host, on any machine);
- ``load_seconds``: loading takes this long;
- ``load_error``: loading raises with this message; ``load_gate``: loading waits for
  this file to exist; ``fail_after_first_load``: a marker file; every load after the
  first one fails;
- ``model_raise`` / ``model_raise_rerank``: every batch (of the reranker) raises;
- ``echo``: each row is [first id, length] instead of a vector;
- ``record``: a file to which the engine appends each batch (one JSON list of
  [first id, length] per line).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fake_openai_server.backends.base import (
    Done,
    Encoded,
    FloatArray,
    IdArray,
    ModelInfo,
    Pending,
    Plugin,
    Task,
)
from fake_openai_server.settings import Settings

BOS, EOS, SEP = 1, 2, 3
DIM = 8
MAX_LENGTH = 32
VOCAB = 1000
SECRET = "/home/operator/.cache/secret-model/weights.bin"
HANG_SECONDS = 3600.0


def fake_plugin(**options: Any) -> Plugin:
    return Plugin("tests.support.fakes", options)


def char_ids(text: str) -> list[int]:
    return [ord(c) % (VOCAB - 10) + 10 for c in text]


def fake_vector(ids: Sequence[int], dim: int = DIM) -> FloatArray:
    """The fake model's embedding of ``ids`` (special tokens included), ``dim`` floats."""
    k = np.arange(1, DIM + 1, dtype=np.float64)
    total = sum(np.sin(i * k * 0.01) for i in ids)
    return _widened(total, len(ids), dim)


def fake_vector_at_once(ids: IdArray, dim: int = DIM) -> FloatArray:
    """``fake_vector`` in one numpy call (the same float32 values), for the emulated GPU:
    the loop costs ~0.3 ms of the engine process's CPU per 500-token text, which a GPU
    would not spend. The other fakes keep the loop: the tests' timings were set with it
    (with this one everywhere, the 100,000-item flood's /health probes waited longer)."""
    k = np.arange(1, DIM + 1, dtype=np.float64)
    total = np.sin(np.outer(ids.astype(np.float64), k) * 0.01).sum(axis=0)
    return _widened(total, len(ids), dim)


def _widened(total: npt.NDArray[np.float64], n: int, dim: int) -> FloatArray:
    """The DIM sums, averaged, repeated to ``dim`` floats and told apart by a ramp: as
    cheap at ruri-large's 1,024 dimensions as at 8 (a sine per id and dimension cost the
    emulated GPU's engine ~5 ms a text), and as long in JSON as a model's floats."""
    k = np.arange(1, dim + 1, dtype=np.float64)
    return np.asarray(np.resize(total, dim) / n + 0.001 * k, dtype=np.float32)


def fake_text_vector(text: str) -> FloatArray:
    ids = [BOS, *char_ids(text)][: MAX_LENGTH - 1] + [EOS]
    return fake_vector(ids)


def fake_logit(query: str, document: str) -> float:
    """Shared distinct characters, centred: documents sharing more with the query rank higher."""
    shared = set(char_ids(query[:MAX_LENGTH])) & set(char_ids(document[:MAX_LENGTH]))
    return float(len(shared) - 2)


def _logit_of(ids: Sequence[int]) -> float:
    """``fake_logit`` computed from a pair's ids: [BOS, query..., SEP, document..., EOS]."""
    ids = list(ids)
    if SEP not in ids:  # not a pair (the engine's warm-up passes)
        return 0.0
    sep = ids.index(SEP)
    return float(len(set(ids[1:sep]) & set(ids[sep + 1 : -1])) - 2)


# --- tokenizers (the server process) -----------------------------------------------------
class FakeHFTokenizer:
    """The part of a Hugging Face tokenizer that TEI's /tokenize and /decode use
    (``backends/vocabulary.py``), over the fake model's character ids."""

    is_fast = False
    all_special_ids = (BOS, EOS, SEP)

    def __init__(self) -> None:
        self._pieces = {BOS: "<s>", EOS: "</s>", SEP: "<sep>"}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return VOCAB

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = char_ids(text)
        with self._lock:
            self._pieces.update(zip(ids, text, strict=True))
        return {"input_ids": [BOS, *ids, EOS] if add_special_tokens else ids}

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._pieces.get(i, "[UNK]") for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        kept = [i for i in ids if not (skip_special_tokens and i in self.all_special_ids)]
        return "".join(self._pieces.get(i, "?") for i in kept)


class FakeTokenizer:
    kind = "fake (one token per character)"

    def __init__(self, info: ModelInfo, options: dict[str, Any]) -> None:
        self.hf_tokenizer = FakeHFTokenizer()
        self.max_length = info.max_length
        self.explode = options.get("tokenizer_raise")
        self.delay = float(options.get("tokenizer_delay", 0.0))
        self.per_text = float(options.get("tokenizer_ms_per_text", 0.0)) / 1000

    def _take_time(self, texts: int) -> None:
        if self.delay or self.per_text:
            time.sleep(self.delay + self.per_text * texts)

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        self._take_time(len(texts))
        if self.explode and any(self.explode in text for text in texts):
            raise RuntimeError(f"tokenizer crashed reading {SECRET}")
        return [self.wrap_ids(char_ids(text)) for text in texts]

    def encode_pairs(
        self, query: str, documents: Sequence[str], document_tokens: int | None = None
    ) -> list[Encoded]:
        self._take_time(len(documents))
        if self.explode and self.explode in query:
            raise RuntimeError(f"tokenizer crashed reading {SECRET}")
        # Each side is cut to MAX_LENGTH characters (the pair says so, as the real pair
        # tokenizers' truncation does), well within the reranker's maximum length.
        q = char_ids(query)
        encoded = []
        for doc in documents:
            d = char_ids(doc)[:document_tokens]
            ids = [BOS, *q[:MAX_LENGTH], SEP, *d[:MAX_LENGTH], EOS]
            full = len(q) + len(d) + 3
            encoded.append(Encoded.of(ids, len(ids) < full, full))
        return encoded

    def wrap_ids(self, ids: Sequence[int]) -> Encoded:
        full = [BOS, *ids, EOS]
        if len(full) <= self.max_length:
            return Encoded.of(full)
        return Encoded.of(full[: self.max_length - 1] + [EOS], True, len(full))


def open_tokenizer(info: ModelInfo, options: dict[str, Any]) -> FakeTokenizer:
    return FakeTokenizer(info, options)


# --- models (the engine process) -----------------------------------------------------------
class OutOfMemoryError(RuntimeError):
    """Named like torch's, which is what the engine recognises."""


class OnDevice:
    """A pass launched on the emulated GPU: its rows are there at ``done_at``."""

    def __init__(self, rows: FloatArray, done_at: float, graph: bool) -> None:
        self._rows = rows
        self._done_at = done_at
        self.graph = graph

    def result(self) -> FloatArray:
        time.sleep(max(0.0, self._done_at - time.monotonic()))
        return self._rows


class FakeModel:
    def __init__(self, info: ModelInfo, options: dict[str, Any]) -> None:
        self.info = info
        self.delay = float(options.get("delay", 0.0))
        self.triggers = {
            char_ids(char)[0]: fault for char, fault in options.get("triggers", {}).items()
        }
        self.record = options.get("record")
        self.echo = bool(options.get("echo"))
        self.graph = bool(options.get("graph"))  # say each pass replayed a CUDA graph
        fixed_ms, token_ms = options.get("gpu") or (0.0, 0.0)
        self.pass_cost = (float(fixed_ms) / 1000, float(token_ms) / 1000)
        self.device_free_at = 0.0
        self.always_raise = bool(options.get("model_raise")) or (
            info.task == "rerank" and bool(options.get("model_raise_rerank"))
        )

    def export_tokenizer(self, folder: str) -> None:
        pass

    def launch(self, batch: Sequence[IdArray]) -> Pending:
        if self.record:
            with open(self.record, "a") as out:
                out.write(json.dumps([[int(ids[0]), len(ids)] for ids in batch]) + "\n")
        if self.delay:
            time.sleep(self.delay)
        if self.always_raise:
            raise ValueError(f"shape mismatch in {SECRET}")
        faults: set[str] = set()
        if self.triggers:  # only then: a set of each row's ids is not free at 512 tokens
            faults = {
                self.triggers[i] for ids in batch for i in set(ids.tolist()) & self.triggers.keys()
            }
        rows = self.rows(batch)
        if "raise" in faults:
            raise RuntimeError(f"CUDA error at {SECRET}")
        if "oom" in faults:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if "die" in faults:
            os.kill(os.getpid(), signal.SIGKILL)
        if "hang" in faults:
            time.sleep(HANG_SECONDS)
        for fault, value in (("nan", np.nan), ("zero", 0.0)):
            if fault in faults:
                marked = {i for i, f in self.triggers.items() if f == fault}
                for row, ids in enumerate(batch):
                    if set(ids.tolist()) & marked:
                        rows[row] = value
        if "too_few" in faults:
            rows = rows[:-1]
        if "too_many" in faults:
            rows = np.concatenate([rows, rows[:1]])
        if any(self.pass_cost):
            fixed, per_token = self.pass_cost
            shape = self.info.padding.shape(len(batch), max(map(len, batch)))
            start = max(time.monotonic(), self.device_free_at)
            self.device_free_at = start + fixed + per_token * shape[0] * shape[1]
            return OnDevice(rows, self.device_free_at, self.graph)
        return Done(rows, graph=self.graph)

    def rows(self, batch: Sequence[IdArray]) -> FloatArray:
        if self.echo:
            return np.array([[ids[0], len(ids)] for ids in batch], dtype=np.float32)
        if self.info.task == "embeddings":
            dim = self.info.dimension or DIM  # the ``dimension`` option's
            if any(self.pass_cost):
                return np.stack([fake_vector_at_once(ids, dim) for ids in batch])
            return np.stack([fake_vector(ids.tolist(), dim) for ids in batch])
        logits = np.asarray([_logit_of(ids.tolist()) for ids in batch], dtype=np.float32)
        scores = np.asarray([1 / (1 + math.exp(-x)) for x in logits], dtype=np.float32)
        return np.stack([logits, scores], axis=1)


def _info(
    name: str, task: Task, options: dict[str, Any], dimension: int | None = None
) -> ModelInfo:
    """The options' ``padding`` (Padding's fields): the model pads batches to shapes, as
    on a GPU; ``gpu``: the model says it runs on ``cuda``."""
    longest = int(options.get("max_length", MAX_LENGTH))
    max_length = longest if task == "embeddings" else 4 * longest
    info = ModelInfo(
        name=name,
        task=task,
        max_length=max_length,
        dimension=dimension,
        vocab_size=VOCAB,
        device="cuda:0" if options.get("gpu") else "cpu",
    )
    padding = options.get("padding")
    return ModelInfo.from_dict({**info.as_dict(), "padding": padding or {}})


def load_models(settings: Settings, options: dict[str, Any]) -> list[FakeModel]:
    time.sleep(float(options.get("load_seconds", 0.0)))
    gate = options.get("load_gate")
    if gate:
        deadline = time.monotonic() + 60
        while not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    once = options.get("fail_after_first_load")
    if once:
        if Path(once).exists():
            raise RuntimeError("the model files are gone")
        Path(once).touch()
    if options.get("load_error"):
        raise RuntimeError(str(options["load_error"]))
    dimension = int(options.get("dimension", DIM))
    models = []
    if settings.serves_embeddings:
        for name in settings.embeddings_model:
            info = _info(name, "embeddings", options, dimension)
            models.append(FakeModel(info, options))
    if settings.serves_rerank:
        info = _info(settings.reranker_model, "rerank", options)
        models.append(FakeModel(info, options))
    return models
