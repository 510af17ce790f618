"""
Adapters as pure tensor functions plus small modules that hang on `model.Linear.adapter`:
LoRA, MoRA (seven compression/decompression kinds) and XGBLoRA's gated rank-1 boosters.
Also: attach / settings / save / load / merge (in place and as a pure state-dict function) / ReMoRA kind switch.
Layer notation as in SPEC: y = W x, W is d x k (d = out_features, k = in_features); every adapter is a branch
Δh(x) = ΔW x, and mora_delta / lora_delta return that ΔW, so merging is exact.
    python -m pytest -q tests/test_adapters.py        # tests;  python bench.py --what all  # merge + step timings
"""
import contextlib
import functools
import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from model import Linear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("lora", "mora", "booster")
SHARE_KINDS = ("share", "share_group", "share_group_tile", "share_fold_group")
KINDS = SHARE_KINDS + ("rope", "decouple", "truncate")
MORA_TYPES = {1: "share", 2: "share_group", 3: "share_group_tile", 4: "share_fold_group", 6: "rope"}  # reference ids
CYCLES = {"paper": ("share", "share_group"), "reference": SHARE_KINDS}  # ReMoRA kind order per restart


def lora_forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale) -> torch.Tensor:
    """LoRA (Hu et al. Eq. 3): Δh = scale · B (A x); A (r, k), B (d, r), scale = alpha / r. Params r(k + d).
    Init A Kaiming-uniform(a=√5), B = 0. scale may be a 0-dim tensor (the booster gate rides on it)."""
    return F.linear(F.linear(x, A) * scale, B)  # scaling the r-wide middle is the cheapest place


def lora_delta(A: torch.Tensor, B: torch.Tensor, scale) -> torch.Tensor:
    """ΔW = scale · B A, shape (d, k)."""
    return (B * scale) @ A  # scale the thin factor: one (d, k) allocation


def mora_rank(in_features: int, out_features: int, r: int, kind: str, rounding: str = "half_up") -> int:
    """r_hat = int(√((d+k)·r) + 0.5) as the reference code ('floor': the paper's ⌊√((d+k)·r)⌋); rope: down to even.
    Per layer, from its own k and d; record it with the adapter, never recompute it when loading."""
    if rounding not in ("half_up", "floor"):
        raise ValueError(f"rounding must be 'half_up' or 'floor', got {rounding!r}")
    n = (in_features + out_features) * r
    r_hat = int(math.sqrt(n) + 0.5) if rounding == "half_up" else math.isqrt(n)
    if kind == "rope":
        r_hat -= r_hat % 2
    _check(r_hat, in_features, out_features, kind)
    return r_hat


def default_kind(r: int) -> str:
    """The paper's choice: rotation at small r (8), sharing at large r (256)."""
    return "rope" if r <= 32 else "share"


def _check(r_hat, k, d, kind):
    if kind not in KINDS:
        raise ValueError(f"unknown MoRA kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if k < 1 or d < 1 or r_hat < 1 or (kind == "rope" and r_hat % 2):
        raise ValueError(f"MoRA kind {kind!r} cannot serve in={k}, out={d} with r_hat={r_hat}"
                         + (" (rope pairs coordinates: r_hat must be even and >= 2)" if kind == "rope" else ""))
    return r_hat


def _wrap(x, L):
    """Cyclic padding/cut of the last dim to length L: out[..., i] = x[..., i mod k] (C_fold's pad, D_tile)."""
    k = x.shape[-1]
    if L <= k:
        return x[..., :L]
    if L <= 2 * k:
        return torch.cat([x, x[..., :L - k]], dim=-1)
    reps = -(-L // k)  # D_tile; as a pad only when k < r_hat / 2
    return x.unsqueeze(-2).expand(*x.shape[:-1], reps, k).flatten(-2)[..., :L]


def _fold_cols(X, k):
    """Cyclic fold of the last dim onto k columns: out[..., j] = sum of X[..., i] over i ≡ j (mod k) (the adjoint of
    _wrap; X itself when it is no wider than k)."""
    w = X.shape[-1]
    if w <= k:
        return X
    c, m = divmod(w, k)
    out = X[..., :c * k].unflatten(-1, (c, k)).sum(-2)
    if m:  # in place on a fresh tensor; in autograd paths (C_fold) w is a multiple of k
        out[..., :m] += X[..., c * k:]
    return out


def _group_sum(x, r_hat):
    """C_group: slot a = sum of contiguous group a (k < r_hat: slots past k get 0)."""
    s, m = divmod(x.shape[-1], r_hat)
    big = m * (s + 1)
    rest = x[..., big:].unflatten(-1, (r_hat - m, s)).sum(-1)
    return rest if m == 0 else torch.cat([x[..., :big].unflatten(-1, (m, s + 1)).sum(-1), rest], dim=-1)


def _group_expand(z, d):
    """D_group: repeat-interleave, the first d mod r_hat entries s+1 times, the rest s times (s = d // r_hat)."""
    r_hat = z.shape[-1]
    s, m = divmod(d, r_hat)
    rest = z[..., m:, None].expand(*z.shape[:-1], r_hat - m, s).flatten(-2)
    if m == 0:
        return rest
    return torch.cat([z[..., :m, None].expand(*z.shape[:-1], m, s + 1).flatten(-2), rest], dim=-1)


def _build_rope_tables(r_hat, n, device, dtype):
    """cos, sin (n, r_hat): row i holds angles i·θ_m, θ_m = 10000^(-2m/r_hat), repeated over both halves."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, r_hat, 2, dtype=torch.float64, device=device) / r_hat)
    ang = torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv_freq  # float64, then cast
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


@functools.lru_cache(maxsize=64)
def _cached_rope_tables(r_hat, n, device, dtype):
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable later under autograd
        return _build_rope_tables(r_hat, n, device, dtype)


def _rope_tables(r_hat, n, device, dtype):
    """Eager: built once per (r_hat, n, device, dtype); compiled: traced from shapes (no cache, no graph break)."""
    return (_build_rope_tables if torch.compiler.is_compiling() else _cached_rope_tables)(r_hat, n, device, dtype)


def _rotate_half_cols(M):
    """M̄ = [M[:, h:], -M[:, :h]], h = r_hat/2: the rotate-half pairing (m, m + h) applied to M's columns."""
    h = M.shape[1] // 2
    return torch.cat([M[:, h:], -M[:, :h]], dim=1)


def _rope_blocks(M, nb):
    """B_i = M·R_i for the chunks i < nb, (nb, r_hat, r_hat): (M·R_i)[:, c] = M[:, c]·cos(iθ_c) + M̄[:, c]·sin(iθ_c)
    (SPEC 2.4)."""
    cos, sin = _rope_tables(M.shape[0], nb, M.device, M.dtype)
    return M * cos[:, None, :] + _rotate_half_cols(M) * sin[:, None, :]


class _BlockDiagMatmul(torch.autograd.Function):
    """y = D_rope(blockdiag(B_0, ..., B_{nb-1}) · wrap(x)) for x (N, k), B (nb, r_hat, r_hat): one bmm over x's chunks
    (a strided view), transposed once into y. The backward is written out because autograd through the wrap,
    the transposes and the cut or tiling zero-fills full-size gradients and copies activations more often (bench.py:
    rope r = 8 steps a few % faster). For nb >= 2 chunks; differentiable once (no double backward)."""

    @staticmethod
    def forward(ctx, x, B, d):
        (N, k), (nb, r_hat, _) = x.shape, B.shape
        L = nb * r_hat
        xw = _wrap(x, L)  # (N, L): a view of x unless the last chunk wraps around
        ctx.save_for_backward(xw, B)
        ctx.k = k
        dev = x.device.type  # backward's bmms run under the forward's autocast, as autograd's own would
        ctx.amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        y = x.new_empty(N, max(L, d))
        y[:, :L].view(N, nb, r_hat).copy_(torch.bmm(xw.view(N, nb, r_hat).transpose(0, 1), B.mT).transpose(0, 1))
        if d <= L:  # D_rope cuts the last chunk
            return y[:, :d]
        f = d // L  # or tiles with period L: whole periods, then a partial one
        y[:, L:f * L].view(N, f - 1, L).copy_(y[:, :L].unsqueeze(1).expand(N, f - 1, L))
        y[:, f * L:] = y[:, :d - f * L]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, G):
        xw, B = ctx.saved_tensors
        (N, L), (nb, r_hat, _), k, d = xw.shape, B.shape, ctx.k, G.shape[1]
        G = F.pad(G, (0, L - d)) if d < L else _fold_cols(G, L)  # adjoint of the cut / tiling: (N, L)
        Gc = G.reshape(N, nb, r_hat).transpose(0, 1)  # (nb, N, r_hat)
        with torch.autocast(G.device.type, ctx.amp) if ctx.amp else contextlib.nullcontext():
            dB = torch.bmm(Gc.mT, xw.view(N, nb, r_hat).transpose(0, 1)).to(B.dtype)
            dx = G.new_empty(N, max(L, k))
            dx[:, :L].view(N, nb, r_hat).copy_(torch.bmm(Gc, B).transpose(0, 1))
        if L < k:  # inputs past the computed chunks get no gradient
            dx[:, L:].zero_()
        else:  # adjoint of the wrap: the padding's gradient folds back onto x's first columns (nb >= 2, so L < 2k)
            dx[:, :L - k] += dx[:, k:]
        return dx[:, :k], dB, None


def _rope_forward(x, M, d, rotate):
    r_hat = M.shape[0]
    n = -(-x.shape[-1] // r_hat)
    nb = min(n, -(-d // r_hat))  # only chunks whose outputs survive the cut at d are computed
    if rotate and nb > 1:
        # y_i = M (R_i x_i) = (M R_i) x_i: rotating M costs nb·r_hat² per call, rotating x several passes over the
        # activations; then one batched matmul over the chunks
        y = _BlockDiagMatmul.apply(x.reshape(-1, x.shape[-1]).contiguous(), _rope_blocks(M, nb), d)
        return y.reshape(*x.shape[:-1], d)
    # one shared M: one plain matmul over all chunks
    y = F.linear(_wrap(x, nb * r_hat).unflatten(-1, (nb, r_hat)), M).flatten(-2)
    return _wrap(y, d)  # D_rope: tile with period nb·r_hat, cut to d


def _fold(x, r_hat):
    """C_fold: wrap-pad x to n·r_hat (padded slot i reads x[i mod k]), sum the n chunks -> (..., r_hat)."""
    return _fold_cols(_wrap(x, -(-x.shape[-1] // r_hat) * r_hat), r_hat)


# The seven kinds (MoRA, Jiang et al.): Δh = f_decomp(M · f_comp(x)), x (..., k) -> (..., d), without building ΔW.
# Each has r_hat² parameters (r_hat from mora_rank), M = 0 at init (ΔW = 0, yet M gets gradient from step 0), no alpha.
def share(x, M, d):
    """C_fold + D_tile, Eq. 6 (the paper's kind for large r; ReMoRA kind A; reference type 1):
    Δh_t = Σ_a M[t mod r_hat, a] · fold(x)_a, fold(x)_a = Σ_{j ≡ a mod r_hat} x_j (+ the wrapped padding)."""
    return _wrap(F.linear(_fold(x, M.shape[0]), M), d)


def share_group(x, M, d):
    """C_group + D_group (ReMoRA kind B; reference type 2): slot a sums the a-th contiguous group of ⌊k/r_hat⌋ or
    ⌊k/r_hat⌋+1 features; output a is repeated over the a-th group of outputs. ΔW[t, j] = M[γ_d(t), γ_k(j)]."""
    return _group_expand(F.linear(_group_sum(x, M.shape[0]), M), d)


def share_group_tile(x, M, d):
    """C_group + D_tile (the reference code's ReMoRA 4-cycle; type 3): ΔW[t, j] = M[t mod r_hat, γ_k(j)]."""
    return _wrap(F.linear(_group_sum(x, M.shape[0]), M), d)


def share_fold_group(x, M, d):
    """C_fold + D_group (the reference code's ReMoRA 4-cycle; type 4): ΔW[t, j] = M[γ_d(t), j mod r_hat] (+ wrap)."""
    return _group_expand(F.linear(_fold(x, M.shape[0]), M), d)


def rope(x, M, d):
    """C_rope + D_rope, Eq. 9 (the paper's kind for small r; reference type 6): chunk i of the wrap-padded x is
    rotated by angles i·θ_m, θ_m = 10000^(-2m/r_hat) (rotate-half pairs), y_i = M R_i x_i, the n·r_hat outputs
    tiled or cut to d. ΔW = blockdiag(M R_0, ..., M R_{n-1}) up to the wrap: full rank is reachable."""
    return _rope_forward(x, M, d, rotate=True)


def decouple(x, M, d):
    """C_rope without rotation + D_rope, Eq. 8 (ablation): y_i = M x_i; ΔW = I_n ⊗ M when d = k = n·r_hat."""
    return _rope_forward(x, M, d, rotate=False)


def truncate(x, M, d):
    """x[:r_hat] -> [M z; 0], Eq. 4 (ablation): ΔW = [[M, 0], [0, 0]] cut to (d, k)."""
    k2, d2 = min(x.shape[-1], M.shape[0]), min(d, M.shape[0])
    y = F.linear(x[..., :k2], M[:d2, :k2])
    return F.pad(y, (0, d - d2)) if d > d2 else y


FORWARDS = {f.__name__: f for f in (share, share_group, share_group_tile, share_fold_group, rope, decouple, truncate)}
assert tuple(FORWARDS) == KINDS


def mora_forward(x: torch.Tensor, M: torch.Tensor, out_features: int, kind: str) -> torch.Tensor:
    """MoRA's branch Δh for x (..., k) -> (..., out_features) with the named kind (see the functions above).
    Defined here where the reference crashes: wrap padding is cyclic (padded slot i reads x[i mod k]), so k < r_hat/2
    wraps x several times, as the reference's merge does; rope with k <= r_hat is one unrotated chunk."""
    _check(M.shape[0], x.shape[-1], out_features, kind)
    return FORWARDS[kind](x, M, out_features)


def _rows_add_(W, X, tile):
    """W[t] += X[row(t)] along dim 0, X (r_hat, ...) broadcasting over W's other dims. tile (D_tile): row t mod
    r_hat; else (D_group): runs of s+1 equal rows for the first d mod r_hat rows of X, then runs of s."""
    d, r_hat = W.shape[0], X.shape[0]
    if tile:
        full = d // r_hat * r_hat
        W[:full].unflatten(0, (-1, r_hat)).add_(X)
        W[full:].add_(X[:d - full])
    else:
        s, m = divmod(d, r_hat)
        W[:m * (s + 1)].unflatten(0, (m, s + 1)).add_(X[:m, None])
        W[m * (s + 1):].unflatten(0, (r_hat - m, s)).add_(X[m:, None])


def _blocks_add_(Wv, M, Mbar, cos, sin, k):
    """Wv (..., R, k) += the first R <= n·r_hat rows of blockdiag(B_0, B_1, ...), B_b = M·R_b = M cos_b + Mbar sin_b
    (cos None: no rotation), columns wrapped mod k."""
    R, r_hat = Wv.shape[-2], M.shape[0]
    f = min(-(-k // r_hat) - 1, R // r_hat)  # whole blocks that neither wrap nor get cut: one strided view
    if f:
        a = f * r_hat
        diag = Wv[..., :a, :a].unflatten(-1, (f, r_hat)).unflatten(-3, (f, r_hat)).diagonal(0, -4, -2)
        if cos is None:  # diag: (..., r_hat, r_hat, f), block b last
            diag.add_(M[:, :, None])
        else:
            diag.addcmul_(M[:, :, None], cos[:f].T).addcmul_(Mbar[:, :, None], sin[:f].T)
    if R > f * r_hat:  # at most one more block: cut by R, or the last one whose padding wraps to column 0
        c0, rows = f * r_hat, min(R - f * r_hat, r_hat)
        Bb = (M if cos is None else M * cos[f] + Mbar * sin[f])[:rows]
        Wb = Wv[..., c0:c0 + rows, :]
        Wb[..., c0:c0 + r_hat].add_(Bb[:, :k - c0])
        if c0 + r_hat > k:  # the padding's columns come from the start of x
            wrap = _fold_cols(Bb[:, k - c0:], k)
            Wb[..., :wrap.shape[-1]].add_(wrap)


def mora_add_(W: torch.Tensor, M: torch.Tensor, kind: str, alpha: float = 1.0) -> torch.Tensor:
    """W (d, k) += alpha·ΔW in place, without building ΔW (SPEC 2.4; the merge path): broadcast adds of M's
    columns onto W's row/column structure (share kinds), or of the blocks M·R_b onto a strided diagonal view
    (rope/decouple, ~k·r_hat entries per output period), or one block (truncate). Returns W."""
    d, k = W.shape
    r_hat = _check(M.shape[0], k, d, kind)
    M = M.to(W.dtype)
    M = M * alpha if alpha != 1 else M
    if kind == "truncate":
        W[:r_hat, :r_hat] += M[:d, :k]
    elif kind in ("rope", "decouple"):
        n = -(-k // r_hat)
        L, nb = n * r_hat, min(n, -(-d // r_hat))  # L: period of the output tiling; nb: blocks that reach it
        cos = sin = Mbar = None
        if kind == "rope" and nb > 1:
            cos, sin = _rope_tables(r_hat, nb, M.device, M.dtype)
            # B_b = M·R_b column-wise: M cos + Mbar sin (as _rope_blocks), added straight into W's diagonal view
            # (building the nb stacked blocks first costs nb·r_hat² extra memory traffic: 2-3x slower at r = 256)
            Mbar = _rotate_half_cols(M)
        P = d // L  # whole output periods (D_rope tiles with period L), then a partial one
        if P:
            _blocks_add_(W[:P * L].unflatten(0, (P, L)), M, Mbar, cos, sin, k)
        if d > P * L:
            _blocks_add_(W[P * L:], M, Mbar, cos, sin, k)
    elif kind in ("share", "share_fold_group"):  # C_fold: column j gets M[:, j mod r_hat] (+ wrapped padding)
        tile = kind == "share"
        nf, q = divmod(k, r_hat)
        if k <= r_hat:
            _rows_add_(W, _fold_cols(M, k), tile)
        else:
            _rows_add_(W[:, :nf * r_hat].unflatten(1, (nf, r_hat)), M[:, None, :], tile)
            if q:  # the last, partial chunk; its padding columns M[:, q:] read x's first r_hat - q features
                _rows_add_(W[:, nf * r_hat:], M[:, :q], tile)
                _rows_add_(W[:, :r_hat - q], M[:, q:], tile)
    else:  # C_group: column j gets M[:, group(j)], runs of s+1 columns for the first k mod r_hat groups, then s
        tile = kind == "share_group_tile"
        s, m = divmod(k, r_hat)
        _rows_add_(W[:, :m * (s + 1)].unflatten(1, (m, s + 1)), M[:, :m, None], tile)
        _rows_add_(W[:, m * (s + 1):].unflatten(1, (r_hat - m, s)), M[:, m:, None], tile)
    return W


def mora_delta(M: torch.Tensor, in_features: int, out_features: int, kind: str) -> torch.Tensor:
    """ΔW (d, k) in closed form: mora_add_ on zeros. Always equals mora_forward(I_k)ᵀ."""
    return mora_add_(M.new_zeros(out_features, in_features), M, kind)


def _add_delta_(W, s: dict, t: dict, alpha=1.0):
    """W += alpha·ΔW of one layer from its settings and tensors, in W's dtype (delta, merge_, merge_state_dict)."""
    if s["method"] == "mora":
        return mora_add_(W, t["M"], s["kind"], alpha)
    B = t["B"].to(W.dtype) * (s["scale"] * t["gate"].to(W.dtype) if "gate" in t else s["scale"])  # booster: gated
    return W.addmm_(B, t["A"].to(W.dtype), alpha=alpha)


class _Adapter(nn.Module):
    """What LoRA and MoRA share: settings() (plain python, saved in checkpoints) and delta()."""

    def settings(self):
        return dict(method=self.method, r=self.r, r_hat=self.r_hat, kind=self.kind, scale=self.scale,
                    in_features=self.in_features, out_features=self.out_features)

    def delta(self, dtype=None):
        """ΔW (d, k) in dtype, by default fp32 (fp64 for fp64 params)."""
        p = next(self.parameters())
        W = p.new_zeros(self.out_features, self.in_features, dtype=dtype or _merge_dtype(p.dtype))
        return _add_delta_(W, self.settings(), self.state_dict())

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        """Re-initialise in place (same Parameter objects) with fresh(generator)."""
        for name, t in self.fresh(generator).items():
            getattr(self, name).copy_(t)


class LoRA(_Adapter):
    """Δh = scale · B A dropout(x) [· gate]. A (r, k) Kaiming-uniform(a=√5), B (d, r) = 0; r(k+d) params.
    gated=True is an XGBLoRA booster (r = 1, scale = s): `gate` is a persistent 0-dim 0/1 buffer (saved with the
    adapter so resume and merge see the same gates), 0 at attach; gate 0 gives exactly zero output and grads."""

    def __init__(self, in_features, out_features, r, scale, dropout=0.0, gated=False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.r, self.scale = in_features, out_features, r, float(scale)
        self.method, self.r_hat, self.kind = "booster" if gated else "lora", None, None
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("gate", torch.zeros((), device=device, dtype=dtype) if gated else None)
        self.reset_parameters()

    def fresh(self, generator=None) -> dict:
        """Init values, full size: A Kaiming-uniform(a=√5) from generator (None: the global RNG), B = 0."""
        A, B = (torch.empty(p.shape, device=p.device, dtype=p.dtype) for p in (self.A, self.B))  # plain, even if sharded
        return {"A": nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator), "B": B.zero_()}

    def forward(self, x):
        scale = self.scale if self.gate is None else self.scale * self.gate
        if torch.is_autocast_enabled(x.device.type):  # autocast casts x, A and B to its dtype itself
            return lora_forward(self.dropout(x), self.A, self.B, scale)
        # a half-precision base without autocast: the branch runs in A's dtype (fp32), its output in x's (as PEFT)
        return lora_forward(self.dropout(x).to(self.A.dtype), self.A, self.B, scale).to(x.dtype)


class MoRA(_Adapter):
    """Δh = mora_forward(dropout(x), M, d, kind); M (r_hat, r_hat) = 0, r_hat² params (kinds: share, rope, ... above).
    r is only the LoRA-equivalent rank r_hat came from. The branch runs in M's dtype, the output in x's."""

    def __init__(self, in_features, out_features, r_hat, kind, r=None, dropout=0.0, device=None, dtype=None):
        super().__init__()
        _check(r_hat, in_features, out_features, kind)
        self.in_features, self.out_features, self.r, self.r_hat, self.kind = in_features, out_features, r, r_hat, kind
        self.method, self.scale = "mora", 1.0
        self.M = nn.Parameter(torch.zeros(r_hat, r_hat, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def fresh(self, generator=None) -> dict:
        """Init values: M = 0."""
        return {"M": torch.zeros(self.M.shape, device=self.M.device, dtype=self.M.dtype)}

    def forward(self, x):
        return mora_forward(self.dropout(x).to(self.M.dtype), self.M, self.out_features, self.kind).to(x.dtype)


def _adapted(model):
    """(name, Linear) for every adapted layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear) and m.adapter is not None]


def _attach_one(lin, s, dropout):
    if (s["in_features"], s["out_features"]) != (lin.in_features, lin.out_features):
        raise ValueError(f"adapter settings {s} do not fit a {lin.in_features}->{lin.out_features} layer")
    # adapters train in fp32 over a bf16/fp16 base (their AdamW state too); fp64 stays fp64
    kw = dict(dropout=dropout, device=lin.weight.device, dtype=_merge_dtype(lin.weight.dtype))
    if s["method"] == "mora":
        lin.adapter = MoRA(s["in_features"], s["out_features"], s["r_hat"], s["kind"], r=s["r"], **kw)
    else:
        gated = s["method"] == "booster"
        lin.adapter = LoRA(s["in_features"], s["out_features"], s["r"], s["scale"], gated=gated, **kw)
    return list(lin.adapter.parameters())


def attach(model, method, targets=TARGETS, r=8, alpha=16.0, kind=None, dropout=0.0) -> list:
    """Freeze every parameter, then put a fresh adapter on each model.Linear whose last name component is in
    targets (an existing adapter is replaced). lora: scale alpha/r; mora: r_hat from each layer's own shape, kind
    default_kind(r), scale 1, alpha unused; booster: r = 1 (r ignored), scale = alpha, gate 0.
    Returns the adapter parameters (trainable) in module order."""
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; valid: {', '.join(METHODS)}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]
    valid = sorted({n.rsplit(".", 1)[-1] for n, _ in layers})
    unknown = sorted(set(targets) - set(valid))
    if unknown or not targets:
        raise ValueError(f"target(s) {unknown or list(targets)} match no adaptable layer; valid names: {valid}")
    kind = kind or default_kind(r)
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for name, lin in layers:
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        k, d = lin.in_features, lin.out_features
        s = dict(method=method, r=r, r_hat=None, kind=None, scale=alpha / r, in_features=k, out_features=d)
        if method == "mora":
            s.update(r_hat=mora_rank(k, d, r, kind), kind=kind, scale=1.0)
        elif method == "booster":
            s.update(r=1, scale=float(alpha))
        params += _attach_one(lin, s, dropout)
    return params


def settings(model) -> dict:
    """{layer name: dict(method, r, r_hat, kind, scale, in_features, out_features)} in plain python types."""
    return {name: lin.adapter.settings() for name, lin in _adapted(model)}


def adapter_state_dict(model) -> dict:
    """Only the adapter tensors (booster gates included), keys as in model.state_dict()."""
    return {f"{name}.adapter.{k}": v for name, lin in _adapted(model) for k, v in lin.adapter.state_dict().items()}


def load_adapters(model, settings, state_dict=None, dropout=0.0) -> list:
    """Freeze everything, attach exactly per saved per-layer settings (r_hat, kind never recomputed), then load
    state_dict strictly (every adapter key, nothing else). state_dict None or {}: attach only, the caller loads the
    tensors with the rest of its checkpoint. Returns the adapter parameters like attach."""
    for p in model.parameters():
        p.requires_grad_(False)
    modules, params = dict(model.named_modules()), []
    for name, s in settings.items():
        if not isinstance(modules.get(name), Linear):
            raise ValueError(f"saved adapter layer {name!r} is not a model.Linear of this model")
        params += _attach_one(modules[name], s, dropout)
    if state_dict:
        expected = set(adapter_state_dict(model))
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if missing or unexpected:
            raise ValueError(f"adapter state dict mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        for name in settings:
            pre = name + ".adapter."
            modules[name].adapter.load_state_dict({k[len(pre):]: v for k, v in state_dict.items() if k.startswith(pre)})
    return params


def reinit_(model, generator=None):
    """Re-initialise every adapter in place (same Parameter objects): LoRA A Kaiming, B = 0; MoRA M = 0.
    generator: the draws, in module order (None: the global RNG)."""
    for _, lin in _adapted(model):
        lin.adapter.reset_parameters(generator)


def next_kind(kind: str, cycle: str = "paper") -> str:
    """ReMoRA: the kind after a restart. 'paper': share <-> share_group; 'reference': the 4-cycle of share kinds."""
    order = CYCLES[cycle]
    if kind not in order:
        raise ValueError(f"kind {kind!r} is not in the ReMoRA {cycle!r} cycle {order}")
    return order[(order.index(kind) + 1) % len(order)]


def switch_kind_(model, kind: str):
    """Set the kind of every MoRA adapter in place (ReMoRA), keeping M and r_hat. Only between share kinds: they
    use the same r_hat rule and any r_hat; rope/decouple/truncate are not defined for ReMoRA and are refused."""
    moras = [lin.adapter for _, lin in _adapted(model) if isinstance(lin.adapter, MoRA)]
    if not moras:
        raise ValueError("switch_kind_: the model has no MoRA adapters")
    for m in moras:
        if kind not in SHARE_KINDS or m.kind not in SHARE_KINDS:
            raise ValueError(f"switch_kind_ only switches between {SHARE_KINDS}, not {m.kind!r} -> {kind!r}")
    for m in moras:
        m.kind = kind


@torch.no_grad()
def set_gates_(model, layer_ids):
    """XGBLoRA: gate = 1 on the boosters of blocks layers.{i} for i in layer_ids, 0 elsewhere (in place)."""
    layer_ids = set(layer_ids)
    if not layer_ids <= set(range(len(model.layers))):
        raise ValueError(f"layer ids {sorted(layer_ids)} out of range for {len(model.layers)} layers")
    gates = [(i, m.gate) for i, block in enumerate(model.layers)
             for m in block.modules() if isinstance(m, LoRA) and m.gate is not None]
    if not gates:
        raise ValueError("set_gates_: the model has no boosters (attach(model, 'booster'))")
    for i, gate in gates:
        gate.fill_(1.0 if i in layer_ids else 0.0)


def _merge_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 weights


@torch.no_grad()
def merge_(model, alpha: float = 1.0):
    """W += alpha·ΔW for every adapted layer, added in place in fp32 (a bf16/fp16 W goes through an fp32 copy,
    cast once). Adapters stay attached and unchanged (call reinit_ to restart)."""
    for _, lin in _adapted(model):
        W = lin.weight
        if W.dtype == _merge_dtype(W.dtype):
            _add_delta_(W, lin.adapter.settings(), lin.adapter.state_dict(), alpha)
        else:
            W.copy_(_add_delta_(W.to(_merge_dtype(W.dtype)), lin.adapter.settings(), lin.adapter.state_dict(), alpha))


@torch.no_grad()
def merge_state_dict(base_sd: dict, settings: dict, adapter_sd: dict, alpha: float = 1.0) -> dict:
    """Pure merge: a new base state dict with W + alpha·ΔW for every layer in settings (same ΔW code as merge_);
    inputs are not modified; adapter keys, if base_sd has any, are dropped, so the result loads strict."""
    out = dict(base_sd)
    for name, s in settings.items():
        pre = name + ".adapter."
        t = {k[len(pre):]: v.to(base_sd[name + ".weight"].device) for k, v in adapter_sd.items() if k.startswith(pre)}
        W = base_sd[name + ".weight"]
        out[name + ".weight"] = _add_delta_(W.to(_merge_dtype(W.dtype), copy=True), s, t, alpha).to(W.dtype)
        for key in [k for k in out if k.startswith(pre)]:
            del out[key]
    return out


def base_fingerprint(state_dict: dict) -> str:
    """sha256 over sorted names, shapes, dtypes and all bytes of the base tensors (keys with an '.adapter.'
    component skipped). Full hash, no subsampling: sha256 runs ~1.7 GB/s here, so 135M fp32 params take ~0.4 s."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        if ".adapter." in name:
            continue
        t = state_dict[name].detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def count_params(model) -> tuple:
    """(trainable, total) parameter counts (shared tensors counted once)."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)
