"""train.py end to end on a tiny from-scratch LLaMA (2 layers, d 64) and a byte-level dataset, every mode."""
import json
import sys

import pytest
import torch

import adapters
from helpers import MODE_ARGS, metrics, run_train, write_stream



@pytest.fixture(scope='module')
def stream_ds(tmp_path_factory):
    return write_stream(tmp_path_factory.mktemp('data') / 'stream')


def effective_weights(model):
    """W + dW of every adapted layer (W alone for full fine-tuning), by module name."""
    return {n: m.weight + (m.adapter.delta() if getattr(m, 'adapter', None) is not None else 0)
            for n, m in model.named_modules() if n.endswith(adapters.TARGETS)}


@pytest.mark.parametrize('mode', list(MODE_ARGS))
def test_loss_goes_down(mode, stream_ds, tmp_path):
    """The loss falls, and not only through the embeddings and head that train from scratch: every adapted layer's
    W + dW moved away from the base (through the adapters, or merged into W at restarts and boosters)."""
    g = run_train([f'--dataset={stream_ds}', '--max_iters=12', '--eval_interval=12', *MODE_ARGS[mode]], tmp_path)
    losses = [m['loss'] for m in metrics(tmp_path) if 'loss' in m]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0], losses
    vals = [m['val_loss'] for m in metrics(tmp_path) if 'val_loss' in m]
    assert vals[-1] < vals[0]
    base, trained = effective_weights(g['build_model'](g['config'])), effective_weights(g['raw_model'])
    assert len(trained) == 2 * 7
    # xgblora: 6 boosters of 2 steps, each on 1 of the 2 blocks, so a block may be skipped (p = 1/64)
    moved = [n for n in trained if (trained[n] - base[n]).abs().max() > 1e-4]
    assert len(moved) == 14 or (mode == 'xgblora' and len(moved) == 7 and len({n[:8] for n in moved}) == 1), moved


RESUME_ARGS = {**MODE_ARGS, 'relora_warm_start': [*MODE_ARGS['relora'], '--warm_start=2'],  # resumes past it
               'lora_float16': ['--mode=lora', '--dtype=float16'],  # with the GradScaler's state
               'remora_rewarm': [*MODE_ARGS['remora'], '--lr_envelope=rewarm', '--optimizer_reset=prune']}


def assert_same_optimizer_state(a, b):
    assert a['param_groups'] == b['param_groups'] and a['state'].keys() == b['state'].keys()
    for k in a['state']:
        assert a['state'][k].keys() == b['state'][k].keys(), k
        assert all(torch.equal(a['state'][k][n], b['state'][k][n]) for n in a['state'][k]), k


@pytest.mark.parametrize('mode', list(RESUME_ARGS))
def test_resume_is_bit_exact(mode, stream_ds, tmp_path):
    """6 steps straight == 3 steps, stop, resume, 3 more: across restarts (2, 4) and booster boundaries."""
    # lr_decay_iters pinned: by default it follows max_iters, which the first half changes
    common = [f'--dataset={stream_ds}', '--eval_interval=3', '--lr_decay_iters=6',
              '--dropout=0.1' if mode != 'full' else '--seed=1', *RESUME_ARGS[mode]]
    run_train([*common, '--max_iters=6'], tmp_path / 'straight')
    run_train([*common, '--max_iters=3'], tmp_path / 'halves')
    run_train([*common, '--max_iters=6', '--resume=True'], tmp_path / 'halves')
    a = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)
    b = torch.load(tmp_path / 'halves' / 'ckpt.pt', weights_only=True)
    assert a['iter_num'] == b['iter_num'] == 6
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert_same_optimizer_state(a['optimizer'], b['optimizer'])
    assert a['adapters'] == b['adapters'] and a['scaler'] == b['scaler']
    if mode == 'lora_float16':
        assert a['scaler']['scale'] > 0 and a['scaler']['_growth_tracker'] == 6  # 6 steps, none skipped
    straight = [m for m in metrics(tmp_path / 'straight') if 'loss' in m]
    halves = [m for m in metrics(tmp_path / 'halves') if 'loss' in m]
    assert [m['loss'] for m in straight] == [m['loss'] for m in halves]


def test_restart_reinitialises_in_place_and_clears_only_adapter_state(stream_ds, tmp_path, monkeypatch):
    """After the restart at step 2 (the run's last step), adapters are the same objects, re-initialised (A a new
    Kaiming draw, B = 0), with empty optimizer state; embeddings/norms/head (trained from scratch) keep theirs."""
    before, reinit = {}, adapters.reinit_

    def recording_reinit(model, *args):
        before.update({n: m.adapter.A.detach().clone() for n, m in model.named_modules()
                       if getattr(m, 'adapter', None) is not None})
        return reinit(model, *args)
    monkeypatch.setattr(adapters, 'reinit_', recording_reinit)
    g = run_train([f'--dataset={stream_ds}', '--max_iters=2', '--eval_interval=2', *MODE_ARGS['relora']], tmp_path)
    model, opt = g['raw_model'], g['optimizer']
    live = [p for m in model.modules() if getattr(m, 'adapter', None) is not None for p in m.adapter.parameters()]
    assert [id(p) for p in live] == [id(p) for p in g['adapter_params']]
    assert len(before) == 14
    for name, m in model.named_modules():
        if getattr(m, 'adapter', None) is not None:
            A = m.adapter.A
            assert torch.count_nonzero(m.adapter.B) == 0 and not torch.equal(A, before[name]), name
            bound = 1 / A.shape[1] ** 0.5  # Kaiming-uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
            assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound, name
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
    calls = []
    merge = adapters.merge_

    def recording_merge(model, **kw):
        calls.append((model, {n: m.adapter.delta().detach().clone() for n, m in model.named_modules()
                              if getattr(m, 'adapter', None) is not None}))
        return merge(model, **kw)
    monkeypatch.setattr(adapters, 'merge_', recording_merge)
    g = run_train([f'--dataset={stream_ds}', '--max_iters=8', '--eval_interval=8', '--train_rest=False',
                   *MODE_ARGS['relora']], tmp_path)
    deltas = [d for model, d in calls if model is g['raw_model']]  # the evals fold adapters into copies
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


# ----------------------------------------------------------------------------- keys: schedule, warm start, resets
GOLDEN_LR = {  # learning_rate 1, min_lr 0.1, warmup_iters 2, lr_decay_iters 10; steps 0..11
    'cosine': [0.333333, 0.666667, 1.0, 0.965746, 0.868198, 0.722208, 0.55, 0.377792, 0.231802, 0.134254, 0.1, 0.1],
    'linear': [0.333333, 0.666667, 1.0, 0.8875, 0.775, 0.6625, 0.55, 0.4375, 0.325, 0.2125, 0.1, 0.1],
    'constant': [0.333333, 0.666667] + [1.0] * 10,
}


def schedule(stream_ds, tmp_path, *args):
    """train.py's get_lr for these keys (a run of 0 steps builds it)."""
    return run_train([f'--dataset={stream_ds}', '--max_iters=0', '--learning_rate=1.0', '--min_lr=0.1',
                      '--warmup_iters=2', '--lr_decay_iters=10', *args], tmp_path)['get_lr']


@pytest.mark.parametrize('decay', list(GOLDEN_LR))
def test_get_lr_values(decay, stream_ds, tmp_path):
    get_lr = schedule(stream_ds, tmp_path, f'--decay_lr={decay}', '--mode=lora')
    assert [get_lr(t) for t in range(12)] == pytest.approx(GOLDEN_LR[decay], abs=1e-6)


def test_rewarm_envelope_matches_its_definition_and_has_no_recursion_limit(stream_ds, tmp_path):
    """lr_envelope='rewarm' (MoRA code): each period decays afresh from the LR just before its restart. Checked
    against that definition written as the recursion it is, then at a step past 10,000 restarts."""
    args = ['--mode=relora', '--merge_every=3', '--restart_warmup=2', '--lr_envelope=rewarm', '--decay_lr=linear']
    get_lr = schedule(stream_ds, tmp_path, *args)

    def envelope(it, start, peak):
        return 0.1 + (1 - min(1.0, (it - start) / max(10 - start, 1))) * (peak - 0.1)

    def reference(it):
        if it < 2:
            return (it + 1) / 3
        if it < 3:
            return envelope(it, 2, 1.0)
        last, k = it // 3 * 3, it % 3
        target = lambda t: envelope(t, last, reference(last - 1))
        return target(it) if k >= 2 else target(last + 2) * (k + 1) / 3
    assert [get_lr(t) for t in range(20)] == pytest.approx([reference(t) for t in range(20)], abs=1e-12)
    assert get_lr(3) == pytest.approx(envelope(5, 3, get_lr(2)) / 3)  # the restart at 3 drops, then re-warms
    assert get_lr(30_001) > 0  # 10,000 restarts: once a RecursionError


def test_warm_start_trains_the_base_then_the_adapters(stream_ds, tmp_path):
    """warm_start=2 (ReLoRA paper): steps 1-2 move the adapted weights W and leave the adapters at their init;
    steps 3-4 leave W where step 2 put it and move the adapters."""
    common = [f'--dataset={stream_ds}', '--mode=lora', '--warm_start=2', '--lr_decay_iters=4', '--train_rest=False']
    two = run_train([*common, '--max_iters=2', '--eval_interval=2'], tmp_path / 'two')['raw_model']
    four = run_train([*common, '--max_iters=4', '--eval_interval=4'], tmp_path / 'four')['raw_model']
    base = run_train([*common, '--max_iters=0'], tmp_path / 'zero')['raw_model']
    layers = [n for n, m in base.named_modules() if getattr(m, 'adapter', None) is not None]
    assert len(layers) == 14
    for n in layers:
        b, t, f = base.get_submodule(n), two.get_submodule(n), four.get_submodule(n)
        assert not torch.equal(t.weight, b.weight) and torch.equal(f.weight, t.weight), n
        assert torch.equal(t.adapter.A, b.adapter.A) and torch.count_nonzero(t.adapter.B) == 0, n
        assert torch.count_nonzero(f.adapter.B) > 0, n


def test_optimizer_reset_prune_keeps_one_percent(stream_ds, tmp_path):
    """optimizer_reset='prune' (ReLoRA): at the restart the adapters' moments keep their largest 1% by magnitude
    (the rest set to 0) and their step count, instead of being cleared."""
    g = run_train([f'--dataset={stream_ds}', '--max_iters=2', '--eval_interval=2', '--optimizer_reset=prune',
                   *MODE_ARGS['relora']], tmp_path)
    opt, pruned = g['optimizer'], 0
    for p in g['adapter_params']:
        state = opt.state[p]
        assert int(state['step']) == 2
        for key in ('exp_avg_sq', 'exp_avg'):
            nonzero = int(torch.count_nonzero(state[key]))
            assert nonzero <= p.numel() // 100 + 1, (key, nonzero, p.numel())
            pruned += nonzero > 0
    assert pruned > 0  # B's moments were not all zero before the prune


def test_booster_alpha_scales_every_merge(stream_ds, tmp_path, monkeypatch):
    """XGBLoRA with booster_alpha 0.5: W_final == W_0 + 0.5 * (the sum of every booster's dW), 3 boosters."""
    calls, merge = [], adapters.merge_

    def recording_merge(model, alpha=1.0):
        calls.append((model, alpha, {n: m.adapter.delta().detach().clone() for n, m in model.named_modules()
                                     if getattr(m, 'adapter', None) is not None}))
        return merge(model, alpha=alpha)
    monkeypatch.setattr(adapters, 'merge_', recording_merge)
    g = run_train([f'--dataset={stream_ds}', '--max_iters=6', '--eval_interval=6', '--train_rest=False',
                   '--booster_alpha=0.5', *MODE_ARGS['xgblora']], tmp_path)
    merges = [(alpha, d) for model, alpha, d in calls if model is g['raw_model']]  # evals fold into copies
    assert len(merges) == 3 and all(alpha == 0.5 for alpha, _ in merges)
    deltas = [d for _, d in merges]
    base = g['build_model'](g['config'])
    for name, m in g['raw_model'].named_modules():
        if getattr(m, 'adapter', None) is not None:
            w0 = base.get_submodule(name).weight
            assert torch.allclose(m.weight, w0 + 0.5 * sum(d[name] for d in deltas), atol=1e-6), name
    assert any(not torch.equal(m.weight, base.get_submodule(n).weight) for n, m in g['raw_model'].named_modules()
               if getattr(m, 'adapter', None) is not None)


def test_eval_only_evaluates_once_and_trains_nothing(stream_ds, tmp_path):
    common = [f'--dataset={stream_ds}', '--mode=lora', '--max_iters=2', '--eval_interval=2']
    run_train(common, tmp_path)
    before = (tmp_path / 'ckpt.pt').read_bytes()
    last = metrics(tmp_path)[-1]
    run_train([*common, '--resume=True', '--eval_only=True'], tmp_path)
    assert (tmp_path / 'ckpt.pt').read_bytes() == before  # nothing trained, nothing saved
    assert metrics(tmp_path)[-1] == last  # the same eval of the same checkpoint, redone
    run_train([*common, '--eval_only=True'], tmp_path / 'fresh')
    rows = metrics(tmp_path / 'fresh')
    assert [r['iter'] for r in rows] == [0] and 'val_loss' in rows[0] and not (tmp_path / 'fresh' / 'ckpt.pt').exists()


def test_wandb_missing_is_one_line_error(stream_ds, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # `import wandb` now raises ImportError, as when not installed
    with pytest.raises(SystemExit) as e:
        run_train([f'--dataset={stream_ds}', '--max_iters=1', '--wandb_log=True'], tmp_path)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith('error: wandb_log=True needs the wandb package') and '\n' not in err
    assert not (tmp_path / 'config.json').exists()  # refused before anything was built or written


def test_wandb_offline_run_logs_the_metrics_rows(stream_ds, tmp_path, monkeypatch):
    """WANDB_MODE=offline: the run writes wandb/offline-run-*/run-*.wandb under WANDB_DIR, holding every value of
    every metrics.jsonl row (its records keep each logged value as JSON text)."""
    wandb = pytest.importorskip('wandb', reason='pip install wandb (requirements-dev.txt) to test wandb_log')
    for k, v in {'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path), 'WANDB_SILENT': 'true', 'WANDB_CONSOLE': 'off'}.items():
        monkeypatch.setenv(k, v)
    run_train([f'--dataset={stream_ds}', '--max_iters=2', '--eval_interval=2', '--wandb_log=True',
               '--wandb_run_name=tiny-offline-check'], tmp_path / 'run')
    wandb.teardown()  # the log is written by wandb's service process: stop it, as a script's exit does, to flush it
    logs = list((tmp_path / 'wandb').glob('offline-run-*/run-*.wandb'))
    assert len(logs) == 1, logs
    data = logs[0].read_bytes()
    rows = metrics(tmp_path / 'run')
    assert len(rows) == 4 and b'tiny-offline-check' in data  # 2 evals + 2 log lines
    for row in rows:
        for key, value in row.items():
            assert key.encode() in data and json.dumps(value).encode() in data, (key, value)
