"""Bad input gets one clear line and exit 2 (train.py, eval.py, merge.py); failed saves and non-finite losses keep
the last good checkpoint; Ctrl-C saves, and --resume=True continues bit-exactly."""
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import model as model_py
from data import write_dataset
from helpers import ROOT, TINY, run_train, write_stream
from model import LLaMA, ModelConfig

ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


@pytest.fixture(scope='module')
def stream_ds(tmp_path_factory):
    return write_stream(tmp_path_factory.mktemp('data') / 'stream')


@pytest.fixture(scope='module')
def trained(stream_ds, tmp_path_factory):
    """A finished 2-step MoRA run; tests damage copies of it."""
    out = tmp_path_factory.mktemp('run') / 'run'
    run_train([f'--dataset={stream_ds}', '--max_iters=2', '--eval_interval=2', '--mode=mora'], out)
    return out


@pytest.fixture
def run_dir(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / 'run')


def one_line_error(code, err, *needles):
    err = err.strip()
    assert code == 2 and err.startswith('error:') and '\n' not in err and 'Traceback' not in err, (code, err)
    for needle in needles:
        assert needle in err, err


def fails(capsys, fn, *needles):
    """fn() exits 2 with one 'error: ...' line on stderr naming every needle."""
    with pytest.raises(SystemExit) as e:
        fn()
    one_line_error(e.value.code, capsys.readouterr().err, *needles)


def script(name, *args):
    """Run eval.py or merge.py as __main__ in this process (no torch import per case)."""
    argv, sys.argv = sys.argv, [name, *args]
    try:
        runpy.run_path(os.path.join(ROOT, name), run_name='__main__')
    finally:
        sys.argv = argv


def cli(name, *args):
    """The real script in a subprocess: exit 2, one line, no traceback."""
    r = subprocess.run([sys.executable, name, *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
    return r.returncode, r.stderr


# ----------------------------------------------------------------------------- config
BAD_CONFIGS = [
    (['--r=0'], 'r=0', '>= 1'),
    (['--r=-4'], 'r=-4', '>= 1'),
    (['--mode=loraa'], "mode='loraa'", 'full | lora | mora | relora | remora | xgblora'),
    (['--mode=lora', '--mora_kind=spin'], "mora_kind='spin'", 'auto | share'),  # ignored by lora, but unknown
    (['--mode=remora', '--mora_kind=rope', '--merge_every=2'], "mora_kind='rope'", 'share | share_group'),
    # a share kind outside the paper's cycle would train until its first restart, then fail there
    (['--mode=remora', '--mora_kind=share_group_tile', '--merge_every=2'], "mora_kind='share_group_tile'",
     "'paper' cycle switches between share | share_group"),
    (['--mode=lora', '--merge_every=5'], 'merge_every=5', 'relora or remora'),
    (['--mode=relora'], "mode='relora'", 'set merge_every >= 1'),
    (['--learning_rate=-1e-3'], 'learning_rate=-0.001', '>= 0'),
    (['--max_iters=-1'], 'max_iters=-1', '>= 0'),
    (['--decay_lr=step'], "decay_lr='step'", 'cosine | linear | constant'),
    (['--lr_envelope=flat'], "lr_envelope='flat'", 'jagged | rewarm'),
    (['--optimizer_reset=zero'], "optimizer_reset='zero'", 'clear | prune'),
    (['--remora_cycle=random'], "remora_cycle='random'", 'paper | reference'),
    (['--mode=xgblora', '--booster_blocks=3'], 'booster_blocks=3', '1..2'),  # TINY has 2 layers
    (['--mode=mora', '--r=40'], 'r=40', 'allowed 1..32'),  # q_proj 64->64: r_hat = sqrt(128 r) <= 64 needs r <= 32
    (['--mode=lora', '--r=97'], 'r=97', 'allowed 1..64'),
    (['--lr=1e-3'], "'lr'", 'learning_rate'),  # configurator: unknown key, with a hint
    (['--max_iters=ten'], "'max_iters'", 'int'),  # configurator: wrong type
]


@pytest.mark.parametrize('args,key,allowed', BAD_CONFIGS, ids=[' '.join(c[0]) for c in BAD_CONFIGS])
def test_bad_config_is_one_line_exit_2(args, key, allowed, stream_ds, tmp_path, capsys):
    fails(capsys, lambda: run_train([f'--dataset={stream_ds}', '--max_iters=2', *args], tmp_path), key, allowed)
    assert not os.path.exists(tmp_path / 'ckpt.pt')


def test_bad_config_from_the_command_line(tmp_path):
    one_line_error(*cli('train.py', '--decay_lr=step', f'--out_dir={tmp_path}'), 'decay_lr', 'cosine | linear')


# ----------------------------------------------------------------------------- model and adapters
def tiny_hf(path, vocab_size=320, **edit):
    """A tiny LLaMA saved as an HF dir, its config.json edited by **edit."""
    LLaMA(ModelConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      intermediate_size=96)).save_pretrained(path)
    with open(os.path.join(path, 'config.json')) as f:
        cfg = json.load(f)
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump({**cfg, **edit}, f)
    return str(path)


def test_model_and_adapter_errors(stream_ds, tmp_path, capsys):
    train = lambda *args: lambda: run_train([f'--dataset={stream_ds}', '--max_iters=1', *args], tmp_path / 'out')
    fails(capsys, train("--targets=('q_proj', 'qkv_proj')"), "['qkv_proj'] match no adaptable layer", 'q_proj')
    gpt2 = tiny_hf(tmp_path / 'gpt2', model_type='gpt2')
    fails(capsys, train(f'--init_from={gpt2}'), "unsupported checkpoint: model_type='gpt2'")
    sharded = tiny_hf(tmp_path / 'sharded')
    with open(os.path.join(sharded, 'model.safetensors.index.json'), 'w') as f:
        json.dump({'weight_map': {'lm_head.weight': 'model-00002-of-00002.safetensors'}}, f)
    fails(capsys, train(f'--init_from={sharded}'), 'model-00002-of-00002.safetensors is missing')
    small = tiny_hf(tmp_path / 'small', vocab_size=256)  # the byte tokenizer has 258 ids
    fails(capsys, train(f'--init_from={small}'), "tokenizer 'byte' has 258 tokens > model vocab_size 256")


def test_offline_tiktoken_is_one_line(stream_ds, tmp_path, capsys, monkeypatch):
    import tokenizer
    def offline(name):
        raise ConnectionError('no route to host')
    monkeypatch.setattr(tokenizer.tiktoken, 'get_encoding', offline)
    tokenizer._load.cache_clear()
    fails(capsys, lambda: run_train([f'--dataset={stream_ds}', '--max_iters=1', '--tokenizer=tiktoken:gpt2'], tmp_path),
          "tiktoken encoding 'gpt2' is downloaded on first use", 'offline')
    tokenizer._load.cache_clear()


def test_foreign_base_is_refused_by_resume_eval_and_merge(stream_ds, run_dir, capsys):
    ckpt = torch.load(run_dir / 'ckpt.pt', weights_only=True)
    ckpt['base_fingerprint'] = '0' * len(ckpt['base_fingerprint'])
    torch.save(ckpt, run_dir / 'ckpt.pt')
    fails(capsys, lambda: run_train([f'--dataset={stream_ds}', '--max_iters=2', '--eval_interval=2', '--mode=mora',
                                     '--resume=True'], run_dir), 'another base', 'fingerprint')
    fails(capsys, lambda: script('merge.py', f'--out_dir={run_dir}'), 'another base', 'fingerprint')
    one_line_error(*cli('eval.py', f'--out_dir={run_dir}'), 'another base', 'fingerprint')


def test_missing_base_shard_is_refused_by_eval_and_merge(stream_ds, tmp_path, capsys):
    base = tiny_hf(tmp_path / 'base')
    run_train([f'--dataset={stream_ds}', '--max_iters=1', f'--init_from={base}'], tmp_path / 'run')
    os.remove(os.path.join(base, 'model.safetensors'))
    for name in ('eval.py', 'merge.py'):
        fails(capsys, lambda: script(name, f'--out_dir={tmp_path / "run"}'), 'model.safetensors is missing')


# ----------------------------------------------------------------------------- data
def bad_data(path, case):
    docs = [[256] + list(b'the cat sat on the mat. ' * 8) + [257]] * 4
    meta = {'tokenizer': 'byte', 'vocab_size': 258}
    if case == 'missing .bin':
        write_dataset(path, {'train': docs, 'val': docs}, meta)
        os.remove(os.path.join(path, 'train.bin'))
    elif case == 'empty split':
        write_dataset(path, {'train': docs, 'val': []}, meta)
    elif case == 'other tokenizer':
        write_dataset(path, {'train': docs, 'val': docs}, {'tokenizer': 'tiktoken:gpt2', 'vocab_size': 50257})
    elif case == 'ids >= vocab':  # byte runs pad the vocab to 320
        write_dataset(path, {'train': docs + [[500]], 'val': docs}, {'tokenizer': 'byte', 'vocab_size': 1000})
    elif case == 'block_size > data':
        write_dataset(path, {'train': docs, 'val': docs[:1]}, meta)  # 202 val tokens, block_size 256 below
    return str(path)


DATA_CASES = {'no dataset dir': 'not found', 'missing .bin': 'train.bin not found', 'empty split': "split 'val'",
              'other tokenizer': "tokenized with 'tiktoken:gpt2'", 'ids >= vocab': 'token id 500 >= model vocab_size 320',
              'block_size > data': 'fewer than block_size + 1 = 257'}


@pytest.mark.parametrize('case', list(DATA_CASES))
def test_bad_data_is_refused_before_training(case, tmp_path, capsys):
    ds = bad_data(tmp_path / 'ds', case)
    fails(capsys, lambda: run_train([f'--dataset={ds}', '--max_iters=1', '--block_size=256'], tmp_path / 'out'),
          DATA_CASES[case])
    assert not os.path.exists(tmp_path / 'out' / 'metrics.jsonl')  # nothing ran


# ----------------------------------------------------------------------------- checkpoints
def test_failed_save_keeps_previous_checkpoint(stream_ds, tmp_path, capsys, monkeypatch):
    """A real full disk on the second save (the temp file is a link to /dev/full: torch's writer raises a
    RuntimeError, not an OSError): ckpt.pt still holds iter 1, the temp file is gone, one error line."""
    real_save, calls = torch.save, []

    def second_save_hits_a_full_disk(obj, f):
        calls.append(f)
        if len(calls) == 2:
            os.symlink('/dev/full', f)
        return real_save(obj, f)
    monkeypatch.setattr(torch, 'save', second_save_hits_a_full_disk)
    fails(capsys, lambda: run_train([f'--dataset={stream_ds}', '--max_iters=2', '--eval_interval=1'], tmp_path),
          'could not write', 'ckpt.pt.tmp', 'previous checkpoint')
    monkeypatch.undo()
    assert len(calls) == 2 and not os.path.lexists(tmp_path / 'ckpt.pt.tmp')
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['iter_num'] == 1


def damage_record(data, part):
    """A valid zip whose first tensor record is damaged: a flipped byte in its local header or in its data."""
    import io, zipfile
    info = next(i for i in zipfile.ZipFile(io.BytesIO(data)).infolist() if '/data/' in i.filename)
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:][:2], 'little'), \
        int.from_bytes(data[info.header_offset + 28:][:2], 'little')  # the local header's (torch pads it)
    at = info.header_offset + (0 if part == 'header' else 30 + name_len + extra_len + 7)
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'record header', 'record data'])
def test_damaged_checkpoint_is_refused_by_resume_eval_and_merge(damage, stream_ds, run_dir, capsys):
    path = run_dir / 'ckpt.pt'
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if damage == 'truncated' else os.urandom(len(data))
                     if damage == 'garbage' else damage_record(data, damage.split()[1]))
    fails(capsys, lambda: run_train([f'--dataset={stream_ds}', '--max_iters=4', '--eval_interval=2', '--mode=mora',
                                     '--resume=True'], run_dir), 'truncated or corrupted')
    fails(capsys, lambda: script('eval.py', f'--out_dir={run_dir}'), 'truncated or corrupted')
    if damage == 'truncated':  # one real process is enough
        one_line_error(*cli('merge.py', f'--out_dir={run_dir}'), 'truncated or corrupted')
    else:
        fails(capsys, lambda: script('merge.py', f'--out_dir={run_dir}'), 'truncated or corrupted')


def test_resume_without_checkpoint_or_with_changed_config(stream_ds, run_dir, tmp_path, capsys):
    args = [f'--dataset={stream_ds}', '--max_iters=4', '--eval_interval=2', '--mode=mora', '--resume=True']
    fails(capsys, lambda: run_train(args, tmp_path / 'empty'), 'no checkpoint at', '--resume=True')
    fails(capsys, lambda: run_train([*args, '--learning_rate=2e-2', '--seed=7'], run_dir),
          'changed config: learning_rate 0.01 -> 0.02, seed 1337 -> 7', 'may change only max_iters')


def test_every_torch_load_is_weights_only():
    calls = []
    for dirpath, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d not in ('out', 'data')]
        for name in files:
            if name.endswith('.py'):
                src = open(os.path.join(dirpath, name)).read()
                calls += [(name, c) for c in re.findall(r'torch\.load\([^\n]*', src)]
    assert len(calls) >= 3 and all('weights_only=True' in c for _, c in calls), calls


# ----------------------------------------------------------------------------- training
def test_non_finite_loss_stops_and_keeps_last_checkpoint(stream_ds, tmp_path, capsys, monkeypatch):
    """NaN train loss at the 2nd step, then (another run) NaN val loss at the iter-2 eval: both stop with the iter
    named, and ckpt.pt stays the one saved at iter 1."""
    forward, counts = LLaMA.forward, {True: 0, False: 0}

    def nan_after(train_calls, eval_calls):
        def patched(self, idx, targets=None, **kw):
            logits, loss = forward(self, idx, targets, **kw)
            counts[targets is not None] += 1
            if targets is not None and counts[True] > train_calls:
                loss = loss * float('nan')
            if targets is None and counts[False] > eval_calls:
                logits = logits * float('nan')
            return logits, loss
        return patched
    # log_interval 10: on CPU the loss is checked every step, not only when logged
    args = [f'--dataset={stream_ds}', '--max_iters=4', '--eval_interval=1', '--log_interval=10', '--mode=lora']
    monkeypatch.setattr(model_py.LLaMA, 'forward', nan_after(1, 10 ** 9))
    fails(capsys, lambda: run_train(args, tmp_path / 'a'), 'non-finite loss at iter 2', 'ckpt.pt keeps the last good')
    assert torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)['iter_num'] == 1
    counts.update({True: 0, False: 0})
    monkeypatch.setattr(model_py.LLaMA, 'forward', nan_after(10 ** 9, 4))  # evals at 0 and 1: 2 batches each
    fails(capsys, lambda: run_train(args, tmp_path / 'b'), 'non-finite val loss at iter 2', 'not saved')
    assert torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['iter_num'] == 1


def test_ctrl_c_saves_and_resume_is_bit_exact(stream_ds, tmp_path):
    """SIGINT mid-run: the step finishes, ckpt.pt is saved, exit 130; --resume=True to n steps == n steps straight."""
    # lr_decay_iters pinned: by default it follows max_iters, which differs between the runs
    common = [f'--dataset={stream_ds}', '--eval_interval=1000', '--lr_decay_iters=40', '--mode=lora', '--dropout=0.1']
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': str(torch.get_num_threads())}  # same kernels
    p = subprocess.Popen([sys.executable, 'train.py', *TINY, *common, '--max_iters=1000', f'--out_dir={tmp_path / "cut"}'],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith('iter 3 '):
            p.send_signal(signal.SIGINT)
            break
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and 'interrupted: saved' in out and 'Traceback' not in err, err
    n = torch.load(tmp_path / 'cut' / 'ckpt.pt', weights_only=True)['iter_num'] + 2
    assert 5 <= n < 1000
    run_train([*common, f'--max_iters={n}', '--resume=True'], tmp_path / 'cut')
    run_train([*common, f'--max_iters={n}'], tmp_path / 'straight')
    a = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)
    b = torch.load(tmp_path / 'cut' / 'ckpt.pt', weights_only=True)
    assert a['iter_num'] == b['iter_num'] == n and a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    for (ka, sa), (kb, sb) in zip(a['optimizer']['state'].items(), b['optimizer']['state'].items()):
        assert ka == kb and all(torch.equal(sa[s], sb[s]) for s in sa), ka


# ----------------------------------------------------------------------------- review defects (issue 20)
BAD_SYSTEM = [
    (['--device=gpu'], "device='gpu'", 'auto | cpu | cuda'),
    (['--device=cuda'], "device='cuda'", 'sees no CUDA GPU'),
    (['--n_head=4', '--n_kv_head=3'], 'n_head=4 must be a multiple of n_kv_head=3', 'n_embd'),
    (['--n_embd=66', '--n_head=4', '--n_kv_head=4'], 'n_embd=66 of n_head', 'n_head=4'),
    (['--compile=yes'], "'compile' expects bool | None", "str 'yes'"),
    (['--train_rest=1'], "'train_rest' expects bool | None", 'int 1'),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal of cuda on a machine without a GPU')
@pytest.mark.parametrize('args,key,why', BAD_SYSTEM, ids=[' '.join(c[0]) for c in BAD_SYSTEM])
def test_bad_device_shape_or_type_is_one_line(args, key, why, stream_ds, tmp_path, capsys):
    fails(capsys, lambda: run_train([f'--dataset={stream_ds}', '--max_iters=1', *args], tmp_path), key, why)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal of cuda on a machine without a GPU')
def test_eval_py_errors_are_one_line(run_dir, tmp_path, capsys, monkeypatch):
    one_line_error(*cli('eval.py', f'--out_dir={run_dir}', '--device=cuda'), "device='cuda'", 'sees a GPU')
    fails(capsys, lambda: script('eval.py', f'--out_dir={run_dir}', '--device=gpu'), "device='gpu'")
    fails(capsys, lambda: script('eval.py', f'--plot={tmp_path}'), 'metrics.jsonl not found', '--plot takes run dirs')
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # not installed
    fails(capsys, lambda: script('eval.py', f'--plot={run_dir}'), '--plot needs matplotlib', 'pip install matplotlib')


def test_resume_may_change_max_iters_only_with_a_pinned_decay(stream_ds, run_dir, capsys):
    """lr_decay_iters=0 follows max_iters: a new max_iters would change the LR of every remaining step."""
    fails(capsys, lambda: run_train([f'--dataset={stream_ds}', '--max_iters=4', '--eval_interval=2', '--mode=mora',
                                     '--resume=True'], run_dir), 'max_iters 2 -> 4', 'lr_decay_iters set')
