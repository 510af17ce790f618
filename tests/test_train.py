"""train.py end to end on a tiny from-scratch LLaMA (2 layers, d 64) and a byte-level dataset, every mode."""
import os
import subprocess
import sys

import pytest
import torch

import adapters
from helpers import MODE_ARGS, ROOT, TINY, metrics, run_train, write_stream



@pytest.fixture(scope='module')
def stream_ds(tmp_path_factory):
    return write_stream(tmp_path_factory.mktemp('data') / 'stream')


@pytest.mark.parametrize('mode', list(MODE_ARGS))
def test_loss_goes_down(mode, stream_ds, tmp_path):
    run_train([f'--dataset={stream_ds}', '--max_iters=12', '--eval_interval=12', *MODE_ARGS[mode]], tmp_path)
    losses = [m['loss'] for m in metrics(tmp_path) if 'loss' in m]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0], losses
    vals = [m['val_loss'] for m in metrics(tmp_path) if 'val_loss' in m]
    assert vals[-1] < vals[0]


@pytest.mark.parametrize('mode', list(MODE_ARGS))
def test_resume_is_bit_exact(mode, stream_ds, tmp_path):
    """6 steps straight == 3 steps, stop, resume, 3 more: across restarts (2, 4) and booster boundaries."""
    # lr_decay_iters pinned: by default it follows max_iters, which the first half changes
    common = [f'--dataset={stream_ds}', '--eval_interval=3', '--lr_decay_iters=6',
              '--dropout=0.1' if mode != 'full' else '--seed=1', *MODE_ARGS[mode]]
    run_train([*common, '--max_iters=6'], tmp_path / 'straight')
    run_train([*common, '--max_iters=3'], tmp_path / 'halves')
    run_train([*common, '--max_iters=6', '--resume=True'], tmp_path / 'halves')
    a = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)
    b = torch.load(tmp_path / 'halves' / 'ckpt.pt', weights_only=True)
    assert a['iter_num'] == b['iter_num'] == 6
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    for (ka, sa), (kb, sb) in zip(a['optimizer']['state'].items(), b['optimizer']['state'].items()):
        assert ka == kb and all(torch.equal(sa[n], sb[n]) for n in sa), ka
    assert a['adapters'] == b['adapters']
    straight = [m for m in metrics(tmp_path / 'straight') if 'loss' in m]
    halves = [m for m in metrics(tmp_path / 'halves') if 'loss' in m]
    assert [m['loss'] for m in straight] == [m['loss'] for m in halves]


def test_restart_reinitialises_in_place_and_clears_only_adapter_state(stream_ds, tmp_path):
    """After the restart at step 2 (the run's last step), adapters are the same objects, re-initialised, with
    empty optimizer state; embeddings/norms/head (trained from scratch) keep theirs."""
    g = run_train([f'--dataset={stream_ds}', '--max_iters=2', '--eval_interval=2', *MODE_ARGS['relora']], tmp_path)
    model, opt = g['raw_model'], g['optimizer']
    live = [p for m in model.modules() if getattr(m, 'adapter', None) is not None for p in m.adapter.parameters()]
    assert [id(p) for p in live] == [id(p) for p in g['adapter_params']]
    for m in model.modules():
        if getattr(m, 'adapter', None) is not None:
            assert torch.count_nonzero(m.adapter.B) == 0 and torch.count_nonzero(m.adapter.A) > 0
    assert all(p not in opt.state for p in g['adapter_params'])
    assert g['rest_params'] and all(int(opt.state[p]['step']) == 2 for p in g['rest_params'])


def test_remora_kind_cycle_is_saved_per_layer(stream_ds, tmp_path):
    g = run_train([f'--dataset={stream_ds}', '--max_iters=6', '--eval_interval=3', *MODE_ARGS['remora']], tmp_path)
    kinds = {s['kind'] for s in adapters.settings(g['raw_model']).values()}
    assert kinds == {'share_group'}  # restarts at 2, 4, 6: share -> share_group -> share -> share_group
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert {s['kind'] for s in ckpt['adapters'].values()} == {'share_group'}
    g = run_train([f'--dataset={stream_ds}', '--max_iters=6', '--eval_interval=3', '--remora_cycle=reference',
                   *MODE_ARGS['remora']], tmp_path / 'ref')
    # share -> share_group -> share_group_tile -> share_fold_group
    assert {s['kind'] for s in adapters.settings(g['raw_model']).values()} == {'share_fold_group'}


def test_sum_of_merges_equals_moved_base(stream_ds, tmp_path, monkeypatch):
    """ReLoRA: W_final == W_0 + the sum of every merged dW (4 restarts in 8 steps)."""
    deltas = []
    merge = adapters.merge_

    def recording_merge(model, **kw):
        deltas.append({n: m.adapter.delta().detach().clone() for n, m in model.named_modules()
                       if getattr(m, 'adapter', None) is not None})
        return merge(model, **kw)
    monkeypatch.setattr(adapters, 'merge_', recording_merge)
    g = run_train([f'--dataset={stream_ds}', '--max_iters=8', '--eval_interval=8', '--train_rest=False',
                   *MODE_ARGS['relora']], tmp_path)
    assert len(deltas) == 4
    base = g['build_model'](g['config'])
    for name, m in g['raw_model'].named_modules():
        if getattr(m, 'adapter', None) is not None:
            w0 = base.get_submodule(name).weight
            expect = w0 + sum(d[name] for d in deltas)
            assert torch.allclose(m.weight, expect, atol=1e-6), name
            assert not torch.equal(m.weight, w0)


def test_xgblora_unsampled_layers_do_not_change(stream_ds, tmp_path):
    """Within one booster (3 steps of 4), only the sampled block's boosters move; base weights stay put."""
    args = [f'--dataset={stream_ds}', '--max_iters=3', '--eval_interval=3', '--mode=xgblora', '--booster_steps=4',
            '--booster_blocks=1', '--weight_decay=0.1', '--train_rest=False']
    g = run_train(args, tmp_path)
    active = g['boosters_at'](0)
    init = g['build_model'](g['config'])  # seeds itself; attach then draws the same Kaiming init as the run did
    adapters.attach(init, 'booster', g['targets'], r=1, alpha=2.0)
    moved = set()
    for name, m in g['raw_model'].named_modules():
        if getattr(m, 'adapter', None) is None:
            continue
        ref = init.get_submodule(name)
        assert torch.equal(m.weight, ref.weight), name  # no merge inside a booster
        block = int(name.split('.')[1])
        same = torch.equal(m.adapter.A, ref.adapter.A) and torch.equal(m.adapter.B, ref.adapter.B)
        if block not in active:
            assert same, f"{name} is not sampled but changed"
        elif not same:
            moved.add(block)
    assert moved == active


def test_compiled_training_has_no_graph_breaks(stream_ds, tmp_path):
    g = run_train([f'--dataset={stream_ds}', '--max_iters=1', '--eval_interval=1', *MODE_ARGS['mora']], tmp_path)
    x, y = g['ds'].get_batch('train', 2, 32, 0, 0)
    explain = torch._dynamo.explain(g['raw_model'])(x, y)
    assert explain.graph_break_count == 0, explain.break_reasons


@pytest.mark.parametrize('mode', ['relora', 'remora'])
def test_restarts_compile_once_per_kind(mode, stream_ds, tmp_path, monkeypatch):
    """compile=True, restarts after steps 2, 4 and 6: relora keeps one graph; remora trains steps 1-2 with share,
    3-4 with share_group, 5-6 with share again, and compiles exactly one graph per kind. Dynamo's backend 'eager'
    keeps the test fast; the guards and graphs are those of the default backend."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda m, **kw: compile_(m, backend='eager'))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run_train([f'--dataset={stream_ds}', '--max_iters=6', '--eval_interval=6', '--compile=True', *MODE_ARGS[mode]],
              tmp_path)
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == (2 if mode == 'remora' else 1)
    torch._dynamo.reset()


def test_ddp_two_processes_match_one(stream_ds, tmp_path):
    """2 gloo processes with grad_accum 2 (1 each) == 1 process with grad_accum 2: same global batch."""
    # torchrun's own parser would take --r=4 for an abbreviation of its options: keep the default r
    common = [*(a for a in TINY if not a.startswith('--r=')), f'--dataset={stream_ds}', '--max_iters=4', '--eval_interval=4', '--gradient_accumulation_steps=2',
              '--mode=lora']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    subprocess.run([sys.executable, 'train.py', *common, f'--out_dir={tmp_path / "one"}'], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    # the two processes also checkpoint their blocks: DDP's reducer sees the grads of the rerun, the same ones
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                        *common, '--grad_checkpoint=True', f'--out_dir={tmp_path / "two"}'], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    one = [m['loss'] for m in metrics(tmp_path / 'one') if 'loss' in m]
    two = [m['loss'] for m in metrics(tmp_path / 'two') if 'loss' in m]
    assert len(one) == len(two) == 4 and one == pytest.approx(two, rel=1e-5)
    a = torch.load(tmp_path / 'one' / 'ckpt.pt', weights_only=True)['model']
    b = torch.load(tmp_path / 'two' / 'ckpt.pt', weights_only=True)['model']
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
