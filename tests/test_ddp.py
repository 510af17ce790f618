"""DDP in real torchrun processes (gloo on the CPU): 2 processes == 1 on the same global batch through every state
change (restarts, boosters, warm start, from an HF base), with every rank's model alike; Ctrl-C on one rank stops
all at one step and resumes bit-exactly (each rank its own dropout stream); an error on rank 0 ends every rank."""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from helpers import TINY, ROOT, metrics, run_train, write_stream
from model import LLaMA, ModelConfig

# torchrun's own parser would take --r=4 for an abbreviation of its options: keep the default r
SMALL = [a for a in TINY if not a.startswith('--r=')]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


def torchrun(*args, out_dir, nproc=2, **kw):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           'tests/ddp_worker.py', *SMALL, *args, f'--out_dir={out_dir}']
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def losses(out_dir):
    return [m['loss'] for m in metrics(out_dir) if 'loss' in m]


def ranks(out_dir):
    return [torch.load(os.path.join(out_dir, f'rank{r}.pt'), weights_only=True) for r in (0, 1)]


@pytest.fixture(scope='module')
def stream_ds(tmp_path_factory):
    return write_stream(tmp_path_factory.mktemp('data') / 'stream')


@pytest.fixture(scope='module')
def hf_base(tmp_path_factory):
    """A tiny random LLaMA saved as an HF dir: runs from it draw their adapters after DDP's construction."""
    path = tmp_path_factory.mktemp('base')
    torch.manual_seed(0)
    LLaMA(ModelConfig(vocab_size=320, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      intermediate_size=96)).save_pretrained(path)
    return str(path)


CASES = {
    'lora from scratch, blocks checkpointed under DDP': ['--mode=lora'],
    'relora from an HF base with a warm start': ['--mode=relora', '--merge_every=2', '--restart_warmup=1',
                                                 '--warm_start=2'],
    'xgblora from an HF base': ['--mode=xgblora', '--booster_steps=2', '--booster_blocks=1'],
}


@pytest.mark.parametrize('case', list(CASES))
def test_two_processes_match_one_on_every_rank(case, stream_ds, hf_base, tmp_path):
    """6 steps, grad_accum 2 (1 per process): the losses of 2 processes == 1 process's, and after the restarts at
    4 and 6 (relora: warm start to 2) or the boosters merged at 2, 4 and 6, both ranks hold the same model, equal
    to the one process's. Ranks seeded alike only at construction would merge different dW."""
    args = [f'--dataset={stream_ds}', '--max_iters=6', '--eval_interval=6', '--gradient_accumulation_steps=2',
            *CASES[case], *([f'--init_from={hf_base}'] if 'HF base' in case else [])]
    one = run_train([*args, '--r=8'], tmp_path / 'one')['raw_model'].state_dict()
    # checkpointed blocks: DDP's reducer sees the gradients of the recomputed forward, the same ones
    r = torchrun(*args, *(['--grad_checkpoint=True'] if 'checkpointed' in case else []), out_dir=tmp_path / 'two')
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(losses(tmp_path / 'one')) == 6 and losses(tmp_path / 'one') == pytest.approx(
        losses(tmp_path / 'two'), rel=1e-5)
    rank0, rank1 = ranks(tmp_path / 'two')
    assert rank0.keys() == rank1.keys() == one.keys() and any('.adapter.' in k for k in one)
    for k in one:
        assert torch.equal(rank0[k], rank1[k]), f"ranks differ in {k}"
        assert torch.allclose(rank0[k], one[k], atol=1e-5), k


def test_ctrl_c_on_one_rank_stops_every_rank_and_resumes_bit_exactly(stream_ds, tmp_path):
    """SIGINT to rank 1 alone: both ranks stop after the same step, rank 0 saves every rank's RNG state, and the
    resumed run (dropout 0.1, so each rank's stream matters) reproduces the straight run exactly."""
    common = [f'--dataset={stream_ds}', '--mode=lora', '--dropout=0.1', '--eval_interval=1000',
              '--lr_decay_iters=40', '--gradient_accumulation_steps=2']
    cut = tmp_path / 'cut'
    p = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          'tests/ddp_worker.py', *SMALL, *common, '--max_iters=1000', f'--out_dir={cut}'],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith('iter 3 '):
            os.kill(int((cut / 'pid1').read_text()), signal.SIGINT)
            break
    out, err = p.communicate(timeout=120)
    saved = re.search(r'interrupted: saved \S+ at iter (\d+)', out)
    assert saved, (p.returncode, out[-2000:], err[-3000:])
    n = int(saved.group(1)) + 3
    # exit 130 on both ranks; torchrun reports that as a failure of its own, but no rank has a traceback
    assert 6 <= n < 1000 and 'train.py", line' not in err, err[-3000:]
    r = torchrun(*common, f'--max_iters={n}', '--resume=True', out_dir=cut)
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(*common, f'--max_iters={n}', out_dir=tmp_path / 'straight')
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(cut) == losses(tmp_path / 'straight') and len(losses(cut)) == n
    for a, b in zip(ranks(cut), ranks(tmp_path / 'straight')):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_error_on_rank_0_ends_every_rank(stream_ds, tmp_path):
    """Rank 0's save at iter 2 hits a full disk (the temp file links to /dev/full): every rank exits with the one
    error line instead of waiting in its next collective; a process count that does not divide the accumulation
    steps is refused on every rank."""
    out = tmp_path / 'full'
    out.mkdir()
    os.symlink('/dev/full', out / 'ckpt.pt.tmp')
    r = torchrun(f'--dataset={stream_ds}', '--mode=lora', '--max_iters=4', '--eval_interval=2',
                 '--gradient_accumulation_steps=2', out_dir=out)
    assert r.returncode != 0 and 'error: could not write' in r.stderr and 'exitcode: 2' in r.stderr, r.stderr[-3000:]
    assert 'train.py", line' not in r.stderr, r.stderr[-3000:]  # no traceback through train.py on any rank
    assert not os.path.lexists(out / 'ckpt.pt.tmp') and 'iter 3 ' not in r.stdout
    r = torchrun(f'--dataset={stream_ds}', '--gradient_accumulation_steps=3', out_dir=tmp_path / 'accum')
    assert r.returncode != 0 and r.stderr.count(
        'error: gradient_accumulation_steps=3 must be a multiple of the process count 2') >= 1, r.stderr[-3000:]
