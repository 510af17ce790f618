"""Tests for model.py: logits parity with transformers both ways, bit-exact save/load, causality, KV cache,
refusals of checkpoints the model cannot represent, sharded loading, compile without graph breaks,
left-padded batched generate == per-row generate.
    python -m pytest -q tests/test_model.py
"""
import dataclasses
import json
import os

import pytest
import torch

import model as model_py
from model import LLaMA, Linear, ModelConfig

# tiny HF configs: (name, LlamaConfig kwargs)
HF_CONFIGS = {
    "gqa": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2),
    "tied_theta": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                       rope_theta=500000.0),
    "odd_heads": dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=8, rope_theta=1234.0),
    "llama3_rope": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=16), rope_theta=500000.0),
}


def hf_model(tmp_path, name, **extra):
    """A randomly initialised LlamaForCausalLM (norm weights random too), saved to tmp_path/name."""
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=97, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    kw.update(HF_CONFIGS.get(name, {}), **extra)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, attn_implementation="eager")).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / name)
    return hf


def random_model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96)
    model = LLaMA(ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_to_ours_logits(tmp_path, name):
    hf = hf_model(tmp_path, name)
    ours = LLaMA.from_pretrained(tmp_path / name).eval()
    idx = torch.randint(0, 97, (2, 40))  # 40 > original_max_position_embeddings of the llama3 config
    with torch.no_grad():
        ref = hf(idx).logits
        logits, _ = ours(idx)
    diff = (logits - ref).abs().max().item()
    print(f"{name}: max abs diff {diff:.2e}")
    assert diff <= 1e-4
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings


def test_mistral_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = LLaMA.from_pretrained(tmp_path)
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max() <= 1e-4


def test_mistral_sliding_window_caps_the_context(tmp_path):
    """Mistral-7B v0.1's sliding_window (4096 of 32768 positions): within the window attention is plain causal, so
    the checkpoint loads with block_size = the window, and matches transformers' sliding-window Mistral up to it."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=24,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = LLaMA.from_pretrained(tmp_path)
    assert ours.config.block_size == 24
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=True, n_kv_head=1, rope_theta=3e4),
                                dict(rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0, original_max_position_embeddings=8))])
def test_ours_to_hf_logits(tmp_path, kw):
    transformers = pytest.importorskip("transformers")
    ours = random_model(**kw)
    ours.save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    idx = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        diff = (ours(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip_bit_exact(tmp_path, tied, dtype):
    ours = random_model(tie_embeddings=tied, bos_token_id=1, eos_token_id=2).to(dtype)
    ours.save_pretrained(tmp_path)
    back = LLaMA.from_pretrained(tmp_path, dtype=dtype)
    assert back.config == dataclasses.replace(ours.config, head_dim=16)  # None resolves to n_embd // n_head
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    # tied stays tied: one Parameter, so the optimizer sees one tensor
    assert (back.lm_head.weight is back.embed_tokens.weight) == tied
    assert torch.equal(back.cos, ours.cos) and back.cos.device.type == "cpu"


def test_sharded_index(tmp_path):
    hf = hf_model(tmp_path, "gqa")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    ours = LLaMA.from_pretrained(tmp_path / "sharded")
    idx = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max() <= 1e-4
    # a shard listed in the index but gone from disk is named in the error
    shard = sorted(f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors"))[-1]
    os.remove(tmp_path / "sharded" / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        LLaMA.from_pretrained(tmp_path / "sharded")


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    random_model().save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj.weight"):
        LLaMA.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, match", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(model_type="gpt2"), "model_type"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}, rope_parameters=None), "yarn"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "linear"),
])
def test_refuses_unrepresentable(tmp_path, change, match):
    random_model().save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg.update(change)
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=match):
        LLaMA.from_pretrained(tmp_path)


def test_save_refuses_attached_adapter(tmp_path):
    model = random_model()
    model.layers[0].self_attn.q_proj.adapter = torch.nn.Identity()
    with pytest.raises(ValueError, match="merge"):
        model.save_pretrained(tmp_path)


def test_causal():
    model = random_model()
    idx = torch.randint(0, 97, (1, 20))
    idx2 = idx.clone()
    idx2[0, 12] = (idx[0, 12] + 1) % 97
    with torch.no_grad():
        a, b = model(idx)[0], model(idx2)[0]
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_loss_ignores_minus_100():
    model = random_model()
    idx = torch.randint(0, 97, (2, 10))
    targets = idx.roll(-1, dims=1)
    targets[:, :4] = -100
    logits, loss = model(idx, targets)
    ref = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 97), targets[:, 4:].reshape(-1))
    assert torch.allclose(loss, ref)
    assert model(idx)[1] is None


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=4, tie_embeddings=True)])
def test_generate_matches_naive_loop(kw):
    model = random_model(**kw)
    idx = torch.randint(0, 97, (3, 7))
    out = model.generate(idx, 12)
    assert out.shape == (3, 19) and out.dtype == torch.long and torch.equal(out[:, :7], idx)
    ref = idx
    with torch.no_grad():
        for _ in range(12):
            ref = torch.cat([ref, model(ref)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)
    early = model.generate(idx, 12, done=lambda new: new.shape[1] == 4)  # asked after each step: stops at 4
    assert torch.equal(early, out[:, :7 + 4])
    torch.manual_seed(1)
    sampled = model.generate(idx, 5, temperature=1.0, top_k=3)
    assert sampled.shape == (3, 12) and 0 <= sampled.min() and sampled.max() < 97


def decode_logits(model, seq, T, pad=None):
    """Prefill seq[:, :T] through a KV cache, then feed seq[:, T:-1] a token at a time: the last step's logits."""
    cache = model.new_cache(seq.size(0), seq.size(1))
    with torch.no_grad():
        logits, _ = model(seq[:, :T], cache=cache, pos=0, pad=pad)
        for t in range(T, seq.size(1) - 1):
            logits, _ = model(seq[:, t:t + 1], cache=cache, pos=t, pad=pad)
    return logits[:, -1]  # (B, vocab)


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=4)])
def test_generate_left_padded_equals_per_row(kw):
    """Rows of 3 prompt lengths, left-padded into one batch (junk pad ids), decode as each row alone does."""
    model = random_model(**kw)
    prompts = [torch.randint(0, 97, (n,)) for n in (9, 4, 7, 4)]
    T, N = 9, 10
    pad = torch.tensor([T - len(p) for p in prompts])
    idx = torch.stack([torch.cat([torch.randint(0, 97, (T - len(p),)), p]) for p in prompts])
    seen = []  # the cos table each attention call gets: row b's real tokens sit at rope positions 0, 1, ...
    hook = model.layers[0].self_attn.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    out = model.generate(idx, N, pad=pad)
    hook.remove()
    assert torch.equal(out[:, :T], idx)
    for b, p in enumerate(prompts):
        assert torch.equal(seen[0][b, 0, pad[b]:], model.cos[:len(p)])  # prefill
        assert torch.equal(seen[-1][b, 0, 0], model.cos[len(p) + N - 2])  # the last decode step
    last = decode_logits(model, out, T, pad)
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], N)
        assert torch.equal(out[b, T:], alone[0, len(p):]), b
        diff = (last[b] - decode_logits(model, alone, len(p))[0]).abs().max().item()
        assert diff <= 1e-5, (b, diff)
    assert len({tuple(r) for r in out[:, T:].tolist()}) == 4 and len(set(out[0, T:].tolist())) > 2  # not degenerate
    # other junk pad ids change nothing; the same batch without pad does change the logits
    seq2 = torch.where(torch.arange(T + N) < pad[:, None], (out + 1) % 97, out)
    assert (decode_logits(model, seq2, T, pad) - last).abs().max() <= 1e-6
    assert not torch.allclose(decode_logits(model, out, T), last, atol=1e-2)


def test_init_and_counts():
    model = LLaMA(ModelConfig(vocab_size=1000, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                              intermediate_size=128))
    assert all(isinstance(getattr(model.layers[0].self_attn, n), Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert all(isinstance(getattr(model.layers[0].mlp, n), Linear) for n in ("gate_proj", "up_proj", "down_proj"))
    assert abs(model.embed_tokens.weight.std().item() - 0.02) < 1e-3
    assert torch.equal(model.norm.weight, torch.ones(64))
    # per layer: q,o 64*64 each, k,v 64*32 each, 3 MLP mats 64*128; plus embed, head, 5 norms of 64
    n_linear = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 64 * 1000
    assert model.num_params() == n_linear + 1000 * 64 + 5 * 64
    assert model.flops_per_token(32) == 6 * n_linear + 12 * 2 * 4 * 16 * 32
    assert "cos" not in model.state_dict()


def test_compile_fullgraph():
    model = random_model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # graph capture, no C++ codegen
    idx = torch.randint(0, 97, (2, 16))
    logits, loss = compiled(idx, idx)
    loss.backward()
    ref_logits, _ = model(idx, idx)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    explain = torch._dynamo.explain(model)(idx, idx)
    assert explain.graph_break_count == 0


@pytest.mark.parametrize("chunk", [1, 7, 16, 100])
def test_chunked_cross_entropy_equals_full_logits(chunk):
    """Loss and gradients (hidden states and head) as F.cross_entropy over the whole (B*T, vocab) logits, to fp32
    round-off, with ignored targets (a whole chunk of them included) and a chunk that does not divide B*T."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 10, 16, generator=g, requires_grad=True)
    w = torch.randn(97, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 97, (3, 10), generator=g)
    targets[0, :8] = -100
    targets[2, 3] = -100
    ref = torch.nn.functional.cross_entropy((h @ w.T).view(-1, 97), targets.view(-1), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, (h, w))
    loss = model_py.chunked_cross_entropy(h, w, targets, chunk)
    grads = torch.autograd.grad(loss, (h, w))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_loss_chunk_forward_has_no_logits_and_the_same_loss():
    model = random_model()
    idx = torch.randint(0, 97, (2, 10))
    targets = idx.roll(-1, dims=1)
    targets[:, :3] = -100
    ref_logits, ref = model(idx, targets)
    model.loss_chunk = 8
    logits, loss = model(idx, targets)
    assert logits is None and torch.allclose(loss, ref, rtol=1e-6)
    assert torch.equal(model(idx)[0], ref_logits)  # without targets: logits as ever (eval, generate)


@pytest.mark.parametrize("T, Tk, masked", [(7, 7, False), (1, 9, False), (6, 6, True), (1, 8, True)])
def test_cpu_attention_equals_sdpa(T, Tk, masked):
    """model.attention (on a CPU the formula in fp32) = SDPA, values and gradients: causal training, a decode step
    over a cache, and boolean masks (left padding) for prefill and decode; in bf16 it returns bf16."""
    g = torch.Generator().manual_seed(T + Tk)
    q = torch.randn(2, 4, T, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 4, Tk, 8, generator=g, requires_grad=True) for _ in range(2))
    mask = None
    if masked:  # every query sees its own position, as forward's padding mask guarantees
        own = torch.arange(Tk)[None, :] == torch.arange(T)[:, None] + Tk - T  # (T, Tk): query i at key i + Tk - T
        mask = (torch.rand(2, 1, T, Tk, generator=g) < 0.6) | own
    ours = model_py.attention(q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    half = model_py.attention(*(t.detach().bfloat16() for t in (q, k, v)), mask)
    assert half.dtype == torch.bfloat16 and (half.float() - ref).abs().max() < 0.05


@pytest.mark.parametrize("tied", [False, True])
def test_a_half_base_computes_as_an_fp32_base_of_its_rounded_weights(tied):
    """Under bf16 autocast a bf16-stored base gives the loss and adapter gradients of an fp32 base holding the same
    bf16-rounded weights and RoPE tables, bit for bit: storing a base in half rounds what it stores, never the
    residual stream (a bf16 one lagged the CPU demo by up to 30 points of char accuracy at step 40)."""
    import adapters
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      intermediate_size=96, tie_embeddings=tied)
    fp32 = LLaMA(cfg)
    fp32.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in fp32.state_dict().items()})
    half = LLaMA(cfg).to(torch.bfloat16)  # its RoPE tables too, as from_pretrained rounds them (HF does)
    half.load_state_dict(fp32.state_dict())
    fp32.cos, fp32.sin = half.cos.float(), half.sin.float()
    x, y = torch.randint(0, 96, (2, 3, 16)).unbind(1)[:2]
    out = []
    for m in (fp32, half):
        torch.manual_seed(1)
        params = adapters.attach(m, "mora", r=4, kind="rope")
        for p in params:  # M = 0 at init: give the branch an output, so its gradients flow through it
            p.data.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
        m.loss_chunk = 8  # training's loss
        with torch.autocast("cpu", torch.bfloat16):
            _, loss = m(x, y)
        loss.backward()
        out.append((loss, [p.grad for p in params]))
    assert out[0][0].dtype == out[1][0].dtype == torch.float32
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))
