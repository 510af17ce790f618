"""
Fully sharded training for train.py (`--parallel=fsdp` under torchrun): PyTorch's FSDP2 (`fully_shard`) shards
every weight, gradient and optimizer moment over the processes; this file is what train.py needs around it.
shard() wraps the model; gather_state() / load_state() turn shards into today's single-process ckpt.pt contents and
back (torch.distributed.checkpoint.state_dict does the gathering), so a run resumes under any process count;
merge_() / reinit_() are adapters.merge_ / reinit_ on sharded weights, equal to one process's, reset_state_() the
optimizer's restart. On an unsharded model each of them is the plain single-process call, so train.py makes the
same calls in every mode; resume_() loads a checkpoint through load_state(). The rest of the distributed set-up is
here too: the process group (with the device and parallel checks), DDP wrapping, gradient sync, one stop decision,
RNG states, errors on all ranks, leaving together.
    torchrun --standalone --nproc_per_node=8 train.py config/alpaca_lora.py --parallel=fsdp
    python -m pytest -q tests/test_fsdp.py
"""
import os
import re
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

import adapters
from configurator import die


def init(device: str, parallel: str):
    """train.py's processes. Under torchrun (RANK set): join the process group (nccl on GPUs, gloo
    on CPUs); with device auto or cuda each rank takes the GPU of its LOCAL_RANK. Then auto is cuda
    where torch sees a GPU, else cpu. A device or parallel key that cannot run dies. Returns
    (torchrun, rank, world, device)."""
    if not re.fullmatch(r'auto|cpu|cuda(:\d+)?', device):
        die(f"device={device!r} is not one of auto | cpu | cuda | cuda:<index>")
    if 'cuda' in device and not torch.cuda.is_available():
        die(f"device={device!r} but torch {torch.__version__} sees no CUDA GPU (use --device=cpu)")
    torchrun = int(os.environ.get('RANK', -1)) != -1
    if parallel == 'fsdp' and not torchrun:
        die("parallel='fsdp' shards the model over torchrun's processes: "
            "torchrun --nproc_per_node=N train.py ...")
    if torchrun:
        backend = 'nccl' if torch.cuda.is_available() and device != 'cpu' else 'gloo'
        dist.init_process_group(backend=backend)
        if device in ('auto', 'cuda') and torch.cuda.is_available():
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if torchrun else (0, 1)
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    return torchrun, rank, world, device


def wrap(model, compile: bool, ddp: bool, device_type: str):
    """The model the loop calls: compiled, and under DDP wrapped for the tensors requiring grad now.
    Sharded, the model is its own wrapper: shard() compiled each block before sharding it."""
    if isinstance(model, FSDPModule):
        return model
    model = torch.compile(model) if compile else model
    ids = [int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None
    return DDP(model, device_ids=ids) if ddp else model


def grad_sync(model, on: bool):
    """Whether this backward reduces the gradients (the last micro-step): DDP all-reduces them,
    FSDP reduce-scatters them; one process has nothing to reduce."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(on)
    elif isinstance(model, DDP):
        model.require_backward_grad_sync = on


def everyone(error):
    """End every rank on rank 0's error (a failed save, a diverged eval): alone, the others would
    wait in their next collective forever. All ranks call it at one point: one error line, exit 2.
    Under a process group the ranks leave by os._exit, without interpreter teardown: a gloo worker
    thread can still be dropping the broadcast's tensors then, and its GIL call in a finalizing
    interpreter aborts the process (SIGABRT; seen in CI, cf. pytorch/pytorch#179291)."""
    if not dist.is_initialized():
        if error:
            die(error)
        return
    box = [error]
    dist.broadcast_object_list(box)
    if box[0]:
        dist.barrier()  # every rank holds the error before any closes its sockets
        if dist.get_rank() == 0:
            print(f"error: {box[0]}", file=sys.stderr, flush=True)
        sys.stdout.flush()  # os._exit skips the flush at exit
        os._exit(2)


def agree(loss_sum: torch.Tensor, stop: bool):
    """(the global batch's loss, whether any rank stops): one decision on every rank, a Ctrl-C on
    any of them stops all. On CUDA the .item() syncs each step: the price of one decision."""
    if not dist.is_initialized():
        return loss_sum, stop
    flags = torch.stack([loss_sum, torch.tensor(float(stop), device=loss_sum.device)])
    dist.all_reduce(flags)
    return flags[0] / dist.get_world_size(), flags[1].item() > 0


def close():
    """Leave the process group together (if any): a rank leaving while rank 0 still evals or saves
    aborts gloo."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rng_states(device_type: str) -> list:
    """Every rank's RNG states, gathered (a collective: all ranks call it); rank i resumes i."""
    state = {'torch': torch.get_rng_state(),
             'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None}
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def shard(model, device_type, param_dtype=None, compile=False):
    """fully_shard each transformer block, then the root (embeddings, final norm, head): a block's parameters, frozen
    base and adapters alike, are all-gathered only for its forward and backward, its gradients reduce-scattered.
    param_dtype (CUDA): mixed precision, compute in param_dtype, gradients reduced in fp32, the sharded fp32 weights
    stay the master copy (merges add into them). Buffers (RoPE tables, booster gates) are replicated, not sharded."""
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in model.layers:
        if compile:  # compile what FSDP wraps, not the sharded model; .compile() keeps the module and its names:
            block.compile()  # https://docs.pytorch.org/docs/stable/compile/programming_model.where_to_apply_compile.html
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # moves the shards to the mesh's device
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded one all-gathered (every rank must call), a plain one as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _set_(p, value):
    """p <- value (full size); a sharded p keeps its own rows (distribute_tensor slices locally: no communication)."""
    if isinstance(p, DTensor):
        value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    p.copy_(value)


def _param_names(model, optimizer):
    """The name of each optimizer parameter in the order a single process's optimizer.state_dict() numbers them."""
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group['params']]


def gather_state(model, optimizer, keys):
    """(the model tensors named in keys, optimizer.state_dict()) as one process holds them. Sharded: every rank must
    call; rank 0 gets them gathered onto its CPU (the other ranks get None, None), the optimizer state under the
    integer ids a single process writes, so ckpt.pt is the same file whatever the process count."""
    if not isinstance(model, FSDPModule):
        sd = model.state_dict()
        return {k: sd[k] for k in keys}, optimizer.state_dict()
    frozen = any(n in keys and not p.requires_grad for n, p in model.named_parameters())
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not frozen)  # no base if unsaved
    sd, osd = get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)
    if dist.get_rank() != 0:
        return None, None
    ids = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    name = {p: n for n, p in model.named_parameters()}
    state = {ids[name[p]]: osd['state'][name[p]] for p in optimizer.state}  # in optimizer.state_dict()'s order
    groups = [{**g, 'params': [ids[n] for n in g['params']]} for g in osd['param_groups']]
    return {k: sd[k] for k in keys}, {'state': state, 'param_groups': groups}


def load_state(model, optimizer, model_sd, optim_sd):
    """Load a checkpoint's tensors (a subset of the model's keys) and optimizer state, written by any process count."""
    if not isinstance(model, FSDPModule):
        model.load_state_dict(model_sd, strict=False)
        optimizer.load_state_dict(optim_sd)
        return
    names = _param_names(model, optimizer)
    opts = StateDictOptions(full_state_dict=True, strict=False)  # every rank holds the full dict: each keeps its rows
    set_model_state_dict(model, model_sd, options=opts)
    set_optimizer_state_dict(model, optimizer, {
        'state': {names[i]: s for i, s in optim_sd['state'].items()},
        'param_groups': [{**g, 'params': [names[i] for i in g['params']]} for g in optim_sd['param_groups']]},
        options=opts)
    # set_optimizer_state_dict first creates every parameter's state (a zero-gradient step, so step = 1); those the
    # checkpoint has none for (adapters cleared at a restart) must start fresh, as with optimizer.load_state_dict
    params = [p for group in optimizer.param_groups for p in group['params']]
    for i, p in enumerate(params):
        if i not in optim_sd['state']:
            optimizer.state.pop(p, None)


def resume_(model, optimizer, scaler, ckpt: dict, device_type: str, seed: int) -> int:
    """Continue ckpt's run, saved by any process count: its tensors and optimizer state
    (load_state), its GradScaler state and this rank's RNG streams as rng_states() saved them;
    saved by another process count, fresh ones from seed + 1000003·iter_num (said on rank 0).
    Returns iter_num."""
    load_state(model, optimizer, ckpt['model'], ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    states, iter_num = ckpt['rng'], ckpt['iter_num']
    if len(states) != world:
        torch.manual_seed(seed + 1000003 * iter_num)
        if rank == 0:
            print(f"resume: saved by {len(states)} processes, now {world}: dropout re-seeded",
                  flush=True)
    else:
        torch.set_rng_state(states[rank]['torch'])
        if device_type == 'cuda' and states[rank]['cuda'] is not None:  # CPU runs: no cuda
            torch.cuda.set_rng_state(states[rank]['cuda'])
    return iter_num


@torch.no_grad()
def merge_(model, alpha: float = 1.0):
    """adapters.merge_ (W += alpha·ΔW, fp32). Sharded: per layer, gather W and its adapter, merge exactly as one
    process does (adapters.merge_state_dict, the same arithmetic), and keep this rank's rows of the result."""
    if not isinstance(model, FSDPModule):
        return adapters.merge_(model, alpha=alpha)
    modules = dict(model.named_modules())
    for name, s in adapters.settings(model).items():
        lin = modules[name]
        t = {f"{name}.adapter.{k}": full(v) for k, v in lin.adapter.state_dict().items()}
        merged = adapters.merge_state_dict({f"{name}.weight": full(lin.weight)}, {name: s}, t, alpha)
        _set_(lin.weight, merged[f"{name}.weight"])


@torch.no_grad()
def reinit_(model, generator=None):
    """adapters.reinit_. Sharded: every rank draws each adapter's full init from the same generator in the same
    order as one process, and keeps its own rows (generator must be rank-independent: the ranks draw alike)."""
    if not isinstance(model, FSDPModule):
        return adapters.reinit_(model, generator)
    for m in model.modules():
        if getattr(m, 'adapter', None) is not None:
            for name, value in m.adapter.fresh(generator).items():
                _set_(getattr(m.adapter, name), value)


def reset_state_(optimizer, params, prune: bool = False):
    """Fresh optimizer state (moments, step) for these tensors only, or ReLoRA's 99% prune: each
    moment keeps its largest 1% by magnitude, the whole tensor's even if sharded (all ranks call)."""
    for p in params:
        if prune and p in optimizer.state:
            for key in ('exp_avg', 'exp_avg_sq'):
                m = optimizer.state[p][key]
                q = full(m).abs().flatten().kthvalue(max(1, int(0.99 * m.numel()))).values
                m.mul_(m.abs() > q)  # q a tensor: no host sync
        else:
            optimizer.state.pop(p, None)


def state_bytes(model, optimizer) -> dict:
    """Bytes of parameters, gradients and optimizer state that this process holds (its shards when sharded)."""
    size = lambda ts: sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in ts)
    ps = list(model.parameters())
    return {'params': size(ps), 'grads': size(p.grad for p in ps if p.grad is not None),
            'optimizer': size(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))}
