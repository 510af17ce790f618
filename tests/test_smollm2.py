"""
SmolLM2-135M-Instruct built by data/smollm2/prepare.py: our model and tokenizer against transformers / tokenizers.
$ python -m pytest -q tests/test_smollm2.py
"""
import os, subprocess, sys
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "data", "smollm2", "SmolLM2-135M-Instruct")
# ~110 words of plain encyclopedic English; the Q4_1-derived weights give ppl ≈ 8 (≈ 56 if the q/k RoPE permutation were left in)
PARAGRAPH = (
    "Water is a chemical compound made of hydrogen and oxygen. It is the main part of the oceans, lakes and rivers of the Earth, "
    "and it is also found in the air as water vapour and in the ground. All known forms of life need water to live. "
    "At normal temperature and pressure, water is a clear liquid with no taste or smell. When it is cooled below zero degrees "
    "Celsius it freezes into ice, and when it is heated to one hundred degrees Celsius it boils and turns into steam. "
    "About seventy percent of the surface of the Earth is covered by water, most of it in the salty oceans.")
VARIED = ("<|im_start|>user\nHello  world! 12345 + 6.789 = ?\tdon't STOP, naïve café — Ça va? 東京 🚀\n\n"
          "    def f(x): return x**2  # comment<|im_end|>\n<|endoftext|>")
PROMPT = "The capital of France is"

@pytest.fixture(scope="module")
def ckpt():
    r = subprocess.run([sys.executable, "data/smollm2/prepare.py"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"prepare.py failed (no PyPI / hub access?): {r.stderr.strip().splitlines()[-1:]}")
    return CKPT

@pytest.fixture(scope="module")
def ours(ckpt):
    model = pytest.importorskip("model")
    torch.set_num_threads(2)
    return model.LLaMA.from_pretrained(ckpt, dtype=torch.float32).eval()

@pytest.fixture(scope="module")
def hf_tok(ckpt):
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))

def test_files_and_special_tokens(ckpt, hf_tok):
    # the GGUF metadata says bos <|im_start|> 1, eos <|im_end|> 2, <|endoftext|> 0; no BOS added on encode
    assert [hf_tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert hf_tok.get_vocab_size() == 49152
    assert hf_tok.encode("Hi").ids == [hf_tok.token_to_id("Hi")]
    assert hf_tok.encode("12").ids == [hf_tok.token_to_id("1"), hf_tok.token_to_id("2")]  # digits split one by one

@torch.no_grad()
def test_perplexity(ours, hf_tok):
    ids = torch.tensor([hf_tok.encode(PARAGRAPH).ids])
    _, loss = ours(ids[:, :-1], ids[:, 1:])
    ppl = loss.exp().item()
    print(f"ours: ppl {ppl:.3f} over {ids.shape[1]} tokens")
    assert 1 < ppl < 20

@torch.no_grad()
def test_greedy_paris(ours, hf_tok):
    idx = torch.tensor([hf_tok.encode(PROMPT).ids])
    out = ours.generate(idx, max_new_tokens=8, temperature=0.0)
    text = hf_tok.decode(out[0, idx.shape[1]:].tolist())
    print(f"ours: {PROMPT!r} -> {text!r}")
    assert "Paris" in text

def test_tokenizer_matches_tokenizers(ckpt, hf_tok):
    tokenizer = pytest.importorskip("tokenizer")
    tok = tokenizer.load_tokenizer(ckpt)
    # encode() treats special-token strings as text (tiktoken's encode_ordinary); the tokenizers library parses them
    plain = VARIED
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        plain = plain.replace(special, "")
    for text in (plain, PARAGRAPH):
        assert tok.encode(text) == hf_tok.encode(text).ids
    assert tok.decode(hf_tok.encode(VARIED).ids) == VARIED
    assert (tok.bos_id, tok.eos_id, tok.n_vocab) == (1, 2, 49152)

def test_tokenizer_on_the_tokenizer_tests_texts(ckpt, hf_tok):
    """The real tokenizer.json on tests/test_tokenizer.py's edge cases (whitespace runs, digits, unicode, code)."""
    tokenizer = pytest.importorskip("tokenizer")
    from test_tokenizer import CHECKS, CORPUS
    tok = tokenizer.load_tokenizer(ckpt)
    for text in CHECKS + CORPUS:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False).ids, text
    assert tok.n_vocab == hf_tok.get_vocab_size()

@torch.no_grad()
def test_logits_match_transformers(ckpt, ours, hf_tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    idx = torch.tensor([hf_tok.encode(PARAGRAPH).ids[:32]])
    ref = hf(idx).logits
    logits, _ = ours(idx)  # (1, T, vocab)
    diff = (logits - ref).abs().max().item()
    print(f"logits vs transformers: max abs diff {diff:.2e}")
    assert diff <= 1e-4
