"""
Tests for adapters.py: golden values from the MoRA authors' code (../shared/fixtures), ΔW == forward(I)ᵀ over
awkward shapes, zero-init identity, adapter == merged, param-count formulas, ranks, compile without graph breaks,
and the in-place helpers (reinit_, switch_kind_, set_gates_, load_adapters).
    python -m pytest -q tests/test_adapters.py
"""
import os

import pytest
import torch

import adapters as A
from model import LLaMA, ModelConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "mora_reference.pt")
CFG = ModelConfig(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96, block_size=64)
MORA_KINDS = A.KINDS
# (k, d, r): primes, k < r_hat, d < r_hat, k < r_hat/2, k >> d, d >> k, r_hat | k, tiny layers
SHAPES = [(64, 64, 8), (67, 131, 4), (131, 67, 4), (24, 150, 8), (10, 200, 8), (200, 12, 8), (3, 97, 8),
          (97, 3, 8), (512, 16, 2), (16, 512, 2), (96, 32, 8), (1, 1, 2), (2, 1, 1), (40, 40, 1), (13, 7, 3)]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def oracle_delta(M, k, d, kind):
    """ΔW = (forward applied to I_k)ᵀ: the definition of the matrix form."""
    return A.mora_forward(torch.eye(k, dtype=M.dtype), M, d, kind).T


def tiny_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return LLaMA(CFG).to(dtype)


def randomize_(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in A.adapter_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)

# ---------------------------------------------------------------------------------------------------------
# pure functions


@pytest.mark.skipif(not os.path.exists(FIXTURES), reason="shared fixtures not present")
def test_reference_fixtures():
    cases = torch.load(FIXTURES, weights_only=True)
    assert len(cases) == 55 and sum("error" in c for c in cases) == 5  # SPEC 2.5 defects 1 and 2
    for c in cases:
        kind, k, d, M = A.MORA_TYPES[c["mora_type"]], c["in_features"], c["out_features"], c["M"]
        tag = f"{kind} {k}->{d} r={c['r']}"
        assert A.mora_rank(k, d, c["r"], kind) == c["r_hat"] == M.shape[0], tag
        y, D = A.mora_forward(c["x"], M, d, kind), A.mora_delta(M, k, d, kind)
        tol = 1e-6 if kind == "rope" else None  # rope: the reference built its cos/sin tables in float32
        for mine, name in ((y, "y"), (D, "delta")):
            if name not in c:  # the reference crashed here: ours is defined, and consistent with the other part
                assert {"y": "forward", "delta": "delta"}[name] in c["error_in"], tag
                continue
            if tol is None:
                assert (mine - c[name]).abs().max().item() <= 1e-10, (tag, name)
            else:
                assert rel_err(mine, c[name]) <= tol, (tag, name)
        assert (oracle_delta(M, k, d, kind) - D).abs().max().item() <= 1e-12, tag
        assert (c["x"] @ D.T - y).abs().max().item() <= 1e-12, tag


def test_mora_rank():
    assert A.mora_rank(4096, 4096, 8, "share") == 256
    assert A.mora_rank(4096, 11008, 8, "share") == 348
    assert A.mora_rank(4096, 4096, 256, "share") == 1448
    assert A.mora_rank(768, 768, 128, "share") == 443 and A.mora_rank(768, 768, 128, "rope") == 442
    assert A.mora_rank(40, 40, 1, "share") == 9 and A.mora_rank(40, 40, 1, "rope") == 8
    assert A.mora_rank(24, 150, 8, "share", rounding="floor") == 37 and A.mora_rank(1, 1, 10, "share", "floor") == 4
    assert A.mora_rank(40, 40, 2, "share") == 13 and A.mora_rank(40, 40, 2, "share", rounding="floor") == 12
    assert A.MORA_TYPES == {1: "share", 2: "share_group", 3: "share_group_tile", 4: "share_fold_group", 6: "rope"}
    assert A.default_kind(8) == "rope" and A.default_kind(32) == "rope" and A.default_kind(256) == "share"
    with pytest.raises(ValueError, match="rope"):
        A.mora_rank(1, 1, 1, "rope")  # r_hat 1 -> 0 after rounding to even
    with pytest.raises(ValueError, match="r_hat=5"):
        A.mora_forward(torch.randn(2, 8), torch.randn(5, 5), 8, "rope")  # odd r_hat cannot rotate pairs
    with pytest.raises(ValueError, match="unknown MoRA kind"):
        A.mora_delta(torch.randn(4, 4), 8, 8, "tile")


@pytest.mark.parametrize("kind", MORA_KINDS)
def test_delta_equals_forward_of_identity(kind):
    g = torch.Generator().manual_seed(0)
    for k, d, r in SHAPES:
        r_hat = A.mora_rank(k, d, r, kind)
        M = torch.randn(r_hat, r_hat, generator=g, dtype=torch.float64)
        D = A.mora_delta(M, k, d, kind)
        assert D.shape == (d, k)
        assert (D - oracle_delta(M, k, d, kind)).abs().max().item() <= 1e-12, (kind, k, d, r_hat)
        x = torch.randn(2, 3, k, generator=g, dtype=torch.float64)  # any leading dims
        assert (A.mora_forward(x, M, d, kind) - x @ D.T).abs().max().item() <= 1e-12
        W = torch.randn(d, k, generator=g, dtype=torch.float64)  # the in-place merge path: W + alpha·ΔW
        assert (A.mora_add_(W.clone(), M, kind, alpha=0.5) - (W + 0.5 * D)).abs().max().item() <= 1e-12


@pytest.mark.parametrize("kind", MORA_KINDS)
def test_gradients_match_finite_differences(kind):
    """Backward of every kind (rope's is written by hand) on the awkward shapes: wrap, cut, tiling, k < r_hat/2."""
    g = torch.Generator().manual_seed(0)
    for k, d, r in SHAPES:
        r_hat = A.mora_rank(k, d, r, kind)
        M = torch.randn(r_hat, r_hat, generator=g, dtype=torch.float64, requires_grad=True)
        x = torch.randn(3, k, generator=g, dtype=torch.float64).T.contiguous().T.requires_grad_()  # non-contiguous
        assert torch.autograd.gradcheck(lambda x, M: A.mora_forward(x, M, d, kind), (x, M), fast_mode=True), (k, d)


def spec_delta(M, k, d, kind):
    """SPEC 2.4 entrywise formulas, written independently of adapters.py (valid for k >= r_hat/2)."""
    r_hat = M.shape[0]
    q, n = k % r_hat, -(-k // r_hat)
    p = (r_hat - q) % r_hat
    t, j = torch.arange(d)[:, None], torch.arange(k)[None, :]

    def group(i, size):
        s, m = divmod(size, r_hat)
        return torch.where(i < m * (s + 1), i // (s + 1), m + (i - m * (s + 1)) // max(s, 1))

    wrap = j < p
    if kind in ("share", "share_fold_group"):
        rows = t % r_hat if kind == "share" else group(t, d)
        return M[rows, j % r_hat] + wrap * M[rows, (q + j).clamp(max=r_hat - 1)]
    if kind in ("share_group", "share_group_tile"):
        rows = t % r_hat if kind == "share_group_tile" else group(t, d)
        return M[rows, group(j, k)] if k >= r_hat else torch.where(j < r_hat, M[rows, j.clamp(max=r_hat - 1)], 0)
    h = r_hat // 2
    Mbar = torch.cat([M[:, h:], -M[:, :h]], dim=1)
    theta = 10000.0 ** (-torch.arange(0, r_hat, 2, dtype=torch.float64) / r_hat)
    u = t % (n * r_hat)
    b, o = u // r_hat, u % r_hat

    def Bb(c):  # (M R_b)[o, c]
        ang = b * theta.repeat(2)[c]
        return M[o, c] * torch.cos(ang) + Mbar[o, c] * torch.sin(ang)
    return (j // r_hat == b) * Bb(j % r_hat) + (b == n - 1) * wrap * Bb((r_hat - p + j).clamp(max=r_hat - 1))


@pytest.mark.parametrize("kind", A.SHARE_KINDS + ("rope",))
def test_delta_matches_spec_formulas(kind):
    g = torch.Generator().manual_seed(1)
    for k, d, r in [(64, 64, 8), (67, 131, 4), (131, 67, 4), (24, 150, 8), (200, 12, 8), (50, 50, 16), (48, 129, 8)]:
        r_hat = A.mora_rank(k, d, r, kind)
        M = torch.randn(r_hat, r_hat, generator=g, dtype=torch.float64)
        assert (A.mora_delta(M, k, d, kind) - spec_delta(M, k, d, kind)).abs().max().item() <= 1e-12, (kind, k, d)


def test_decouple_truncate_and_small_input_definitions():
    g = torch.Generator().manual_seed(2)
    for k, d in [(32, 32), (33, 32), (32, 95), (95, 32), (64, 128), (128, 64), (97, 101)]:
        M = torch.randn(32, 32, generator=g, dtype=torch.float64)
        x = torch.randn(4, k, generator=g, dtype=torch.float64)
        for kind in ("decouple", "truncate"):
            y = A.mora_forward(x, M, d, kind)
            assert y.shape == (4, d) and (y - x @ A.mora_delta(M, k, d, kind).T).abs().max() <= 1e-12
        T = torch.zeros(d, k, dtype=torch.float64)
        T[:32, :32] = M  # Eq. 4: [[M, 0], [0, 0]]
        assert torch.equal(A.mora_delta(M, k, d, "truncate"), T)
    M = torch.randn(16, 16, dtype=torch.float64)  # Eq. 8: decouple with d = k = n·r_hat is I_n ⊗ M
    assert torch.equal(A.mora_delta(M, 64, 64, "decouple"), torch.kron(torch.eye(4, dtype=torch.float64), M))
    # k < r_hat/2: the wrap repeats x until the r_hat slots are full, so column j collects M[:, c], c ≡ j (mod k)
    M = torch.randn(8, 8, dtype=torch.float64)
    D = A.mora_delta(M, 3, 8, "share")
    assert torch.allclose(D[:, 0], M[:, 0] + M[:, 3] + M[:, 6]) and torch.allclose(D[:, 2], M[:, 2] + M[:, 5])
    assert torch.allclose(A.mora_delta(M, 3, 8, "rope"), D, rtol=0, atol=1e-12)  # one chunk: nothing rotates


def test_ranks():
    g = torch.Generator().manual_seed(3)
    for kind in A.SHARE_KINDS:
        for k, d, r in [(64, 64, 8), (67, 131, 4), (128, 40, 2)]:
            r_hat = A.mora_rank(k, d, r, kind)
            D = A.mora_delta(torch.randn(r_hat, r_hat, generator=g, dtype=torch.float64), k, d, kind)
            assert torch.linalg.matrix_rank(D) <= r_hat
    r_hat = A.mora_rank(64, 64, 8, "rope")
    assert r_hat == 32
    D = A.mora_delta(torch.randn(r_hat, r_hat, generator=g, dtype=torch.float64), 64, 64, "rope")
    assert torch.linalg.matrix_rank(D) == 64  # rope reaches full rank; share kinds are capped at 32
    # rope with k > d: only the first ceil(d/r_hat) chunks reach the output; later input features are dropped
    D = A.mora_delta(torch.randn(40, 40, generator=g, dtype=torch.float64), 200, 12, "rope")
    assert torch.count_nonzero(D[:, 40:]) == 0 and torch.count_nonzero(D[:, :40]) == 12 * 40


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_lora(dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 67, generator=g).to(dtype)
    for kind in MORA_KINDS:
        r_hat = A.mora_rank(67, 131, 4, kind)
        M = torch.randn(r_hat, r_hat, generator=g).to(dtype)
        y, D = A.mora_forward(x, M, 131, kind), A.mora_delta(M, 67, 131, kind)
        assert y.dtype == D.dtype == dtype
        y64 = A.mora_forward(x.double(), M.double(), 131, kind)
        assert rel_err(y.double(), y64) <= (1e-5 if dtype == torch.float32 else 1e-13)
        assert rel_err(x @ D.T, y) <= (1e-5 if dtype == torch.float32 else 1e-13)
    Am, Bm = torch.randn(4, 67, generator=g).to(dtype), torch.randn(131, 4, generator=g).to(dtype)
    y = A.lora_forward(x, Am, Bm, 2.0)
    assert y.dtype == dtype and rel_err(y, 2.0 * x @ Am.T @ Bm.T) <= 1e-6
    assert rel_err(A.lora_delta(Am, Bm, 2.0), 2.0 * Bm @ Am) <= 1e-6


def test_rope_tables_under_inference_mode_then_autograd():
    x, M = torch.randn(2, 96), torch.randn(32, 32, requires_grad=True)
    with torch.inference_mode():
        A.mora_forward(x, M.detach(), 96, "rope")  # builds and caches the (32, 3) tables
    A.mora_forward(x, M, 96, "rope").sum().backward()  # cached tables must not be inference tensors
    assert M.grad is not None and M.grad.abs().sum() > 0

# ---------------------------------------------------------------------------------------------------------
# modules and model-level helpers

METHODS = [("lora", None), ("booster", None)] + [("mora", kind) for kind in MORA_KINDS]


@pytest.mark.parametrize("method,kind", METHODS)
def test_zero_init_is_identity(method, kind):
    idx = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    base = tiny_model()
    ref, _ = base(idx)
    params = A.attach(base, method, kind=kind)
    if method == "booster":
        A.set_gates_(base, {0, 1})  # gate on: the branch is live, B = 0 still makes it exactly zero
    assert all(p.requires_grad for p in params)
    assert torch.equal(base(idx)[0], ref)


@pytest.mark.parametrize("method,kind", METHODS)
def test_adapter_equals_merged(method, kind):
    idx = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_model()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    A.attach(model, method, kind=kind, r=8)
    randomize_(model)
    if method == "booster":
        A.set_gates_(model, {1})  # block 0's boosters are gated off and must not merge
    y_adapted = model(idx)[0]
    s, asd = A.settings(model), A.adapter_state_dict(model)
    A.merge_(model)
    plain = tiny_model(seed=123)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".adapter." not in k}, strict=True)
    assert rel_err(plain(idx)[0], y_adapted) <= 1e-5
    merged_sd = A.merge_state_dict(base_sd, s, asd)  # pure path: same numbers, loads strict into the plain model
    plain.load_state_dict(merged_sd, strict=True)
    assert rel_err(plain(idx)[0], y_adapted) <= 1e-5
    for name in s:
        assert torch.equal(merged_sd[name + ".weight"], model.get_submodule(name).weight)
    assert torch.equal(base_sd["layers.0.self_attn.q_proj.weight"], tiny_model().layers[0].self_attn.q_proj.weight)
    if method == "booster":
        assert torch.equal(merged_sd["layers.0.mlp.up_proj.weight"], base_sd["layers.0.mlp.up_proj.weight"])


def test_merge_float64_and_settings_are_plain():
    model = tiny_model(dtype=torch.float64)
    A.attach(model, "mora", kind="share", r=4)
    randomize_(model)
    idx = torch.randint(0, CFG.vocab_size, (1, 8))
    y = model(idx)[0]
    A.merge_(model)
    A.reinit_(model)
    assert rel_err(model(idx)[0], y) <= 1e-12
    for name, s in A.settings(model).items():
        assert set(s) == {"method", "r", "r_hat", "kind", "scale", "in_features", "out_features"}
        assert all(v is None or type(v) in (int, float, str) for v in s.values())


def test_merge_bf16_goes_through_fp32():
    model = tiny_model(dtype=torch.bfloat16)
    A.attach(model, "lora", r=4)
    randomize_(model)
    q = model.layers[0].self_attn.q_proj
    expected = (q.weight.float() + q.adapter.delta()).to(torch.bfloat16)  # delta() defaults to fp32
    assert q.adapter.delta().dtype == torch.float32 and q.adapter.A.dtype == torch.float32  # adapters train in fp32
    A.merge_(model)
    assert torch.equal(q.weight, expected)


@pytest.mark.parametrize("method,kind", [("lora", None), ("mora", "rope"), ("mora", "share"), ("booster", None)])
def test_fp32_adapters_on_a_bf16_base_without_autocast(method, kind):
    """A bf16 base, no autocast (CPU): fp32 adapter tensors, the branch computed in fp32 and added in bf16, fp32
    grads; the output equals the bf16 base plus the fp32 branch rounded once."""
    model = tiny_model(dtype=torch.bfloat16)
    params = A.attach(model, method, r=4, kind=kind)
    randomize_(model)
    if method == "booster":
        A.set_gates_(model, range(CFG.n_layer))
    assert {p.dtype for p in params} == {torch.float32}
    q = model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, CFG.n_embd).to(torch.bfloat16)
    branch = q.adapter(x)
    assert branch.dtype == torch.bfloat16
    ref = (q.adapter.delta() @ x.float().reshape(-1, CFG.n_embd).T).T.reshape(2, 5, -1)
    assert rel_err(branch.float(), ref) < 1e-2  # the fp32 branch, rounded to bf16 once
    idx = torch.randint(0, CFG.vocab_size, (2, 8))
    logits, loss = model(idx, idx)
    loss.backward()
    assert logits.dtype == torch.float32 and all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


def test_param_counts():
    model = tiny_model()
    shapes = [(m.in_features, m.out_features) for n, m in model.named_modules()
              if isinstance(m, A.Linear) and n.rsplit(".", 1)[-1] in A.TARGETS]
    assert len(shapes) == 7 * CFG.n_layer
    for r in (1, 8):
        A.attach(model, "lora", r=r)
        assert A.count_params(model)[0] == sum(r * (k + d) for k, d in shapes)
        A.attach(model, "mora", r=r, kind="share")
        assert A.count_params(model)[0] == sum(A.mora_rank(k, d, r, "share") ** 2 for k, d in shapes)
    A.attach(model, "booster", alpha=2.0)
    trainable, total = A.count_params(model)
    assert trainable == sum(k + d for k, d in shapes) and total == sum(p.numel() for p in model.parameters())
    A.attach(model, "lora", targets=("q_proj",), r=2)  # re-attach freezes all, old adapters included
    assert A.count_params(model)[0] == CFG.n_layer * 2 * (CFG.n_embd + CFG.n_embd)


def test_compile_no_graph_breaks():
    idx = torch.randint(0, CFG.vocab_size, (2, 16))
    for method, kind in METHODS:
        model = tiny_model()
        A.attach(model, method, kind=kind)
        torch._dynamo.reset()
        explain = torch._dynamo.explain(model)(idx)
        assert explain.graph_break_count == 0, (method, kind, explain.break_reasons)
    torch._dynamo.reset()


def test_reinit_switch_kind_and_errors():
    model = tiny_model()
    params = A.attach(model, "mora", r=8, kind="share")
    ids = [id(p) for p in params]
    randomize_(model)
    x = torch.randn(3, CFG.n_embd)
    q = model.layers[0].self_attn.q_proj
    y_share = q.adapter(x)
    A.switch_kind_(model, A.next_kind("share"))
    assert q.adapter.kind == "share_group" and A.settings(model)["layers.0.self_attn.q_proj"]["kind"] == "share_group"
    assert not torch.allclose(q.adapter(x), y_share)
    assert q.adapter.r_hat == A.mora_rank(64, 64, 8, "share")
    with pytest.raises(ValueError, match="rope"):
        A.switch_kind_(model, "rope")
    A.reinit_(model)
    assert [id(p) for p in model.parameters() if p.requires_grad] == ids
    assert all(torch.count_nonzero(p) == 0 for p in params)
    assert [A.next_kind(k, "reference") for k in A.SHARE_KINDS] == list(A.SHARE_KINDS[1:] + A.SHARE_KINDS[:1])
    assert A.next_kind("share_group") == "share"
    with pytest.raises(ValueError):
        A.next_kind("rope")
    with pytest.raises(ValueError, match="valid names"):
        A.attach(model, "lora", targets=("q_proj", "qkv_proj"))
    with pytest.raises(ValueError, match="valid names"):
        A.attach(model, "lora", targets=("lm_head",))  # the head is a plain nn.Linear: never adapted
    model = tiny_model()
    A.attach(model, "lora", r=4)
    with pytest.raises(ValueError, match="no MoRA"):
        A.switch_kind_(model, "share")


def test_attach_refuses_a_rank_that_outgrows_the_layers():
    """r at most what keeps every adapted layer's rank <= max(in, out): LoRA's r, MoRA's r_hat = √((k+d)·r)."""
    model = tiny_model()
    A.attach(model, "lora", r=64)  # q_proj 64 -> 64 is the tightest layer: r <= 64, r_hat = √(128 r) <= 64
    A.attach(model, "mora", r=32, kind="share")
    with pytest.raises(ValueError, match=r"^r=65 is too large for the adapted layers: allowed 1\.\.64 \(rank"):
        A.attach(model, "lora", r=65)
    with pytest.raises(ValueError, match=r"allowed 1\.\.32 "):
        A.attach(model, "mora", r=33, kind="share")
    with pytest.raises(ValueError, match=r"allowed 1\.\.42 "):  # k_proj 64 -> 32 alone: √(96 r) <= 64
        A.attach(model, "mora", targets=("k_proj",), r=43, kind="share")
    A.attach(model, "booster", r=1000)  # boosters are rank 1 whatever r

def test_booster_gates():
    model = tiny_model()
    params = A.attach(model, "booster", alpha=2.0)
    assert all(p.shape[0] == 1 or p.shape[1] == 1 for p in params)
    randomize_(model)  # also sets the gates to random values: set_gates_ must reset them to 0/1
    A.set_gates_(model, {1})
    idx = torch.randint(0, CFG.vocab_size, (2, 8))
    model(idx, idx)[1].backward()
    for name, lin in A._adapted(model):
        live = name.startswith("layers.1.")
        assert lin.adapter.gate.item() == float(live) and lin.adapter.scale == 2.0
        for p in (lin.adapter.A, lin.adapter.B):
            assert (p.grad.abs().sum() > 0) == live, name
    assert "layers.0.mlp.up_proj.adapter.gate" in A.adapter_state_dict(model)
    with pytest.raises(ValueError):
        A.set_gates_(model, {2})


def test_save_load_roundtrip_uses_saved_r_hat():
    idx = torch.randint(0, CFG.vocab_size, (2, 8))
    model = tiny_model()
    A.attach(model, "mora", r=8, kind="rope")
    name = "layers.1.mlp.down_proj"
    model.get_submodule(name).adapter = A.MoRA(96, 64, 20, "share", r=8)  # not what attach would compute
    randomize_(model)
    s, sd = A.settings(model), A.adapter_state_dict(model)
    y = model(idx)[0]
    fresh = tiny_model()
    params = A.load_adapters(fresh, s, sd)
    assert A.settings(fresh) == s and fresh.get_submodule(name).adapter.r_hat == 20
    assert torch.equal(fresh(idx)[0], y) and len(params) == 14
    assert not fresh.embed_tokens.weight.requires_grad
    other = tiny_model()
    A.load_adapters(other, s, None)  # attach only: the caller loads the tensors with its checkpoint
    assert A.settings(other) == s and torch.count_nonzero(other.get_submodule(name).adapter.M) == 0
    with pytest.raises(ValueError, match="mismatch"):
        A.load_adapters(tiny_model(), s, {k: v for k, v in sd.items() if "layers.0" not in k})
