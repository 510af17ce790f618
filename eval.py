"""
Evaluation: deterministic validation loss, memory-task character accuracy, and curves of runs.
train.py imports these functions, so its logs and this script print the same numbers.

$ python eval.py --out_dir=out/memory_mora                # val loss (+ char_acc on a memory dataset) of a checkpoint
$ python eval.py --out_dir=out/memory_mora --char_acc_pairs=-1   # score every pair
$ python eval.py --plot=out/memory_lora,out/memory_mora --plot_file=assets/memory_cpu.png
"""
import copy
import json
import math
import os
import re
import sys
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

import adapters
from checkpoint import base_fingerprint, load_checkpoint
from model import LLaMA, Linear, ModelConfig
from tokenizer import checkpoint_dir

UUID_LEN = 36  # a uuid4 string: 32 hex digits + 4 hyphens


@torch.no_grad()
def inference_model(model, dtype=None):
    """The model as the evals run it: a copy with every adapter folded into its weight (W + ΔW, added in fp32 as
    merge.py writes it) and every matmul weight stored in dtype, the autocast dtype (None: as it is). Folded, an
    adapted layer is one matmul again, and a bf16 copy is not re-cast on every call: greedy decoding, a few dozen
    tiny steps bound by per-op overhead and weight reads, is most of an eval. The trained model is not touched."""
    model = copy.deepcopy(model)
    adapters.merge_(model)
    for m in list(model.modules()):
        if isinstance(m, Linear):
            m.adapter = None
        if isinstance(m, nn.Linear) and dtype is not None:  # the head too: a tied one gets its own copy
            m.weight = nn.Parameter(m.weight.detach().to(dtype), requires_grad=False)
    return model.eval()


@torch.no_grad()
def estimate_loss(model, dataset, split, batch_size, block_size, eval_iters, device, ctx=nullcontext()):
    """Mean cross-entropy per target token over a fixed, ordered slice of the split (deterministic)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in dataset.eval_batches(split, batch_size, block_size, eval_iters):
        x, y = x.to(device), y.to(device)
        with ctx:
            logits, _ = model(x)
        # sum, not mean per batch, so padded example batches weigh every target token equally
        total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-100,
                                 reduction='sum').item()
        count += (y != -100).sum().item()
    model.train(was_training)
    return total / max(count, 1)


def char_score(pred, value):
    """Share of the value's characters that the prediction matches position-wise (missing ones count as wrong)."""
    return sum(a == b for a, b in zip(pred, value)) / len(value)


@torch.no_grad()
def char_accuracy(model, tokenizer, pairs, device, ctx=nullcontext(), batch_size=256, max_new_tokens=None):
    """Memory task (SPEC 5.1): greedy-decode after `key:` and score the first 36 characters against the value.
    pairs: dicts with 'value' and 'prompt' (token ids, BOS included) as written by data/memory/prepare.py.
    The value is read as the data script wrote it, `key:value` tokenized as one text: the decoded prompt + tokens
    less the decoded prompt (decoding the tokens alone would drop a SentencePiece value's leading space).
    Prompts of different lengths share one decode via left padding (model.generate's pad): each row keeps its
    own positions and never attends to padding, so its tokens are those it would get decoded alone. Wide batches:
    on a GPU each decode step of a model this small is bound by kernel launches, not by its batch."""
    was_training = model.training
    model.eval()
    # a uuid is about one token per character; leave slack for tokens that are shorter than that
    max_new_tokens = max_new_tokens or UUID_LEN + 8
    # sorted by length, so each chunk's rows are close in length and padding stays small
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]['prompt']))
    scores = [0.0] * len(pairs)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        lens = [len(pairs[i]['prompt']) for i in chunk]
        n = max(lens)
        prompt = torch.tensor([[0] * (n - m) + pairs[i]['prompt'] for i, m in zip(chunk, lens)],
                              dtype=torch.long, device=device)  # (B, n), left-padded with id 0
        pad = torch.tensor([n - m for m in lens], dtype=torch.long, device=device)
        prompts = [pairs[i]['prompt'] for i in chunk]
        skip = [len(tokenizer.decode(p)) for p in prompts]  # the prompt's characters in decode(prompt + tokens)
        read = lambda rows: [tokenizer.decode(p + row)[k:] for p, k, row in zip(prompts, skip, rows)]
        with ctx:  # stop once every row has read out a uuid's length: later tokens are never scored
            out = model.generate(prompt, max_new_tokens, temperature=0.0, pad=pad,
                                 done=lambda new: min(map(len, read(new.tolist()))) >= UUID_LEN)
        for i, pred in zip(chunk, read(out[:, n:].tolist())):
            scores[i] = char_score(pred[:UUID_LEN], pairs[i]['value'])
    model.train(was_training)
    return sum(scores) / max(len(scores), 1)


def device_error(device):
    """Why eval.py / sample.py cannot run on device, or None: 'cpu', or 'cuda' / 'cuda:<index>' with a GPU."""
    if not re.fullmatch(r'cpu|cuda(:\d+)?', device) or ('cuda' in device and not torch.cuda.is_available()):
        return f"device={device!r}: use cpu, or cuda / cuda:<index> where torch sees a GPU"


def memory_pairs(dataset, n):
    """The first n pairs of a memory dataset (all when n < 0); [] for other datasets."""
    path = os.path.join(dataset.path, 'pairs.json')
    if n == 0 or not os.path.exists(path):
        return []
    with open(path) as f:
        pairs = json.load(f)
    return pairs if n < 0 else pairs[:n]


def build_model(config, device='cpu'):
    """The base model a run starts from: an HF checkpoint dir or hub id (its local snapshot), or a fresh init
    (seeded) for init_from='scratch', in the run's base_dtype (resolved by train.py; runs saved before the key
    existed are fp32)."""
    dtype = getattr(torch, config.get('base_dtype', 'float32'))
    if config['init_from'] == 'scratch':
        torch.manual_seed(config['seed'])
        return LLaMA(ModelConfig(**config['model_config'])).to(device=device, dtype=dtype)  # init in fp32, then cast
    return LLaMA.from_pretrained(checkpoint_dir(config['init_from']), dtype).to(device)


def load_run(out_dir, device='cpu'):
    """Rebuild the trained model of a run from out_dir/ckpt.pt: base, moved weights, adapters. Returns (model, ckpt)."""
    path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train first (python train.py ... --out_dir={out_dir})")
    ckpt = load_checkpoint(path)
    model = build_model(ckpt['config'], device)
    if ckpt['base_fingerprint'] != base_fingerprint(model.state_dict()):
        raise ValueError(f"{path} was trained on another base than {ckpt['config']['init_from']} (fingerprint differs)")
    if ckpt['adapters']:
        adapters.load_adapters(model, ckpt['adapters'], {})
    params = dict(model.named_parameters(remove_duplicate=False))
    for k, v in ckpt['model'].items():  # what a run trains over a half-precision base is fp32 (train.py): keep it so
        if k in params and params[k].dtype != v.dtype:
            params[k].data = params[k].data.to(v.dtype)
    missing, unexpected = model.load_state_dict(ckpt['model'], strict=False)
    # the base supplies every other tensor; adapter tensors must all come from the checkpoint
    lacking = [k for k in missing if k in adapters.adapter_state_dict(model)]
    if unexpected or lacking:
        raise ValueError(f"{path} does not fit its own settings: unexpected {unexpected[:5]}, missing {lacking[:5]}")
    return model, ckpt


PANELS = {'loss': 'train loss', 'val_loss': 'val loss', 'char_acc': 'char accuracy (greedy, 36 chars)'}


def plot_curves(run_dirs, plot_file):
    """Train loss, val loss and (memory runs) char_acc against step for each run's metrics.jsonl, to one PNG."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib (pip install matplotlib)") from None
    runs = {}
    for run in run_dirs:
        path = os.path.join(run, 'metrics.jsonl')
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: --plot takes run dirs that train.py wrote")
        with open(path) as f:
            runs[os.path.basename(os.path.normpath(run))] = [json.loads(line) for line in f]
    keys = [k for k in PANELS if any(k in r for rows in runs.values() for r in rows)]  # panels some run has
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, rows in runs.items():
            pts = [(r['iter'], r[key]) for r in rows if key in r]
            if pts:  # evals are sparse: mark their points
                ax.plot(*zip(*pts), label=label, marker=None if key == 'loss' else 'o', ms=3)
        later = [r[key] for rows in runs.values() for r in rows if key in r and r['iter'] > 0]
        if key == 'val_loss' and later:  # zoom past the untrained model's loss: it would squash what matters
            ax.set_ylim(min(later) - 0.05 * (max(later) - min(later)), max(later) * 1.02)
        ax.set_xlabel('step'); ax.set_title(PANELS[key]); ax.grid(alpha=0.3); ax.legend()
    os.makedirs(os.path.dirname(plot_file) or '.', exist_ok=True)
    fig.tight_layout()
    fig.savefig(plot_file, dpi=120)
    print(f"wrote {plot_file}")


if __name__ == '__main__':
    from configurator import configure, die
    from data import Dataset
    from tokenizer import load_tokenizer
    # -----------------------------------------------------------------------------
    out_dir = 'out'  # run directory holding ckpt.pt
    dataset = ''  # data/<dataset>/ to evaluate on ('' = the run's own dataset)
    split = 'val'  # which split the loss is computed on
    eval_iters = 50  # batches for the loss (fixed order)
    batch_size = 0  # eval batch size (0 = the run's)
    char_acc_pairs = -1  # memory datasets: pairs scored by greedy decoding (-1 = all)
    device = 'cpu'  # 'cpu' or 'cuda'
    plot = ''  # comma-separated run dirs: plot their metrics.jsonl instead of evaluating
    plot_file = 'assets/curves.png'  # where --plot writes the PNG
    # -----------------------------------------------------------------------------
    cfg = configure(globals(), sys.argv[1:], __file__)
    if plot:
        try:
            plot_curves(plot.split(','), plot_file)
        except (ImportError, FileNotFoundError) as e:
            die(e)
        sys.exit(0)
    if error := device_error(device):
        die(error)
    try:  # the expected failures of a missing or mismatched run, base or dataset; anything else keeps its traceback
        model, ckpt = load_run(out_dir, device)
        run = ckpt['config']
        ds = Dataset(os.path.join('data', dataset or run['dataset']))
        ds.check(model.config.vocab_size, run['block_size'], run['tokenizer'])
        pairs = memory_pairs(ds, char_acc_pairs)
        tok = load_tokenizer(ds.tokenizer) if pairs else None
    except (OSError, ValueError, ImportError) as e:  # OSError: offline hub/tiktoken; ImportError: a tokenizer's package
        die(e)
    bs = batch_size or run['batch_size']
    # in the autocast dtype the run trained in, as its logs (runs saved before train.py recorded the resolved dtype:
    # autocast in a half base's dtype; what the run trained over it is fp32)
    amp = run['dtype'] if run.get('dtype', 'auto') != 'auto' else run.get('base_dtype', 'float32')
    ctx = torch.autocast(device.split(':')[0], getattr(torch, amp)) if amp != 'float32' else nullcontext()
    model = inference_model(model, None if amp == 'float32' else getattr(torch, amp))  # as train.py's evals
    loss = estimate_loss(model, ds, split, bs, run['block_size'], eval_iters, device, ctx)
    print(f"{out_dir} @ iter {ckpt['iter_num']}: {split} loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.2f})")
    if pairs:
        acc = char_accuracy(model, tok, pairs, device, ctx)
        print(f"char_acc {100 * acc:.1f}% over {len(pairs)} pairs")
