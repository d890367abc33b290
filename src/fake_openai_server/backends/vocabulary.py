"""Token-level access to a served model's own tokenizer, for TEI's /tokenize and /decode.

A module of its own, so that the ``Tokenizer`` interface stays narrow (texts in, ids
out): this one reads the Hugging Face tokenizer itself, the copy the engine saved in
``info.tokenizer_dir`` (opened on first use), or the one a ``Tokenizer`` exposes as
``hf_tokenizer`` (the tests' fakes do; ``HFTokenizer`` does not). It imports neither
torch nor FastAPI.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from fake_openai_server.backends.base import ModelInfo
from fake_openai_server.backends.tokenizer import MAX_TOKENIZER_CHARS, load_saved

# MeCab (fugashi) crashes the process on inputs of a few hundred thousand characters;
# the embedding path cuts texts before they reach it, and /tokenize refuses longer ones.
MAX_TOKENIZE_CHARS = MAX_TOKENIZER_CHARS


@dataclass(frozen=True)
class Token:
    id: int
    text: str  # the input's characters for the token; the token itself for special tokens
    special: bool
    start: int | None  # byte offsets into the input's UTF-8, as TEI's; None where unknown
    stop: int | None


class Vocabulary:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()  # HF tokenizers are not safe to share between threads
        self.size = len(tokenizer)
        self.special_ids = frozenset(int(i) for i in tokenizer.all_special_ids)

    def tokenize(self, text: str, add_special_tokens: bool) -> list[Token]:
        with self._lock:
            if self._tokenizer.is_fast:
                encoded = self._tokenizer(
                    text, add_special_tokens=add_special_tokens, return_offsets_mapping=True
                )
                ids = [int(i) for i in encoded["input_ids"]]
                pieces = self._tokenizer.convert_ids_to_tokens(ids)
                offsets: list[tuple[int, int] | None] = [
                    (int(a), int(b)) for a, b in encoded["offset_mapping"]
                ]
            else:
                ids = [
                    int(i)
                    for i in self._tokenizer(text, add_special_tokens=add_special_tokens)[
                        "input_ids"
                    ]
                ]
                pieces = self._tokenizer.convert_ids_to_tokens(ids)
                offsets = _align(text, pieces, [i in self.special_ids for i in ids])
        at_byte = _byte_offsets(text)
        tokens = []
        for token_id, piece, span in zip(ids, pieces, offsets, strict=True):
            special = token_id in self.special_ids
            if special or span is None or span[0] == span[1]:
                tokens.append(Token(token_id, str(piece), special, None, None))
            else:
                start, stop = span
                tokens.append(
                    Token(token_id, text[start:stop], False, at_byte[start], at_byte[stop])
                )
        return tokens

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        with self._lock:
            text: str = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text


def _byte_offsets(text: str) -> Sequence[int]:
    """Where each character of ``text`` begins in its UTF-8, and its end: TEI's offsets
    are bytes (a kana is 3), the tokenizers' are characters."""
    if text.isascii():
        return range(len(text) + 1)
    return list(accumulate((len(c.encode()) for c in text), initial=0))


def _align(
    text: str, pieces: Sequence[str], special: Sequence[bool]
) -> list[tuple[int, int] | None]:
    """Character spans of WordPiece tokens (slow tokenizers give no offsets): each piece,
    without its '##', is looked up from where the previous one ended."""
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    for piece, is_special in zip(pieces, special, strict=True):
        surface = piece.removeprefix("##")
        found = -1 if is_special or not surface else text.find(surface, cursor)
        if found < 0:
            spans.append(None)
            continue
        spans.append((found, found + len(surface)))
        cursor = found + len(surface)
    return spans


def vocabulary_of(tokenizer: object, info: ModelInfo) -> Vocabulary | None:
    """The vocabulary of a served model; None when neither source is there."""
    hf_tokenizer = getattr(tokenizer, "hf_tokenizer", None)
    if hf_tokenizer is None and info.tokenizer_dir:
        hf_tokenizer = load_saved(info.tokenizer_dir)
    if hf_tokenizer is None or not hasattr(hf_tokenizer, "convert_ids_to_tokens"):
        return None
    return Vocabulary(hf_tokenizer)
