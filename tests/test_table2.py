"""table2.py, MoRA Table 2 in miniature: the protocol's LR selection on fake results, the base's
config through train.py, and the whole orchestration (--dry_run: every config/mini_* method through
the real train.py on a tiny random base)."""
import json
import os
import subprocess
import sys

from helpers import ROOT, metrics, run_train, write_stream

sys.path.insert(0, ROOT)
import table2  # noqa: E402


def fake_run(results, name, accs, val_loss=1.0):
    """A finished run's files as run_all copies them: char acc at steps 0, 100, ..., max_iters."""
    os.makedirs(os.path.join(results, name))
    with open(os.path.join(results, name, 'metrics.jsonl'), 'w') as f:
        for i, a in enumerate(accs):
            f.write(json.dumps({'iter': 100 * i, 'char_acc': a, 'val_loss': val_loss}) + '\n')
    with open(os.path.join(results, name, 'config.json'), 'w') as f:
        json.dump({'max_iters': 100 * (len(accs) - 1)}, f)


def test_best_lr_brackets_the_optimum(tmp_path):
    """The grid first; a best at an edge asks for the next x3 point (3e-2 -> 9e-2), an interior best
    ends it; step 0 does not count; equal to 0.1 pt, the lower final val loss wins."""
    res = str(tmp_path)
    assert table2.best_lr(res, 'lora_r8') == (None, list(table2.GRID))
    for lr, acc in zip(table2.GRID, (0.1, 0.2, 0.3, 0.4, 0.5)):
        fake_run(res, table2.run_name('lora_r8', lr), [0.9, acc, acc])  # step 0 must not count
    assert table2.best_lr(res, 'lora_r8') == (None, [9e-2])
    fake_run(res, table2.run_name('lora_r8', 9e-2), [0.0, 0.45, 0.45])
    assert table2.best_lr(res, 'lora_r8') == (3e-2, [])
    for lr, acc, loss in ((3e-4, 0.3, 1.0), (1e-3, 0.3, 0.5), (3e-3, 0.2, 0.1), (1e-2, 0.1, 1.0),
                          (3e-2, 0.1, 1.0)):
        fake_run(res, table2.run_name('full', lr), [0.0, acc, acc], val_loss=loss)
    assert table2.best_lr(res, 'full') == (1e-3, [])  # level with 3e-4: the lower val loss
    fake_run(res, table2.run_name('xgblora', 3e-4), [0.0, 0.2, 0.2])
    assert table2.best_lr(res, 'xgblora')[0] is None  # an unfinished grid has no best yet


def test_mini_base_config_runs(tmp_path, monkeypatch):
    """The base's config, its data swapped for a tiny byte stream: 8 steps, the val loss falls from
    the untrained model's ~ln(258)."""
    monkeypatch.chdir(ROOT)
    stream = write_stream(tmp_path / 'stream')
    run_train(['config/mini_base.py', f'--dataset={stream}', '--max_iters=8', '--eval_interval=8',
               '--eval_iters=1', '--batch_size=4', '--warmup_iters=2'], tmp_path / 'run',
              tiny=False)
    val = [r['val_loss'] for r in metrics(tmp_path / 'run') if 'val_loss' in r]
    assert val[0] > 5.0 and val[-1] < val[0] - 0.5, val


def test_dry_run_runs_every_method():
    """--dry_run: a tiny base, each method's config for 4 steps through train.py, results, table."""
    methods = ','.join(table2.METHODS)  # the main stage's default is the r8 rows only
    r = subprocess.run([sys.executable, 'table2.py', '--dry_run', f'--methods={methods}'], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    table = r.stdout.split("each config's LR (the sweep's best), seed 1")[1].strip().splitlines()
    assert table[0] == '| method | runs | @0 | @2 | @4 |', table
    assert [line.split(' | ')[0][2:] for line in table[2:-1]] == list(table2.METHODS)
    assert all(len(line.split(' | ')) == 5 for line in table[2:-1]), table
    assert table[-1].startswith('total')


def test_config_lr_is_the_sweeps_best():
    """Each config/mini_* LR is its method's best in the committed sweep (assets/mini_table2/), so
    `python table2.py` runs what the protocol chose; methods whose sweep is not committed are
    skipped by name."""
    checked = []
    for m in table2.METHODS:
        best = table2.best_lr(os.path.join(ROOT, 'assets', 'mini_table2'), m)[0]
        if best is not None:
            own = {}
            exec(open(os.path.join(ROOT, 'config', f'mini_{table2.METHODS[m][0]}.py')).read(), own)
            assert own['learning_rate'] == best, m
            checked.append(m)
    assert {'lora_r8', 'mora_r8_rope'} <= set(checked), checked
