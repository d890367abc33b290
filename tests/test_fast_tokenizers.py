"""The fast tokenizer paths give exactly the Hugging Face tokenizers' ids.

The reference is the tokenizer itself, called the way the server calls it. Any difference
is a bug; a failure prints the first differing texts.

ruri-large's stand-in vocabulary holds single characters only, which never exercises
WordPiece's longest match; the vocabulary here adds MeCab words, their prefixes, "##"
suffixes and ASCII pieces, and leaves some characters without a "##" form (a word that
needs one becomes [UNK] whole) and others out entirely.
"""

from __future__ import annotations

import copy
import pickle
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from fake_openai_server.backends.fast_tokenizers import (
    FastEncoder,
    MecabWordPieceEncoder,
    RustEncoder,
    fast_encoder,
)
from tests.support import standins

# The server cuts a text to max_length * 16 characters before tokenizing it (see _cut).
SERVER_CUT = 512 * 16

# Pieces of text that tokenizers get wrong when they get anything wrong.
NFKC = [
    "ＡＢＣｘｙｚ",
    "０１２３４５６７８９",
    "ｶﾀｶﾅ",
    "ｶﾞｷﾞｸﾞﾊﾟﾋﾟ",
    "ﾞﾟ",
    "ﬁﬂﬀ",
    "㍻㍼㌔㌢㈱㈲",
    "①②⑳㉑",
    "™½²³Ⅻⅷ",
    "｟｠｡｢｣､･",
    "〜～−－",
    "Å",
    "ǅ",
    "ｰ",
]
EMOJI = [
    "😀",
    "👍🏽",
    "👨‍👩‍👧‍👦",
    "🇯🇵",
    "1️⃣",
    "❤️",
    "🏳️‍🌈",
    "🀄",
    "𠮷野家",
    "𩸽",
]
COMBINING = ["e\u0301", "か\u3099", "\u0301", "a\u0300\u0301\u0302", "ﾊ\u309a", "\u20dd"]
CONTROL = [
    "\x00",
    "\x01",
    "\x1c",
    "\x1f",
    "\x7f",
    "\x85",
    "\x9f",
    "\u200b",
    "\u200d",
    "\u200e",
    "\u2028",
    "\u2029",
    "\ufeff",
    "\ufffd",
    "\ue000",
    "\U000e0001",
]
WHITESPACE = [" ", "  ", "\u3000", "\u3000\u3000", "\xa0", "\t", "\n", "\r\n", "\x0b\x0c", " \t\n "]
SPECIAL = [
    "[CLS]",
    "[SEP]",
    "[MASK]x",
    "[PAD]",
    "[UNK]",
    "[sep]",
    "［ＳＥＰ］",
    "[ SEP ]",
    "[SEP",
    "##",
    "###",
]
LATIN = [
    "Dify",
    "OpenAI-compatible",
    "ΣΑΣ",
    "ΟΔΥΣΣΕΥΣ",
    "İstanbul",
    "Straße",
    "ǅemal",
    "naïve",
    "HTTP",
    "Hello, World!",
    "can't",
    "ruri-v3-310m",
]
CODE = [
    "https://example.com/v1/embeddings?model=ruri&q=東京",
    "http://localhost:8000/",
    "www.example.co.jp",
    "def f(x):\n    return x ** 2  # コメント",
    '{"input": ["東京"], "model": "ruri"}',
    "SELECT * FROM users WHERE id = 1;",
    "a_b-c.d/e\\f",
    "C:\\Users\\ruri",
    "1,234,567.89円",
    "2024年11月25日 12:34:56",
    "user@example.com",
]
LONG = [
    "a" * 100,
    "a" * 101,
    "あ" * 150,
    "ア" * 120,
    "東京" * 60,
    "9" * 200,
    "x" * 99 + "\u0301",
    "https://example.com/" + "a" * 120,
]
UNKNOWN = ["鬱", "龘", "ꙮ", "ᄀ", "א", "ا", "ก", "Ж", "ॐ", "\U0001f9ff"]
EDGES = [*NFKC, *EMOJI, *COMBINING, *CONTROL, *WHITESPACE, *SPECIAL, *LATIN, *CODE, *LONG, *UNKNOWN]


def _mixes(rng: random.Random, n: int) -> Iterator[str]:
    """Texts of 1..30 pieces: edge cases, characters of every kind, prose, spaces."""
    chars = (
        standins._KANA
        + standins._KANJI_COMMON
        + standins._ASCII
        + standins._PUNCT
        + [chr(c) for c in range(0x4E00, 0x4E00 + 3000, 7)]
    )
    for _ in range(n):
        parts: list[str] = []
        for _ in range(rng.randint(1, 30)):
            kind = rng.random()
            if kind < 0.3:
                parts.append(rng.choice(EDGES))
            elif kind < 0.55:
                parts.append("".join(rng.choices(chars, k=rng.randint(1, 12))))
            elif kind < 0.8:
                parts.append(rng.choice(standins.SAMPLE_SENTENCES)[: rng.randint(1, 40)])
            else:
                parts.append(rng.choice(WHITESPACE))
        yield "".join(parts)


def _corpus() -> list[str]:
    rng = random.Random(20_251_125)
    prose = [standins.japanese_text(rng.randint(0, 400), seed=i) for i in range(7_000)]
    # Prose with edge cases dropped in at random places.
    salted = []
    for i in range(3_000):
        text = list(standins.japanese_text(rng.randint(20, 200), seed=100_000 + i))
        for _ in range(rng.randint(1, 4)):
            text.insert(rng.randint(0, len(text)), rng.choice(EDGES))
        salted.append("".join(text))
    mixes = list(_mixes(rng, 10_500))
    # As long as the server lets a text be (MeCab sees all of it), prose and mixes.
    at_limit = [standins.japanese_text(SERVER_CUT + 500, seed=i)[:SERVER_CUT] for i in range(12)]
    at_limit += ["".join(_mixes(rng, 400))[:SERVER_CUT] for _ in range(12)]
    blank = ["", " ", "\u3000", "\n\n", "\t \u3000\xa0", "\x00", "\x00東京", "東京\x00大阪"]
    return [*EDGES, *blank, *prose, *salted, *mixes, *at_limit]


CORPUS = _corpus()


def _stress_vocab() -> list[str]:
    """A WordPiece vocabulary whose longest match has work to do (see the module docstring)."""
    rng = random.Random(7)
    chars = standins._KANA + standins._KANJI_COMMON + standins._ASCII + standins._PUNCT
    chars += [chr(c) for c in range(0x4E00, 0x4E00 + 3000, 7) if chr(c) not in chars]
    chars = [c for c in chars if c not in "鬱龘"]  # a few common-looking characters missing
    corpus = standins.SAMPLE_SENTENCES + [standins.japanese_text(300, seed=s) for s in range(50)]
    words = [w for w in standins.mecab_words(corpus) if len(w) > 1]
    # A third of the words are left out, so that they fall into a prefix and "##" pieces.
    whole = {w for w in words if rng.random() < 0.67}
    prefixes = {w[:k] for w in words for k in range(2, len(w)) if rng.random() < 0.5}
    suffixes = {"##" + w[k:] for w in words for k in range(1, len(w)) if rng.random() < 0.5}
    latin = ["http", "https", "://", "www", "example", "com", "def", "return", "the", "Hello"]
    latin += ["API", "Open", "##AI", "##ing", "##tion", "##s", "##ed", "##.", "###", "##24"]
    latin += ["20", "##00", "東京都", "##京都", "サファイ", "##ファイア"]
    no_continuation = set(chars[::13])  # can start a word but not continue one
    continuations = ["##" + c for c in chars if c not in no_continuation]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    unwanted = {*chars, *continuations, *("##" + c for c in no_continuation)}
    pieces = sorted({*whole, *prefixes, *suffixes, *latin} - unwanted)
    return specials + pieces + chars + continuations


@pytest.fixture(scope="module")
def quiet_transformers() -> Iterator[None]:
    """The slow tokenizer logs a warning for every pair it truncates."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    yield
    logging.set_verbosity(level)


def _bert_japanese(folder: Path, **kwargs: Any) -> Any:
    """Saved and loaded again, as a worker process would get it."""
    from transformers import AutoTokenizer

    standins.save_bert_japanese_tokenizer(folder, _stress_vocab(), **kwargs)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def ruri_large(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _bert_japanese(tmp_path_factory.mktemp("ruri-large"))


@pytest.fixture(scope="module")
def reranker(hf_home: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(standins.RERANKER)


def _encoder(tokenizer: Any) -> FastEncoder:
    encoder, why = fast_encoder(tokenizer)
    assert encoder is not None, why
    return encoder


def _assert_same(texts: Sequence[object], expected: list[Any], got: list[list[int]]) -> None:
    assert len(expected) == len(got)
    wrong = [(t, list(e), g) for t, e, g in zip(texts, expected, got, strict=True) if list(e) != g]
    shown = "\n".join(f"  {t!r}\n    slow {e}\n    fast {g}" for t, e, g in wrong[:5])
    assert not wrong, f"{len(wrong)} of {len(texts)} differ, the first:\n{shown}"


def test_corpus_is_large_and_varied() -> None:
    assert len(CORPUS) >= 20_000
    assert max(map(len, CORPUS)) == SERVER_CUT
    assert all(any(edge in text for text in CORPUS[len(EDGES) :]) for edge in EDGES if edge)


def test_the_vocabulary_exercises_wordpiece(ruri_large: Any) -> None:
    """Multi-character pieces, "##" pieces and whole-word [UNK]s occur in the corpus."""
    tokens = [t for text in CORPUS[:3000] for t in ruri_large.tokenize(text)]
    assert sum(len(t) > 1 and not t.startswith("##") and t != "[UNK]" for t in tokens) > 1000
    assert sum(t.startswith("##") and len(t) > 3 for t in tokens) > 100
    assert tokens.count("[UNK]") > 100


def test_mecab_wordpiece_ids_equal_the_slow_tokenizer(ruri_large: Any) -> None:
    encoder = _encoder(ruri_large)
    assert isinstance(encoder, MecabWordPieceEncoder)
    assert "ctypes" in encoder.kind  # the GIL-releasing MeCab call is the one under test
    expected = ruri_large(CORPUS)["input_ids"]
    # In the server's batch sizes, and a large part in one call.
    got = [ids for i in range(0, len(CORPUS), 64) for ids in encoder.encode(CORPUS[i : i + 64])]
    _assert_same(CORPUS, expected, got)
    assert encoder.encode(CORPUS[-3_000:]) == got[-3_000:]


@pytest.mark.parametrize(
    ("variant", "options"),
    [
        ("lowercase, added tokens", {"do_lower_case": True}),
        ("no NFKC", {"mecab_kwargs": {"mecab_dic": "unidic_lite", "normalize_text": False}}),
        ("fugashi's own MeCab call", {}),
    ],
)
def test_mecab_wordpiece_variants(tmp_path: Path, variant: str, options: dict[str, Any]) -> None:
    tokenizer = _bert_japanese(tmp_path, **options)
    if variant.startswith("lowercase"):
        tokenizer.add_tokens(["東京都庁", "hello", "[NEW]"])
    encoder: FastEncoder = (
        MecabWordPieceEncoder(tokenizer, libmecab="")
        if variant.startswith("fugashi")
        else _encoder(tokenizer)
    )
    texts = [*CORPUS[:1_500], *CORPUS[-50:], "HELLO 東京都庁 [NEW]", "ΣΑΣ ΟΔΥΣΣΕΥΣ", "Hello"]
    _assert_same(texts, tokenizer(texts)["input_ids"], encoder.encode(texts))


@pytest.mark.usefixtures("quiet_transformers")
@pytest.mark.parametrize("max_length", [512, 64, 16, 4, 3, 1, 0])
def test_mecab_wordpiece_pairs(ruri_large: Any, max_length: int) -> None:
    encoder = _encoder(ruri_large)
    rng = random.Random(max_length)
    for _ in range(6):
        query = rng.choice([rng.choice(CORPUS), standins.japanese_text(rng.randint(0, 900))])
        documents = [*rng.sample(CORPUS, 40), query]  # equal lengths: the tie rule
        expected = ruri_large(
            [query] * len(documents),
            documents,
            truncation="longest_first",
            max_length=max_length,
        )["input_ids"]
        got = encoder.encode_pairs(query, documents, max_length)
        _assert_same([(query, d) for d in documents], expected, got)


def test_fast_tokenizer_ids_equal_transformers(reranker: Any) -> None:
    encoder = _encoder(reranker)
    assert isinstance(encoder, RustEncoder)
    texts = CORPUS[:5_000]
    got = [ids for i in range(0, len(texts), 64) for ids in encoder.encode(texts[i : i + 64])]
    _assert_same(texts, reranker(texts)["input_ids"], got)


# The reference (the Rust library's own truncation) keeps every cut-off piece of both texts,
# one encoding per combination: long texts at a small max_length would take minutes.
SHORT_DOCUMENTS = [text for text in CORPUS if len(text) <= 600]


@pytest.mark.parametrize(
    ("max_length", "query_chars"),
    [(512, 5), (512, 300), (512, 2_000), (128, 40), (128, 2_000), (32, 5), (32, 300)]
    + [(8, 40), (4, 5), (3, 5), (2, 5)],
)
def test_fast_tokenizer_pairs(reranker: Any, max_length: int, query_chars: int) -> None:
    """Short queries cut the documents; long ones are cut too; 3 leaves only the special
    tokens and below that the Rust library cuts nothing at all."""
    encoder = _encoder(reranker)
    query = standins.japanese_text(query_chars, seed=query_chars)
    # The query itself too: equal lengths are where the two ways of cutting a pair differ.
    documents = [*random.Random(max_length).sample(SHORT_DOCUMENTS, 80), query]
    expected = reranker(
        [query] * len(documents), documents, truncation="longest_first", max_length=max_length
    )["input_ids"]
    got = encoder.encode_pairs(query, documents, max_length)
    _assert_same([(query, d) for d in documents], expected, got)


def test_fast_tokenizer_pairs_at_the_length_limit(reranker: Any) -> None:
    """Query and documents as long as the server lets them be (the reference takes a
    second a pair here; the fast path does not build the overflowing pieces)."""
    encoder = _encoder(reranker)
    query = CORPUS[-1]
    documents = [CORPUS[-2], CORPUS[-13], standins.japanese_text(100)]
    expected = reranker(
        [query] * len(documents), documents, truncation="longest_first", max_length=512
    )["input_ids"]
    _assert_same(documents, expected, encoder.encode_pairs(query, documents, 512))


@pytest.mark.usefixtures("quiet_transformers")
@pytest.mark.parametrize(
    ("document_tokens", "max_length"), [(1, 512), (7, 512), (60, 512), (10, 40)]
)
def test_mecab_wordpiece_pairs_of_documents_cut_short(
    ruri_large: Any, document_tokens: int, max_length: int
) -> None:
    """Cohere's max_tokens_per_doc: each document's first ids, then the pair as the slow
    tokenizer builds it from ids (prepare_for_model), cut as usual."""
    encoder = _encoder(ruri_large)
    query = standins.japanese_text(30, seed=document_tokens)
    documents = [*random.Random(document_tokens).sample(SHORT_DOCUMENTS, 40), "", "東京"]
    query_ids = ruri_large(query, add_special_tokens=False)["input_ids"]
    expected = [
        ruri_large.prepare_for_model(
            query_ids,
            ruri_large(doc, add_special_tokens=False)["input_ids"][:document_tokens],
            truncation="longest_first",
            max_length=max_length,
        )["input_ids"]
        for doc in documents
    ]
    got = encoder.encode_pairs(query, documents, max_length, document_tokens)
    _assert_same([(query, d) for d in documents], expected, got)
    whole = encoder.encode_pairs(query, documents, max_length)
    assert sum(a != b for a, b in zip(got, whole, strict=True)) >= 10  # many were cut


@pytest.mark.parametrize(
    ("document_tokens", "max_length"), [(1, 512), (7, 512), (60, 512), (10, 40)]
)
def test_fast_tokenizer_pairs_of_documents_cut_short(
    reranker: Any, document_tokens: int, max_length: int
) -> None:
    """Cohere's max_tokens_per_doc: each document's encoding cut to its first ids, then
    the pair as the Rust library makes it from the two encodings (its own truncation and
    special tokens: post_process)."""
    encoder = _encoder(reranker)
    backend = copy.deepcopy(reranker.backend_tokenizer)
    backend.enable_truncation(max_length, strategy="longest_first")
    query = standins.japanese_text(30, seed=document_tokens)
    documents = [*random.Random(document_tokens).sample(SHORT_DOCUMENTS, 60), "", "東京"]
    first = backend.encode(query, add_special_tokens=False)
    expected = []
    for doc in documents:
        second = backend.encode(doc, add_special_tokens=False)
        second.truncate(document_tokens)
        expected.append(backend.post_process(first, second).ids)
    got = encoder.encode_pairs(query, documents, max_length, document_tokens)
    _assert_same([(query, d) for d in documents], expected, got)
    whole = encoder.encode_pairs(query, documents, max_length)
    assert sum(a != b for a, b in zip(got, whole, strict=True)) >= 10  # many were cut


@pytest.mark.parametrize("name", ["ruri_large", "reranker"])
def test_one_encoder_serves_several_threads(request: pytest.FixtureRequest, name: str) -> None:
    tokenizer = request.getfixturevalue(name)
    encoder = _encoder(tokenizer)
    texts = CORPUS[:2_000]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda text: encoder.encode([text])[0], texts))
    _assert_same(texts, tokenizer(texts)["input_ids"], got)


def test_encoders_pickle(ruri_large: Any, reranker: Any) -> None:
    """A worker process can receive an encoder instead of building one."""
    texts = CORPUS[:300]
    for tokenizer in (ruri_large, reranker):
        copy = pickle.loads(pickle.dumps(_encoder(tokenizer)))
        assert copy.encode(texts) == [list(ids) for ids in tokenizer(texts)["input_ids"]]
        expected = tokenizer(["東京"] * len(texts), texts, truncation=True, max_length=512)
        assert copy.encode_pairs("東京", texts, 512) == expected["input_ids"]


def test_empty_calls(ruri_large: Any, reranker: Any) -> None:
    for tokenizer in (ruri_large, reranker):
        encoder = _encoder(tokenizer)
        assert encoder.encode([]) == []
        assert encoder.encode_pairs("東京", [], 512) == []


def test_text_that_is_not_utf8_fails_as_in_the_slow_tokenizer(ruri_large: Any) -> None:
    with pytest.raises(UnicodeEncodeError):
        ruri_large(["東京\ud800"])
    with pytest.raises(UnicodeEncodeError):
        _encoder(ruri_large).encode(["東京\ud800"])


def test_tokenizers_without_a_fast_path_say_why(tmp_path: Path) -> None:
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    basic = _bert_japanese(tmp_path / "basic", word_tokenizer_type="basic")
    encoder, why = fast_encoder(basic)
    assert encoder is None
    assert "word_tokenizer_type='basic'" in why

    characters = _bert_japanese(tmp_path / "char", subword_tokenizer_type="character")
    encoder, why = fast_encoder(characters)
    assert encoder is None
    assert "subword_tokenizer_type='character'" in why

    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n")
    encoder, why = fast_encoder(BertTokenizerLegacy(str(tmp_path / "vocab.txt")))
    assert encoder is None
    assert "BertTokenizerLegacy: no fast path" in why


@pytest.mark.usefixtures("quiet_transformers")
def test_pairs_of_documents_cut_short_without_a_fast_path(tmp_path: Path) -> None:
    """A tokenizer with no fast path cuts a document to its first tokens by decoding
    them and tokenizing the pair as usual: for Japanese text that gives the same ids as
    cutting the ids themselves (prepare_for_model)."""
    from fake_openai_server.backends.tokenizer import HFTokenizer

    slow = _bert_japanese(tmp_path, word_tokenizer_type="basic")
    tokenizer = HFTokenizer(slow, 512)
    assert "slow" in tokenizer.kind
    query = standins.japanese_text(30, seed=5)
    documents = [standins.japanese_text(n, seed=n) for n in (0, 3, 40, 200, 600)]
    query_ids = slow(query, add_special_tokens=False)["input_ids"]
    for tokens in (1, 10, 100):
        expected = [
            slow.prepare_for_model(
                query_ids,
                slow(doc, add_special_tokens=False)["input_ids"][:tokens],
                truncation="longest_first",
                max_length=512,
            )["input_ids"]
            for doc in documents
        ]
        got = [item.ids.tolist() for item in tokenizer.encode_pairs(query, documents, tokens)]
        assert got == expected, tokens


@pytest.mark.usefixtures("quiet_transformers")
@pytest.mark.parametrize("path", ["fast", "slow"])
def test_whitespace_runs_use_up_none_of_the_characters_read(
    tmp_path: Path, ruri_large: Any, path: str
) -> None:
    """MeCab + WordPiece make no tokens of whitespace: a text over the characters the
    tokenizer reads (16 per token of the maximum) has its whitespace runs squeezed to
    one space first, and is cut only if it is still over them. A text of 9 words and
    thousands of spaces had been cut to its first words (its end never read)."""
    from fake_openai_server.backends.tokenizer import HFTokenizer

    slow = ruri_large if path == "fast" else _bert_japanese(tmp_path, word_tokenizer_type="basic")
    tokenizer = HFTokenizer(slow, 64)
    assert ("slow" in tokenizer.kind) == (path == "slow")
    limit = 64 * 16
    spaced = "東京" + " \n\u3000\t" * limit + "大阪"
    got = tokenizer.encode([spaced, "  東京" + " " * limit])
    assert [(item.truncated, item.char_limit) for item in got] == [(False, 0), (False, 0)]
    assert got[0].ids.tolist() == slow("東京 大阪")["input_ids"]
    assert got[1].ids.tolist() == slow("東京")["input_ids"]
    prose = standins.japanese_text(limit + 10, seed=2)  # no runs to squeeze: cut
    (cut,) = tokenizer.encode([prose])
    assert (cut.truncated, cut.char_limit) == (True, limit)
    assert cut.original_length > 64  # over the maximum in tokens too


@pytest.mark.usefixtures("quiet_transformers")
def test_texts_over_the_characters_read_come_back_cut(reranker: Any) -> None:
    """SentencePiece makes tokens of spaces but few of a run of newlines: a text over the
    characters the tokenizer reads is tokenized from those characters and comes back
    truncated, however few tokens they make; a text at that length is untouched. Pairs:
    the query's cut cuts every pair, a document's its own; with ``document_tokens`` a
    document whose characters read make more tokens than asked is not cut."""
    from fake_openai_server.backends.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(reranker, 64)
    limit = 64 * 16
    assert tokenizer.char_limit == limit
    lines = "東京" + "\n" * limit + "大阪"
    at_limit = lines[:limit]
    prose = standins.japanese_text(limit + 10, seed=2)
    got = tokenizer.encode([lines, at_limit, "東京", prose])
    assert [item.truncated for item in got] == [True, False, False, True]
    assert [item.char_limit for item in got] == [limit, 0, 0, limit]
    expected = tokenizer.encode([at_limit, at_limit, "東京", prose[:limit]])
    for have, want in zip(got, expected, strict=True):
        assert have.ids.tolist() == want.ids.tolist()
    assert len(got[0].ids) < 64  # few tokens, yet cut

    pairs = tokenizer.encode_pairs("東京", [lines, at_limit, prose])
    assert [item.truncated for item in pairs] == [True, False, True]
    assert [item.char_limit for item in pairs] == [limit, 0, limit]
    cut_query = tokenizer.encode_pairs(lines, ["東京", "大阪"])
    assert [item.char_limit for item in cut_query] == [limit, limit]
    # The first 5 tokens of the prose are among the characters read; of the newlines'
    # text's, only a few tokens are.
    first = tokenizer.encode_pairs("東京", [lines, prose], 5)
    assert [item.char_limit for item in first] == [limit, 0]
