"""The tokenizer half of a Hugging Face model, as the engine process saved it.

Texts are cut to a safe number of characters (``char_limit``), tokenized once and cut to
the model's maximum length with the end tokens kept, exactly as the model's own tokenizer
would with ``truncation=True``. A text cut by characters counts as truncated
(``Encoded.char_limit``), even when its first characters' tokens fit (a long run of
newlines makes few SentencePiece tokens), and with truncation off such a text is refused
like any other over-long one. Where the tokenizer makes no tokens of whitespace (MeCab +
WordPiece), a long text's whitespace runs are squeezed to one space before it is cut, so
that they use up none of those characters. No torch here: this runs where requests arrive.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import re
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fake_openai_server.backends.base import Encoded, ModelInfo
from fake_openai_server.backends.fast_tokenizers import fast_encoder

log = logging.getLogger(__name__)

# Text is cut to this many characters per allowed token before it reaches the
# word tokenizer: ordinary text has used up the model's length well before that (about a
# token per one to four characters), and MeCab (fugashi) crashes the whole process on
# inputs of a few hundred thousand characters.
CHARS_PER_TOKEN_CAP = 16
MAX_TOKENIZER_CHARS = 50_000


def char_limit(max_length: int) -> int:
    """The characters of one text the tokenizer of a model of ``max_length`` reads."""
    return min(max_length * CHARS_PER_TOKEN_CAP, MAX_TOKENIZER_CHARS)


@functools.cache
def _whitespace() -> str:
    """Every character ``str.isspace`` (and so ``re``'s ``\\s``) counts as whitespace."""
    return "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())


def whitespace_runs(tokenizer: Any) -> re.Pattern[str] | None:
    """Runs of the whitespace characters the tokenizer makes no tokens of: a run of any
    one gives the ids one space gives, at the start, between words and at the end
    (MeCab + WordPiece, as ruri-large: all of them). Squeezing such runs to one space
    changes no ids. None where a space itself makes tokens (SentencePiece, as ruri-v3)."""

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    one = ids(" 東京 大阪 ")
    free = [
        c
        for c in _whitespace()
        if all(ids(f"{c * n}東京{c * n}大阪{c * n}") == one for n in (1, 3))
    ]
    return re.compile(f"[{re.escape(''.join(free))}]+") if " " in free else None


def load_saved(folder: str) -> Any:
    """The tokenizer the engine process saved in ``folder``, opened by its own class.

    ``AutoTokenizer`` finds the same class, but it imports transformers' configuration
    code and with it torch (transformers 5: seconds, and ~500 MiB in the server process
    and in each tokenizer process, for nothing). ``save_pretrained`` names the class in
    ``tokenizer_config.json``; where it names none that transformers has, AutoTokenizer
    it is.
    """
    import transformers

    try:
        config = json.loads((Path(folder) / "tokenizer_config.json").read_text())
        found = getattr(transformers, str(config["tokenizer_class"]))
    except Exception:  # no such file or key, or a class transformers does not have
        found = None
    if not (isinstance(found, type) and hasattr(found, "from_pretrained")):
        found = transformers.AutoTokenizer
    return found.from_pretrained(folder)


def end_tokens(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer appends after the text ([SEP] for BERT, </s> for ruri-v3).

    A cut sequence keeps them, as the tokenizer's own truncation does.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[start + len(plain) :])
    return []


def fit(ids: Sequence[int], max_length: int, end: Sequence[int]) -> Encoded:
    """Cut ``ids`` to ``max_length``, keeping the end tokens."""
    if len(ids) <= max_length:
        return Encoded.of(ids)
    return Encoded.of(list(ids[: max_length - len(end)]) + list(end), True, len(ids))


class _PerThread:
    """HF tokenizers are not safe to share between threads: one copy per thread."""

    def __init__(self, tokenizer: Any) -> None:
        self._prototype = tokenizer
        self._local = threading.local()
        self._lock = threading.Lock()

    def get(self) -> Any:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            with self._lock:
                tokenizer = copy.deepcopy(self._prototype)
            self._local.tokenizer = tokenizer
        return tokenizer


class HFTokenizer:
    """A model's own tokenizer (``load_saved`` of the folder the engine saved).

    Where ``fast_tokenizers`` knows the tokenizer, its encoder gives the same ids with
    the work in C and Rust, off the GIL; otherwise the tokenizer itself runs (and the log
    and ``/info`` say why).
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.max_length = max_length
        self.char_limit = char_limit(max_length)
        self._end = end_tokens(tokenizer)
        self._specials = len(tokenizer("a")["input_ids"]) - len(
            tokenizer("a", add_special_tokens=False)["input_ids"]
        )
        self._runs = whitespace_runs(tokenizer)
        self._tokenizers = _PerThread(tokenizer)
        try:
            self._fast, reason = fast_encoder(tokenizer)
        except Exception as exc:  # a library version it does not expect: stay correct
            self._fast, reason = None, f"the fast path failed to start ({type(exc).__name__})"
        if self._fast is not None:
            self.kind = self._fast.kind
        else:
            self.kind = f"{type(tokenizer).__name__} in Python (slow: {reason})"
            log.warning("no fast tokenizer: %s; tokenizing with the model's own", reason)

    @classmethod
    def open(cls, info: ModelInfo) -> HFTokenizer:
        return cls(load_saved(info.tokenizer_dir), info.max_length)

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        cut, long = self._read(texts)
        if self._fast is not None:
            encoded = [fit(ids, self.max_length, self._end) for ids in self._fast.encode(cut)]
        else:
            tokenizer = self._tokenizers.get()
            # One token over the limit, so that a cut text is known to have been cut.
            ids = tokenizer(cut, truncation=True, max_length=self.max_length + 1)["input_ids"]
            encoded = [fit(row, self.max_length, self._end) for row in ids]
        for i in long:
            encoded[i] = encoded[i].cut_at(self.char_limit)
        return encoded

    def encode_pairs(
        self, query: str, documents: Sequence[str], document_tokens: int | None = None
    ) -> list[Encoded]:
        (query,), query_cut = self._read([query])
        docs, long = self._read(documents)
        if self._fast is not None:
            pairs = self._fast.encode_pairs(query, docs, self.max_length, document_tokens)
            encoded = [Encoded.of(ids) for ids in pairs]
        else:
            tokenizer = self._tokenizers.get()
            seconds = (
                docs if document_tokens is None else _first_tokens(tokenizer, docs, document_tokens)
            )
            ids = tokenizer(
                [query] * len(docs), seconds, truncation="longest_first", max_length=self.max_length
            )["input_ids"]
            encoded = [Encoded.of(row) for row in ids]
        # A pair of a text cut by characters is cut, however few its tokens; but for a
        # document of which only the first ``document_tokens`` tokens were asked, and the
        # characters read gave more, which are those asked.
        if long and document_tokens is not None:
            counts = self._token_counts([docs[i] for i in long])
            long = [i for i, count in zip(long, counts, strict=True) if count <= document_tokens]
        for i in range(len(encoded)) if query_cut else long:
            encoded[i] = encoded[i].cut_at(self.char_limit)
        return encoded

    def _read(self, texts: Sequence[str]) -> tuple[list[str], list[int]]:
        """``texts`` as the tokenizer reads them, and the indices of those it reads only
        the first ``char_limit`` characters of. A text over that has its whitespace runs
        squeezed to one space first, where that changes no ids (``whitespace_runs``), so
        that they use up none of those characters."""
        limit = self.char_limit
        read, cut = list(texts), []
        for i, text in enumerate(texts):
            if len(text) > limit:
                if self._runs is not None:
                    text = self._runs.sub(" ", text)
                if len(text) > limit:
                    text = text[:limit]
                    cut.append(i)
                read[i] = text
        return read, cut

    def _token_counts(self, texts: list[str]) -> list[int]:
        """Each text's tokens, without the special tokens."""
        if self._fast is not None:
            return [len(ids) - self._specials for ids in self._fast.encode(texts)]
        ids = self._tokenizers.get()(texts, add_special_tokens=False)["input_ids"]
        return [len(row) for row in ids]

    def wrap_ids(self, ids: Sequence[int]) -> Encoded:
        wrapped = self._tokenizers.get().build_inputs_with_special_tokens(list(ids))
        return fit(list(wrapped), self.max_length, self._end)


def _first_tokens(tokenizer: Any, texts: list[str], count: int) -> list[str]:
    """Each text cut to its first ``count`` tokens, for a tokenizer without the fast path:
    a longer text becomes the decoding of those tokens, which reads back as them or very
    nearly (the fast paths cut the ids themselves, exactly)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [
        text if len(row) <= count else tokenizer.decode(row[:count])
        for text, row in zip(texts, ids, strict=True)
    ]
