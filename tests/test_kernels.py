"""
kernels.py == adapters.py's formulas, for every kind: the forward, its gradients (w.r.t. x, M) and
the in-place merge, on the shapes of the public fixtures and on the odd ones (k < r_hat,
k <= r_hat/2, d < r_hat, r_hat | k, tiny layers), in float64 (to round-off) and float32.
    python -m pytest -q tests/test_kernels.py
"""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import adapters as A
import kernels as K
from test_adapters import FIXTURES, SHAPES

# (k, d, r) of every case in ../shared/fixtures/mora_reference.pt (its README lists them)
FIXTURE_SHAPES = [(10, 200, 8), (24, 48, 2), (24, 150, 8), (32, 96, 8), (40, 40, 1), (48, 24, 2),
                  (48, 129, 8), (50, 50, 16), (64, 64, 8), (129, 48, 8), (200, 12, 8)]
ODD = [(3, 97, 8), (10, 200, 8), (2, 1, 1), (97, 3, 8), (13, 7, 3), (512, 16, 2), (1, 1, 2)]


def cases(kind, dtype=torch.float64, seed=0):
    """(x, M, k, d) per shape; x non-contiguous and with two leading dims."""
    g = torch.Generator().manual_seed(seed)
    for k, d, r in dict.fromkeys(FIXTURE_SHAPES + SHAPES + ODD):
        r_hat = A.mora_rank(k, d, r, kind)
        M = torch.randn(r_hat, r_hat, generator=g, dtype=dtype)
        x = torch.randn(3, k, 2, generator=g, dtype=dtype).transpose(1, 2)  # (3, 2, k), strided
        yield x, M, k, d


def test_fixture_shapes_are_the_fixtures():
    if os.path.exists(FIXTURES):
        cs = torch.load(FIXTURES, weights_only=True)
        assert {(c["in_features"], c["out_features"], c["r"]) for c in cs} == set(FIXTURE_SHAPES)
    shapes = [(k, d, A.mora_rank(k, d, r, "share")) for k, d, r in FIXTURE_SHAPES + SHAPES + ODD]
    assert any(k < rh for k, _, rh in shapes) and any(2 * k <= rh for k, _, rh in shapes)
    assert any(d < rh for _, d, rh in shapes) and any(k % rh == 0 for k, _, rh in shapes)


@pytest.mark.parametrize("kind", A.KINDS)
def test_training_path_equals_the_formula(kind):
    """What mora_forward runs (A.FORWARDS: kernels.<kind>) == the formula: output, dx and dM."""
    assert A.FORWARDS[kind] is getattr(K, kind, A.FORMULAS[kind])
    for x, M, k, d in cases(kind):
        outs = []
        for f in (A.FORWARDS[kind], A.FORMULAS[kind]):
            xi, Mi = x.clone().requires_grad_(), M.clone().requires_grad_()
            y = f(xi, Mi, d)
            G = torch.randn(y.shape, generator=torch.Generator().manual_seed(k * d), dtype=y.dtype)
            y.backward(G)
            outs.append((y.detach(), xi.grad, Mi.grad))
        for a, b, name in zip(*outs, ("y", "dx", "dM")):
            assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-12, (kind, k, d, name)


@pytest.mark.parametrize("kind", A.KINDS)
def test_merge_equals_the_closed_form(kind):
    """kernels.mora_add_ (in place, ΔW never built) == W + alpha·mora_delta, and mora_delta is the
    formula's matrix: x @ ΔWᵀ == formula(x)."""
    for x, M, k, d in cases(kind, seed=1):
        D = A.mora_delta(M, k, d, kind)
        assert (x @ D.T - A.FORMULAS[kind](x, M, d)).abs().max().item() <= 1e-12, (kind, k, d)
        W = torch.randn(d, k, generator=torch.Generator().manual_seed(k + d), dtype=M.dtype)
        for alpha in (1.0, -0.5):
            assert (K.mora_add_(W.clone(), M, kind, alpha) - (W + alpha * D)).abs().max() <= 1e-12


@pytest.mark.parametrize("kind", A.KINDS)
def test_fast_equals_plain_in_float32(kind):
    for x, M, k, d in cases(kind, dtype=torch.float32, seed=2):
        y, y0 = A.FORWARDS[kind](x, M, d), A.FORMULAS[kind](x, M, d)
        scale = y0.abs().max().clamp_min(1)
        assert y.dtype == torch.float32, kind
        assert ((y - y0).abs().max() / scale).item() <= 1e-5, (kind, k, d)
        W = torch.zeros(d, k)
        D = A.mora_delta(M, k, d, kind)
        err = (K.mora_add_(W, M, kind) - D).abs().max() / D.abs().max().clamp_min(1)
        assert err.item() <= 1e-6, (kind, k, d)


def test_lora_merge_equals_its_delta():
    g = torch.Generator().manual_seed(3)
    Am, Bm = torch.randn(4, 67, generator=g), torch.randn(131, 4, generator=g)
    W = torch.randn(131, 67, generator=g)
    for gate in (None, torch.tensor(0.0), torch.tensor(1.0)):
        t = {"A": Am, "B": Bm} | ({} if gate is None else {"gate": gate})
        s = {"method": "lora" if gate is None else "booster", "scale": 0.5}
        want = W + 0.25 * A.lora_delta(Am, Bm, 0.5) * (1.0 if gate is None else gate)
        assert torch.allclose(K.add_delta_(W.clone(), s, t, alpha=0.25), want, atol=1e-5)


def test_unknown_kind_is_refused_by_the_merge_kernel():
    with pytest.raises(ValueError, match="unknown MoRA kind"):
        K.mora_add_(torch.zeros(8, 8), torch.zeros(4, 4), "tile")


class Ops(TorchDispatchMode):
    """Records every aten op that runs inside it as (op, its first input, its output)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, args[0] if args else None, out))
        return out


def test_rope_backward_runs_in_the_autocast_dtype():
    """Under bf16 autocast, _BlockDiagMatmul's backward bmms run in bf16 as autograd's own would (they ran in fp32,
    half the speed on bf16 CPUs), and the gradients still come back in the inputs' fp32."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 40, generator=g, requires_grad=True)
    M = torch.randn(16, 16, generator=g, requires_grad=True)
    with torch.autocast('cpu', torch.bfloat16):
        y = A.mora_forward(x, M, 40, 'rope')  # 3 chunks of 16 (wrapped), cut to 40
    with Ops() as rec:
        y.float().pow(2).sum().backward()
    bmms = [a.dtype for op, a, _ in rec.ops if op is torch.ops.aten.bmm.default]
    assert bmms == [torch.bfloat16] * 2 and x.grad.dtype == M.grad.dtype == torch.float32
    ref_x, ref_M = x.detach().clone().requires_grad_(), M.detach().clone().requires_grad_()
    A.mora_forward(ref_x, ref_M, 40, 'rope').pow(2).sum().backward()  # fp32: equal to bf16 precision
    for a, b in ((x.grad, ref_x.grad), (M.grad, ref_M.grad)):
        assert (a - b).norm() <= 0.05 * b.norm()


def test_mora_branch_stays_in_the_autocast_dtype():
    """A MoRA layer under bf16 autocast takes the bf16 activation as it is (no fp32 copy of x in, no cast of
    its output back: the casts cost more than the branch's bmms on a CPU); without autocast the branch runs in
    M's fp32 and returns x's dtype."""
    layer = A.MoRA(40, 40, 16, 'rope')
    torch.nn.init.normal_(layer.M)
    x = torch.randn(5, 40).bfloat16().requires_grad_()
    with Ops() as rec:
        with torch.autocast('cpu', torch.bfloat16):
            y = layer(x)
        y.sum().backward()
    up = [out for op, _, out in rec.ops if op is torch.ops.aten._to_copy.default
          and out.dtype == torch.float32 and out.dim() == 2 and out.shape[1] == 40]
    assert y.dtype == torch.bfloat16 and not up and layer.M.grad.dtype == torch.float32  # no fp32 (N, 40) copy
    y32 = layer(x.detach())  # no autocast: fp32 inside, bf16 out
    assert y32.dtype == torch.bfloat16 and (y32.float() - y.float()).abs().max() < 0.1 * y.float().abs().max()
