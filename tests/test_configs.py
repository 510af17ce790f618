"""Every config file parses against train.py's keys: the tiny pretraining configs train end to end as they are,
the memory configs (CPU and GPU tier) with the base swapped for a tiny model."""
import glob
import os
import subprocess
import sys

import pytest

from helpers import ROOT, TINY, metrics, run_train, write_stream

CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'config', '[!_]*.py')))


@pytest.fixture(scope='module')
def stream_ds(tmp_path_factory):
    return write_stream(tmp_path_factory.mktemp('data') / 'stream')


def test_every_config_names_its_command():
    assert len(CONFIGS) >= 21  # memory (6 CPU + 7 GPU), pretrain (5), alpaca (3)
    for path in CONFIGS:
        assert f"python train.py {path}" in open(os.path.join(ROOT, path)).read(), path


@pytest.mark.parametrize('path', [p for p in CONFIGS if 'pretrain_' in p])
def test_pretrain_config_runs(path, stream_ds, tmp_path, monkeypatch):
    """The real config with only the data swapped for a tiny byte stream (same tokenizer), 8 steps of batch 4 after
    a 2-step warmup (restarts every 3): the val loss falls from the untrained model's ~ln(258) = 5.55."""
    monkeypatch.chdir(ROOT)  # config files exec their shared part by a path relative to the repo root
    run_train([path, f'--dataset={stream_ds}', '--max_iters=8', '--eval_interval=8', '--eval_iters=1',
               '--batch_size=4', '--warmup_iters=2', '--log_interval=1', '--device=cpu', '--merge_every=0' if 'relora' not in path and
               'remora' not in path else '--merge_every=3'], tmp_path, tiny=False)
    rows = metrics(tmp_path)
    assert [r['iter'] for r in rows if 'loss' in r] == list(range(1, 9))
    val = [r['val_loss'] for r in rows if 'val_loss' in r]
    assert val[0] > 5.0 and val[-1] < val[0] - 0.5, val


@pytest.fixture(scope='module')
def byte_pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp('data') / 'pairs'
    subprocess.run([sys.executable, 'data/memory/prepare.py', '--n_pairs=8', '--tokenizer=byte', f'--out_dir={out}'],
                   cwd=ROOT, check=True, capture_output=True)
    return str(out)


@pytest.mark.parametrize('path', [p for p in CONFIGS if 'memory_' in p])
def test_memory_config_runs(path, byte_pairs, tmp_path, monkeypatch):
    """Each memory config's own mode, kind, LR and schedule, on the tiny byte-level model instead of SmolLM2 (the GPU
    run is minutes of GPU): 6 steps, its restarts or boosters every step; the val loss falls (a small step at the
    configs' LRs and warmups, but a step down), char accuracy is scored at the end."""
    every = {'relora': ['--merge_every=1', '--restart_warmup=1'], 'remora': ['--merge_every=1', '--restart_warmup=1'],
             'xgblora': ['--booster_steps=1', '--booster_blocks=1']}
    mode_args = next((v for k, v in every.items() if k in path), [])
    monkeypatch.chdir(ROOT)  # config files exec their shared part by a path relative to the repo root
    own = {}
    exec(open(path).read(), own)  # what the config itself sets
    tiny = [a for a in TINY if not a.startswith(('--learning_rate', '--warmup_iters'))]  # keep the config's
    # after the config: the tiny model (block 96 holds a prompt + 44 decoded bytes), then the run's length (one
    # micro-batch per step: the 7B configs accumulate 32)
    g = run_train([path, *tiny, '--block_size=96', f'--dataset={byte_pairs}', '--max_iters=6', '--eval_interval=6',
                   '--gradient_accumulation_steps=1', '--eval_iters=1', '--char_acc_pairs=2', *mode_args],
                  tmp_path, tiny=False)
    config = os.path.basename(path)[:-3].removesuffix('_r256').rsplit('_', 1)[-1]  # memory_[gpu_|llama2_7b_]<mode>
    assert g['mode'] == config and g['learning_rate'] == own['learning_rate']
    rows = metrics(tmp_path)
    assert [r['iter'] for r in rows if 'loss' in r] == list(range(1, 7))
    val = [r['val_loss'] for r in rows if 'val_loss' in r]
    assert val[-1] < val[0] - 1e-3, val
    assert 0.0 <= rows[-1]['char_acc'] <= 1.0 and 'char_acc' in rows[0]
