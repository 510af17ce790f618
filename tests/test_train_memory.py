"""train.py's memory options end to end (issue 13): base_dtype, grad_checkpoint, loss_chunk, and their bad input.
Kept beside test_train.py (same tiny model and data) so the memory keys read as one set."""
import json
import os
import runpy
import sys

import pytest
import torch

import eval as evaluate
import merge
from data import Dataset
from helpers import MODE_ARGS, ROOT, metrics, run_train, write_stream
from model import LLaMA

HALF = ['--base_dtype=bfloat16', '--dtype=bfloat16']  # a bf16 base under bf16 autocast (CPU autocast works too)


@pytest.fixture(scope='module')
def stream_ds(tmp_path_factory):
    return write_stream(tmp_path_factory.mktemp('data') / 'stream')


def losses(out_dir):
    return [m['loss'] for m in metrics(out_dir) if 'loss' in m]


def tensors(out_dir):
    return torch.load(out_dir / 'ckpt.pt', weights_only=True)['model']


@pytest.mark.parametrize('mode', list(MODE_ARGS))
def test_grad_checkpoint_changes_nothing(mode, stream_ds, tmp_path):
    """Checkpointed blocks give the same losses and weights, with adapter dropout on: the rerun in backward
    restores the RNG state, so it draws the same masks (preserve_rng_state)."""
    common = [f'--dataset={stream_ds}', '--max_iters=3', '--eval_interval=3', '--dropout=0.1', *MODE_ARGS[mode]]
    run_train(common, tmp_path / 'off')
    g = run_train([*common, '--grad_checkpoint=True'], tmp_path / 'on')
    assert g['raw_model'].grad_checkpoint
    assert losses(tmp_path / 'on') == pytest.approx(losses(tmp_path / 'off'), rel=1e-6)
    a, b = tensors(tmp_path / 'off'), tensors(tmp_path / 'on')
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_chunked_loss_trains_like_the_whole_batch(stream_ds, tmp_path):
    common = [f'--dataset={stream_ds}', '--max_iters=3', '--eval_interval=3', *MODE_ARGS['lora']]
    run_train([*common, '--loss_chunk=0'], tmp_path / 'whole')
    run_train([*common, '--loss_chunk=24'], tmp_path / 'chunks')  # 4 x 32 tokens: 6 chunks, the last one short
    assert losses(tmp_path / 'chunks') == pytest.approx(losses(tmp_path / 'whole'), rel=1e-5)


def test_checkpointing_compiles_without_graph_breaks(stream_ds, tmp_path, monkeypatch):
    """compile=True with grad_checkpoint and a chunked loss: one graph, and the losses of eager training.
    Dynamo's backend 'aot_eager' traces forward and backward (checkpoint regions included) without C++ codegen."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda m, **kw: compile_(m, backend='aot_eager'))
    torch._dynamo.reset()
    common = [f'--dataset={stream_ds}', '--max_iters=2', '--eval_interval=2', '--grad_checkpoint=True',
              '--loss_chunk=48', *MODE_ARGS['mora']]
    run_train(common, tmp_path / 'eager')
    g = run_train([*common, '--compile=True'], tmp_path / 'compiled')
    assert losses(tmp_path / 'compiled') == pytest.approx(losses(tmp_path / 'eager'), rel=1e-5)
    x, y = g['ds'].get_batch('train', 4, 32, 0, 0)
    explain = torch._dynamo.explain(g['raw_model'])(x, y)
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()


@pytest.mark.parametrize('mode', ['lora', 'relora', 'xgblora'])
def test_bf16_base_resume_is_bit_exact(mode, stream_ds, tmp_path):
    """A bf16 base (restarts and boosters merge into it in fp32, cast once): 6 steps straight == 3 + resume + 3.
    Only the frozen base is bf16: adapters, the embeddings/norms/head trained from scratch and AdamW state are fp32."""
    common = [f'--dataset={stream_ds}', '--eval_interval=3', '--lr_decay_iters=6', '--dropout=0.1', *HALF,
              *MODE_ARGS[mode]]
    g = run_train([*common, '--max_iters=6'], tmp_path / 'straight')
    run_train([*common, '--max_iters=3'], tmp_path / 'halves')
    run_train([*common, '--max_iters=6', '--resume=True'], tmp_path / 'halves')
    a = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)
    b = torch.load(tmp_path / 'halves' / 'ckpt.pt', weights_only=True)
    assert a['config']['base_dtype'] == 'bfloat16' and a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    for (ka, sa), (kb, sb) in zip(a['optimizer']['state'].items(), b['optimizer']['state'].items()):
        assert ka == kb and all(torch.equal(sa[n], sb[n]) for n in sa), ka
    assert losses(tmp_path / 'straight') == losses(tmp_path / 'halves')
    model = g['raw_model']
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert {p.dtype for p in g['trainable']} == {torch.float32}
    assert model.embed_tokens.weight.dtype == model.norm.weight.dtype == torch.float32
    assert all(t.dtype == torch.float32 for s in a['optimizer']['state'].values() for n, t in s.items() if n != 'step')


def test_bf16_base_eval_and_merge(stream_ds, tmp_path):
    """eval.py rebuilds a bf16-base run exactly (fingerprint of the bf16 base, trained tensors back in fp32) and
    prints the training log's val loss; merge.py writes the merged weights in the base's dtype."""
    out = tmp_path / 'run'
    run_train([f'--dataset={stream_ds}', '--max_iters=3', '--eval_interval=3', *HALF, *MODE_ARGS['mora']], out)
    model, ckpt = evaluate.load_run(out)
    assert model.embed_tokens.weight.dtype == torch.float32 and model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with torch.autocast('cpu', torch.bfloat16):  # as train.py's evals: adapters folded into a bf16 copy
        loss = evaluate.estimate_loss(evaluate.inference_model(model, torch.bfloat16), Dataset(stream_ds), 'val', 4,
                                      32, 2, 'cpu')
    assert loss == [m['val_loss'] for m in metrics(out) if 'val_loss' in m][-1]
    merged = LLaMA.from_pretrained(merge.merge_run(str(out), str(tmp_path / 'merged')))
    assert merged.config.n_layer == 2


@pytest.mark.parametrize('bf16_cpu', [True, False])
def test_dtype_auto_follows_the_cpu_and_eval_py_evaluates_in_it(bf16_cpu, stream_ds, tmp_path, monkeypatch, capsys):
    """dtype=auto is bf16 autocast on a CPU with AVX-512 BF16 (or AMX) and fp32 on others; the resolved dtype is
    saved with the run, and eval.py evaluates in it: it prints the training log's last val loss to the digit."""
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: bf16_cpu)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False)
    out = tmp_path / 'run'
    run_train([f'--dataset={stream_ds}', '--max_iters=2', '--eval_interval=2', '--dtype=auto', *MODE_ARGS['mora']],
              out)
    with open(out / 'config.json') as f:  # and base_dtype=auto follows: a bf16 base for mora under bf16
        config = json.load(f)
    assert config['dtype'] == config['base_dtype'] == ('bfloat16' if bf16_cpu else 'float32')
    logged = [m['val_loss'] for m in metrics(out) if 'val_loss' in m][-1]
    capsys.readouterr()
    argv, sys.argv = sys.argv, ['eval.py', f'--out_dir={out}', '--eval_iters=2']  # the run's
    try:
        runpy.run_path(os.path.join(ROOT, 'eval.py'), run_name='__main__')
    finally:
        sys.argv = argv
    assert f"val loss {logged:.4f}" in capsys.readouterr().out
    fp32 = evaluate.inference_model(evaluate.load_run(out)[0], torch.float32)  # every matmul weight in fp32
    fp32 = evaluate.estimate_loss(fp32, Dataset(stream_ds), 'val', 4, 32, 2, 'cpu')
    # bf16 numbers are not fp32's, so the check can tell: compared unrounded (on an AVX2-only CPU, whose
    # bf16 matmuls are emulated, this run's bf16 and fp32 losses agree to 4 decimals: 4.75603 vs 4.75599)
    assert (abs(fp32 - logged) > 1e-6) == bf16_cpu


def test_base_dtype_cannot_change_on_resume(stream_ds, tmp_path, capsys):
    common = [f'--dataset={stream_ds}', '--eval_interval=2', *MODE_ARGS['lora']]
    run_train([*common, '--max_iters=2', *HALF], tmp_path)
    with pytest.raises(SystemExit) as e:
        run_train([*common, '--max_iters=4', '--dtype=bfloat16', '--base_dtype=float32', '--resume=True'], tmp_path)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "base_dtype 'bfloat16' -> 'float32'" in err and '\n' not in err


@pytest.mark.parametrize('args,needles', [
    (['--base_dtype=half'], ["base_dtype='half'", 'float32 | bfloat16 | float16']),
    (['--mode=full', '--base_dtype=bfloat16'], ["mode='full'", 'fp32 master weights', "base_dtype='float32'"]),
    (['--mode=relora', '--merge_every=2', '--warm_start=2', '--base_dtype=float16'], ['warm_start=2', 'fp32 master']),
    (['--mode=lora', '--base_dtype=bfloat16'], ['trained embeddings', 'needs autocast', 'train_rest=False']),
])
def test_half_base_in_a_mode_that_trains_it_is_refused(args, needles, stream_ds, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_train([f'--dataset={stream_ds}', '--max_iters=1', *args], tmp_path)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith('error:') and '\n' not in err, err
    assert all(n in err for n in needles), err
