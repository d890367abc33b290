"""Tokenization that gives the Hugging Face tokenizer's ids while holding the GIL briefly.

The slow ``BertJapaneseTokenizer`` (ruri-large) spends most of its time in Python: MeCab's
nodes are wrapped one by one, WordPiece runs a Python loop over every word, and
``convert_tokens_to_ids`` looks every token up. Its threads therefore take turns on the GIL,
and the GIL is what the inference thread needs to launch kernels. The encoders here produce
the same ids with the heavy work in C and Rust, outside the GIL:

- ``BertJapaneseTokenizer`` (MeCab + WordPiece): NFKC in Python (one C call), MeCab through
  the very ``libmecab`` that fugashi loaded, called with ctypes (which releases the GIL) in
  wakati mode (one call per text returns the surfaces joined by spaces), then WordPiece,
  [CLS] and [SEP] in the Rust ``tokenizers`` library (which releases the GIL while it works).
  A text that holds an added or special token's string ("[SEP]") goes to the slow tokenizer:
  its added-token splitting is then exact by construction, and such texts are rare.
- ``PreTrainedTokenizerFast`` (ruri-v3 and the reranker, tokenizer.json): the Rust backend
  called directly, without transformers' Python-side batch assembly.

Ids are identical to ``tokenizer(texts)["input_ids"]`` and, for pairs, to
``tokenizer([query] * n, documents, truncation="longest_first", max_length=m)["input_ids"]``;
``tests/test_fast_tokenizers.py`` checks that over some 25,000 texts. An encoder is safe to
share between threads (one MeCab tagger per thread); each tokenizer process builds its
own from the tokenizer the engine saved.

Measured on the 2-core development machine (AMD EPYC, avx512), 300-character Japanese texts
(``standins.japanese_text``), ``TOKENIZERS_PARALLELISM=false``, batches of 64 texts (32 pairs),
``uv run python -m bench.tokenizers``:

    ruri-large stand-in (WordPiece over words, 32,768 entries)  slow / fast, texts/s
      1 thread                                                  1,240 / 7,150
      2 threads                                                 1,190 / 12,300
    ruri-large stand-in (single characters only, as in the benchmark models)
      1 thread                                                  1,000 / 5,500
      2 threads                                                   960 / 9,800
    reranker stand-in (SentencePiece, 300-char query and documents)  pairs/s
      1 thread                                                  2,900 / 3,800
      2 threads                                                 2,900 / 6,900
"""

from __future__ import annotations

import copy
import ctypes
import functools
import importlib
import os
import re
import shlex
import sys
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors


class FastEncoder(Protocol):
    kind: str  # what does the work, for logs and /info

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """``tokenizer(list(texts))["input_ids"]``: special tokens added, nothing cut."""
        ...

    def encode_pairs(
        self,
        query: str,
        documents: Sequence[str],
        max_length: int,
        document_tokens: int | None = None,
    ) -> list[list[int]]:
        """``tokenizer([query] * n, list(documents), truncation="longest_first",
        max_length=max_length)["input_ids"]``; with ``document_tokens``, each document's
        ids cut to their first that many before the pair is joined."""
        ...


def fast_encoder(tokenizer: Any) -> tuple[FastEncoder | None, str]:
    """The fast path for this Hugging Face tokenizer, or ``(None, why there is none)``.

    When there is one, the string says what it is (the encoder's ``kind``).
    """
    from transformers import BertJapaneseTokenizer, PreTrainedTokenizerFast

    encoder: FastEncoder
    if isinstance(tokenizer, PreTrainedTokenizerFast):
        unsupported = RustEncoder.unsupported(tokenizer)
        if unsupported:
            return None, unsupported
        encoder = RustEncoder(tokenizer)
    elif isinstance(tokenizer, BertJapaneseTokenizer):
        unsupported = MecabWordPieceEncoder.unsupported(tokenizer)
        if unsupported:
            return None, unsupported
        encoder = MecabWordPieceEncoder(tokenizer)
    else:
        return None, f"{type(tokenizer).__name__}: no fast path for this tokenizer class"
    mismatch = _self_check(encoder, tokenizer)
    if mismatch:
        return (
            None,
            f"{type(tokenizer).__name__}: fast path disagrees with the tokenizer: {mismatch}",
        )
    return encoder, encoder.kind


# A few texts every encoder must get right before it is used: a cheap guard against a
# configuration this module does not reproduce (the parity tests cover the known ones).
_PROBES = [
    "",
    "東京は日本の首都です。",
    "ｶﾀｶﾅと全角ＡＢＣ１２３、㍻の①。",
    "Dify uses an OpenAI-compatible API: https://example.com/v1?q=ruri",
    "  空白\u3000\t改行\nの　混在 ",
]


def _self_check(encoder: FastEncoder, tokenizer: Any) -> str:
    expected = tokenizer(_PROBES)["input_ids"]
    got = encoder.encode(_PROBES)
    for text, want, have in zip(_PROBES, expected, got, strict=True):
        if list(want) != have:
            return f"{text!r}: {have} != {list(want)}"
    # Long enough not to truncate (the slow tokenizer logs a warning for every truncated
    # pair): this checks the pair's special tokens; the parity tests check truncation.
    query, documents = _PROBES[1], _PROBES[1:]
    expected = tokenizer([query] * len(documents), documents, truncation=True, max_length=512)
    got = encoder.encode_pairs(query, documents, 512)
    if [list(ids) for ids in expected["input_ids"]] != got:
        return f"pairs: {got} != {expected['input_ids']}"
    return ""


class RustEncoder:
    """A fast (tokenizer.json) tokenizer: its own Rust backend, called directly.

    Single texts: exactly transformers' call, without its Python work per text
    (BatchEncoding, padding and length checks). Pairs: the Rust library encodes a pair as
    each text on its own, then truncation, then the special tokens; here the query is encoded
    once for all documents and the library's truncation arithmetic is done on the ids.
    That also skips what the library does besides: it keeps every cut-off piece of both
    texts as "overflowing" encodings, one per combination, which for an 8,000-character
    query and document at max_length 512 is some 960 encodings and half a second per pair.
    """

    kind = "Rust tokenizers (tokenizer.json), called directly"

    def __init__(self, tokenizer: Any) -> None:
        self._plain = _backend_copy(tokenizer)
        self._pairs = _rust_pair_template(self._plain, tokenizer.truncation_side)

    @staticmethod
    def unsupported(tokenizer: Any) -> str:
        """Why this fast tokenizer has no fast path, or "" when it has one."""
        from transformers import PreTrainedTokenizerFast

        name = type(tokenizer).__name__
        # A class that changes these does Python work of its own around the Rust call.
        for method in (
            "__call__",
            "_encode_plus",
            "set_truncation_and_padding",
            "_convert_encoding",
        ):
            if getattr(type(tokenizer), method) is not getattr(PreTrainedTokenizerFast, method):
                return f"{name} overrides {method}: no fast path"
        if _rust_pair_template(_backend_copy(tokenizer), tokenizer.truncation_side) is None:
            return f"{name}: its pairs are not [special] first [special] second [special]"
        return ""

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._plain.encode_batch_fast(list(texts))]

    def encode_pairs(
        self,
        query: str,
        documents: Sequence[str],
        max_length: int,
        document_tokens: int | None = None,
    ) -> list[list[int]]:
        assert self._pairs is not None  # unsupported() said so
        texts = [query, *documents]
        encodings = self._plain.encode_batch_fast(texts, add_special_tokens=False)
        first, *seconds = (e.ids for e in encodings)
        return self._pairs.join_all(first, seconds, max_length, document_tokens)


def _backend_copy(tokenizer: Any) -> Tokenizer:
    """The tokenizer's backend as transformers calls it, in a copy this module alone owns."""
    backend: Tokenizer = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(tokenizer.split_special_tokens)
    return backend


class MecabWordPieceEncoder:
    """``BertJapaneseTokenizer`` with MeCab words and WordPiece subwords (ruri-large).

    What the slow tokenizer does to a text without added tokens, step by step:
    ``MecabTokenizer.tokenize``: NFKC, ``fugashi.GenericTagger`` nodes' surfaces (MeCab
    reads the text as a C string, so it ends at the first NUL), each lowercased when
    ``do_lower_case``; then ``WordpieceTokenizer.tokenize`` on each surface: split on
    whitespace (``str.split``), greedy longest match per word with "##" continuations,
    [UNK] for a word longer than ``max_input_chars_per_word`` or with no match; ids from the
    vocabulary, added tokens' ids first; [CLS] ... [SEP] around.

    Here MeCab's wakati output is the surfaces joined by spaces, and splitting it on
    whitespace gives the concatenation of each surface's ``split()``: the same words. The
    Rust pre-tokenizer splits on exactly the characters ``str.split`` splits on (Rust's own
    idea of whitespace differs: U+001C..U+001F), and Rust's WordPiece implements the same
    greedy longest match, so the same words give the same pieces.
    """

    def __init__(self, tokenizer: Any, libmecab: str | None = None) -> None:
        """``libmecab``: the library to call, "" for fugashi's own (GIL-holding) call;
        by default the one fugashi loaded, where it can be found."""
        word = tokenizer.word_tokenizer
        self._normalize: bool = word.normalize_text
        self._lower: bool = word.do_lower_case
        self._mecab_args = _mecab_args(tokenizer.mecab_kwargs or {}) + ["-Owakati"]
        self._libmecab = _loaded_libmecab() if libmecab is None else libmecab
        self.kind = (
            "MeCab (libmecab via ctypes, GIL released) + WordPiece (Rust tokenizers)"
            if self._libmecab
            else "MeCab (fugashi, holds the GIL) + WordPiece (Rust tokenizers)"
        )
        # The slow tokenizer splits these strings out before MeCab sees the text: such a
        # text goes to the slow tokenizer itself.
        added = {*tokenizer.added_tokens_encoder, *tokenizer.all_special_tokens} - {""}
        self._added = _any_of(added)
        # MecabTokenizer lowercases every surface except these.
        self._never_lower = _any_of({*word.never_split, *tokenizer.all_special_tokens} - {""})
        self._rust = _wordpiece(tokenizer)
        self._pairs = _slow_pair_template(tokenizer)
        self._slow = tokenizer
        self._slow_lock = threading.Lock()  # slow tokenizers are not thread-safe
        self._local = threading.local()

    @staticmethod
    def unsupported(tokenizer: Any) -> str:
        """Why this BertJapaneseTokenizer has no fast path, or "" when it has one."""
        name = type(tokenizer).__name__
        if not (tokenizer.do_word_tokenize and tokenizer.word_tokenizer_type == "mecab"):
            return (
                f"{name} with word_tokenizer_type={tokenizer.word_tokenizer_type!r}: no fast path"
            )
        if not (tokenizer.do_subword_tokenize and tokenizer.subword_tokenizer_type == "wordpiece"):
            return (
                f"{name} with subword_tokenizer_type={tokenizer.subword_tokenizer_type!r}: "
                "no fast path"
            )
        if (tokenizer.mecab_kwargs or {}).get("mecab_option"):
            return f"{name}: a custom mecab_option is not reproduced by the fast path"
        if tokenizer.split_special_tokens:
            return f"{name} with split_special_tokens=True: no fast path"
        unk = str(tokenizer.unk_token)
        if unk not in tokenizer.vocab and unk not in tokenizer.added_tokens_encoder:
            return f"{name}: unknown token {unk!r} has no id"
        return ""

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self._encode(list(texts), special=True)

    def encode_pairs(
        self,
        query: str,
        documents: Sequence[str],
        max_length: int,
        document_tokens: int | None = None,
    ) -> list[list[int]]:
        first, *seconds = self._encode([query, *documents], special=False)
        return self._pairs.join_all(first, seconds, max_length, document_tokens)

    def _encode(self, texts: list[str], special: bool) -> list[list[int]]:
        """Each text's ids, with or without the special tokens around them."""
        words = [self._words(text) for text in texts]
        encodings = self._rust.encode_batch_fast(
            [w or "" for w in words], add_special_tokens=special
        )
        ids = [e.ids for e in encodings]
        for i, w in enumerate(words):
            if w is None:  # an added token's string: the slow tokenizer splits it out itself
                with self._slow_lock:
                    ids[i] = list(self._slow(texts[i], add_special_tokens=special)["input_ids"])
        return ids

    def _words(self, text: str) -> str | None:
        """MeCab's surfaces joined by spaces, or None when the slow tokenizer must run."""
        if self._added and self._added.search(text):
            return None
        if self._normalize:
            text = unicodedata.normalize("NFKC", text)
        text = text.partition("\x00")[0]  # where MeCab's C string ends
        if self._lower:
            if self._never_lower and self._never_lower.search(text):
                return None
            # Lowercasing the joined surfaces equals lowercasing each: a space is neither
            # cased nor case-ignorable, so it ends the context of a final sigma.
            return self._tagger().wakati(text).lower()
        return self._tagger().wakati(text)

    def _tagger(self) -> _Wakati:
        tagger: _Wakati | None = getattr(self._local, "tagger", None)
        if tagger is None:
            tagger = _Wakati(self._mecab_args, self._libmecab)
            self._local.tagger = tagger
        return tagger

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for unpicklable in ("_local", "_slow_lock"):
            del state[unpicklable]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._slow_lock = threading.Lock()


def _any_of(strings: set[str]) -> re.Pattern[str] | None:
    if not strings:
        return None
    return re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)))


def _mecab_args(mecab_kwargs: dict[str, Any]) -> list[str]:
    """The arguments MecabTokenizer gives fugashi.GenericTagger, as GenericTagger splits them."""
    import inspect

    from transformers.models.bert_japanese.tokenization_bert_japanese import MecabTokenizer

    default_dic = inspect.signature(MecabTokenizer).parameters["mecab_dic"].default
    dic = mecab_kwargs.get("mecab_dic", default_dic)
    option = ""
    if dic is not None:
        dic_dir = importlib.import_module(dic).DICDIR
        option = f'-d "{dic_dir}" -r "{os.path.join(dic_dir, "mecabrc")}" '
    return ["fugashi", "-C", *shlex.split(option)]


def _wordpiece(tokenizer: Any) -> Tokenizer:
    """The tokenizer's WordPiece, [CLS] and [SEP] as a Rust tokenizer over MeCab's output."""
    # convert_tokens_to_ids looks at added tokens before the vocabulary.
    added = tokenizer.added_tokens_encoder
    vocab = {token: added.get(token, i) for token, i in tokenizer.vocab.items()}
    unk = str(tokenizer.unk_token)
    vocab.setdefault(unk, added[unk])
    rust = Tokenizer(
        models.WordPiece(
            vocab,
            unk_token=unk,
            max_input_chars_per_word=tokenizer.subword_tokenizer.max_input_chars_per_word,
            continuing_subword_prefix="##",
        )
    )
    rust.pre_tokenizer = pre_tokenizers.Split(_python_whitespace(), behavior="removed")
    before, after = _around(tokenizer.build_inputs_with_special_tokens([-1]), -1)
    names = {i: str(tokenizer.convert_ids_to_tokens(i)) for i in before + after}
    rust.post_processor = processors.TemplateProcessing(
        single=[names[i] for i in before] + ["$A"] + [names[i] for i in after],
        special_tokens=[(name, i) for i, name in names.items()],
    )
    return rust


@functools.cache
def _python_whitespace() -> Regex:
    """Runs of the characters ``str.split()`` splits on, as a pattern for the Rust library."""
    spaces = (c for c in range(sys.maxunicode + 1) if chr(c).isspace())  # 0.1 s, once
    return Regex("[" + "".join(f"\\x{{{c:x}}}" for c in spaces) + "]+")


@dataclass(frozen=True)
class _PairTemplate:
    """How a tokenizer joins and cuts a pair: [prefix] first [middle] second [suffix]."""

    prefix: list[int]
    middle: list[int]
    suffix: list[int]
    side: str  # which end truncation cuts: "right" or "left"
    rust: bool  # the Rust library's longest_first arithmetic, else transformers' Python one

    def join_all(
        self,
        first: list[int],
        seconds: Sequence[list[int]],
        max_length: int,
        second_tokens: int | None = None,
    ) -> list[list[int]]:
        """``first`` joined with each of ``seconds``, each cut to its first
        ``second_tokens`` ids beforehand (None: as they are)."""
        if second_tokens is not None:
            seconds = [second[:second_tokens] for second in seconds]
        return [self.join(first, second, max_length) for second in seconds]

    def join(self, first: list[int], second: list[int], max_length: int) -> list[int]:
        special = len(self.prefix) + len(self.middle) + len(self.suffix)
        cut = _rust_longest_first if self.rust else _python_longest_first
        keep_first, keep_second = cut(len(first), len(second), max_length, special)
        if self.side == "right":
            first, second = first[:keep_first], second[:keep_second]
        else:
            first = first[len(first) - keep_first :]
            second = second[len(second) - keep_second :]
        return self.prefix + first + self.middle + second + self.suffix


def _python_longest_first(n1: int, n2: int, max_length: int, special: int) -> tuple[int, int]:
    """How many ids of each text transformers' slow tokenizer keeps (truncate_sequences)."""
    remove = n1 + n2 + special - max_length
    if not max_length or remove <= 0:  # max_length 0 reads as "no limit" there
        return n1, n2
    # Cut the longer text down towards the shorter one, then both evenly, the second
    # text giving up the odd id.
    towards_equal = min(abs(n1 - n2), remove)
    rest = remove - towards_equal
    if n1 > n2:
        cut1, cut2 = towards_equal + rest // 2, rest - rest // 2
    else:
        cut1, cut2 = rest // 2, towards_equal + rest - rest // 2
    return max(n1 - cut1, 0), max(n2 - cut2, 0)


def _rust_longest_first(n1: int, n2: int, max_length: int, special: int) -> tuple[int, int]:
    """How many ids of each text the Rust library keeps (utils/truncation.rs)."""
    limit = max_length - special
    if limit < 0:
        # The library subtracts in unsigned arithmetic, which wraps: no limit at all.
        return n1, n2
    if n1 + n2 <= limit:
        return n1, n2
    short, long = sorted((n1, n2))
    # The shorter text stays whole if it leaves room; otherwise both get half, the
    # second (as ordered here: the longer, or on a tie the pair's second) the odd id.
    long = short if short > limit else max(short, limit - short)
    if short + long > limit:
        short, long = limit // 2, limit // 2 + limit % 2
    return (short, long) if n1 <= n2 else (long, short)


def _slow_pair_template(tokenizer: Any) -> _PairTemplate:
    """The special ids around a pair, from the slow tokenizer itself."""
    full = tokenizer.build_inputs_with_special_tokens([-1], [-2])
    prefix, rest = _around(full, -1)
    middle, suffix = _around(rest, -2)
    return _PairTemplate(prefix, middle, suffix, tokenizer.truncation_side, rust=False)


def _rust_pair_template(backend: Tokenizer, side: str) -> _PairTemplate | None:
    """The special ids around a pair, from the Rust post-processor; None if they are not
    simply before, between and after the two texts."""
    first, second = (backend.encode(t, add_special_tokens=False) for t in ("東京", "大阪"))
    pair = backend.post_process(first, second, add_special_tokens=True)
    texts = [i for i, special in enumerate(pair.special_tokens_mask) if not special]
    if not first.ids or not second.ids or not texts:
        return None
    start, end = texts[0], texts[-1] + 1
    between = pair.ids[start + len(first.ids) : end - len(second.ids)]
    template = _PairTemplate(pair.ids[:start], between, pair.ids[end:], side, rust=True)
    if template.join(first.ids, second.ids, 1 << 30) != pair.ids:
        return None
    return template


def _around(ids: list[int], marker: int) -> tuple[list[int], list[int]]:
    at = ids.index(marker)
    return list(ids[:at]), list(ids[at + 1 :])


def _loaded_libmecab() -> str:
    """The path of the libmecab that fugashi loaded, "" where it cannot be found.

    Calling that very library gives the same analysis as fugashi; ctypes releases the GIL
    for the call, which fugashi (Cython, no ``nogil``) does not.
    """
    import fugashi  # noqa: F401  (loads libmecab into this process)

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ""
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1]
        if "libmecab" in Path(path).name:
            return path
    return ""


@functools.cache
def _libmecab(path: str) -> ctypes.CDLL:
    """The few functions of libmecab's C API used here, typed for ctypes."""
    lib = ctypes.CDLL(path)  # CDLL (not PyDLL): its calls release the GIL
    lib.mecab_new.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.mecab_new.restype = ctypes.c_void_p
    lib.mecab_sparse_tostr2.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.mecab_sparse_tostr2.restype = ctypes.c_char_p
    lib.mecab_strerror.argtypes = [ctypes.c_void_p]
    lib.mecab_strerror.restype = ctypes.c_char_p
    lib.mecab_destroy.argtypes = [ctypes.c_void_p]
    lib.mecab_destroy.restype = None
    return lib


class _Wakati:
    """One MeCab tagger in wakati mode; one per thread (a tagger is not thread-safe)."""

    def __init__(self, args: list[str], libmecab: str) -> None:
        self._lib = _libmecab(libmecab) if libmecab else None
        if self._lib is None:
            import fugashi

            # GenericTagger puts "fugashi -C" in front of the arguments itself.
            self._fugashi = fugashi.GenericTagger(shlex.join(args[2:]))
            return
        argv = (ctypes.c_char_p * len(args))(*(arg.encode() for arg in args))
        self._tagger = self._lib.mecab_new(len(args), argv)
        if not self._tagger:
            error = self._lib.mecab_strerror(None) or b""
            raise RuntimeError(f"MeCab failed to start with {args}: {error.decode()}")

    def wakati(self, text: str) -> str:
        """The surfaces of MeCab's nodes for ``text`` (no NUL in it), joined by spaces."""
        if self._lib is None:
            return str(self._fugashi.parse(text))
        data = text.encode()
        out = self._lib.mecab_sparse_tostr2(self._tagger, data, len(data))
        if out is None:
            error = self._lib.mecab_strerror(self._tagger) or b""
            raise RuntimeError(f"MeCab failed: {error.decode()}")
        result: str = out.decode()
        return result

    def __del__(self) -> None:
        if getattr(self, "_lib", None) is not None and getattr(self, "_tagger", None):
            self._lib.mecab_destroy(self._tagger)  # type: ignore[union-attr]
