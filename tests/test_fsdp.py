"""fsdp.py through the real train.py: 2 gloo processes under torchrun with parallel=fsdp against 1 process on the same
global batch (every mode), resume across process counts, merge.py of a sharded run, per-process state bytes.
Two torchrun launches in all (tests/torchrun_runs.py runs several train.py runs per launch)."""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import merge
from helpers import MODE_ARGS, ROOT, TINY, metrics, run_train, write_stream

# 4 micro-batches per step: 2 per rank, so the first one skips the gradient reduce (set_requires_gradient_sync)
# lr_decay_iters pinned: by default it follows max_iters, which the first half of a resumed run changes
STEPS = ['--eval_interval=4', '--gradient_accumulation_steps=4', '--lr_decay_iters=8']
# fp32 reduction order: 2 ranks' gradients reduce-scattered vs one process accumulating 4 micro-batches; measured
# <= 9e-7 relative on the losses and <= 5e-6 absolute on the weights (remora) over 8 steps with 4 merges
RTOL, ATOL = 1e-5, 5e-5
RESUMED = 'remora'  # merges, a kind switch, moved base, adapter and full-rank (embeddings, norms, head) AdamW state


def torchrun(runs, path):
    """One launch of 2 processes that run train.py once per (args, out_dir) in runs, in turn."""
    with open(path, 'w') as f:
        json.dump([[args, str(out)] for args, out in runs], f)
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        os.path.join('tests', 'torchrun_runs.py'), str(path)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]


def one_process(args, out_dir):
    """run_train in this process, its stdout kept in out_dir/stdout.0.txt as the torchrun runs keep rank 0's."""
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        run_train(args, out_dir)
    (out_dir / 'stdout.0.txt').write_text(buf.getvalue())


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Every mode 8 steps with 2 FSDP processes and with 1; the RESUMED mode also 4 steps with 2 processes, then
    resumed to 8 once under 2 processes and once (a copy) under 1."""
    tmp = tmp_path_factory.mktemp('fsdp')
    data = write_stream(tmp / 'stream')
    common = lambda mode: [f'--dataset={data}', *STEPS, *MODE_ARGS[mode]]
    fsdp = [*TINY, '--parallel=fsdp']
    torchrun([([*fsdp, *common(m), '--max_iters=8'], tmp / 'two' / m) for m in MODE_ARGS]
             + [([*fsdp, *common(RESUMED), '--max_iters=4'], tmp / 'halves2')], tmp / 'a.json')
    shutil.copytree(tmp / 'halves2', tmp / 'halves1')
    torchrun([([*fsdp, *common(RESUMED), '--max_iters=8', '--resume=True'], tmp / 'halves2')], tmp / 'b.json')
    one_process([*common(RESUMED), '--max_iters=8', '--resume=True'], tmp / 'halves1')
    for m in MODE_ARGS:
        one_process([*common(m), '--max_iters=8'], tmp / 'one' / m)
    return tmp


def losses(out_dir):
    return [m['loss'] for m in metrics(out_dir) if 'loss' in m]


@pytest.mark.parametrize('mode', list(MODE_ARGS))
def test_two_fsdp_processes_match_one(mode, runs):
    """Same losses, and a ckpt.pt with the same keys, optimizer ids and param groups and (nearly) the same tensors."""
    one, two = runs / 'one' / mode, runs / 'two' / mode
    assert len(losses(one)) == 8 and losses(two) == pytest.approx(losses(one), rel=RTOL)
    if mode in ('relora', 'remora', 'xgblora'):
        assert len(re.findall(r'^(restart|booster) ', (two / 'stdout.0.txt').read_text(), re.M)) == 4
    a, b = (torch.load(d / 'ckpt.pt', weights_only=True) for d in (one, two))
    assert a['model'].keys() == b['model'].keys() and a['adapters'] == b['adapters']
    for k in a['model']:
        assert torch.allclose(a['model'][k], b['model'][k], atol=ATOL), k
    assert a['optimizer']['param_groups'] == b['optimizer']['param_groups']
    assert list(a['optimizer']['state']) == list(b['optimizer']['state'])
    for i, s in a['optimizer']['state'].items():
        t = b['optimizer']['state'][i]
        assert s.keys() == t.keys() and all(torch.allclose(s[n], t[n], atol=ATOL) for n in s), i


def test_fsdp_resume_under_two_and_one_process(runs):
    straight = losses(runs / 'two' / RESUMED)
    assert losses(runs / 'halves2') == straight  # same process count: the same reductions, bit-exact
    assert losses(runs / 'halves1') == pytest.approx(straight, rel=RTOL)
    assert torch.load(runs / 'halves1' / 'ckpt.pt', weights_only=True)['iter_num'] == 8


def test_merged_fsdp_run_equals_one_process(runs):
    for mode in MODE_ARGS:
        a, b = (load_file(merge.merge_run(str(runs / n / mode), str(runs / n / mode / 'merged')) + '/model.safetensors')
                for n in ('one', 'two'))
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], atol=ATOL) for k in a), mode


def state_bytes(out_dir):
    line = re.search(r'^state bytes per process: (.*)$', (out_dir / 'stdout.0.txt').read_text(), re.M).group(1)
    return {k: int(v.replace(',', '')) for k, v in (part.split() for part in line.split(' | '))}


def test_full_fine_tuning_state_is_halved(runs):
    """Parameters, gradients and AdamW moments of full fine-tuning: each of 2 processes holds half of one's."""
    one, two = state_bytes(runs / 'one' / 'full'), state_bytes(runs / 'two' / 'full')
    assert one['params'] == 2 * two['params'] and one['grads'] == 2 * two['grads']
    assert two['optimizer'] / one['optimizer'] == pytest.approx(0.5, abs=0.01)  # + the unsharded 'step' scalars
    assert sum(two.values()) / sum(one.values()) == pytest.approx(0.5, abs=0.01)


def test_parallel_bad_input(tmp_path, capsys):
    for arg, needle in (('--parallel=fsdp', 'torchrun'), ('--parallel=zero3', 'ddp | fsdp')):
        with pytest.raises(SystemExit) as e:
            run_train([arg, '--dataset=nowhere'], tmp_path)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith('error: parallel') and '\n' not in err and needle in err, err
