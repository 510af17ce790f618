"""Tests for tokenizer.py: tiktoken encodings built from HF tokenizer.json files equal the `tokenizers` library,
Llama-3 tokenizer.model files, SentencePiece models equal `sentencepiece`, the byte tokenizer, refusals, hub ids.
Offline: tokenizers are trained here on a tiny corpus.
    python -m pytest -q tests/test_tokenizer.py
"""
import base64
import io
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


def train_sentencepiece(path, **kw):
    """A tiny SentencePiece BPE trained here with Llama 2's settings (byte fallback, digits split, identity
    normalizer, whitespace kept, dummy prefix), saved as path/tokenizer.model; returns the processor."""
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 3), model_writer=model, vocab_size=600, model_type="bpe", byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=0.99, hard_vocab_limit=False, minloglevel=2, **kw)
    os.makedirs(path, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def test_sentencepiece_tokenizer_model(tmp_path):
    """A SentencePiece tokenizer.model encodes as sentencepiece itself, decodes back to the text (its leading '▁'
    handled), never parses special-token text, and takes BOS/EOS from the model or the checkpoint's config."""
    ref = train_sentencepiece(tmp_path / "sp")
    tok = load_tokenizer(str(tmp_path / "sp"))
    assert isinstance(tok, tk.SentencePieceTokenizer) and tok.n_vocab == ref.get_piece_size() == 600
    for text in CHECKS + CORPUS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == text and tok.decode([tok.bos_id, *ids, tok.eos_id]) == text, text
    assert ref.id_to_piece(tok.encode("a b")[0]).startswith("▁")  # the dummy prefix, which decode strips again
    assert (tok.bos_id, tok.eos_id) == (ref.bos_id(), ref.eos_id()) == (1, 2)
    assert tok.encode("<s>") != [1] and tok.decode(tok.encode("</s>")) == "</s>"  # special-token text is text
    assert tok.decode([tok.n_vocab, tok.n_vocab + 5, *tok.encode("hi")]) == "hi"  # a padded embedding's rows
    assert set(tok.decode(tok.encode("ሴ")[-2:])) == {"\ufffd"}  # not in the corpus: byte fallback, cut mid-character
    # ids named by the checkpoint's config files come first, as for tokenizer.json
    with open(tmp_path / "sp" / "tokenizer_config.json", "w") as f:
        json.dump({"bos_token": {"content": "</s>"}, "eos_token_id": 0}, f)
    tk._load.cache_clear()
    assert (load_tokenizer(str(tmp_path / "sp")).bos_id, load_tokenizer(str(tmp_path / "sp")).eos_id) == (2, 0)


def test_sentencepiece_beside_its_tokenizer_json(tmp_path):
    """Llama 2 / Mistral / TinyLlama HF dirs ship a SentencePiece-style tokenizer.json (Metaspace, byte fallback)
    beside tokenizer.model: the model is used. Without it, that tokenizer.json is refused, naming what is missing."""
    transformers = pytest.importorskip("transformers")
    ref = train_sentencepiece(tmp_path / "sp")
    json.dump({"model_type": "llama"}, open(tmp_path / "sp" / "config.json", "w"))
    transformers.AutoTokenizer.from_pretrained(tmp_path / "sp").save_pretrained(tmp_path / "sp")
    tj = json.load(open(tmp_path / "sp" / "tokenizer.json"))
    assert tj["model"]["byte_fallback"] and "Metaspace" in json.dumps(tj["pre_tokenizer"])
    tok = load_tokenizer(str(tmp_path / "sp"))
    assert isinstance(tok, tk.SentencePieceTokenizer) and tok.encode(TEXT) == ref.encode(TEXT)
    os.remove(tmp_path / "sp" / "tokenizer.model")
    tk._load.cache_clear()
    with pytest.raises(ValueError, match="SentencePiece-style.*tokenizer.model"):
        load_tokenizer(str(tmp_path / "sp"))


def test_refuses_broken_sentencepiece_and_tiktoken_files(tmp_path):
    pytest.importorskip("sentencepiece")
    (tmp_path / "spm").mkdir()  # a protobuf (first byte 0x0A) that is no usable model: one piece, no trainer spec
    (tmp_path / "spm" / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    with pytest.raises(ValueError, match="does not load as a SentencePiece model"):
        load_tokenizer(str(tmp_path / "spm"))
    (tmp_path / "tt").mkdir()
    (tmp_path / "tt" / "tokenizer.model").write_text("IQ== 0\nnot a rank line\n")
    with pytest.raises(ValueError, match="neither a SentencePiece model nor a tiktoken BPE file"):
        load_tokenizer(str(tmp_path / "tt"))


def test_checkpoint_dir_resolves_only_hub_ids(tmp_path, monkeypatch):
    """Local dirs, 'scratch', 'byte', tiktoken names pass through; owner/name goes to huggingface_hub once, for the
    files a run reads only (no .bin, no consolidated.safetensors); hub failures are one FileNotFoundError line."""
    hub = pytest.importorskip("huggingface_hub")
    httpx = pytest.importorskip("httpx")  # huggingface_hub's HTTP client: its errors carry a response
    calls = []

    def download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        if repo_id == "gated/model":
            request = httpx.Request("GET", "https://huggingface.co/api/models/gated/model")
            response = httpx.Response(401, request=request)
            raise hub.errors.GatedRepoError("401 Client Error.\nAccess to model gated/model is restricted.",
                                            response=response)
        return str(tmp_path)
    monkeypatch.setattr(hub, "snapshot_download", download)
    tk.checkpoint_dir.cache_clear()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "dir").mkdir(parents=True)
    for spec in ("scratch", "byte", "tiktoken:gpt2", "local/dir", str(tmp_path), "a/b/c"):
        assert tk.checkpoint_dir(spec) == spec and not calls
    assert tk.checkpoint_dir("meta-llama/Llama-2-7b-hf") == str(tmp_path)
    assert tk.checkpoint_dir("meta-llama/Llama-2-7b-hf") == str(tmp_path) and len(calls) == 1  # resolved once
    import fnmatch
    patterns = calls[0][1]
    wanted = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
              "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    unwanted = ["pytorch_model-00001-of-00002.bin", "consolidated.safetensors", "consolidated.00.pth", "README.md"]
    assert all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in wanted)
    assert not any(fnmatch.fnmatch(f, p) for f in unwanted for p in patterns)
    with pytest.raises(FileNotFoundError) as e:
        tk.checkpoint_dir("gated/model")
    assert "gated: accept its license" in str(e.value) and "\n" not in str(e.value)
    tk.checkpoint_dir.cache_clear()


def test_tiktoken_offline_error(monkeypatch):
    def offline(name):
        raise ConnectionError("no route to host")
    monkeypatch.setattr(tk.tiktoken, "get_encoding", offline)
    tk._load.cache_clear()
    with pytest.raises(ConnectionError, match="offline"):
        load_tokenizer("tiktoken:gpt2")
    with pytest.raises(ValueError, match="unknown tiktoken encoding"):
        load_tokenizer("tiktoken:nope")
