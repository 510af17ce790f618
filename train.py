"""
One training loop for full fine-tuning, LoRA, MoRA, ReLoRA, ReMoRA and XGBLoRA (SPEC sections 1-4).

$ python train.py config/memory_mora.py                       # one process, CPU or one GPU
$ python train.py config/memory_lora.py --max_iters=100       # a config file, then --key=value
$ torchrun --standalone --nproc_per_node=2 train.py config/pretrain_remora.py   # DDP
$ torchrun --standalone --nproc_per_node=8 train.py config/alpaca_lora.py --parallel=fsdp  # FSDP2
$ python train.py --help                                      # every key with its comment
"""
import functools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext

import torch

import adapters
import checkpoint
import fsdp
from configurator import configure, die, setup
from data import Dataset
from eval import build_model, char_accuracy, estimate_loss, inference_model, memory_pairs
from model import RMSNorm, peak_bytes, peak_flops, resolve_dtypes, scratch_config
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'  # checkpoint ckpt.pt, config.json and metrics.jsonl go here
eval_interval = 100  # iterations between evals and checkpoints
log_interval = 10  # iterations between log lines
eval_iters = 20  # val batches per loss estimate (fixed order: the same number every time)
char_acc_pairs = 0  # memory datasets: pairs scored by greedy decoding per eval (0 = off, -1 = all)
eval_only = False  # evaluate once and exit
note = ''  # printed at the start and the end of the run (configs: what it does and does not show)
wandb_log = False  # also log metrics.jsonl rows to Weights & Biases (pip install wandb; or offline)
wandb_project = 'mora-gpt'  # wandb project
wandb_run_name = ''  # wandb run name ('' = the out_dir's name)
resume = False  # continue the run in out_dir exactly where its checkpoint stopped
init_from = 'scratch'  # 'scratch' | an HF checkpoint dir (data/smollm2/...) | a hub id (owner/name)
# data
dataset = 'memory'  # data/<dataset>/ as written by a data/*/prepare.py script
tokenizer = ''  # 'byte' | 'tiktoken:<name>' | a checkpoint dir or hub id ('' = init_from's / byte)
batch_size = 16  # sequences per micro-batch (per process)
block_size = 128  # tokens per sequence
gradient_accumulation_steps = 1  # micro-batches per optimizer step, over all processes
# model shape (init_from='scratch' only)
n_layer = 4  # transformer blocks
n_head = 4  # attention heads
n_kv_head = 4  # key/value heads (grouped-query attention when < n_head)
n_embd = 128  # model width
intermediate_size = 352  # SwiGLU hidden size
rope_theta = 10000.0  # RoPE base
# method
mode = 'mora'  # full | lora | mora | relora | remora | xgblora
targets = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')  # adapted
r = 8  # LoRA rank; MoRA picks r_hat = sqrt((in+out)*r) for the same parameter count
alpha = 16.0  # LoRA scale = alpha / r (MoRA has no alpha)
mora_kind = 'auto'  # one of adapters.KINDS (share, rope, ...) or auto (rope if r <= 32, else share)
dropout = 0.0  # dropout on the adapter input
train_rest: bool | None = None  # adapter modes train embeddings, norms, lm_head too (None: scratch)
# merge-and-restart (relora, remora)
merge_every = 0  # optimizer steps between merges (0 = never)
restart_warmup = 50  # steps of linear LR re-warm after each restart
remora_cycle = 'paper'  # 'paper': share <-> share_group; 'reference': the MoRA code's 4-kind cycle
optimizer_reset = 'clear'  # 'clear' adapter moments and step at a restart, or 'prune' 99% (ReLoRA)
warm_start = 0  # full-rank steps before the adapters take over (ReLoRA paper; 0 = none, as in MoRA)
lr_envelope = 'jagged'  # 'jagged': one cosine for the run (ReLoRA); 'rewarm': one per period (MoRA)
# xgblora
booster_steps = 50  # optimizer steps per rank-1 booster
booster_blocks = 0  # blocks sampled per booster (0 = n_layer // 3, the paper's best)
booster_alpha = 1.0  # boosting rate: W += booster_alpha * dW at each booster merge
booster_scale = 2.0  # booster LoRA scale s
# optimizer
learning_rate = 3e-4  # peak learning rate
max_iters = 1000  # optimizer steps
weight_decay = 0.0  # AdamW decoupled weight decay on 2-D tensors
beta1 = 0.9  # AdamW beta1
beta2 = 0.999  # AdamW beta2
grad_clip = 1.0  # clip the global grad norm (0 = off)
# learning rate schedule
warmup_iters = 100  # linear warmup steps
decay_lr = 'cosine'  # 'cosine' | 'linear' | 'constant' after warmup
lr_decay_iters = 0  # steps over which LR decays (0 = max_iters)
min_lr = 0.0  # LR at the end of decay (0 = learning_rate / 10)
# system
device = 'auto'  # 'cpu' | 'cuda' | 'cuda:1' | 'auto'
dtype = 'auto'  # autocast: float32 | bfloat16 | float16 | auto (bf16 on CUDA and on bf16 CPUs)
compile: bool | None = None  # torch.compile the model (None = on for CUDA, off on CPU)
base_dtype = 'auto'  # frozen base: float32 | bfloat16 | float16 | auto (README: Memory keys)
grad_checkpoint = False  # recompute each block in backward, keep only its input (~1/3 more compute)
loss_chunk = 512  # training CE over chunks of this many tokens: no (B, T, vocab) logits (0 = off)
seed = 1337  # model init, adapters, dropout, data order
parallel = 'ddp'  # under torchrun: 'ddp' replicates the model, 'fsdp' shards weights, grads, state
# -----------------------------------------------------------------------------
# checked before anything is built: string keys take one of their choices, numbers >= 0 (sizes >= 1)
DTYPES = ('auto', 'float32', 'bfloat16', 'float16')
CHOICES = {'mode': ('full', 'lora', 'mora', 'relora', 'remora', 'xgblora'),
           'mora_kind': ('auto', *adapters.KINDS), 'remora_cycle': tuple(adapters.CYCLES),
           'optimizer_reset': ('clear', 'prune'), 'lr_envelope': ('jagged', 'rewarm'),
           'decay_lr': ('cosine', 'linear', 'constant'), 'dtype': DTYPES, 'base_dtype': DTYPES,
           'parallel': ('ddp', 'fsdp')}
POSITIVE = ('r', 'batch_size', 'block_size', 'gradient_accumulation_steps', 'eval_interval',
            'log_interval', 'eval_iters', 'booster_steps', 'n_layer', 'n_head', 'n_kv_head',
            'n_embd', 'intermediate_size')
config = configure(globals(), sys.argv[1:], __file__, choices=CHOICES,
                   minimum={**dict.fromkeys(POSITIVE, 1), 'char_acc_pairs': -1})

restarts = mode in ('relora', 'remora')
prune = optimizer_reset == 'prune'  # at each restart or booster merge (fsdp.reset_state_)
if merge_every and not restarts:
    die(f"merge_every={merge_every} needs mode relora or remora, got mode={mode!r}")
if restarts and not merge_every:  # a restart mode that never restarts is silently its plain twin
    die(f"mode={mode!r} merges every merge_every steps: set merge_every >= 1 (0 trains plain "
        f"{mode[2:]})")
wandb = setup(checkpoint.tracker, wandb_log)  # optional: imported only when on, before any build
cycle = adapters.CYCLES[remora_cycle]  # ReMoRA's kinds, one per restart period
if mode == 'remora' and mora_kind not in ('auto', *cycle):
    die(f"remora's {remora_cycle!r} cycle switches between {' | '.join(cycle)}; "
        f"mora_kind={mora_kind!r} is not one of them")

# derived settings (after overrides); ddp: launched by torchrun (parallel: how its ranks share it)
ddp, rank, world, device = fsdp.init(device, parallel)  # the process group; device auto resolved
sharded, master = ddp and parallel == 'fsdp', rank == 0
device_type = 'cuda' if 'cuda' in device else 'cpu'
# autocast and base precision, auto resolved (model.resolve_dtypes); eval.py and a resume keep them
trains_base = "mode='full'" if mode == 'full' else f"warm_start={warm_start}" if warm_start else ''
dtype, base_dtype = setup(resolve_dtypes, dtype, base_dtype, device_type, trains_base,
                          merges=mode not in ('lora', 'mora'))
config['dtype'], config['base_dtype'] = dtype, base_dtype
compile = device_type == 'cuda' if compile is None else compile
if gradient_accumulation_steps % world:
    die(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the "
        f"process count {world}")
grad_accum = gradient_accumulation_steps // world
lr_decay_iters, min_lr = lr_decay_iters or max_iters, min_lr or learning_rate / 10
torch.manual_seed(seed)  # the model and adapters: the same on every rank
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
amp = {'float32': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]  # autocast's
ctx = nullcontext() if amp is None else torch.autocast(device_type, dtype=amp)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')  # fp16 grads underflow
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
log = functools.partial(print, flush=True) if master else (lambda *a, **k: None)  # flushed, for tee

# -----------------------------------------------------------------------------
# data, base model, adapters
ds = setup(Dataset, os.path.join('data', dataset))
tok = setup(load_tokenizer, tokenizer or ('byte' if init_from == 'scratch' else init_from))
config['tokenizer'] = tok.spec
if init_from == 'scratch':  # the shape keys above (model.scratch_config: the vocab padded to 64s)
    config['model_config'] = setup(scratch_config, config, tok.n_vocab, tok.bos_id, tok.eos_id)
model = setup(build_model, config, 'cpu' if sharded else device)  # sharded: ranks move their shards
model.grad_checkpoint, model.loss_chunk = grad_checkpoint, loss_chunk  # read by forward in training
setup(ds.check, model.config.vocab_size, block_size, tok.spec, tok.n_vocab)  # data, tokenizer fit
if mode == 'xgblora' and booster_blocks > model.config.n_layer:
    die(f"booster_blocks={booster_blocks} must be 0 (n_layer // 3) or 1..{model.config.n_layer} "
        "(the model's n_layer)")
base_fingerprint = checkpoint.base_fingerprint(model.state_dict())
method = {'full': None, 'lora': 'lora', 'relora': 'lora', 'mora': 'mora', 'remora': 'mora',
          'xgblora': 'booster'}[mode]
kind = (mora_kind if mora_kind != 'auto' else 'share' if mode == 'remora' else
        adapters.default_kind(r))
adapter_params = setup(adapters.attach, model, method, targets, r=r, kind=kind, dropout=dropout,
                       alpha=booster_scale if method == 'booster' else alpha) if method else []
adapted = [m for m in model.modules() if getattr(m, 'adapter', None) is not None]  # their Linears
if sharded:  # from here on the parameters are this rank's shards (DTensors): collect them again
    fsdp.shard(model, device_type, amp if device_type == 'cuda' else None, compile)
    adapter_params = [p for m in adapted for p in m.adapter.parameters()]
# in adapter modes, pretraining from scratch also trains embeddings, norms and head at full rank
norms = [p for m in model.modules() if isinstance(m, RMSNorm) for p in m.parameters()]
rest = list(dict.fromkeys([model.embed_tokens.weight, model.lm_head.weight, *norms]))  # tied: once
if mode == 'full' or (method and (train_rest or (train_rest is None and init_from == 'scratch'))):
    for p in (model.parameters() if mode == 'full' else rest):
        p.requires_grad_(True)
rest_params = [p for p in rest if p.requires_grad and mode != 'full']
if rest_params and base_dtype != 'float32' and dtype == 'float32':  # fp32 embeddings, half weights
    die(f"base_dtype={base_dtype!r} with trained embeddings, norms and head (train_rest, or "
        "init_from='scratch') needs autocast: set dtype='bfloat16' or 'float16', or "
        "train_rest=False, or base_dtype='float32'")
for p in rest_params:  # trained over a half base: fp32 weights (and fp32 AdamW state) all the same
    p.data = p.data.float()
adapted_weights = [m.weight for m in adapted]
trainable = [p for p in model.parameters() if p.requires_grad]
trainable += adapted_weights if warm_start else []

def hand_over(full_rank):
    """warm_start: the adapted weights train at full rank (full_rank=True), then the adapters do."""
    for p in adapted_weights:
        p.requires_grad_(full_rank)
        if not full_rank:
            optimizer.state.pop(p, None)
    for p in adapter_params:
        p.requires_grad_(not full_rank)
n_train = sum(p.numel() for p in dict.fromkeys(trainable))
n_total = sum(p.numel() for p in model.parameters())
# what a checkpoint must hold: every tensor that can differ from the base (merges move the weights)
moved = adapted_weights if mode in ('relora', 'remora', 'xgblora') or warm_start else []
saved_keys = checkpoint.saved_keys(model, trainable + moved, everything=mode == 'full')
decay = [p for p in dict.fromkeys(trainable) if p.dim() >= 2]
no_decay = [p for p in dict.fromkeys(trainable) if p.dim() < 2]
optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                               {'params': no_decay, 'weight_decay': 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=device_type == 'cuda')
torch.manual_seed(seed + rank)  # dropout: each rank its own stream
iter_num = 0
if resume:  # where ckpt.pt stopped, saved by any process count; each rank its own dropout stream
    ckpt = setup(checkpoint.load_for_resume, out_dir, config, base_fingerprint)
    if mode == 'remora':  # a ReMoRA run's current kind comes from the checkpoint, never the config
        kind = next(iter(ckpt['adapters'].values()))['kind']
        adapters.switch_kind_(model, kind)
    iter_num = fsdp.resume_(model, optimizer, scaler, ckpt, device_type, seed + rank)
    del ckpt
if warm_start:
    hand_over(full_rank=iter_num < warm_start)

raw_model = model  # uncompiled handle for saving, eval and merges (no _orig_mod. keys)
model = fsdp.wrap(raw_model, compile, ddp, device_type)  # compiled, DDP (sharded: as it is)

def envelope(it, start, peak):
    """Decay from peak at step start to min_lr at lr_decay_iters (cosine, linear or constant)."""
    ratio = min(1.0, (it - start) / max(lr_decay_iters - start, 1))
    coeff = {'cosine': 0.5 * (1 + math.cos(math.pi * ratio)), 'linear': 1 - ratio,
             'constant': 1.0}[decay_lr]
    return peak if decay_lr == 'constant' else min_lr + coeff * (peak - min_lr)

def get_lr(it):
    """LR at optimizer step it: linear warmup, then the envelope; restart modes drop to 0 at each
    merge and re-warm linearly over restart_warmup steps back onto it (SPEC 3). A pure function."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    first = warm_start + merge_every  # step of the first restart
    if not restarts or it < first:
        return envelope(it, warmup_iters, learning_rate)
    last = warm_start + (it - warm_start) // merge_every * merge_every  # step of the latest restart
    if lr_envelope == 'jagged':  # ReLoRA: one global envelope, cut to 0 at each restart
        return rewarmed(it, last, lambda t: envelope(t, warmup_iters, learning_rate))
    # MoRA code: each period decays afresh from the LR the run had just before its restart (a loop,
    # not a recursion: runs have thousands of restarts)
    peak = get_lr(first - 1)
    for start in range(first, last, merge_every):
        peak = rewarmed(start + merge_every - 1, start, lambda t: envelope(t, start, peak))
    return rewarmed(it, last, lambda t: envelope(t, last, peak))

def rewarmed(it, last, target):
    """target's LR at step it, ramped linearly from 0 over restart_warmup steps after a restart."""
    k = it - last
    if k >= restart_warmup:
        return target(it)
    return target(last + restart_warmup) * (k + 1) / (restart_warmup + 1)

def boosters_at(it):
    """XGBLoRA: the blocks booster it // booster_steps trains, drawn without replacement."""
    L, draw = raw_model.config.n_layer, random.Random(seed * 100003 + it // booster_steps)
    return set(draw.sample(range(L), booster_blocks or max(1, L // 3)))

def reinit_generator(it):
    """The adapter draws of the restart or booster merge at step it, the same on every rank."""
    return torch.Generator(device).manual_seed(seed * 1000003 + it)

def save(rng):
    """ckpt.pt from the uncompiled model (all ranks gather, rank 0 writes): None, or the error."""
    model_sd, optim_sd = fsdp.gather_state(raw_model, optimizer, saved_keys)
    if master:
        return checkpoint.save_checkpoint({
            'model': model_sd, 'optimizer': optim_sd, 'config': config, 'iter_num': iter_num,
            'adapters': adapters.settings(raw_model) if method else None,
            'base_fingerprint': base_fingerprint, 'scaler': scaler.state_dict(), 'rng': rng},
            out_dir)

# -----------------------------------------------------------------------------
# a Ctrl-C is acted on at the next step boundary: the checkpoint resumes bit-exactly
stop_requested = threading.Event()
signal.signal(signal.SIGINT, lambda signum, frame: stop_requested.set())
if master:  # out_dir, config.json (with the hash of the code that ran), metrics.jsonl, wandb run
    sha = checkpoint.start_run(out_dir, config, resume, iter_num, wandb)
    log(f"torch {torch.__version__} | device {device} | dtype {dtype} | compile {compile} | "
        f"world {world} | git {sha or '?'}")
    log("config: " + json.dumps({k: v for k, v in config.items() if k != 'model_config'}))
    log(f"trainable params: {n_train:,} / {n_total:,} ({100 * n_train / n_total:.2f}%) | "
        f"tokens per iter: {tokens_per_iter:,}" + (f"\nnote: {note}" if note else ''))
    if method == 'booster':
        log(f"xgblora: {n_train:,} booster params on {len(adapted_weights)} layers, "
            f"~{n_train * len(boosters_at(0)) // raw_model.config.n_layer:,} trained per booster")
pairs = memory_pairs(ds, char_acc_pairs)
flops_per_iter = raw_model.flops_per_token(block_size) * tokens_per_iter
flops_per_iter *= 1 if mode == 'full' else 2 / 3  # adapters: no weight-gradient matmuls
peak = peak_flops(device) if device_type == 'cuda' else None
if method == 'booster':
    adapters.set_gates_(raw_model, boosters_at(iter_num))
    boosters = [(int(name.split('.')[1]), m.adapter) for name, m in raw_model.named_modules()
                if getattr(m, 'adapter', None) is not None]  # (block index, booster) of layers.i.*
t_start = t_log = time.time()  # t_log: start of the log interval
t_eval = 0.0  # seconds of the log interval spent in evals (not counted in ms/iter)
stop = False  # every rank's decision to stop after this step (a Ctrl-C on any of them)
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr
    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        t_eval -= time.time()
        rng, error = fsdp.rng_states(device_type), None
        if master or sharded:  # sharded, every rank evals (the forward gathers blocks); rank 0 logs
            # a copy with the adapters folded in, in the autocast dtype; sharded: the model as it is
            m = raw_model if sharded else inference_model(raw_model, amp)
            val = estimate_loss(m, ds, 'val', batch_size, block_size, eval_iters, device, ctx)
            row = {'iter': iter_num, 'val_loss': val}
            if pairs:
                row['char_acc'] = char_accuracy(m, tok, pairs, device, ctx)
            del m
            evals = f"val loss {row['val_loss']:.4f}" + (f" | char_acc {100 * row['char_acc']:.1f}%"
                                                        if pairs else '')
            log(f"eval {iter_num} | {evals}")
            if master:  # metrics.jsonl, and the same row in wandb with wandb_log
                checkpoint.append_metrics(out_dir, row, wandb)
            if iter_num > 0 and not eval_only:  # never replace the last good checkpoint by bad
                error = save(rng) if math.isfinite(row['val_loss']) else (
                    f"non-finite val loss at iter {iter_num}; not saved, {out_dir}/ckpt.pt keeps "
                    "the last good state")
        fsdp.everyone(error)
        t_eval += time.time()
    if iter_num >= max_iters or eval_only or stop:
        break
    if warm_start and iter_num == warm_start:  # full-rank warm start over: freeze the base
        hand_over(full_rank=False)
        # DDP reduces the gradients of what required grad when it was built
        model = fsdp.wrap(raw_model, compile, ddp, device_type)
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        x, y = ds.get_batch('train', batch_size, block_size, seed, iter_num, micro, grad_accum,
                            rank, world)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        fsdp.grad_sync(model, micro == grad_accum - 1)  # reduce only on the last micro-step
        with ctx:
            _, loss = model(x, y)
        scaler.scale(loss / grad_accum).backward()
        loss_sum += loss.detach()
    if method == 'booster':  # unsampled boosters: no grad at all, so AdamW (and decay) leaves them
        active = boosters_at(iter_num)
        for i, b in boosters:
            if i not in active:
                b.A.grad = b.B.grad = None
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    scaler.step(optimizer)  # = optimizer.step() unless float16: unscaled, skipped on inf/nan grads
    scaler.update()
    if iter_num == 0:  # once, while gradients and optimizer state both exist (sharded: this rank's)
        state = fsdp.state_bytes(raw_model, optimizer)
        log("state bytes per process: " + " | ".join(f"{k} {v:,}" for k, v in state.items()))
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1

    # merge-and-restart (SPEC 3) and booster boundaries (SPEC 4): every state change of a run
    if restarts and iter_num > warm_start and (iter_num - warm_start) % merge_every == 0:
        fsdp.merge_(raw_model)  # W <- W + dW in fp32 (sharded: each rank its own rows)
        fsdp.reinit_(raw_model, reinit_generator(iter_num))  # same Parameters: B = 0, M = 0
        if mode == 'remora':
            kind = adapters.next_kind(kind, remora_cycle)
            adapters.switch_kind_(raw_model, kind)
        fsdp.reset_state_(optimizer, adapter_params, prune)  # and LR drops to 0: get_lr knows
        log(f"restart at {iter_num}: merged {len(adapted_weights)} layers, adapters re-initialised"
            + (f", next kind {kind}" if mode == 'remora' else '')
            + f", optimizer state {'pruned' if prune else 'cleared'}")
    if method == 'booster' and iter_num % booster_steps == 0:
        fsdp.merge_(raw_model, alpha=booster_alpha)  # only gated-on boosters carry a dW
        fsdp.reinit_(raw_model, reinit_generator(iter_num))
        fsdp.reset_state_(optimizer, adapter_params, prune)
        adapters.set_gates_(raw_model, boosters_at(iter_num))
        log(f"booster {iter_num // booster_steps}: merged, now training blocks "
            f"{sorted(boosters_at(iter_num))}")

    # a Ctrl-C during this step stops after it: one decision on every rank (the global batch's loss)
    loss_sum, stop = fsdp.agree(loss_sum, stop_requested.is_set())
    # a non-finite loss stops the run before any save, so ckpt.pt keeps the last good state. .item()
    # waits for the device: on CUDA that stalls each step, so check at log intervals (logs sync)
    if device_type == 'cpu' or iter_num % log_interval == 0:
        if not math.isfinite(loss_sum.item()):
            fsdp.everyone(f"non-finite loss at iter {iter_num}; {out_dir}/ckpt.pt keeps the last "
                          "good state (lower learning_rate?)")
    if iter_num % log_interval == 0 and master:
        loss_val = loss_sum.item() / grad_accum
        dt = (time.time() - t_log - t_eval) / log_interval  # .item() above waited for the device
        t_log, t_eval = time.time(), 0.0
        eta = dt * (max_iters - iter_num)
        row = {'iter': iter_num, 'loss': loss_val, 'lr': lr, 'ms': 1000 * dt,
               'tok_s': tokens_per_iter / dt, 'mem_mb': peak_bytes(device) / 2**20}
        if peak:
            row['mfu'] = flops_per_iter / dt / peak
        log(f"iter {iter_num} | loss {loss_val:.4f} | lr {lr:.1e} | {1000 * dt:.1f} ms | "
            f"{row['tok_s'] / 1e3:.1f}k tok/s" + (f" | mfu {100 * row['mfu']:.1f}%" if peak else '')
            + f" | mem {row['mem_mb']:.0f} MB | eta {eta / 60:.1f}m")
        checkpoint.append_metrics(out_dir, row, wandb)

if stop:
    rng = fsdp.rng_states(device_type)
    fsdp.everyone(save(rng) if master or sharded else None)
    log(f"interrupted: saved {out_dir}/ckpt.pt at iter {iter_num}; continue with --resume=True")
elif master and not eval_only:
    log(f"done: {iter_num} iters in {(time.time() - t_start) / 60:.1f} min | {evals} | checkpoint "
        f"{out_dir}/ckpt.pt" + (f"\nnote: {note}" if note else ''))
if wandb and master:
    wandb.finish()
fsdp.close()  # the ranks leave together
if stop:
    sys.exit(130)
