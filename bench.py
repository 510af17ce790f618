"""
Adapter benchmarks, CPU fp32 by default (a script, not a test):
  (a) merge: W += ΔW (in place, and built first, then added) on LLaMA-7B layer shapes, against one same-shaped
      W.add_(W2), the memory-bound floor of any merge;
  (b) step: forward + backward + AdamW step of a small LLaMA with LoRA / MoRA adapters, median ms, and the
      matmul-FLOP ratio against LoRA counted with torch.utils.flop_counter.FlopCounterMode; MoRA rope also as the
      authors' code computes it (authors_rope below), for the "faster than the reference" comparison.
  (c) modes: the real train.py for each of the six modes on that small LLaMA (byte vocab, Shakespeare from
      `python data/text/prepare.py`), in fp32 and in the default dtype (auto: bf16 autocast on bf16 CPUs), eager
      (--compile: compiled too): tok/s of the last log interval and its ratio to fp32, peak RSS of the process.
  (d) ops: aten ops (kernels, views excluded) per training step of a SmolLM2-shaped model under bf16 autocast, per
      mode: on a GPU an eager step of a model this small costs about its number of kernel launches.
  (e) memory: peak memory of one training step (fwd + bwd + AdamW) of SmolLM2-135M at 1 x 2048 tokens per mode and
      option (autocast dtype, base_dtype, grad_checkpoint, loss_chunk), each in a fresh process (peak RSS on the
      CPU, max_memory_allocated on CUDA), and the activation bytes autograd saves per token.
  (f) gpu_tier: the one-GPU session of MoRA Table 2 in one command (issue 18): the memory_gpu_* runs in priority
      order, --parallel at a time on one GPU, compiled, to 800 steps or until --table_s runs out (then SIGINT: they
      save and stop, the step each reached is kept), metrics + config copied to assets/memory_gpu/<run>/; then the
      speed of every mode, one run at a time, compiled, bf16, until --speed_s runs out: tok/s, MFU, graph breaks
      and recompiles (TORCH_LOGS) on SmolLM2-135M at 128 x 73 and a Llama-3.2-1B-shaped model at 8 x 2048.
      --dry_run does the same on the CPU with a tiny model in a minute (the orchestration, not the numbers).
  (g) attention: model.attention (the formula in fp32 on a CPU) against SDPA's CPU kernel, forward + backward.
    python bench.py --what all            # (a) + (b); --threads 2 (default), --quick for a short run
    python bench.py --what step --compile # (b) with torch.compile (~15 min on 2 CPU cores, mostly compiling)
    python bench.py --what modes          # (c), ~5 min on 2 CPU cores (--compile: ~25 min); --device=cuda
    python bench.py --what ops            # (d), ~15 s
    python bench.py --what memory         # (e), 13 rows, 3-10 min each on 2 busy cores (--rows=0,3: today's step, the
                                          # issue's); needs data/smollm2/prepare.py and
                                          # data/text/prepare.py --tokenizer=data/smollm2/SmolLM2-135M-Instruct
    python bench.py --what gpu_tier --device=cuda   # (f), after data/smollm2/prepare.py and
                                                    # data/memory/prepare.py --n_pairs=1000; ~9 min of one GPU
    python bench.py --what gpu_tier --dry_run       # (f) on the CPU, tiny model, ~1-2 min
    python bench.py --what attention      # (g) model.attention vs SDPA on the CPU, ~20 s
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import adapters
import kernels
from model import LLaMA, ModelConfig, peak_bytes


def timeit(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_merge(args):
    shapes = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out): q/k/v/o, gate/up, down of LLaMA-7B
    ranks = [8] if args.quick else [8, 256]
    print(f"\n(a) merge W += ΔW, fp32, {torch.get_num_threads()} threads, median of {args.repeats}. floor: one "
          "W.add_(W2) of the same shape; in-place: what merge_ runs (mora_add_ / addmm_); "
          "materialised: W.add_(ΔW), ΔW built first (kernels.mora_add_ on zeros / lora_delta)")
    print(f"{'layer (in->out)':>16} {'r':>4} {'method':>17} {'r_hat':>6} {'floor ms':>9} {'in-place':>9} {'ratio':>6} "
          f"{'materialised':>13} {'ratio':>6}")
    g = torch.Generator().manual_seed(0)
    for k, d in shapes:
        W, W2 = torch.randn(d, k, generator=g), torch.randn(d, k, generator=g)
        for r in ranks:
            for method in ("lora",) + adapters.KINDS:
                if method == "lora":
                    r_hat, A, B = "-", torch.randn(r, k, generator=g), torch.randn(d, r, generator=g)
                    in_place = lambda: W.addmm_(B, A, alpha=2.0 / r)  # noqa: E731
                    materialised = lambda: W.add_(adapters.lora_delta(A, B, 2.0 / r))  # noqa: E731
                else:
                    r_hat = adapters.mora_rank(k, d, r, method)
                    M = torch.randn(r_hat, r_hat, generator=g) * 0.01
                    in_place = lambda: adapters.mora_add_(W, M, method)  # noqa: E731
                    # ΔW built first by the fast path on zeros (as _Adapter.delta), then added
                    delta = lambda: kernels.mora_add_(torch.zeros_like(W), M, method)  # noqa: E731
                    materialised = lambda: W.add_(delta())  # noqa: E731
                floor = timeit(lambda: W.add_(W2, alpha=1e-6), args.repeats)  # re-measured: the machine is shared
                t1, t2 = timeit(in_place, args.repeats), timeit(materialised, args.repeats)
                print(f"{f'{k}->{d}':>16} {r:>4} {method:>17} {r_hat:>6} {floor * 1e3:>9.1f} {t1 * 1e3:>9.1f} "
                      f"{t1 / floor:>6.2f} {t2 * 1e3:>13.1f} {t2 / floor:>6.2f}")


def authors_rope(x, M, d, _tables={}):
    """MoRA rope as the authors' code computes it (peft-mora lora/layer.py `_apply_mora`, mora_type 6), ported op
    for op: wrap-pad x, rotate every chunk's activations (rotate-half, tables cached per layer as theirs),
    one matmul with M over all n chunks, then cut or tile to d. Same function as adapters.rope."""
    r, in_f = M.shape[0], x.shape[-1]
    sum_inter = rb1 = -(-in_f // r)
    if in_f % r != 0:
        x = torch.cat([x, x[..., :r - in_f % r]], dim=-1)
    in_x = x.view(*x.shape[:-1], sum_inter, r)
    if (r, rb1) not in _tables:
        inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
        emb = torch.outer(torch.arange(rb1), inv_freq).repeat(1, 2)
        _tables[r, rb1] = emb.cos().unsqueeze(0).to(x.dtype), emb.sin().unsqueeze(0).to(x.dtype)
    cos, sin = _tables[r, rb1]
    rh_in_x = torch.cat((-in_x[..., r // 2:], in_x[..., :r // 2]), dim=-1)
    in_x = in_x * cos + rh_in_x * sin
    out_x = torch.nn.functional.linear(in_x, M).view(*x.shape[:-1], -1)[..., :d]
    if out_x.shape[-1] < d:
        out_x = torch.cat([out_x] * -(-d // out_x.shape[-1]), dim=-1)[..., :d]
    return out_x


def bench_step(args):
    cfg = ModelConfig(vocab_size=8192, block_size=256, n_layer=8, n_head=8, n_kv_head=4, n_embd=512,
                      intermediate_size=1376)
    B, T = (4, 128) if args.quick else (8, 256)
    runs = [("lora", None, 8), ("mora", "share", 8), ("mora", "rope", 8), ("mora", "authors_rope", 8)]
    if not args.quick:
        runs += [("lora", None, 256), ("mora", "share", 256), ("mora", "rope", 256), ("mora", "authors_rope", 256)]
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    print(f"\n(b) train step (fwd + bwd + AdamW), LLaMA d={cfg.n_embd} L={cfg.n_layer} MLP {cfg.intermediate_size} "
          f"GQA {cfg.n_head}/{cfg.n_kv_head} vocab {cfg.vocab_size}, batch {B}x{T}, fp32, "
          f"{torch.get_num_threads()} threads, {'compiled' if args.compile else 'eager'}, {args.steps} steps each after 2 "
          "warm-up, round-robin")
    print(f"{'method':>18} {'r':>4} {'trainable':>10} {'min ms':>8} {'median ms':>10} {'time/LoRA':>10} "
          f"{'(median)':>9} {'FLOPs/LoRA':>11}")
    steps, flops, rope_ours = [], [], adapters.FORWARDS["rope"]
    for method, kind, r in runs:
        torch.manual_seed(0)
        model = LLaMA(cfg)
        params = adapters.attach(model, method, r=r, alpha=2.0 * r, kind="rope" if kind == "authors_rope" else kind)
        with torch.no_grad():
            for p in params:  # a trained-looking adapter (zero M / B would not change the work done)
                p.normal_(0, 0.01)
        opt = torch.optim.AdamW(params, lr=1e-4)
        rope = authors_rope if kind == "authors_rope" else rope_ours

        def step(model=torch.compile(model) if args.compile else model, opt=opt, rope=rope):
            adapters.FORWARDS["rope"] = rope  # the MoRA modules dispatch through this table
            model(x, y)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        adapters.FORWARDS["rope"] = rope
        with FlopCounterMode(display=False) as fc:
            loss = model(x, y)[1]
            loss.backward()
        opt.zero_grad(set_to_none=True)
        if rope is authors_rope:  # same function, so the same loss as adapters.rope
            adapters.FORWARDS["rope"] = rope_ours
            with torch.no_grad():
                torch.testing.assert_close(model(x, y)[1], loss)
        steps.append((step, adapters.count_params(model)[0]))
        flops.append(fc.get_total_flops())
    times = [[] for _ in runs]
    for i in range(args.steps + 2):  # round-robin, so load from other processes hits every method alike
        for (step, _), ts in zip(steps, times):
            t0 = time.perf_counter()
            step()
            if i >= 2:  # the first two are warm-up
                ts.append(time.perf_counter() - t0)
    adapters.FORWARDS["rope"] = rope_ours
    base = {}
    for (method, kind, r), (_, n_train), ts, fl in zip(runs, steps, times, flops):
        lo, med = min(ts) * 1e3, statistics.median(ts) * 1e3  # min: least disturbed by other processes
        base.setdefault(r, (lo, med, fl))
        name = method if kind is None else f"mora {kind}"
        print(f"{name:>18} {r:>4} {n_train:>10,} {lo:>8.1f} {med:>10.1f} {lo / base[r][0]:>10.3f} "
              f"{med / base[r][1]:>9.3f} {fl / base[r][2]:>11.3f}")


def bench_modes(args):
    """train.py as users run it, one subprocess per (mode, compile); os.wait4 gives that process's own peak RSS."""
    shape = ['--init_from=scratch', '--tokenizer=byte', '--dataset=text/shakespeare_byte', '--n_layer=8',
             '--n_head=8', '--n_kv_head=4', '--n_embd=512', '--intermediate_size=1376', '--block_size=256',
             '--batch_size=8', '--r=8', f'--device={args.device}', '--max_iters=8', '--log_interval=4',
             '--eval_interval=1000', '--eval_iters=1', '--warmup_iters=2']
    modes = {'full': [], 'lora': [], 'mora': ['--mora_kind=share'], 'mora_rope': ['--mora_kind=rope'],
             'relora': ['--merge_every=4'], 'remora': ['--merge_every=4'], 'xgblora': ['--booster_steps=4']}
    print(f"\n(c) train.py per mode: LLaMA d=512 L=8 MLP 1376 GQA 8/4, byte vocab (320), batch 8x256, "
          f"{args.device}, steps 5-8 (after compile and warm-up), restarts/boosters every 4 steps")
    print(f"{'mode':>10} {'compile':>8} {'dtype':>9} {'trainable':>11} {'ms/iter':>9} {'tok/s':>8} "
          f"{'peak RSS MB':>12} {'tok/s / first dtype':>20}")
    env = {**os.environ, 'OMP_NUM_THREADS': str(args.threads)}
    dtypes = args.dtypes.split(',')  # dtype=auto: what train.py picks here (bf16 autocast on bf16 CPUs)
    for name, extra in modes.items():
        for compile_ in (False, True) if args.compile else (False,):
            first = None
            for dtype in dtypes:
                with tempfile.TemporaryDirectory() as out:
                    cmd = [sys.executable, 'train.py', *shape, f"--mode={name.split('_')[0]}", *extra,
                           f'--compile={compile_}', f'--dtype={dtype}', f'--out_dir={out}']
                    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True)
                    log = proc.stdout.read()
                    _, status, usage = os.wait4(proc.pid, 0)
                    if status:
                        print(f"{name:>10} {compile_!s:>8} {dtype:>9} failed:\n{log[-2000:]}")
                        continue
                    with open(os.path.join(out, 'metrics.jsonl')) as f:
                        last = [r for r in map(json.loads, f) if 'tok_s' in r][-1]
                    with open(os.path.join(out, 'config.json')) as f:
                        resolved = json.load(f)['dtype']
                trainable = next(line for line in log.splitlines() if line.startswith('trainable')).split()[2]
                first = first or last['tok_s']
                shown = dtype if dtype == resolved else f"{dtype}={resolved[:4]}"
                print(f"{name:>10} {compile_!s:>8} {shown:>9} {trainable:>11} {last['ms']:>9.0f} "
                      f"{last['tok_s']:>8.0f} {usage.ru_maxrss / 1024:>12.0f} {last['tok_s'] / first:>20.2f}")


def bench_attention(args):
    """(g): model.attention (on a CPU: the formula in fp32) against F.scaled_dot_product_attention (the kernel torch
    picks: flash on a CPU), forward + backward at SmolLM2's 9 heads x 64, batch x T = 1152 tokens, fp32 and bf16
    inputs (bf16 under autocast, as training runs it); median ms of --repeats after one warm-up."""
    import model as model_py
    print(f"\n(g) causal attention fwd+bwd, 9 heads x 64, {torch.get_num_threads()} threads, median ms")
    print(f"{'B x T':>10} {'dtype':>9} {'SDPA':>8} {'ours':>8} {'ours / SDPA':>12}")
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    for T in (72, 256, 1152):
        for dt in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            qkv = [torch.randn(1152 // T, 9, T, 64, generator=g).to(dt).requires_grad_() for _ in range(3)]
            ms = []
            for fn in (sdpa, model_py.attention):
                def run():
                    with torch.autocast('cpu', torch.bfloat16, enabled=dt == torch.bfloat16):
                        y = fn(*qkv)
                    y.float().sum().backward()
                run()  # warm-up
                ms.append(1000 * timeit(run, args.repeats))
            print(f"{1152 // T:>4} x {T:<4} {str(dt)[6:]:>9} {ms[0]:>8.2f} {ms[1]:>8.2f} {ms[1] / ms[0]:>12.2f}")


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that reach the kernels (after autograd and autocast), views and allocations excluded."""
    FREE = {'view', '_unsafe_view', 't', 'transpose', 'expand', 'as_strided', 'slice', 'select', 'unsqueeze',
            'squeeze', 'permute', 'detach', 'alias', 'split', 'unbind', 'diagonal', 'unflatten', 'empty', 'empty_like',
            'new_empty', 'empty_strided', 'new_empty_strided', 'lift_fresh'}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket.__name__ not in self.FREE
        return func(*args, **(kwargs or {}))


def bench_ops(args):
    """(d): ops per forward + backward of SmolLM2-135M's shape (30 layers, width 576), byte vocab, bf16 autocast."""
    cfg = ModelConfig(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536, vocab_size=256,
                      block_size=73)
    print(f"\nops per training step (fwd + bwd), {cfg.n_layer} layers x 7 adapted projections, bf16 autocast")
    n_full = None
    for name, method, kind in [("full", None, None), ("lora r8", "lora", None), ("mora share r8", "mora", "share"),
                               ("mora rope r8", "mora", "rope")]:
        torch.manual_seed(0)
        model = LLaMA(cfg)
        if method:
            adapters.attach(model, method, r=8, kind=kind)
        x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
        with OpCounter() as ops:
            with torch.autocast("cpu", torch.bfloat16):
                _, loss = model(x, x)
            loss.backward()
        n_full = n_full or ops.n
        extra = f" ({(ops.n - n_full) / (7 * cfg.n_layer):+.1f} per adapter)" if method else ""
        print(f"{name:>14} {ops.n:>6}{extra}")


class SavedBytes(saved_tensors_hooks):
    """Counts the bytes of the activations autograd saves for backward: tensors with a dimension of T tokens (weights
    and autocast's weight copies have none), each storage once, the model's own tensors (RoPE tables) excluded.
    With torch.utils.checkpoint only its inputs are saved (block inputs, the loss's hidden states), and counted."""

    def __init__(self, T, model):
        self.total, seen = 0, {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

        def pack(t):
            s = t.untyped_storage()
            if T in t.shape and s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                self.total += s.nbytes()
            return t  # the tensor itself: counting changes nothing that is kept
        super().__init__(pack, lambda t: t)


def memory_step(spec):
    """(e), in a fresh process: one training step as train.py runs it, then the saved bytes per token, as JSON."""
    from data import Dataset
    dev = spec["device"]
    row = {"baseline": peak_bytes(dev)}  # python + torch, nothing built yet
    model = LLaMA.from_pretrained(spec["base"], getattr(torch, spec["base_dtype"])).to(dev)
    model.grad_checkpoint, model.loss_chunk = spec["grad_checkpoint"], spec["loss_chunk"]
    if spec["mode"] == "full":
        params = list(model.parameters())
    else:
        method = {"xgblora": "booster"}.get(spec["mode"], spec["mode"])
        params = adapters.attach(model, method, r=8, alpha=16.0 if method == "lora" else 2.0, kind=spec["kind"])
        if method == "booster":  # one booster: n_layer // 3 blocks gated on, as train.py's default
            adapters.set_gates_(model, range(model.config.n_layer // 3))
    for p in params:
        p.requires_grad_(True)
    n_param = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    row["loaded"] = peak_bytes(dev)
    T = spec["tokens"]
    x, y = (t.to(dev) for t in Dataset(spec["data"]).get_batch("train", 1, T, 1337, 0))
    ctx = nullcontext() if spec["dtype"] == "float32" else torch.autocast(dev, getattr(torch, spec["dtype"]))
    saved = SavedBytes(T, model)
    with ctx, saved:
        _, loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    row.update(peak=peak_bytes(dev), loss=loss.item(), n_param=n_param, n_train=sum(p.numel() for p in params))
    row["saved_per_token"] = saved.total / T
    print(json.dumps(row))


def bench_memory(args):
    """(e): each configuration in its own process, so that no peak carries over from the one before."""
    base = {"mode": "lora", "kind": None, "dtype": "float32", "base_dtype": "float32", "grad_checkpoint": False,
            "loss_chunk": 0, "device": args.device, "tokens": 2048, "base": "data/smollm2/SmolLM2-135M-Instruct",
            "data": "data/text/shakespeare_smollm2"}
    chunk, half = {"loss_chunk": args.loss_chunk}, {"dtype": "bfloat16", "base_dtype": "bfloat16"}
    ckpt, amp = {"grad_checkpoint": True}, {"dtype": "bfloat16"}  # full fine-tuning: bf16 autocast, fp32 weights
    runs = [{}, chunk, {**half, **chunk}, {**half, **chunk, **ckpt},  # LoRA r8: today's step, then option by option
            {"mode": "mora", "kind": "rope", **half, **chunk}, {"mode": "mora", "kind": "rope", **half, **chunk, **ckpt},
            {"mode": "full", **amp, **chunk}, {"mode": "full", **amp, **chunk, **ckpt},
            ckpt, amp, half, {"mode": "xgblora", **half, **chunk, **ckpt}, {"mode": "full"}]
    runs = [runs[int(i)] for i in args.rows.split(",")] if args.rows else runs
    print(f"\n(e) one training step of SmolLM2-135M at 1 x {base['tokens']} tokens ({base['data']}), {args.device}, "
          f"r = 8, each in a fresh process; peak = {'max_memory_allocated' if args.device == 'cuda' else 'peak RSS'}, "
          "baseline = the process before loading the model")
    print(f"{'mode':>12} {'dtype':>8} {'base':>8} {'ckpt':>5} {'chunk':>5} {'peak MB':>8} {'- baseline':>10} {'/ first':>7} "
          f"{'loaded MB':>9} {'saved KB/token':>14} {'loss':>7}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    first = None
    for run in runs:
        spec = {**base, **run}
        out = subprocess.run([sys.executable, __file__, "--memory_step", json.dumps(spec)], env=env,
                             capture_output=True, text=True)
        if out.returncode:
            print(f"{spec['mode']} failed:\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.splitlines()[-1])
        first = first or r["peak"]
        name = spec["mode"] + (f" {spec['kind']}" if spec["kind"] else "")
        print(f"{name:>12} {spec['dtype'][:8]:>8} {spec['base_dtype'][:8]:>8} {spec['grad_checkpoint']!s:>5} "
              f"{spec['loss_chunk']:>5} {r['peak'] / 2**20:>8.0f} {(r['peak'] - r['baseline']) / 2**20:>10.0f} "
              f"{r['peak'] / first:>7.2f} {r['loaded'] / 2**20:>9.0f} {r['saved_per_token'] / 1024:>14.1f} "
              f"{r['loss']:>7.4f}", flush=True)


# (f) MoRA Table 2 on one GPU, in priority order (issue 18): r8 at two LRs each (rope's first Adam step moves dW
# ~sqrt(6) less than share's, so rope also at 3e-3), then the other rows. What the budget leaves out is "not run".
TABLE2 = [('lora_r8_lr1e-3', 'lora', ['--learning_rate=1e-3']),
          ('mora_share_r8_lr1e-3', 'mora', ['--mora_kind=share', '--learning_rate=1e-3']),
          ('mora_rope_r8_lr3e-3', 'mora', ['--mora_kind=rope', '--learning_rate=3e-3']),
          ('lora_r8_lr3e-3', 'lora', ['--learning_rate=3e-3']),
          ('mora_share_r8_lr3e-3', 'mora', ['--mora_kind=share', '--learning_rate=3e-3']),
          ('mora_rope_r8_lr1e-3', 'mora', ['--mora_kind=rope', '--learning_rate=1e-3']),
          ('full_lr1e-4', 'full', []), ('mora_r256', 'mora_r256', []), ('lora_r256', 'lora_r256', []),
          ('remora_r8', 'remora', []), ('xgblora', 'xgblora', [])]
SPEED_MODES = {'full': ['--mode=full'], 'lora': ['--mode=lora'], 'mora_share': ['--mode=mora', '--mora_kind=share'],
               'mora_rope': ['--mode=mora', '--mora_kind=rope'], 'relora': ['--mode=relora', '--merge_every=10'],
               'remora': ['--mode=remora', '--merge_every=10'], 'xgblora': ['--mode=xgblora', '--booster_steps=10']}
LLAMA32_1B = ['--n_layer=16', '--n_embd=2048', '--n_head=32', '--n_kv_head=8', '--intermediate_size=8192',
              '--rope_theta=500000.0']  # Llama-3.2-1B's body; vocab: the tokenizer's (SmolLM2's 49,152, not 128,256)


def run_until(cmd, deadline, log_path, env):
    """Start train.py; returns (Popen, log file). The caller SIGINTs it at the deadline (it saves and exits 130)."""
    f = open(log_path, 'w')
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, text=True), f


def last_eval(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, 'metrics.jsonl'))]
    evals = [r for r in rows if 'char_acc' in r]
    return rows, evals


def tiny_setup(work):
    """--dry_run: a tiny random HF base (byte vocab) and a byte memory dataset, so the CPU runs the real configs."""
    base, data = os.path.join(work, 'tiny_base'), os.path.join(work, 'pairs')
    torch.manual_seed(0)
    LLaMA(ModelConfig(vocab_size=320, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      intermediate_size=96)).save_pretrained(base)
    subprocess.run([sys.executable, 'data/memory/prepare.py', '--n_pairs=16', '--tokenizer=byte', f'--out_dir={data}'],
                   check=True, capture_output=True)
    return [f'--init_from={base}', '--tokenizer=byte', f'--dataset={data}', '--batch_size=4', '--block_size=96',
            '--eval_iters=1', '--max_iters=400', '--eval_interval=3', '--log_interval=1', '--booster_steps=2',
            '--booster_blocks=1', '--r=4', '--compile=False'], base  # 400 steps: the deadline's SIGINT stops them


def bench_gpu_tier(args):
    work = tempfile.mkdtemp(prefix='gpu_tier_') if args.dry_run else 'out/gpu_tier'
    os.makedirs(work, exist_ok=True)
    assets = os.path.join(work, 'assets') if args.dry_run else 'assets/memory_gpu'
    tiny, tiny_base = tiny_setup(work) if args.dry_run else ([], None)
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    # 1. Table 2: --parallel runs at a time, in priority order, each to 800 steps or the phase's deadline
    deadline, queue, running, done, not_run = time.time() + args.table_s, list(TABLE2), [], [], []
    print(f"\n(e) gpu_tier: Table 2, {len(queue)} runs, {args.parallel} at a time, {args.table_s} s")
    while queue or running:
        while queue and len(running) < args.parallel and time.time() < deadline - 30:  # 30 s: no run starts to die
            name, config, extra = queue.pop(0)
            out = os.path.join(work, name)
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, 'train.py', f'config/memory_gpu_{config}.py', *extra, f'--device={args.device}',
                   *tiny, *(['--merge_every=2'] if tiny and config == 'remora' else []), f'--out_dir={out}']
            running.append((name, out, *run_until(cmd, deadline, out + '.log', env)))
            print(f"  start {name}: {' '.join(cmd[2:])}", flush=True)
        if queue and time.time() >= deadline - 30:
            not_run, queue = [q[0] for q in queue], []
        time.sleep(0.2 if args.dry_run else 2)
        for item in list(running):
            name, out, proc, f = item
            if proc.poll() is None and time.time() >= deadline:
                proc.send_signal(signal.SIGINT)  # saves ckpt.pt and exits 130 at the next step boundary
                proc.wait()
            if proc.poll() is not None:
                f.close()
                running.remove(item)
                done.append((name, out, proc.returncode))
    print(f"{'run':>22} {'exit':>5} {'step':>5}  char acc % at each eval")
    for name, out, code in done:
        rows, evals = last_eval(out) if os.path.exists(os.path.join(out, 'metrics.jsonl')) else ([], [])
        steps = max([r['iter'] for r in rows], default=0)
        why = '' if code in (0, 130) else open(out + '.log').read().strip().splitlines()[-1]  # 130: the SIGINT
        print(f"{name:>22} {code:>5} {steps:>5}  " + ' '.join(f"{r['iter']}:{100 * r['char_acc']:.1f}" for r in evals)
              + why)
        if rows:  # what the README table cites: the metrics and the config of exactly this run
            os.makedirs(os.path.join(assets, name), exist_ok=True)
            for file in ('metrics.jsonl', 'config.json'):
                shutil.copy(os.path.join(out, file), os.path.join(assets, name, file))
    print(f"  not run (budget): {', '.join(not_run) or 'none'}")
    # 2. speed: one run at a time, compiled (the graphs of the SmolLM2 shape are in Inductor's cache by now)
    if args.dry_run:
        shapes = {'tiny': [*tiny, '--max_iters=12', '--eval_interval=1000', '--log_interval=4', '--char_acc_pairs=0']}
    else:
        shapes = {'smollm2 128x73': ['--init_from=data/smollm2/SmolLM2-135M-Instruct', '--batch_size=128',
                                     '--block_size=73', '--dataset=memory/smollm2_n1000_s1337'],
                  'llama3.2-1b 8x2048': ['--init_from=scratch', '--tokenizer=data/smollm2/SmolLM2-135M-Instruct',
                                         '--dataset=text/shakespeare_smollm2', *LLAMA32_1B, '--batch_size=8',
                                         '--block_size=2048', '--train_rest=False']}
        shapes = {k: [*v, '--max_iters=30', '--log_interval=10', '--eval_interval=1000', '--eval_iters=1',
                      '--warmup_iters=5', '--compile=True', '--dtype=bfloat16', f'--device={args.device}']
                  for k, v in shapes.items()}
    deadline = time.time() + args.speed_s
    print(f"\nspeed, one run at a time, {args.speed_s} s: last log interval; graph breaks / recompiles from TORCH_LOGS")
    print(f"{'shape':>20} {'mode':>11} {'ms/iter':>8} {'tok/s':>9} {'mfu %':>6} {'breaks':>6} {'recompiles':>10}")
    skipped = []
    for shape, shape_args in shapes.items():
        for mode, mode_args in SPEED_MODES.items():
            if time.time() > deadline:
                skipped.append(f"{shape} {mode}")
                continue
            out = os.path.join(work, 'speed', f"{shape.split()[0]}_{mode}")
            cmd = [sys.executable, 'train.py', *shape_args, *mode_args, f'--out_dir={out}']
            r = subprocess.run(cmd, capture_output=True, text=True,
                               env={**env, 'TORCH_LOGS': 'graph_breaks,recompiles'})
            if r.returncode:
                print(f"{shape:>20} {mode:>11} failed: {(r.stderr or r.stdout).strip().splitlines()[-1]}")
                continue
            last = [row for row in map(json.loads, open(os.path.join(out, 'metrics.jsonl'))) if 'tok_s' in row][-1]
            breaks = len(re.findall(r'Graph break', r.stderr))
            recompiles = len(re.findall(r'Recompiling function', r.stderr))
            mfu = f"{100 * last['mfu']:.1f}" if 'mfu' in last else '-'
            print(f"{shape:>20} {mode:>11} {last['ms']:>8.1f} {last['tok_s']:>9.0f} {mfu:>6} {breaks:>6} {recompiles:>10}")
    print(f"  not run (budget): {', '.join(skipped) or 'none'}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", choices=["merge", "step", "modes", "ops", "memory", "gpu_tier", "attention", "all"], default="all")
    ap.add_argument("--device", default="cpu", help="modes and memory: cpu or cuda")
    ap.add_argument("--loss_chunk", type=int, default=512, help="memory: loss_chunk of the chunked rows")
    ap.add_argument("--rows", default="", help="memory: only these rows of the run list, e.g. 0,3 (default all)")
    ap.add_argument("--memory_step", default="", help=argparse.SUPPRESS)  # (e)'s worker: one configuration as JSON
    ap.add_argument("--dtypes", default="float32,auto", help="modes: train.py's dtype per row (ratios to the first)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="r=8 only, smaller batch, fewer repeats")
    ap.add_argument("--compile", action="store_true", help="step: torch.compile each model (compiles in warm-up); modes: compiled rows too")
    ap.add_argument("--parallel", type=int, default=4, help="gpu_tier: Table 2 runs at a time on the one GPU")
    ap.add_argument("--table_s", type=int, default=390, help="gpu_tier: seconds for the Table 2 runs")
    ap.add_argument("--speed_s", type=int, default=150, help="gpu_tier: seconds for the speed runs")
    ap.add_argument("--dry_run", action="store_true", help="gpu_tier: the orchestration on the CPU, tiny model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_step:
        memory_step(json.loads(args.memory_step))
        sys.exit(0)
    print(f"torch {torch.__version__}, {os.cpu_count()} cpus, {args.threads} threads, "
          f"load average at start {os.getloadavg()[0]:.2f} (other processes skew the timings)")
    args.repeats, args.steps = (3, 3) if args.quick else (5, 7)
    if args.what in ("merge", "all"):
        bench_merge(args)
    if args.what in ("step", "all"):
        if args.compile:  # a graph per model (and per rope forward): more than dynamo's default of 8
            torch._dynamo.config.recompile_limit = 64
        bench_step(args)
    if args.what == "modes":
        bench_modes(args)
    if args.what == "ops":
        bench_ops(args)
    if args.what == "memory":
        bench_memory(args)
    if args.what == "attention":
        bench_attention(args)
    if args.what == "gpu_tier":
        if args.dry_run:
            args.table_s, args.speed_s, args.device = 75, 150, 'cpu'
        bench_gpu_tier(args)
