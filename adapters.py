"""
The adapters as their formulas: LoRA, MoRA's seven kinds (compression -> M -> decompression),
XGBLoRA's boosters; modules on `model.Linear.adapter`; attach, settings, load, merge, kind switch.
As in SPEC: y = W x, W is d x k (d = out, k = in features); an adapter is a branch Δh(x) = ΔW x.
Training and merging run each formula's fast path in kernels.py; tests hold the two equal.
    python -m pytest -q tests/test_adapters.py tests/test_kernels.py
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from model import Linear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("lora", "mora", "booster")
SHARE_KINDS = ("share", "share_group", "share_group_tile", "share_fold_group")
KINDS = SHARE_KINDS + ("rope", "decouple", "truncate")
MORA_TYPES = {1: "share", 2: "share_group", 3: "share_group_tile", 4: "share_fold_group", 6: "rope"}
CYCLES = {"paper": ("share", "share_group"), "reference": SHARE_KINDS}  # ReMoRA's kind per restart

def lora_forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale) -> torch.Tensor:
    """LoRA (Hu et al. Eq. 3): Δh = scale · B (A x), A (r, k), B (d, r), scale = alpha / r (or a
    0-dim tensor: a booster's gate rides on it); r(k + d) params, init A Kaiming, B = 0."""
    return F.linear(F.linear(x, A) * scale, B)  # scaling the r-wide middle is the cheapest place

def lora_delta(A: torch.Tensor, B: torch.Tensor, scale) -> torch.Tensor:
    """ΔW = scale · B A, shape (d, k)."""
    return (B * scale) @ A  # scale the thin factor: one (d, k) allocation

def mora_rank(in_features: int, out_features: int, r: int, kind: str, rounding="half_up") -> int:
    """r_hat = int(√((d+k)·r) + 0.5) as the reference code ('floor': the paper's ⌊√((d+k)·r)⌋),
    rope: down to even. Per layer, from its own k and d; saved, never recomputed on loading."""
    if rounding not in ("half_up", "floor"):
        raise ValueError(f"rounding must be 'half_up' or 'floor', got {rounding!r}")
    n = (in_features + out_features) * r
    r_hat = int(math.sqrt(n) + 0.5) if rounding == "half_up" else math.isqrt(n)
    return _check(r_hat - (r_hat % 2 if kind == "rope" else 0), in_features, out_features, kind)

def default_kind(r: int) -> str:
    return "rope" if r <= 32 else "share"  # the paper's: rotation at r = 8, sharing at r = 256

def _check(r_hat, k, d, kind):
    if kind not in KINDS:
        raise ValueError(f"unknown MoRA kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if k < 1 or d < 1 or r_hat < 1 or (kind == "rope" and r_hat % 2):
        why = " (rope pairs coordinates: r_hat must be even and >= 2)" if kind == "rope" else ""
        raise ValueError(f"MoRA kind {kind!r} cannot serve in={k}, out={d} with r_hat={r_hat}{why}")
    return r_hat

# The pieces of the kinds (SPEC 2.2), as index maps on the last dim; n = ⌈k/r_hat⌉ chunks.
def _wrap(x, L):
    """Cyclic pad or cut to length L: slot i reads x[i mod k] (C_fold's, C_rope's pad; D_tile)."""
    return x[..., torch.arange(L, device=x.device) % x.shape[-1]]

def _chunks(x, r_hat):
    """x wrap-padded to n·r_hat, as the n chunks x⁽ⁱ⁾: (..., n, r_hat)."""
    return _wrap(x, -(-x.shape[-1] // r_hat) * r_hat).unflatten(-1, (-1, r_hat))

def _groups(n, r_hat, device):
    """γ: position i of n -> its contiguous group; the first n mod r_hat groups have s+1 members,
    the others s = ⌊n/r_hat⌋ (n < r_hat: position i is group i)."""
    (s, m), i = divmod(n, r_hat), torch.arange(n, device=device)
    return torch.where(i < m * (s + 1), i // (s + 1), m + (i - m * (s + 1)) // max(s, 1))

def _group_sum(x, r_hat):
    """C_group: slot a = the sum of the features in group a (k < r_hat: slots past k get 0)."""
    return x.new_zeros(*x.shape[:-1], r_hat).index_add(-1, _groups(x.shape[-1], r_hat, x.device), x)

def _rope_tables(r_hat, n, device, dtype):
    """cos, sin (n, r_hat) of chunk i's angles i·θ_m, θ_m = 10000^(-2m/r_hat), both halves."""
    f64 = dict(dtype=torch.float64, device=device)  # built in float64, then cast
    theta = 1.0 / 10000 ** (torch.arange(0, r_hat, 2, **f64) / r_hat)
    ang = (torch.arange(n, **f64)[:, None] * theta).repeat(1, 2)
    return ang.cos().to(dtype), ang.sin().to(dtype)

# The seven kinds (MoRA, Jiang et al.): Δh = f_decomp(M · f_comp(x)), x (..., k) -> (..., d);
# r_hat² params, M = 0 at init (ΔW = 0, yet M gets gradient at step 0), no alpha. q = k mod r_hat,
# p = (r_hat - q) mod r_hat, ρ(t) = t mod r_hat; γ_k, γ_d: the groups of the inputs, outputs.
# "Fast": what training (mora_forward) and merging (mora_add_) run instead, equal to the formula.
def share(x, M, d):
    """C_fold + D_tile, Eq. 6 (the paper's kind at large r; ReMoRA kind A; reference type 1):
    Δh_t = (M Σ_i x⁽ⁱ⁾)_ρ(t); ΔW[t, j] = M[ρ(t), j mod r_hat] + [j < p]·M[ρ(t), q + j].
    Fast: training kernels.share (views, no gathers), merging kernels.mora_add_ (row adds)."""
    return _wrap(F.linear(_chunks(x, M.shape[0]).sum(-2), M), d)

def share_group(x, M, d):
    """C_group + D_group (ReMoRA kind B; reference type 2): slot a sums contiguous group a of
    ⌊k/r_hat⌋ or ⌊k/r_hat⌋+1 features, output t reads slot γ_d(t); ΔW[t, j] = M[γ_d(t), γ_k(j)].
    Fast: kernels.share_group (reshaped sums, expanded views), kernels.mora_add_."""
    return F.linear(_group_sum(x, M.shape[0]), M)[..., _groups(d, M.shape[0], x.device)]

def share_group_tile(x, M, d):
    """C_group + D_tile (the reference's ReMoRA 4-cycle; type 3): ΔW[t, j] = M[ρ(t), γ_k(j)].
    Fast: kernels.share_group_tile, kernels.mora_add_."""
    return _wrap(F.linear(_group_sum(x, M.shape[0]), M), d)

def share_fold_group(x, M, d):
    """C_fold + D_group (the reference's ReMoRA 4-cycle; type 4):
    ΔW[t, j] = M[γ_d(t), j mod r_hat] + [j < p]·M[γ_d(t), q + j].
    Fast: kernels.share_fold_group, kernels.mora_add_."""
    return F.linear(_chunks(x, M.shape[0]).sum(-2), M)[..., _groups(d, M.shape[0], x.device)]

def rope(x, M, d):
    """C_rope + D_rope, Eq. 9 (the paper's kind at small r; reference type 6): chunk i rotated by
    angles i·θ_m (rotate-half pairs m, m + r_hat/2), y⁽ⁱ⁾ = M R_i x⁽ⁱ⁾, the n·r_hat outputs tiled or
    cut to d. ΔW = blockdiag(M R_0, ..., M R_{n-1}) up to wrap and tiling: full rank reachable.
    Fast: kernels.rope (R_i folded into M, one bmm, hand-written backward), kernels.mora_add_
    (the blocks added onto a strided diagonal view of W)."""
    xc, h = _chunks(x, M.shape[0]), M.shape[0] // 2
    cos, sin = _rope_tables(M.shape[0], xc.shape[-2], x.device, x.dtype)
    xc = xc * cos + torch.cat([-xc[..., h:], xc[..., :h]], dim=-1) * sin  # R_i x⁽ⁱ⁾
    return _wrap(F.linear(xc, M).flatten(-2), d)

def decouple(x, M, d):
    """C_rope without rotation + D_rope, Eq. 8 (ablation): y⁽ⁱ⁾ = M x⁽ⁱ⁾; d = k = n·r_hat: I_n ⊗ M.
    Fast: kernels.decouple (only the chunks that survive the cut), kernels.mora_add_."""
    return _wrap(F.linear(_chunks(x, M.shape[0]), M).flatten(-2), d)

def truncate(x, M, d):
    """x[:r_hat] -> [M z; 0], Eq. 4 (ablation): ΔW = [[M, 0], [0, 0]] cut to (d, k).
    Fast: this formula itself, kernels.mora_add_ (one block)."""
    k2, d2 = min(x.shape[-1], M.shape[0]), min(d, M.shape[0])
    y = F.linear(x[..., :k2], M[:d2, :k2])
    return F.pad(y, (0, d - d2)) if d > d2 else y

FORMULAS = {kind: globals()[kind] for kind in KINDS}  # the seven functions above, by name
FORWARDS = {k: getattr(kernels, k, FORMULAS[k]) for k in KINDS}  # what training runs (bench swaps)

def mora_forward(x: torch.Tensor, M: torch.Tensor, out_features: int, kind: str) -> torch.Tensor:
    """MoRA's branch Δh, x (..., k) -> (..., out_features), by the kind's fast path. Padded slot i
    reads x[i mod k], so k < r_hat/2 (where the reference crashes) wraps x several times."""
    _check(M.shape[0], x.shape[-1], out_features, kind)
    return FORWARDS[kind](x, M, out_features)

def mora_delta(M: torch.Tensor, in_features: int, out_features: int, kind: str) -> torch.Tensor:
    """ΔW (d, k) in closed form, T·𝓜·S (SPEC 2.4), by index gathers: output t reads row ρ(t) or
    γ_d(t) of M (rope: row t mod n·r_hat of the block diagonal), padded input slot i adds onto
    column i mod k (C_group: feature j reads column γ_k(j)). Equals mora_forward(I_k)ᵀ."""
    k, d, r_hat = in_features, out_features, _check(M.shape[0], in_features, out_features, kind)
    if kind == "truncate":  # [[M, 0], [0, 0]]
        return F.pad(M[:d, :k], (0, k - min(k, r_hat), 0, d - min(d, r_hat)))
    slot = torch.arange(-(-k // r_hat) * r_hat, device=M.device)  # the padded input slots
    if kind in ("rope", "decouple"):  # row u = t mod n·r_hat of blockdiag(B_0, ..., B_{n-1})
        n, u = len(slot) // r_hat, torch.arange(d, device=M.device) % len(slot)
        B = M.expand(n, r_hat, r_hat)
        if kind == "rope":  # B_b = M·R_b, (M·R_b)[:, c] = M[:, c] cos(bθ_c) + M̄[:, c] sin(bθ_c)
            cos, sin = _rope_tables(r_hat, n, M.device, M.dtype)
            Mbar = torch.cat([M[:, r_hat // 2:], -M[:, :r_hat // 2]], dim=1)
            B = M * cos[:, None] + Mbar * sin[:, None]
        cols = (u // r_hat * r_hat)[:, None] + torch.arange(r_hat, device=M.device)  # u's block
        return M.new_zeros(d, k).scatter_add_(1, cols % k, B[u // r_hat, u % r_hat])
    tile = kind in ("share", "share_group_tile")
    rows = M[torch.arange(d, device=M.device) % r_hat if tile else _groups(d, r_hat, M.device)]
    if kind in ("share", "share_fold_group"):  # C_fold: slot i reads column i mod r_hat of M
        return M.new_zeros(d, k).index_add_(1, slot % k, rows[:, slot % r_hat])
    return rows[:, _groups(k, r_hat, M.device)]

def mora_add_(W: torch.Tensor, M: torch.Tensor, kind: str, alpha: float = 1.0) -> torch.Tensor:
    """W (d, k) += alpha·ΔW in place by kernels.mora_add_ (the merge path; ΔW never built)."""
    _check(M.shape[0], W.shape[1], W.shape[0], kind)
    return kernels.mora_add_(W, M, kind, alpha)

def _merge_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 weights

class _Adapter(nn.Module):
    """What LoRA and MoRA share: settings (plain python, saved in checkpoints), delta(), resets."""
    SETTINGS = ("method", "r", "r_hat", "kind", "scale", "in_features", "out_features")

    def __init__(self, dropout, **settings):
        super().__init__()
        self.__dict__.update(settings)  # plain attributes: self.r, self.kind, ...
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def settings(self):
        return {k: getattr(self, k) for k in self.SETTINGS}

    def delta(self, dtype=None):  # ΔW (d, k) in dtype, by default fp32 (fp64 for fp64 params)
        p = next(self.parameters())
        W = p.new_zeros(self.out_features, self.in_features, dtype=dtype or _merge_dtype(p.dtype))
        return kernels.add_delta_(W, self.settings(), self.state_dict())

    @torch.no_grad()
    def reset_parameters(self, generator=None):  # in place: the same Parameter objects
        for name, t in self.fresh(generator).items():
            getattr(self, name).copy_(t)

class LoRA(_Adapter):
    """Δh = scale · B A dropout(x) [· gate]. gated: an XGBLoRA booster (r = 1, scale = s) whose gate
    is a saved 0-dim 0/1 buffer, 0 at attach: exactly zero output and grads. kw: device, dtype."""
    def __init__(self, in_features, out_features, r, scale, dropout=0.0, gated=False, **kw):
        super().__init__(dropout, method="booster" if gated else "lora", r=r, r_hat=None, kind=None,
                         scale=float(scale), in_features=in_features, out_features=out_features)
        self.A = nn.Parameter(torch.empty(r, in_features, **kw))
        self.B = nn.Parameter(torch.empty(out_features, r, **kw))
        self.register_buffer("gate", torch.zeros((), **kw) if gated else None)
        self.reset_parameters()

    def fresh(self, generator=None) -> dict:
        """Init values, full size even if sharded: A Kaiming-uniform(a=√5) from generator, B = 0."""
        A, B = (torch.empty(p.shape, device=p.device, dtype=p.dtype) for p in (self.A, self.B))
        return {"A": nn.init.kaiming_uniform_(A, a=5 ** 0.5, generator=generator), "B": B.zero_()}

    def forward(self, x):
        scale = self.scale if self.gate is None else self.scale * self.gate
        if torch.is_autocast_enabled(x.device.type):  # autocast casts x, A and B itself
            return lora_forward(self.dropout(x), self.A, self.B, scale)
        # a half-precision base without autocast: the branch runs in fp32, its output in x's (PEFT)
        return lora_forward(self.dropout(x).to(self.A.dtype), self.A, self.B, scale).to(x.dtype)

class MoRA(_Adapter):
    """Δh = mora_forward(dropout(x), M, d, kind), M (r_hat, r_hat) = 0; r: the LoRA-equivalent rank
    that r_hat came from. Output in x's dtype. kw: device, dtype."""
    def __init__(self, in_features, out_features, r_hat, kind, r=None, dropout=0.0, **kw):
        _check(r_hat, in_features, out_features, kind)
        super().__init__(dropout, method="mora", r=r, r_hat=r_hat, kind=kind, scale=1.0,
                         in_features=in_features, out_features=out_features)
        self.M = nn.Parameter(torch.zeros(r_hat, r_hat, **kw))

    def fresh(self, generator=None) -> dict:  # init values: M = 0
        return {"M": torch.zeros(self.M.shape, device=self.M.device, dtype=self.M.dtype)}

    def forward(self, x):  # in M's dtype (fp32), but under autocast in its dtype, as the base layer
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(self.M.dtype)
        return mora_forward(self.dropout(h), self.M, self.out_features, self.kind).to(x.dtype)

def _adapted(model):  # (name, Linear) of every adapted layer, in module order
    return [(n, m) for n, m in model.named_modules() if getattr(m, "adapter", None) is not None]

def attach(model, method, targets=TARGETS, r=8, alpha=16.0, kind=None, dropout=0.0) -> list:
    """Freeze all, then a fresh adapter on each model.Linear whose last name part is in targets:
    lora scale alpha/r; mora r_hat per layer, kind default_kind(r); booster r = 1, scale alpha."""
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; valid: {', '.join(METHODS)}")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    valid = sorted({n.rsplit(".", 1)[-1] for n in layers})
    bad = sorted(set(targets) - set(valid))
    if bad or not targets:
        raise ValueError(f"target(s) {bad} match no adaptable layer; valid names: {valid}")
    kind, mora = kind or default_kind(r), method == "mora"
    shapes = {n: (m.in_features, m.out_features) for n, m in layers.items()
              if n.rsplit(".", 1)[-1] in targets}
    limit = min(max(k, d) ** 2 // (k + d) if mora else max(k, d) for k, d in shapes.values())
    if method != "booster" and r > limit:  # the rank (MoRA: r_hat = √((k+d)·r)) outgrows W
        raise ValueError(f"r={r} is too large for the adapted layers: allowed 1..{limit} (rank at "
                         "most max(in, out))")
    scale = {"lora": alpha / r, "mora": 1.0, "booster": float(alpha)}[method]
    plan = {n: dict(method=method, r=1 if method == "booster" else r, scale=scale,
                    kind=kind if mora else None, r_hat=mora_rank(k, d, r, kind) if mora else None,
                    in_features=k, out_features=d) for n, (k, d) in shapes.items()}
    return load_adapters(model, plan, None, dropout)

def settings(model) -> dict:
    """{layer name: dict(method, r, r_hat, kind, scale, in_features, out_features)}."""
    return {name: lin.adapter.settings() for name, lin in _adapted(model)}

def adapter_state_dict(model) -> dict:
    """Only the adapter tensors (booster gates included), keys as in model.state_dict()."""
    return {f"{name}.adapter.{k}": v for name, lin in _adapted(model)
            for k, v in lin.adapter.state_dict().items()}

def load_adapters(model, settings, state_dict=None, dropout=0.0) -> list:
    """Freeze all, attach exactly per saved settings (r_hat, kind never recomputed), then load
    state_dict strictly (all adapter keys, nothing else; None or {}: the caller loads them)."""
    model.requires_grad_(False)
    modules, params = dict(model.named_modules()), []
    for name, s in settings.items():
        lin, k, d = modules.get(name), s["in_features"], s["out_features"]
        if not isinstance(lin, Linear):
            raise ValueError(f"saved adapter layer {name!r} is not a model.Linear of this model")
        if (k, d) != (lin.in_features, lin.out_features):
            raise ValueError(f"adapter settings {s} do not fit a {lin.in_features}->"
                             f"{lin.out_features} layer")
        # adapters train in fp32 over a bf16/fp16 base (their AdamW state too); fp64 stays fp64
        kw = dict(dropout=dropout, device=lin.weight.device, dtype=_merge_dtype(lin.weight.dtype))
        lin.adapter = (MoRA(k, d, s["r_hat"], s["kind"], r=s["r"], **kw) if s["method"] == "mora"
                       else LoRA(k, d, s["r"], s["scale"], gated=s["method"] == "booster", **kw))
        params += list(lin.adapter.parameters())
    if state_dict:
        expected = set(adapter_state_dict(model))
        miss, extra = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if miss or extra:
            raise ValueError(f"adapter state dict mismatch: missing {miss}, unexpected {extra}")
        model.load_state_dict(state_dict, strict=False)  # exactly the adapter keys: checked above
    return params

def reinit_(model, generator=None):
    """Re-init every adapter in place from generator, in module order (LoRA: B = 0; MoRA: M = 0)."""
    for _, lin in _adapted(model):
        lin.adapter.reset_parameters(generator)

def next_kind(kind: str, cycle: str = "paper") -> str:
    """ReMoRA's kind after a restart. 'paper': share <-> share_group; 'reference': a 4-cycle."""
    order = CYCLES[cycle]
    if kind not in order:
        raise ValueError(f"kind {kind!r} is not in the ReMoRA {cycle!r} cycle {order}")
    return order[(order.index(kind) + 1) % len(order)]

def switch_kind_(model, kind: str):
    """ReMoRA: set every MoRA adapter's kind in place (M, r_hat kept); share kinds only."""
    moras = [lin.adapter for _, lin in _adapted(model) if isinstance(lin.adapter, MoRA)]
    if not moras:
        raise ValueError("switch_kind_: the model has no MoRA adapters")
    bad = [m.kind for m in moras if kind not in SHARE_KINDS or m.kind not in SHARE_KINDS]
    if bad:
        raise ValueError(f"switch_kind_ only switches between {SHARE_KINDS}, "
                         f"not {bad[0]!r} -> {kind!r}")
    for m in moras:
        m.kind = kind

@torch.no_grad()
def set_gates_(model, layer_ids):
    """XGBLoRA: gate = 1 on the boosters of blocks layers.{i}, i in layer_ids, else 0 (in place)."""
    layer_ids, n = set(layer_ids), len(model.layers)
    if not layer_ids <= set(range(n)):
        raise ValueError(f"layer ids {sorted(layer_ids)} out of range for {n} layers")
    gates = [(i, m.gate) for i, block in enumerate(model.layers)
             for m in block.modules() if isinstance(m, LoRA) and m.gate is not None]
    if not gates:
        raise ValueError("set_gates_: the model has no boosters (attach(model, 'booster'))")
    for i, gate in gates:
        gate.fill_(1.0 if i in layer_ids else 0.0)

@torch.no_grad()
def merge_(model, alpha: float = 1.0):
    """W += alpha·ΔW in fp32 for every adapted layer (a half W via an fp32 copy); adapters stay."""
    for _, lin in _adapted(model):
        W = lin.weight.to(_merge_dtype(lin.weight.dtype))  # the weight itself when already fp32
        kernels.add_delta_(W, lin.adapter.settings(), lin.adapter.state_dict(), alpha)
        if W is not lin.weight:
            lin.weight.copy_(W)

@torch.no_grad()
def merge_state_dict(base_sd: dict, settings: dict, adapter_sd: dict, alpha: float = 1.0) -> dict:
    """Pure merge: a new state dict, W + alpha·ΔW per layer in settings, adapter keys dropped."""
    out = dict(base_sd)
    for name, s in settings.items():
        pre, W = name + ".adapter.", base_sd[name + ".weight"]
        t = {k[len(pre):]: v.to(W.device) for k, v in adapter_sd.items() if k.startswith(pre)}
        W32 = W.to(_merge_dtype(W.dtype), copy=True)
        out = {k: v for k, v in out.items() if not k.startswith(pre)}  # this layer's adapter keys
        out[name + ".weight"] = kernels.add_delta_(W32, s, t, alpha).to(W.dtype)
    return out

def count_params(model) -> tuple:  # (trainable, total) parameter counts, shared tensors once
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)
