"""Random-weight stand-ins for the real models, laid into a Hugging Face cache.

No machine that builds or tests this project reaches the Hugging Face Hub, so
tests, the benchmark and the container test build models of the same
architecture and tokenizer family as the real ones, with random weights, and
place them in a cache under the real names. With ``HF_HOME`` pointing there and
``HF_HUB_OFFLINE=1`` the server loads them through its normal loading path.

Random weights say nothing about retrieval quality; they are right for the
API contract, for parity with sentence-transformers and for speed.

    python -m tests.support.standins --hf-home /tmp/hf --size tiny
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Size = Literal["tiny", "small", "full", "null"]

RURI_LARGE = "cl-nagoya/ruri-large"
RERANKER = "cl-nagoya/ruri-v3-reranker-310m"
RURI_V3 = {
    "cl-nagoya/ruri-v3-30m": (256, 10, 4, 1024),
    "cl-nagoya/ruri-v3-70m": (384, 13, 6, 1536),
    "cl-nagoya/ruri-v3-130m": (512, 19, 8, 2048),
    "cl-nagoya/ruri-v3-310m": (768, 25, 12, 3072),
}

# Sentences used to train the stand-in SentencePiece model and to generate
# benchmark text. Ordinary Japanese prose of the kind people index.
SAMPLE_SENTENCES = [
    "東京は日本の首都であり、政治と経済の中心地です。",
    "瑠璃色はサファイアのような深い青色のことを指します。",
    "この製品の保証期間は購入日から一年間となっております。",
    "会議は来週の火曜日の午後三時から第二会議室で行います。",
    "返品をご希望の場合は、商品到着後七日以内にご連絡ください。",
    "機械学習モデルの性能は学習データの質に大きく左右されます。",
    "京都には千年以上の歴史を持つ寺社が数多く残っています。",
    "社内規程により、出張旅費は月末までに精算する必要があります。",
    "本システムはセキュリティ強化のため定期的にパスワードの変更を求めます。",
    "富士山は標高三七七六メートルで、日本で最も高い山です。",
    "新しい検索エンジンは文章の意味を理解して関連する文書を返します。",
    "お問い合わせはサポート窓口までメールまたはお電話でお願いします。",
    "桜の開花時期は地域によって異なり、南から北へと進んでいきます。",
    "データベースのバックアップは毎晩午前二時に自動で実行されます。",
    "ラーメンは醤油、味噌、塩、豚骨など多様なスープがあります。",
    "Dify uses an OpenAI-compatible API for embeddings and rerank.",
]

_KANA = [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x30A1, 0x30FB)]
_KANJI_COMMON = sorted({c for s in SAMPLE_SENTENCES for c in s if "\u4e00" <= c <= "\u9fff"})
_ASCII = [chr(c) for c in range(0x21, 0x7F)]
_PUNCT = list("、。「」『』（）・ー！？：　")


def japanese_text(n_chars: int, seed: int = 0) -> str:
    """Deterministic Japanese prose of about ``n_chars`` characters."""
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < n_chars:
        sentence = rng.choice(SAMPLE_SENTENCES)
        parts.append(sentence)
        length += len(sentence)
    return "".join(parts)[:n_chars]


@dataclass(frozen=True)
class BertShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab_size: int


BERT_SHAPES: dict[Size, BertShape] = {
    "tiny": BertShape(hidden=64, layers=2, heads=4, intermediate=128, vocab_size=0),
    # A small BERT for quick benchmark runs, with ruri-large's vocabulary.
    "small": BertShape(hidden=384, layers=6, heads=12, intermediate=1536, vocab_size=32768),
    # cl-nagoya/ruri-large: BERT-large with a 32,768 vocabulary.
    "full": BertShape(hidden=1024, layers=24, heads=16, intermediate=4096, vocab_size=32768),
    # No layers: the model costs next to nothing, the server's own ceiling (bench --shape null).
    "null": BertShape(hidden=8, layers=0, heads=1, intermediate=8, vocab_size=32768),
}


def _init(size: Size) -> dict[str, Any]:
    """Tiny and null models get a wider weight spread: different texts score differently."""
    return {"initializer_range": 0.1} if size in ("tiny", "null") else {}


def _snapshot_dir(hf_home: Path, repo_id: str) -> Path:
    """Create ``hub/models--org--name/snapshots/<hex>`` with ``refs/main``."""
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / revision
    if snapshot.exists():
        shutil.rmtree(snapshot)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False))


_ST = "sentence_transformers.models"


def _sentence_transformers_files(folder: Path, dim: int, max_seq_length: int) -> None:
    """modules.json (Transformer + mean Pooling), as ruri's repositories have."""
    _write_json(
        folder / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
        ],
    )
    _write_json(
        folder / "sentence_bert_config.json",
        {"max_seq_length": max_seq_length, "do_lower_case": False},
    )
    _write_json(
        folder / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": dim,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    )
    _write_json(
        folder / "config_sentence_transformers.json",
        {"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"},
    )


def ruri_large_vocab(size: Size = "tiny", words: bool = False) -> list[str]:
    """The stand-in's WordPiece vocabulary: special tokens, characters and their "##" forms.

    With ``words``, also the MeCab words of ``SAMPLE_SENTENCES`` (what the benchmark's texts
    are made of) ahead of the characters, as a real vocabulary has its frequent words: texts
    then come out in about as many tokens as ruri-large's real vocabulary gives, and
    WordPiece's longest match does real work. Sizes with a ``vocab_size`` keep it.
    """
    shape = BERT_SHAPES[size]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = _KANA + _KANJI_COMMON + _ASCII + _PUNCT
    if size != "tiny":
        chars += [chr(c) for c in range(0x4E00, 0x9FA0) if chr(c) not in _KANJI_COMMON]
    multi = [w for w in mecab_words(SAMPLE_SENTENCES) if len(w) > 1] if words else []
    vocab = specials + multi + chars + ["##" + c for c in chars]
    if shape.vocab_size:
        vocab = vocab[: shape.vocab_size]
        vocab += [f"[unused{i}]" for i in range(shape.vocab_size - len(vocab))]
    return vocab


def mecab_words(texts: list[str]) -> list[str]:
    """The distinct MeCab (unidic-lite) words of ``texts``, most frequent first."""
    from collections import Counter

    from transformers.models.bert_japanese.tokenization_bert_japanese import MecabTokenizer

    mecab = MecabTokenizer(mecab_dic="unidic_lite")
    # tokenize applies NFKC first, as the tokenizer does.
    counts = Counter(w for text in texts for w in mecab.tokenize(text))  # type: ignore[no-untyped-call]
    return [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def save_bert_japanese_tokenizer(folder: Path, vocab: list[str], **kwargs: Any) -> None:
    """ruri-large's tokenizer configuration (MeCab/unidic-lite + WordPiece) over ``vocab``."""
    from transformers import BertJapaneseTokenizer

    options: dict[str, Any] = {
        "do_lower_case": False,
        "word_tokenizer_type": "mecab",
        "subword_tokenizer_type": "wordpiece",
        "mecab_kwargs": {"mecab_dic": "unidic_lite"},
        "model_max_length": 512,
    }
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        vocab_file.write_text("\n".join(vocab) + "\n")
        tokenizer = BertJapaneseTokenizer(  # type: ignore[no-untyped-call]
            str(vocab_file), **{**options, **kwargs}
        )
        tokenizer.save_pretrained(folder)


def build_ruri_large(hf_home: Path, size: Size = "tiny", words: bool = False) -> Path:
    """A ruri-large-like model: BERT + MeCab/unidic-lite WordPiece tokenizer.

    ``words``: a vocabulary with words, not only characters (see :func:`ruri_large_vocab`).
    """
    import torch
    from transformers import BertConfig, BertModel

    shape = BERT_SHAPES[size]
    snapshot = _snapshot_dir(hf_home, RURI_LARGE)
    vocab = ruri_large_vocab(size, words)
    save_bert_japanese_tokenizer(snapshot, vocab)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=512,
        **_init(size),
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(snapshot)
    _sentence_transformers_files(snapshot, shape.hidden, max_seq_length=512)
    return snapshot


def _training_sentences() -> Iterator[str]:
    rng = random.Random(1)
    for _ in range(3000):
        yield "".join(rng.sample(SAMPLE_SENTENCES, 3))
    # Every character once, so nothing falls to <unk> in tests.
    yield "".join(_KANA + _KANJI_COMMON + _ASCII + _PUNCT)


def _modernbert_tokenizer(folder: Path, vocab_hint: int) -> int:
    """Train a SentencePiece unigram model and save it as a fast tokenizer.

    Returns the vocabulary size. Special ids follow ruri-v3:
    <unk>=0, <s>=1, </s>=2, <pad>=3.
    """
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_sentences(),
        model_writer=model_bytes,
        vocab_size=vocab_hint,
        model_type="unigram",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        user_defined_symbols=["<sep>", "<mask>", "<cls>"],
        hard_vocab_limit=False,
        character_coverage=1.0,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model_bytes.getvalue())
    pieces = [
        (processor.id_to_piece(i), processor.get_score(i))
        for i in range(processor.get_piece_size())
    ]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", 1), ("</s>", 2)],
    )
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        sep_token="<sep>",
        cls_token="<cls>",
        mask_token="<mask>",
        model_max_length=8192,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(model_bytes.getvalue())
    return len(pieces)


def _modernbert_config(
    vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int, **extra: Any
) -> Any:
    from transformers import ModernBertConfig

    return ModernBertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=8192,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
        # Global attention every third layer, sliding windows of 128 between: ModernBERT-Ja.
        layer_types=[
            "full_attention" if i % 3 == 0 else "sliding_attention" for i in range(layers)
        ],
        local_attention=128,
        **extra,
    )


def build_reranker(hf_home: Path, size: Size = "tiny") -> Path:
    """A ruri-v3-reranker-310m-like ModernBERT sequence classifier (one label)."""
    import torch
    from transformers import ModernBertForSequenceClassification

    snapshot = _snapshot_dir(hf_home, RERANKER)
    pieces = _modernbert_tokenizer(snapshot, vocab_hint=2000)
    if size == "full":
        vocab, hidden, layers, heads, inter = 102400, 768, 25, 12, 3072
    elif size == "small":
        # ruri-v3-70m's width and heads, six layers: the small benchmark shape.
        vocab, hidden, layers, heads, inter = 102400, 384, 6, 6, 1536
    elif size == "null":
        vocab, hidden, layers, heads, inter = 102400, 8, 1, 1, 8
    else:
        vocab, hidden, layers, heads, inter = pieces, 64, 2, 4, 128
    config = _modernbert_config(
        max(vocab, pieces), hidden, layers, heads, inter, num_labels=1, **_init(size)
    )
    torch.manual_seed(0)
    ModernBertForSequenceClassification(config).save_pretrained(snapshot)
    return snapshot


def build_ruri_v3(hf_home: Path, repo_id: str, size: Size = "tiny") -> Path:
    """A ruri-v3 embedding model: ModernBERT + mean pooling, 8192-token context."""
    import torch
    from transformers import ModernBertModel

    snapshot = _snapshot_dir(hf_home, repo_id)
    pieces = _modernbert_tokenizer(snapshot, vocab_hint=2000)
    hidden, layers, heads, inter = RURI_V3[repo_id]
    if size == "full":
        vocab = 102400
    else:
        # Keep the real output dimension (it is part of the contract), shrink the rest.
        vocab, layers, heads, inter = pieces, 2, 4, 2 * hidden
    config = _modernbert_config(max(vocab, pieces), hidden, layers, heads, inter, **_init(size))
    torch.manual_seed(0)
    ModernBertModel(config).save_pretrained(snapshot)
    _sentence_transformers_files(snapshot, hidden, max_seq_length=8192)
    return snapshot


def build_all(hf_home: Path, size: Size = "tiny", ruri_v3: tuple[str, ...] = ()) -> None:
    build_ruri_large(hf_home, size)
    build_reranker(hf_home, size)
    for repo_id in ruri_v3:
        build_ruri_v3(hf_home, repo_id, size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-home", type=Path, required=True)
    parser.add_argument("--size", choices=["tiny", "small", "full", "null"], default="tiny")
    parser.add_argument(
        "--ruri-v3", nargs="*", default=[], choices=sorted(RURI_V3), help="also build these"
    )
    args = parser.parse_args(argv)
    build_all(args.hf_home, args.size, tuple(args.ruri_v3))
    print(f"stand-in models written under {args.hf_home / 'hub'}")


if __name__ == "__main__":
    main()
