"""merge.py and eval.py: merged weights reproduce the adapter model for every mode, PEFT export, char accuracy."""
import json
import subprocess
import sys

import pytest
import torch

import eval as evaluate
import merge
from data import write_dataset
from helpers import MODE_ARGS, ROOT, Oracle, run_train, write_hf_dir, write_stream
from model import LLaMA
from tokenizer import load_tokenizer


@pytest.fixture(scope='module')
def stream_ds(tmp_path_factory):
    return write_stream(tmp_path_factory.mktemp('data') / 'stream')


def logits(model, idx):
    model.eval()
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize('mode', list(MODE_ARGS))
def test_merged_model_equals_adapter_model(mode, stream_ds, tmp_path):
    """Train 5 steps (restart modes merge at 2 and 4, so base and adapters both moved), then merge.py through its
    command line: the HF dir loads strict into model.py with the adapter model's logits (fp32, 1e-5 relative)."""
    run_train([f'--dataset={stream_ds}', '--max_iters=5', '--eval_interval=5', *MODE_ARGS[mode]], tmp_path / 'run')
    adapted, _ = evaluate.load_run(tmp_path / 'run')
    r = subprocess.run([sys.executable, 'merge.py', f'--out_dir={tmp_path / "run"}', f'--merged_dir={tmp_path / "m"}'],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    merged = LLaMA.from_pretrained(tmp_path / 'm')
    idx = torch.randint(0, 258, (2, 24))
    a, b = logits(adapted, idx), logits(merged, idx)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max(), (a - b).abs().max()
    transformers = pytest.importorskip('transformers')
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'm', torch_dtype=torch.float32).eval()
    with torch.no_grad():
        c = hf(idx).logits
    assert (a - c).abs().max() <= 1e-4 * a.abs().max()


def test_merge_refuses_twice_and_foreign_base(stream_ds, tmp_path):
    run_train([f'--dataset={stream_ds}', '--max_iters=2', '--eval_interval=2', *MODE_ARGS['mora']], tmp_path / 'run')
    merge.merge_run(tmp_path / 'run', tmp_path / 'm')
    with pytest.raises(FileExistsError, match='merge twice'):
        merge.merge_run(tmp_path / 'run', tmp_path / 'm')
    ckpt = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)
    ckpt['config']['seed'] += 1  # a from-scratch base is its seed: another seed is another base
    torch.save(ckpt, tmp_path / 'run' / 'ckpt.pt')
    with pytest.raises(ValueError, match='fingerprint'):
        merge.merge_run(tmp_path / 'run', tmp_path / 'm2')


def test_peft_export_round_trip(stream_ds, tmp_path):
    """A LoRA run on an HF base, exported in PEFT format, loads with peft.PeftModel with the same logits."""
    peft = pytest.importorskip('peft')
    transformers = pytest.importorskip('transformers')
    base_dir = tmp_path / 'base'
    run_train([f'--dataset={stream_ds}', '--max_iters=1', '--eval_interval=1', '--mode=full'], tmp_path / 'pre')
    pre, _ = evaluate.load_run(tmp_path / 'pre')
    pre.save_pretrained(base_dir)
    args = [f'--dataset={stream_ds}', '--max_iters=3', '--eval_interval=3', '--mode=lora', f'--init_from={base_dir}',
            '--tokenizer=byte', '--alpha=8.0']
    run_train(args, tmp_path / 'run')
    ours, _ = evaluate.load_run(tmp_path / 'run')
    merge.export_peft(tmp_path / 'run', tmp_path / 'peft')
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / 'peft').eval()
    idx = torch.randint(0, 258, (2, 24))
    with torch.no_grad():
        a, b = logits(ours, idx), hf(idx).logits
    assert not torch.allclose(a, logits(pre, idx), atol=1e-4)  # the adapter did something
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_merged_dir_loads_in_transformers_auto_classes(tmp_path):
    """merge.py's dir of a run on an HF base (tokenizer, chat template, generation config) loads with transformers'
    Auto classes as the base does, with the merged weights; a scratch run's dir still has a generation config."""
    transformers = pytest.importorskip('transformers')
    pytest.importorskip('tokenizers')
    base = write_hf_dir(tmp_path / 'base')
    tok = load_tokenizer(base)
    text = "the cat sat on the mat. the dog sat on the log. " * 20
    docs = [[tok.bos_id] + tok.encode(text[i:i + 200]) for i in range(0, len(text), 200)]
    write_dataset(str(tmp_path / 'ds'), {'train': docs, 'val': docs[:2]}, {'tokenizer': base, 'vocab_size': tok.n_vocab})
    run_train([f'--dataset={tmp_path / "ds"}', f'--init_from={base}', f'--tokenizer={base}', '--max_iters=2',
               '--eval_interval=2', *MODE_ARGS['lora']], tmp_path / 'run')
    merge.merge_run(tmp_path / 'run', tmp_path / 'm')
    a, b = (transformers.AutoTokenizer.from_pretrained(d) for d in (base, tmp_path / 'm'))
    assert b(text).input_ids == a(text).input_ids == tok.encode(text)
    assert b.chat_template == a.chat_template and (b.bos_token, b.eos_token) == ('<|im_start|>', '<|im_end|>')
    g = transformers.GenerationConfig.from_pretrained(tmp_path / 'm')
    assert g.to_dict() == transformers.GenerationConfig.from_pretrained(base).to_dict()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'm', dtype=torch.float32).eval()
    idx = torch.tensor([docs[0][:24]])
    with torch.no_grad():
        ours, theirs = logits(evaluate.load_run(tmp_path / 'run')[0], idx), hf(idx).logits
    assert (ours - theirs).abs().max() <= 1e-4 * ours.abs().max()
    run_train([f'--dataset={write_stream(tmp_path / "stream")}', '--max_iters=1', '--eval_interval=1'], tmp_path / 's')
    merge.merge_run(tmp_path / 's', tmp_path / 'sm')
    g = transformers.GenerationConfig.from_pretrained(tmp_path / 'sm')  # the byte tokenizer's BOS and EOS
    assert (g.bos_token_id, g.eos_token_id) == (256, 257)


def test_char_score_golden():
    value = '0f8fad5b-d9cb-469f-a165-70867728950e'
    assert evaluate.char_score(value, value) == 1.0
    assert evaluate.char_score('', value) == 0.0  # missing characters count as wrong
    assert evaluate.char_score(value[:18], value) == 0.5
    wrong = ''.join('x' if i % 4 == 0 else c for i, c in enumerate(value))  # 9 of 36 positions wrong
    assert evaluate.char_score(wrong, value) == 27 / 36


def test_char_accuracy_of_perfect_and_wrong_decoders():
    from tokenizer import load_tokenizer
    tok = load_tokenizer('byte')
    pairs = [{'key': k, 'value': v, 'prompt': [256] + tok.encode(k + ':')}
             for k, v in [('a' * 36, '0f8fad5b-d9cb-469f-a165-70867728950e'), ('bb', '7c9e6679-7425-40de-944b-e07fc1f90ae7'),
                          ('c', '16fd2706-8baf-433b-82eb-8c7fada847da')]]
    perfect = Oracle({tuple(p['prompt']): tok.encode(p['value']) for p in pairs})
    assert evaluate.char_accuracy(perfect, tok, pairs, 'cpu', batch_size=2) == 1.0
    # every value shifted by one character: wrong wherever neighbours differ; the dashes never line up
    shifted = Oracle({tuple(p['prompt']): tok.encode('-' + p['value']) for p in pairs})
    expect = sum(evaluate.char_score('-' + p['value'], p['value']) for p in pairs) / 3
    assert evaluate.char_accuracy(shifted, tok, pairs, 'cpu') == pytest.approx(expect)
    assert expect < 0.2


def test_char_accuracy_left_padded_equals_per_row():
    """A tiny random model, prompts of 5 lengths (pairs of equal ones) left-padded into shared batches: the same
    score as decoding every prompt alone (what the per-length grouping computed). Values are each row's own greedy
    text with j characters spoiled, so every row scores differently and a decode changed by padding moves the mean."""
    from model import ModelConfig
    from tokenizer import load_tokenizer
    tok = load_tokenizer('byte')
    torch.manual_seed(0)
    model = LLaMA(ModelConfig(vocab_size=258, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                              intermediate_size=96)).eval()
    pairs = [{'prompt': [256] + tok.encode(k + ':')} for k in ['k', 'key7', 'kk', 'a-key', 'key8', 'zz', 'another']]
    preds, needed = [], []
    for j, p in enumerate(pairs):
        row = model.generate(torch.tensor([p['prompt']]), evaluate.UUID_LEN + 8)[0, len(p['prompt']):].tolist()
        preds.append(tok.decode(row)[:evaluate.UUID_LEN])
        # tokens until the row reads out a uuid's length (random bytes: some are invalid UTF-8 and merge)
        needed.append(next(t for t in range(1, len(row) + 1) if len(tok.decode(row[:t])) >= evaluate.UUID_LEN))
        p['value'] = ('#' * j + preds[-1][j:]).ljust(evaluate.UUID_LEN, '#')
    expect = sum(evaluate.char_score(pred, p['value']) for pred, p in zip(preds, pairs)) / len(pairs)
    assert expect > 0.8 and len(set(preds)) == len(preds)
    for bs in (64, 3):  # one padded batch; chunks of 3 that mix lengths
        assert evaluate.char_accuracy(model, tok, pairs, 'cpu', batch_size=bs) == expect
    # the decode stops once every row has a uuid's length of characters: the prefill, then one forward per token
    # but the last, not the UUID_LEN + 8 tokens it may take
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(1))
    evaluate.char_accuracy(model, tok, pairs, 'cpu', batch_size=64)
    hook.remove()
    assert len(calls) == max(needed) < evaluate.UUID_LEN + 8


@pytest.mark.parametrize('mode', ['lora', 'mora', 'xgblora'])
def test_inference_model_folds_the_adapters_into_a_copy(mode, stream_ds, tmp_path):
    """The evals' model: the trained model's logits (fp32 round-off) with no adapter left, the trained model
    untouched; in bf16 every matmul weight is bf16 and the logits are the model's to bf16 precision."""
    import copy
    from model import Linear
    # 3 steps: xgblora's booster merged at 2 has trained one step since (B != 0)
    model = run_train([f'--dataset={stream_ds}', '--max_iters=3', '--eval_interval=3', *MODE_ARGS[mode]],
                      tmp_path)['raw_model'].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(idx)[0]
        plain = copy.deepcopy(model)
        for m in plain.modules():
            if isinstance(m, Linear):
                m.adapter = None
        assert (plain(idx)[0] - ref).abs().max() > 1e-3  # the adapters moved the logits: folding them shows
        folded = evaluate.inference_model(model)
        assert all(m.adapter is None for m in folded.modules() if isinstance(m, Linear))
        torch.testing.assert_close(folded(idx)[0], ref, rtol=1e-5, atol=1e-5)
        half = evaluate.inference_model(model, torch.bfloat16)
        assert {m.weight.dtype for m in half.modules() if isinstance(m, torch.nn.Linear)} == {torch.bfloat16}
        with torch.autocast('cpu', torch.bfloat16):
            assert (half(idx)[0] - ref).abs().max() < 0.1 * ref.abs().max()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.embed_tokens.weight.dtype == torch.float32


def test_delta_ranks_follow_the_method(stream_ds, tmp_path):
    """LoRA's learned dW has rank <= r; MoRA rope on a square layer can exceed it (SPEC 2.2)."""
    ranks = {}
    for mode in ('lora', 'mora'):
        run_train([f'--dataset={stream_ds}', '--max_iters=4', '--eval_interval=4', *MODE_ARGS[mode]], tmp_path / mode)
        ranks[mode] = merge.delta_ranks(tmp_path / mode, threshold=1e-6)
    assert set(ranks['lora']) == {'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'}
    assert all(0 < n <= 4 for n in ranks['lora'].values())  # r = 4
    assert ranks['mora']['q_proj'] > 4


def test_plot_draws_the_panels_the_runs_have(tmp_path, monkeypatch):
    """eval.py --plot: one panel per metric some run logged (a memory run adds char_acc), a real PNG; without
    matplotlib a one-line message instead of a traceback."""
    pytest.importorskip('matplotlib')
    import matplotlib.pyplot as plt
    rows = {'pretrain': [{'iter': 0, 'val_loss': 5.0}, {'iter': 10, 'loss': 4.0}, {'iter': 10, 'val_loss': 4.1}],
            'memory': [{'iter': 0, 'val_loss': 3.0, 'char_acc': 0.02}, {'iter': 5, 'loss': 2.0}]}
    for name, rs in rows.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rs))
    panels = []
    monkeypatch.setattr(plt, 'subplots', lambda *a, real=plt.subplots, **k: panels.append(a[1]) or real(*a, **k))
    evaluate.plot_curves([str(tmp_path / 'pretrain')], str(tmp_path / 'a.png'))
    evaluate.plot_curves([str(tmp_path / 'pretrain'), str(tmp_path / 'memory')], str(tmp_path / 'b.png'))
    assert panels == [2, 3]  # loss + val_loss; + char_acc
    assert (tmp_path / 'b.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import fails as if it were not installed
    with pytest.raises(ImportError, match='needs matplotlib'):  # eval.py's __main__ makes it the one line
        evaluate.plot_curves([str(tmp_path / 'pretrain')], str(tmp_path / 'c.png'))
