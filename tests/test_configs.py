"""Every config file parses against train.py's keys; the tiny pretraining configs train end to end."""
import glob
import os

import pytest

from helpers import ROOT, metrics, run_train, write_stream

CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'config', '[!_]*.py')))


@pytest.fixture(scope='module')
def stream_ds(tmp_path_factory):
    return write_stream(tmp_path_factory.mktemp('data') / 'stream')


def test_every_config_names_its_command():
    assert len(CONFIGS) >= 19  # memory (6 CPU + 5 GPU), pretrain (5), alpaca (3)
    for path in CONFIGS:
        assert f"python train.py {path}" in open(os.path.join(ROOT, path)).read(), path


@pytest.mark.parametrize('path', [p for p in CONFIGS if 'pretrain_' in p])
def test_pretrain_config_runs(path, stream_ds, tmp_path):
    """The real config with only the data swapped for a tiny byte stream (same tokenizer) and 3 steps."""
    cwd = os.getcwd()
    os.chdir(ROOT)  # config files exec their shared part by a path relative to the repo root
    try:
        run_train([path, f'--dataset={stream_ds}', '--max_iters=3', '--eval_interval=3', '--eval_iters=1',
                   '--log_interval=1', '--device=cpu', '--merge_every=0' if 'relora' not in path and 'remora' not in path
                   else '--merge_every=2'], tmp_path, tiny=False)
    finally:
        os.chdir(cwd)
    rows = metrics(tmp_path)
    assert [r['iter'] for r in rows if 'loss' in r] == [1, 2, 3]
    assert all(r['loss'] < 6.5 for r in rows if 'loss' in r)
