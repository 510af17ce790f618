"""Tests for tokenizer.py: tiktoken encodings built from HF tokenizer.json files equal the `tokenizers` library,
Llama-3 tokenizer.model files, the byte tokenizer, refusals. Offline: tokenizers are trained here on a tiny corpus.
    python -m pytest -q tests/test_tokenizer.py
"""
import base64
import json
import os
import random

import pytest

import tokenizer as tk
from tokenizer import LLAMA3_PATTERN, load_tokenizer

TEXT = (
    "Hello world! It's a test, isn't it? We're sure they'll say I'd've done it... "
    "Numbers: 1234567890 3.14159 and 2024-11-25, ①②③ ٣٤٥ 12 345 x1y22z333.\n"
    "Ünïcödé: café naïve résumé Straße Ελληνικά русский 中文字符 日本語のテキスト 한국어 🙂🚀👩‍💻 e\u0301\n"
    "Whitespace:  two   three    four\t\ttabs\t\n\n\nnewlines   \r\n  trailing   \n"
    "def f(x):\n    return {'a': [x**2, x // 3]}  # comment\n\tif x != 0: print(f\"{x:>8}\")\n"
    "   leading spaces and trailing spaces   "
)
CORPUS = [TEXT, TEXT.upper(), TEXT[::-1]] + [
    "the quick brown fox jumps over the lazy dog " * 3, "1 22 333 4444 55555 " * 4,
    "print('hello')\n\tfor i in range(10):\n\t\tx += i\n", "día año niño 東京 大阪 🙂🙂 " * 3,
    "a — b — c « d » ± e © " * 4,  # teaches merges like ' \xe2', which the digit splitting must not reach
]
SPECIALS = ["<|endoftext|>", "<|im_start|>"]


def train(tmp_path, name, pre_tokenizer, vocab_size=600):
    """Train a tiny byte-level BPE with `tokenizers` and save it HF-style (tokenizer.json + tokenizer_config)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    path = tmp_path / name
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    json.dump({"bos_token": "<|im_start|>", "eos_token": {"content": "<|endoftext|>"}},
              open(path / "tokenizer_config.json", "w"))
    return tok, path


def pre_tokenizers():
    from tokenizers import Regex, pre_tokenizers as pt
    return {
        "bytelevel": pt.ByteLevel(add_prefix_space=False),  # GPT-2
        "digits": pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]),  # SmolLM2
        "split": pt.Sequence([pt.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),  # Llama-3
                              pt.ByteLevel(add_prefix_space=False, use_regex=False)]),
    }


CHECKS = [TEXT, TEXT.upper(), "", " ", "\n", "  \t ", "a1b22c333", "x 1", "x  1", "x   12 ", "1 \n2", " 😀", "é",
          "x ①② ²³ ٣٤", " ½"]


@pytest.mark.parametrize("kind", ["bytelevel", "digits", "split"])
def test_tokenizer_json_matches_tokenizers(tmp_path, kind):
    pytest.importorskip("tokenizers")
    ref, path = train(tmp_path, kind, pre_tokenizers()[kind])
    tok = load_tokenizer(str(path))
    assert tok.rank_to_id is None  # a trained vocab is in merge order: tiktoken ranks are the HF ids
    for text in CHECKS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text
    assert tok.n_vocab == ref.get_vocab_size() == 600
    assert (tok.bos_id, tok.eos_id) == (1, 0)
    assert tok.encode("<|endoftext|>") != [0]  # special-token text is plain text to encode
    assert tok.decode([0]) == "<|endoftext|>"


def test_vocab_out_of_merge_order_is_remapped(tmp_path):
    """HF ids shuffled away from merge order: encode must still give HF's ids (through a rank <-> id map)."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer
    _, path = train(tmp_path, "shuffled", pre_tokenizers()["digits"])
    tj = json.load(open(path / "tokenizer.json"))
    vocab = tj["model"]["vocab"]
    movable = sorted(i for t, i in vocab.items() if i >= 2 + 256)  # keep specials and the byte alphabet
    perm = dict(zip(movable, random.Random(0).sample(movable, len(movable))))
    tj["model"]["vocab"] = {t: perm.get(i, i) for t, i in vocab.items()}
    json.dump(tj, open(path / "tokenizer.json", "w"))
    ref = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok = load_tokenizer(str(path))
    assert tok.rank_to_id is not None
    for text in CHECKS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([0, 1]) == "<|endoftext|><|im_start|>"


def test_llama3_tokenizer_model(tmp_path):
    """A Llama-3 style tokenizer.model written from the ranks of a Split+ByteLevel tokenizer.json encodes alike."""
    pytest.importorskip("tokenizers")
    _, path = train(tmp_path, "split", pre_tokenizers()["split"])
    hf = load_tokenizer(str(path))
    ranks = {t: r - 2 for t, r in hf.enc._mergeable_ranks.items()}  # drop the 2 specials below: dense from 0
    (tmp_path / "llama3").mkdir()
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    (tmp_path / "llama3" / "tokenizer.model").write_text("\n".join(lines) + "\n")
    tok = load_tokenizer(str(tmp_path / "llama3"))
    for text in CHECKS:
        assert tok.encode(text) == [i - 2 for i in hf.encode(text)], text
        assert tok.decode(tok.encode(text)) == text
    assert tok.n_vocab == 598 + 256
    assert (tok.bos_id, tok.eos_id) == (598, 599)  # <|begin_of_text|>, <|end_of_text|>
    assert tok.decode([598 + 9]) == "<|eot_id|>"


def test_byte_tokenizer():
    tok = load_tokenizer("byte")
    assert (tok.bos_id, tok.eos_id, tok.n_vocab) == (256, 257, 258)
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and tok.decode(ids) == TEXT
    assert tok.decode([256, *tok.encode("hé"), 257]) == "hé"


def test_partial_utf8_decodes_with_replacement(tmp_path):
    tok = load_tokenizer("byte")
    assert tok.decode(tok.encode("🙂")[:2]) == "\ufffd"
    pytest.importorskip("tokenizers")
    _, path = train(tmp_path, "bl", pre_tokenizers()["bytelevel"])
    hf = load_tokenizer(str(path))
    ids = hf.encode("ሴ")  # not in the corpus: three byte tokens
    assert len(ids) == 3 and hf.decode(ids[:2]) == "\ufffd" and hf.decode(ids) == "ሴ"


def test_refuses_sentencepiece(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers as pt
    sp = tokenizers.Tokenizer(models.Unigram([("<unk>", 0.0), ("▁a", -1.0), ("a", -2.0)], unk_id=0))
    sp.pre_tokenizer = pt.Metaspace()
    (tmp_path / "sp").mkdir()
    sp.save(str(tmp_path / "sp" / "tokenizer.json"))
    with pytest.raises(ValueError, match="SentencePiece"):
        load_tokenizer(str(tmp_path / "sp"))
    (tmp_path / "spm").mkdir()  # a SentencePiece protobuf tokenizer.model (Llama 2) is not base64 lines
    (tmp_path / "spm" / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    with pytest.raises(ValueError, match="SentencePiece"):
        load_tokenizer(str(tmp_path / "spm"))


def test_tiktoken_offline_error(monkeypatch):
    def offline(name):
        raise ConnectionError("no route to host")
    monkeypatch.setattr(tk.tiktoken, "get_encoding", offline)
    tk._load.cache_clear()
    with pytest.raises(ConnectionError, match="offline"):
        load_tokenizer("tiktoken:gpt2")
    with pytest.raises(ValueError, match="unknown tiktoken encoding"):
        load_tokenizer("tiktoken:nope")
