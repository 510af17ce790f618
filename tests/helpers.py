"""Shared by the tests: run train.py in-process on a tiny from-scratch LLaMA and byte-level data; a fixed decoder."""
import json
import os
import runpy
import signal
import sys

import torch

from data import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--init_from=scratch', '--tokenizer=byte', '--n_layer=2', '--n_head=4', '--n_kv_head=2', '--n_embd=64',
        '--intermediate_size=96', '--batch_size=4', '--block_size=32', '--eval_iters=2', '--log_interval=1',
        '--warmup_iters=2', '--learning_rate=1e-2', '--r=4', '--device=cpu', '--compile=False']
MODE_ARGS = {
    'full': ['--mode=full', '--learning_rate=3e-3'],
    'lora': ['--mode=lora'],
    'mora': ['--mode=mora', '--mora_kind=rope'],
    'relora': ['--mode=relora', '--merge_every=2', '--restart_warmup=1'],
    'remora': ['--mode=remora', '--mora_kind=share', '--merge_every=2', '--restart_warmup=1'],
    'xgblora': ['--mode=xgblora', '--booster_steps=2', '--booster_blocks=1'],
}


def write_stream(path):
    """A byte-level stream of short repetitive English, learnable in a few steps."""
    text = "the cat sat on the mat. the dog sat on the log. " * 40
    docs = [[256] + list(text[i:i + 400].encode()) + [257] for i in range(0, len(text), 400)]
    write_dataset(str(path), {'train': docs, 'val': docs[:2]}, {'tokenizer': 'byte', 'vocab_size': 258})
    return str(path)


def run_train(args, out_dir, tiny=True):
    """Run train.py in this process and return its globals (model, optimizer, ... as the run left them)."""
    argv, handler = sys.argv, signal.getsignal(signal.SIGINT)
    sys.argv = ['train.py', *(TINY if tiny else []), *args, f'--out_dir={out_dir}']  # last: beats config files
    try:
        return runpy.run_path(os.path.join(ROOT, 'train.py'), run_name='__main__')
    finally:
        sys.argv = argv
        signal.signal(signal.SIGINT, handler)


def metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


class Oracle(torch.nn.Module):
    """A decoder that emits a fixed continuation per prompt: the true value, or a corrupted one."""

    def __init__(self, answers):
        super().__init__()
        self.answers = answers

    def generate(self, idx, max_new_tokens, temperature=0.0, pad=None):
        pad = [0] * len(idx) if pad is None else pad.tolist()  # left padding: the prompt starts at pad[b]
        rows = [p + self.answers[tuple(p[k:])][:max_new_tokens] for p, k in zip(idx.tolist(), pad)]
        return torch.tensor([r + [0] * (idx.size(1) + max_new_tokens - len(r)) for r in rows])
