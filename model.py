"""
A LLaMA-family decoder in one file (LLaMA 1/2/3, SmolLM2, Mistral), nanoGPT style:
RMSNorm, SwiGLU MLP, rotate-half RoPE (+ llama3 scaling), grouped-query attention, optional tied embeddings,
a KV-cache generate, and HF checkpoint load/save (config.json + safetensors, HF key names).
Module names follow HF with the `model.` prefix removed. Every projection is a `Linear`, the adapter hook.
    python -c "from model import LLaMA; m = LLaMA.from_pretrained('data/smollm2/SmolLM2-135M'); print(m.num_params())"
"""
import json
import math
import os
import re
import resource
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    block_size: int = 2048          # max sequence length (RoPE tables length)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 12             # GQA when < n_head
    n_embd: int = 768
    intermediate_size: int = 2048   # SwiGLU hidden size
    head_dim: int | None = None     # None -> n_embd // n_head
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or HF llama3-style dict
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None  # HF lists of eos ids keep only the first


class Linear(nn.Linear):
    """bias-free nn.Linear with one optional adapter branch (attached by adapters.attach)."""
    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)
        self.adapter = None          # an nn.Module: x (..., in) -> Δh (..., out), or None
    def forward(self, x):
        y = F.linear(x, self.weight)
        return y if self.adapter is None else y + self.adapter(x)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as HF LlamaRMSNorm); under autocast to its dtype."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * h.to(x.dtype)
        if torch.is_autocast_enabled(x.device.type):  # the matmuls reading it would each cast it again: once here
            y = y.to(torch.get_autocast_dtype(x.device.type))
        return y


def rope_tables(config: ModelConfig):
    """cos, sin tables (block_size, hd) in fp32; inverse frequencies as HF, incl. the llama3 rescaling."""
    hd = config.head_dim or config.n_embd // config.n_head
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd)
    rs = config.rope_scaling
    if rs is not None:
        kind = rs.get("rope_type", rs.get("type"))
        if kind != "llama3":
            raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")
        # llama3: long wavelengths are divided by factor, short ones kept, the band between interpolated
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) * ~(wavelen > old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    freqs = torch.outer(torch.arange(config.block_size).float(), inv_freq)  # (block_size, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: pairs are (m, m + hd/2)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x: (B, nh, T, hd); cos/sin: (T, hd), or (B, 1, T, hd) for per-row positions. HF's rotate_half convention."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attention(q, k, v, mask=None):
    """softmax(q kᵀ / √hd, causal or mask) v for (B, nh, T, hd) inputs. On a GPU, and for more than 128 keys:
    SDPA's fused kernels. On a CPU up to 128 keys: the formula written out in fp32 (autocast off); at the memory
    demo's 72 tokens, fwd + bwd under bf16 autocast, it took 0.52x the time of SDPA's CPU flash kernel (fp32:
    1.06x; 256 tokens: 1.4-1.6x, so longer sequences keep SDPA: bench.py --what attention)."""
    causal = mask is None and q.size(2) > 1
    if q.device.type != 'cpu' or k.size(2) > 128:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    with torch.autocast('cpu', enabled=False):
        att = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, T')
        if causal:
            mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril(k.size(2) - q.size(2))
        if mask is not None:
            att = att.masked_fill(~mask, float('-inf'))
        return (att.softmax(-1) @ v.float()).to(v.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.nh, self.nkv = config.n_head, config.n_kv_head
        self.hd = config.head_dim or config.n_embd // config.n_head
        assert self.nh % self.nkv == 0, "n_head must be a multiple of n_kv_head"
        self.q_proj = Linear(config.n_embd, self.nh * self.hd)
        self.k_proj = Linear(config.n_embd, self.nkv * self.hd)
        self.v_proj = Linear(config.n_embd, self.nkv * self.hd)
        self.o_proj = Linear(self.nh * self.hd, config.n_embd)

    def forward(self, x, cos, sin, cache=None, pos=0, mask=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)   # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # write this chunk into the preallocated (B, nkv, T_max, hd) buffers, attend over everything so far
            assert pos == 0 or T == 1, "the cache takes a prefill at pos 0, then one token at a time"
            ck, cv = cache
            ck[:, :, pos:pos + T], cv[:, :, pos:pos + T] = k, v
            k, v = ck[:, :, :pos + T], cv[:, :, :pos + T]
        if self.nkv != self.nh:
            # GQA: each kv head serves nh / nkv consecutive query heads
            k = k.repeat_interleave(self.nh // self.nkv, dim=1)  # (B, nh, T', hd)
            v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        y = attention(q, k, v, mask)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hd)         # (B, T, nh*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(config.n_embd, config.intermediate_size)
        self.up_proj = Linear(config.n_embd, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.n_embd)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, pos=0, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaMA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        # a plain bias-free nn.Linear, not the adapter hook: the head is never adapted
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config)  # built once here; not in the state dict
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # training memory (train.py sets them): recompute each block in backward; loss over chunks of loss_chunk rows
        self.grad_checkpoint, self.loss_chunk = False, 0
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, scaled_residual: bool = False):
        """
        The whole init, in one place (std 0.02 = HF `initializer_range`):
          embed_tokens, lm_head, q/k/v/gate/up proj   normal(0, 0.02)   (a tied lm_head shares embed_tokens)
          o_proj, down_proj                          normal(0, 0.02), or 0.02/sqrt(2*n_layer) if scaled_residual
                                                     (GPT-2's scaling of projections that write to the residual)
          RMSNorm weights                            1
          adapters                                   untouched (adapters.py owns them)
        """
        std_res = 0.02 / math.sqrt(2 * self.config.n_layer) if scaled_residual else 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif ".adapter." not in name:
                is_res = name.endswith(("o_proj.weight", "down_proj.weight"))
                nn.init.normal_(p, mean=0.0, std=std_res if is_res else 0.02)

    def forward(self, idx, targets=None, cache=None, pos=0, pad=None):
        """idx (B, T) -> logits (B, T, vocab) float, loss (mean CE over targets != -100) or None; with targets and
        loss_chunk > 0: (None, loss) from chunked_cross_entropy (training: no (B, T, vocab) logits at all).
        cache: per-layer (k, v) buffers from new_cache() (generate only); pos: position of idx[:, 0];
        pad: None, or (B,) counts of left-padding tokens: row b's real tokens get positions index - pad[b]."""
        B, T = idx.shape
        cos, sin, mask = self.cos[pos:pos + T], self.sin[pos:pos + T], None  # (T, hd)
        if pad is not None:
            q = torch.arange(pos, pos + T, device=idx.device)[:, None]  # (T, 1) absolute query indices
            p = (q.T - pad[:, None]).clamp(min=0)  # (B, T) rope positions
            cos, sin = self.cos[p].unsqueeze(1), self.sin[p].unsqueeze(1)  # (B, 1, T, hd)
            j = torch.arange(pos + T, device=idx.device)  # key indices
            # causal, no padding keys; a padding query sees only itself, so no softmax row is all -inf (NaN)
            mask = ((j <= q) & ((j >= pad[:, None, None]) | (j == q))).unsqueeze(1)  # (B, 1, T, pos + T)
        x = self.embed_tokens(idx)  # (B, T, C)
        if torch.is_autocast_enabled(x.device.type):  # the residual stream in fp32 over a half base too, as over
            x = x.float()  # an fp32 one (in bf16 it lagged the CPU demo by up to 30 points at step 40)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.layers):
            if recompute:  # keep only the block's input; backward reruns it (same dropout masks: RNG state restored)
                x = checkpoint(block, x, cos, sin, None, pos, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, None if cache is None else cache[i], pos, mask)
        if cache is not None:
            x = x[:, -1:]  # decoding needs only the last position's logits: skip the head on the prompt
        if targets is not None and self.loss_chunk:
            return None, chunked_cross_entropy(self.norm(x), self.lm_head.weight, targets, self.loss_chunk)
        logits = self.lm_head(self.norm(x)).float()  # (B, T, vocab), (B, 1, vocab) with a cache
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)
        return logits, loss

    def new_cache(self, B, T_max):
        """Preallocated KV cache: one (k, v) pair of (B, nkv, T_max, hd) zeros per layer."""
        a = self.layers[0].self_attn
        p = self.embed_tokens.weight
        return [(p.new_zeros(B, a.nkv, T_max, a.hd), p.new_zeros(B, a.nkv, T_max, a.hd)) for _ in self.layers]

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, pad=None, done=None):
        """Continue idx (B, T) by max_new_tokens -> (B, T + max_new_tokens). Greedy when temperature == 0.
        Prefills the prompt once, then feeds one token per step through a preallocated KV cache. pad: optional
        (B,) LongTensor, row b starts with pad[b] left-padding tokens (any id, never attended; see forward).
        done: optional callable(new tokens (B, t)) -> bool, asked after each step; True stops early -> (B, T + t)."""
        B, T = idx.shape
        assert T + max_new_tokens <= self.config.block_size, "prompt + new tokens exceed block_size"
        cache = self.new_cache(B, T + max_new_tokens)
        out = F.pad(idx.long(), (0, max_new_tokens))  # (B, T + max_new_tokens), the tail written below
        logits, _ = self(idx, cache=cache, pos=0, pad=pad)
        for t in range(T, T + max_new_tokens):
            logits = logits[:, -1, :]  # (B, vocab)
            if temperature == 0.0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            out[:, t:t + 1] = nxt
            if done is not None and done(out[:, T:t + 1]):
                return out[:, :t + 1]
            if t + 1 < T + max_new_tokens:  # the last token needs no forward
                logits, _ = self(nxt, cache=cache, pos=t, pad=pad)
        return out

    def num_params(self):
        """Number of parameters (a tied head counted once, adapters included if attached)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, T):
        """Training FLOPs per token at sequence length T (PaLM appendix B, as nanoGPT's estimate_mfu):
        6*N for the weight matmuls (fwd 2 + bwd 4; N = all Linear weights incl. lm_head, a tied head counted
        as a matmul, embedding lookup and norms excluded) + 12*L*H*hd*T for attention scores and values."""
        N = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        a = self.layers[0].self_attn
        return 6 * N + 12 * self.config.n_layer * a.nh * a.hd * T

    # ---------------------------------------------------------------- HF checkpoints
    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32):
        """Load an HF LLaMA/Mistral dir: config.json + model.safetensors (or a sharded index)."""
        with open(os.path.join(path, "config.json")) as f:
            config = config_from_hf(json.load(f))
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        sd = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.exists(file):
                raise FileNotFoundError(f"checkpoint file {file} is missing")
            sd.update(load_file(file))
        # HF keys carry a `model.` prefix; very old checkpoints also stored the rotary inv_freq
        sd = {k.removeprefix("model."): v.to(dtype) for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
        if config.tie_embeddings:
            sd.setdefault("lm_head.weight", sd.get("embed_tokens.weight"))
        with torch.device("meta"):  # no memory or init time spent on weights about to be replaced
            model = cls(config)
        missing = [k for k in model.state_dict() if sd.get(k) is None]
        extra = [k for k in sd if k not in model.state_dict()]
        if missing or extra:
            raise ValueError(f"checkpoint {path} does not match the config: missing tensors {missing[:5]}, "
                             f"unexpected tensors {extra[:5]}")
        model.load_state_dict(sd, strict=True, assign=True)
        if config.tie_embeddings:  # assign=True made two Parameters; tie them back into one
            model.lm_head.weight = model.embed_tokens.weight
        # the meta-device buffers, now for real; in `dtype` like any buffer after .to(dtype) (HF rounds them
        # to the activation dtype as well, so logits agree either way)
        model.cos, model.sin = (t.to(dtype) for t in rope_tables(config))
        return model

    def save_pretrained(self, path):
        """Write config.json (a LlamaConfig) + model.safetensors with HF key names. Base weights only."""
        adapted = [n for n, m in self.named_modules() if getattr(m, "adapter", None) is not None]
        if adapted:
            raise ValueError(f"adapters attached to {adapted[:3]}...: merge them first (adapters.merge_) "
                             f"or save the adapters separately; save_pretrained writes base weights only")
        os.makedirs(path, exist_ok=True)
        c = self.config
        sd = {f"model.{k}" if k != "lm_head.weight" else k: v.contiguous() for k, v in self.state_dict().items()}
        if c.tie_embeddings:
            del sd["lm_head.weight"]
        dtype = str(self.embed_tokens.weight.dtype).removeprefix("torch.")
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config_to_hf(c, dtype), f, indent=2)
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ CE(h @ weightᵀ, targets) over targets != -100, `chunk` rows at a time, with the gradients made in the same
    pass: d(sum)/d(logits) = softmax − onehot, so dh = G @ weight and dweight = Gᵀ @ h per chunk. Backward only
    scales them: the head's matmul runs once per product needed (as with whole logits), never recomputed, and at
    most one (chunk, vocab) block of logits lives at a time. Under autocast the matmuls run in its dtype."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, need_h, need_w):
        total = torch.zeros((), device=h.device)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        dev = h.device.type  # the matmul dtype; the weight cast once, not by autocast for every chunk
        w = weight.to(torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype)
        for i in range(0, targets.numel(), chunk):
            hc, t = h[i:i + chunk].to(w.dtype), targets[i:i + chunk]
            z = F.linear(hc, w)  # (n, vocab)
            logp, keep = z.log_softmax(-1, dtype=torch.float32), (t != -100)[:, None]
            t = t.clamp(min=0)[:, None]  # ignored rows: any valid id, masked out below
            total -= (logp.gather(1, t) * keep).sum()
            if need_h or need_w:
                G = logp.exp_().scatter_add_(1, t, -torch.ones_like(t, dtype=logp.dtype)).mul_(keep).to(z.dtype)
                if need_h:
                    dh[i:i + chunk] = G @ w
                if need_w:
                    dw += (G.T @ hc).float()
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh * g, None if dw is None else (dw * g).to(ctx.weight_dtype),
                None, None, None, None)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean CE over targets != -100 of logits = h @ weightᵀ, never holding the (B·T, vocab) logits: at most one
    (chunk, vocab) block of them at a time (_LinearCrossEntropy). Same value and gradients as F.cross_entropy on
    the full logits, to fp32 round-off."""
    h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)  # (B*T, C), (B*T,)
    grad = torch.is_grad_enabled()
    total = _LinearCrossEntropy.apply(h, weight, targets, chunk, grad and h.requires_grad,
                                      grad and weight.requires_grad)
    return total / (targets != -100).sum()


def scratch_config(keys: dict, n_vocab: int, bos_id=None, eos_id=None) -> dict:
    """asdict(ModelConfig) of a fresh model from a run's shape keys, the vocab padded to a multiple of 64 for
    faster matmuls (as nanoGPT does); heads that do not divide the width are a ValueError."""
    n_head, n_kv_head, n_embd = keys['n_head'], keys['n_kv_head'], keys['n_embd']
    if n_head % n_kv_head or n_embd % n_head:
        raise ValueError(f"n_head={n_head} must be a multiple of n_kv_head={n_kv_head}, and n_embd={n_embd} of n_head")
    shape = ('block_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'intermediate_size', 'rope_theta')
    return asdict(ModelConfig(vocab_size=(n_vocab + 63) // 64 * 64, bos_token_id=bos_id, eos_token_id=eos_id,
                              **{k: keys[k] for k in shape}))


def config_from_hf(hf: dict) -> ModelConfig:
    """Map an HF LlamaConfig/MistralConfig dict to ModelConfig; refuse what this model cannot represent."""
    def refuse(key, why):
        raise ValueError(f"unsupported checkpoint: {key}={hf.get(key)!r} ({why})")
    if hf.get("model_type") not in ("llama", "mistral"):
        refuse("model_type", "only llama and mistral are supported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            refuse(key, "this model has bias-free projections")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "the MLP is SwiGLU with silu")
    # transformers >= 5 writes `rope_parameters` (theta inside); older versions `rope_theta` + `rope_scaling`
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"unsupported checkpoint: rope type {kind!r} (rope_scaling/rope_parameters); "
                         f"only default and llama3 RoPE are supported")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"unsupported checkpoint: partial_rotary_factor={rope['partial_rotary_factor']}")
    n_head = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    # a sliding window of w tokens is plain causal attention on up to w tokens (Mistral-7B v0.1: 4096): context <= w
    block_size = min(hf.get("max_position_embeddings", 2048), hf.get("sliding_window") or float("inf"))
    return ModelConfig(
        vocab_size=hf["vocab_size"], block_size=block_size,
        n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head, rope_theta=float(theta),
        rope_scaling=rope if kind == "llama3" else None, norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos)


def config_to_hf(c: ModelConfig, dtype: str = "float32") -> dict:
    """ModelConfig -> a LlamaConfig dict that transformers 4.x and 5.x both read."""
    rope = {"rope_type": "default"} if c.rope_scaling is None else {**c.rope_scaling, "rope_type": "llama3"}
    rope.pop("type", None)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim or c.n_embd // c.n_head, "hidden_act": "silu",
        "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps, "initializer_range": 0.02,
        "rope_theta": c.rope_theta, "rope_scaling": None if c.rope_scaling is None else dict(rope),
        "rope_parameters": {**rope, "rope_theta": c.rope_theta},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "tie_word_embeddings": c.tie_embeddings, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "use_cache": True, "torch_dtype": dtype,
    }


# dense bf16 peaks for MFU; a GPU matches by whole words of its name ('NVIDIA A100-SXM4-80GB'):
# 'L4' is no L40S, 'A10' no A10G
PEAK_FLOPS = {'H100 PCIe': 756e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L40S': 362e12,
              'L4': 121e12, 'A10': 125e12, '4090': 165e12}


def peak_flops(device):
    """The dense bf16 peak FLOP/s of a CUDA device, from PEAK_FLOPS by its name; None if not listed."""
    words = set(re.split(r'[\s-]+', torch.cuda.get_device_name(device)))
    return next((v for k, v in PEAK_FLOPS.items() if set(k.split()) <= words), None)


def bf16_native(device_type: str) -> bool:
    """Whether matmuls run natively in bf16 here: a CUDA GPU that supports it, a CPU with AVX-512
    BF16 or AMX."""
    if device_type == 'cuda':
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtypes(dtype: str, base_dtype: str, device_type: str, trains_base: str, merges: bool):
    """(autocast dtype, frozen-base dtype) of a run, 'auto' resolved: autocast bf16 where matmuls
    run natively in it (bf16_native), else fp32; the base in bf16 only where all its weights stay
    frozen (trains_base: what trains them, '' if nothing), and on a CPU only under bf16 autocast with
    nothing merged into it (merges: restarts, boosters; their merges stay fp32). A half base that
    something trains (trains_base) is a ValueError."""
    if dtype == 'auto':
        dtype = 'bfloat16' if bf16_native(device_type) else 'float32'
    if base_dtype == 'auto':
        half = not trains_base and (bf16_native(device_type) if device_type == 'cuda' else
                                    dtype == 'bfloat16' and not merges)
        base_dtype = 'bfloat16' if half else 'float32'
    if base_dtype != 'float32' and trains_base:
        raise ValueError(f"base_dtype={base_dtype!r} stores the frozen base in half precision, but "
                         f"{trains_base} trains the base weights, which keep fp32 master weights: use "
                         "base_dtype='float32' (or 'auto'; dtype= sets the autocast precision)")
    return dtype, base_dtype


def peak_bytes(device) -> int:
    """Peak memory of this process so far: CUDA tensors on a CUDA device, else the peak RSS
    (ru_maxrss: KiB on Linux, bytes on macOS)."""
    if 'cuda' in str(device):
        return torch.cuda.max_memory_allocated(device)
    kib = 1 if sys.platform == 'darwin' else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib
