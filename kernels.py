"""
The fast paths of adapters.py's MoRA formulas, in plain PyTorch: what training and merging run.
Each computes what the formula of the same name in adapters.py defines, only faster: views instead
of index gathers, rope's rotation folded into M with a hand-written backward (_BlockDiagMatmul),
cached cos/sin tables, and ΔW added into W in place through strided views, never built. Kept apart
as gpt-fast and FlashAttention keep kernels apart from the model that reads simply; tests hold each
equal to its formula (forward, gradients, merge). Imports no project file; adapters.py imports it.
    python -m pytest -q tests/test_kernels.py        # fast == plain;  python bench.py  # the speed
"""
import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def wrap(x, L):
    """Cyclic pad/cut of the last dim to length L, out[..., i] = x[..., i mod k]: views, a cat."""
    k = x.shape[-1]
    if L <= k:
        return x[..., :L]
    if L <= 2 * k:
        return torch.cat([x, x[..., :L - k]], dim=-1)
    reps = -(-L // k)  # D_tile; as a pad only when k < r_hat / 2
    return x.unsqueeze(-2).expand(*x.shape[:-1], reps, k).flatten(-2)[..., :L]


def fold_cols(X, k):
    """Cyclic fold of the last dim onto k columns: out[..., j] = sum of X[..., i] over i ≡ j (mod k)
    (the adjoint of wrap; X itself when it is no wider than k)."""
    w = X.shape[-1]
    if w <= k:
        return X
    c, m = divmod(w, k)
    out = X[..., :c * k].unflatten(-1, (c, k)).sum(-2)
    if m:  # in place on a fresh tensor; in autograd paths (C_fold) w is a multiple of k
        out[..., :m] += X[..., c * k:]
    return out


def fold(x, r_hat):
    """C_fold: wrap-pad x to n·r_hat, sum the n chunks -> (..., r_hat)."""
    return fold_cols(wrap(x, -(-x.shape[-1] // r_hat) * r_hat), r_hat)


def group_sum(x, r_hat):
    """C_group as two reshaped sums: groups of s+1 features, then of s (k < r_hat: zero slots)."""
    s, m = divmod(x.shape[-1], r_hat)
    big = m * (s + 1)
    rest = x[..., big:].unflatten(-1, (r_hat - m, s)).sum(-1)
    if m == 0:
        return rest
    return torch.cat([x[..., :big].unflatten(-1, (m, s + 1)).sum(-1), rest], dim=-1)


def group_expand(z, d):
    """D_group as two expanded views: the first d mod r_hat entries s+1 times, the rest s times."""
    r_hat = z.shape[-1]
    s, m = divmod(d, r_hat)
    rest = z[..., m:, None].expand(*z.shape[:-1], r_hat - m, s).flatten(-2)
    if m == 0:
        return rest
    return torch.cat([z[..., :m, None].expand(*z.shape[:-1], m, s + 1).flatten(-2), rest], dim=-1)


def share(x, M, d):
    return wrap(F.linear(fold(x, M.shape[0]), M), d)


def share_group(x, M, d):
    return group_expand(F.linear(group_sum(x, M.shape[0]), M), d)


def share_group_tile(x, M, d):
    return wrap(F.linear(group_sum(x, M.shape[0]), M), d)


def share_fold_group(x, M, d):
    return group_expand(F.linear(fold(x, M.shape[0]), M), d)


def _build_rope_tables(r_hat, n, device, dtype):
    """cos, sin (n, r_hat): row i holds angles i·θ_m, θ_m = 10000^(-2m/r_hat), over both halves."""
    f64 = dict(dtype=torch.float64, device=device)  # float64, then cast
    inv_freq = 1.0 / 10000 ** (torch.arange(0, r_hat, 2, **f64) / r_hat)
    ang = torch.arange(n, **f64)[:, None] * inv_freq
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


@functools.lru_cache(maxsize=64)
def _cached_rope_tables(r_hat, n, device, dtype):
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable later under autograd
        return _build_rope_tables(r_hat, n, device, dtype)


def rope_tables(r_hat, n, device, dtype):
    """Eager: built once per (r_hat, n, device, dtype); compiled: traced from shapes (no cache, no
    graph break)."""
    build = _build_rope_tables if torch.compiler.is_compiling() else _cached_rope_tables
    return build(r_hat, n, device, dtype)


def _rotate_half_cols(M):
    """M̄ = [M[:, h:], -M[:, :h]], h = r_hat/2: rotate-half's pairing (m, m + h) on M's columns."""
    h = M.shape[1] // 2
    return torch.cat([M[:, h:], -M[:, :h]], dim=1)


def _rope_blocks(M, nb):
    """B_i = M·R_i for the chunks i < nb, (nb, r_hat, r_hat):
    (M·R_i)[:, c] = M[:, c]·cos(iθ_c) + M̄[:, c]·sin(iθ_c) (SPEC 2.4)."""
    cos, sin = rope_tables(M.shape[0], nb, M.device, M.dtype)
    return M * cos[:, None, :] + _rotate_half_cols(M) * sin[:, None, :]


class _BlockDiagMatmul(torch.autograd.Function):
    """y = D_rope(blockdiag(B_0, ..., B_{nb-1}) · wrap(x)) for x (N, k), B (nb, r_hat, r_hat): one
    bmm over x's chunks (a strided view), transposed once into y. The backward is written out
    because autograd through the wrap, the transposes and the cut or tiling zero-fills full-size
    gradients and copies activations more often (bench.py: rope r = 8 steps a few % faster). For nb
    >= 2 chunks; differentiable once (no double backward)."""

    @staticmethod
    def forward(ctx, x, B, d):
        (N, k), (nb, r_hat, _) = x.shape, B.shape
        L = nb * r_hat
        xw = wrap(x, L)  # (N, L): a view of x unless the last chunk wraps around
        ctx.save_for_backward(xw, B)
        ctx.k = k
        dev = x.device.type  # backward's bmms run under the forward's autocast, as autograd's would
        ctx.amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        y = x.new_empty(N, max(L, d))
        yc = torch.bmm(xw.view(N, nb, r_hat).transpose(0, 1), B.mT).transpose(0, 1)
        y[:, :L].view(N, nb, r_hat).copy_(yc)
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
        G = F.pad(G, (0, L - d)) if d < L else fold_cols(G, L)  # adjoint of the cut / tiling
        Gc = G.reshape(N, nb, r_hat).transpose(0, 1)  # (nb, N, r_hat)
        with torch.autocast(G.device.type, ctx.amp) if ctx.amp else contextlib.nullcontext():
            dB = torch.bmm(Gc.mT, xw.view(N, nb, r_hat).transpose(0, 1)).to(B.dtype)
            dx = G.new_empty(N, max(L, k))
            dx[:, :L].view(N, nb, r_hat).copy_(torch.bmm(Gc, B).transpose(0, 1))
        if L < k:  # inputs past the computed chunks get no gradient
            dx[:, L:].zero_()
        else:  # adjoint of the wrap: the padding's gradient folds back onto x's first columns
            # (nb >= 2, so L < 2k)
            dx[:, :L - k] += dx[:, k:]
        return dx[:, :k], dB, None


def _rope_forward(x, M, d, rotate):
    r_hat = M.shape[0]
    n = -(-x.shape[-1] // r_hat)
    nb = min(n, -(-d // r_hat))  # only chunks whose outputs survive the cut at d are computed
    if rotate and nb > 1:
        # y_i = M (R_i x_i) = (M R_i) x_i: rotating M costs nb·r_hat² per call, rotating x several
        # passes over the activations; then one batched matmul over the chunks
        y = _BlockDiagMatmul.apply(x.reshape(-1, x.shape[-1]).contiguous(), _rope_blocks(M, nb), d)
        return y.reshape(*x.shape[:-1], d)
    # one shared M: one plain matmul over all chunks
    y = F.linear(wrap(x, nb * r_hat).unflatten(-1, (nb, r_hat)), M).flatten(-2)
    return wrap(y, d)  # D_rope: tile with period nb·r_hat, cut to d


def rope(x, M, d):
    return _rope_forward(x, M, d, rotate=True)


def decouple(x, M, d):
    return _rope_forward(x, M, d, rotate=False)


# -----------------------------------------------------------------------------
# merges: W += alpha·ΔW in place, ΔW never built

def add_delta_(W, s: dict, t: dict, alpha=1.0):
    """W += alpha·ΔW of one layer from its settings s and tensors t, in W's dtype (merge_,
    merge_state_dict, delta): LoRA by one addmm_, MoRA by mora_add_."""
    if s["method"] == "mora":
        return mora_add_(W, t["M"], s["kind"], alpha)
    scale = s["scale"] * t["gate"].to(W.dtype) if "gate" in t else s["scale"]  # a booster: gated
    return W.addmm_(t["B"].to(W.dtype) * scale, t["A"].to(W.dtype), alpha=alpha)


def _rows_add_(W, X, tile):
    """W[t] += X[row(t)] along dim 0, X (r_hat, ...) broadcasting over W's other dims. tile
    (D_tile): row t mod r_hat; else (D_group): runs of s+1 equal rows for the first d mod r_hat rows
    of X, then runs of s."""
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
    """Wv (..., R, k) += the first R <= n·r_hat rows of blockdiag(B_0, B_1, ...),
    B_b = M·R_b = M cos_b + Mbar sin_b (cos None: no rotation), columns wrapped mod k."""
    R, r_hat = Wv.shape[-2], M.shape[0]
    f = min(-(-k // r_hat) - 1, R // r_hat)  # whole blocks that neither wrap nor get cut: one view
    if f:
        a = f * r_hat
        diag = Wv[..., :a, :a].unflatten(-1, (f, r_hat)).unflatten(-3, (f, r_hat))
        diag = diag.diagonal(0, -4, -2)
        if cos is None:  # diag: (..., r_hat, r_hat, f), block b last
            diag.add_(M[:, :, None])
        else:
            diag.addcmul_(M[:, :, None], cos[:f].T).addcmul_(Mbar[:, :, None], sin[:f].T)
    if R > f * r_hat:  # one more block at most: cut by R, or the last, whose padding wraps round
        c0, rows = f * r_hat, min(R - f * r_hat, r_hat)
        Bb = (M if cos is None else M * cos[f] + Mbar * sin[f])[:rows]
        Wb = Wv[..., c0:c0 + rows, :]
        Wb[..., c0:c0 + r_hat].add_(Bb[:, :k - c0])
        if c0 + r_hat > k:  # the padding's columns come from the start of x
            wrapped = fold_cols(Bb[:, k - c0:], k)
            Wb[..., :wrapped.shape[-1]].add_(wrapped)


def mora_add_(W: torch.Tensor, M: torch.Tensor, kind: str, alpha: float = 1.0) -> torch.Tensor:
    """W (d, k) += alpha·ΔW in place, without building ΔW (SPEC 2.4; the merge path): broadcast adds
    of M's columns onto W's row/column structure (share kinds), or of the blocks M·R_b onto a
    strided diagonal view (rope/decouple, ~k·r_hat entries per output period), or one block
    (truncate). Returns W."""
    (d, k), r_hat = W.shape, M.shape[0]
    M = M.to(W.dtype)
    M = M * alpha if alpha != 1 else M
    if kind == "truncate":
        W[:r_hat, :r_hat] += M[:d, :k]
    elif kind in ("rope", "decouple"):
        n = -(-k // r_hat)
        # L: period of the output tiling; nb: blocks that reach it
        L, nb = n * r_hat, min(n, -(-d // r_hat))
        cos = sin = Mbar = None
        if kind == "rope" and nb > 1:
            cos, sin = rope_tables(r_hat, nb, M.device, M.dtype)
            # B_b = M·R_b column-wise: M cos + Mbar sin (as _rope_blocks), added straight into W's
            # diagonal view (building the nb stacked blocks first costs nb·r_hat² extra traffic:
            # 2-3x slower at r = 256)
            Mbar = _rotate_half_cols(M)
        P = d // L  # whole output periods (D_rope tiles with period L), then a partial one
        if P:
            _blocks_add_(W[:P * L].unflatten(0, (P, L)), M, Mbar, cos, sin, k)
        if d > P * L:
            _blocks_add_(W[P * L:], M, Mbar, cos, sin, k)
    elif kind in ("share", "share_fold_group"):  # C_fold: column j gets M[:, j mod r_hat] (+ wrap)
        tile = kind == "share"
        nf, q = divmod(k, r_hat)
        if k <= r_hat:
            _rows_add_(W, fold_cols(M, k), tile)
        else:
            _rows_add_(W[:, :nf * r_hat].unflatten(1, (nf, r_hat)), M[:, None, :], tile)
            if q:  # the last, partial chunk; its padding columns M[:, q:] read x's first r_hat - q
                _rows_add_(W[:, nf * r_hat:], M[:, :q], tile)
                _rows_add_(W[:, :r_hat - q], M[:, q:], tile)
    elif kind in ("share_group", "share_group_tile"):
        # C_group: column j gets M[:, group(j)], runs of s+1 columns for the first k mod r_hat
        tile = kind == "share_group_tile"  # groups, then runs of s
        s, m = divmod(k, r_hat)
        _rows_add_(W[:, :m * (s + 1)].unflatten(1, (m, s + 1)), M[:, :m, None], tile)
        _rows_add_(W[:, m * (s + 1):].unflatten(1, (r_hat - m, s)), M[:, m:, None], tile)
    else:
        raise ValueError(f"unknown MoRA kind {kind!r}")
    return W
