"""sample.py through its command line: greedy == model.generate, a run dir == its merged dir, seeded top-k sampling,
prompts from files, and chat-template prompts == transformers' apply_chat_template.
    python -m pytest -q tests/test_sample.py
"""
import os
import runpy
import sys

import pytest
import torch

import merge
import sample
from eval import build_model, load_run
from helpers import MODE_ARGS, ROOT, run_train, write_hf_dir, write_stream
from model import LLaMA
from tokenizer import load_tokenizer

PROMPT = 'the'  # a prompt whose greedy text changes without BOS or without the adapters
QUESTION = 'What is the capital of France?'
SMOLLM2 = os.path.join(ROOT, 'data', 'smollm2', 'SmolLM2-135M-Instruct')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A 6-step MoRA run from scratch on byte-level text, and its merged HF dir."""
    d = tmp_path_factory.mktemp('sample')
    run_train([f'--dataset={write_stream(d / "stream")}', '--max_iters=6', '--eval_interval=6', *MODE_ARGS['mora']],
              d / 'run')
    merge.merge_run(d / 'run', d / 'merged')
    return d


def sample_py(capsys, *args):
    """Run sample.py in this process (runpy, as a script) and return what it printed: (stdout, stderr, exit code)."""
    argv, code = sys.argv, 0
    sys.argv = ['sample.py', '--device=cpu', *map(str, args)]
    capsys.readouterr()
    try:
        runpy.run_path(os.path.join(ROOT, 'sample.py'), run_name='__main__')
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return out, err, code


def completion(capsys, *args):
    out, err, code = sample_py(capsys, *args)
    assert code == 0, err
    return out


def greedy(model, ids, n):
    """model.generate's greedy continuation of ids, as token ids."""
    with torch.no_grad():
        return model.eval().generate(torch.tensor([ids]), n)[0, len(ids):].tolist()


def test_greedy_from_run_dir_equals_generate_and_the_merged_dir(run, tmp_path, capsys):
    model, _ = load_run(run / 'run')
    tok = load_tokenizer('byte')
    ids = [tok.bos_id] + tok.encode(PROMPT)  # BOS first, as the data scripts write every example
    out = greedy(model, ids, 20)
    base = build_model(torch.load(run / 'run' / 'ckpt.pt', weights_only=True)['config'])  # the seeded scratch init
    assert out != greedy(base, ids, 20) and out != greedy(model, ids[1:], 20)  # else this test would show nothing
    expected = tok.decode(out[:out.index(tok.eos_id)] if tok.eos_id in out else out)
    assert completion(capsys, f'--out_dir={run / "run"}', f'--prompt={PROMPT}', '--max_new_tokens=20') == expected + '\n'
    (tmp_path / 'prompt.txt').write_text(PROMPT, encoding='utf-8')
    merged = completion(capsys, f'--init_from={run / "merged"}', '--tokenizer=byte',
                        f'--prompt=FILE:{tmp_path / "prompt.txt"}', '--max_new_tokens=20')
    assert merged == expected + '\n'


def test_seeded_top_k_samples(run, capsys):
    """Temperature, top_k, num_samples and seed all reach generate: the script's text is the in-process draw's."""
    model, _ = load_run(run / 'run')
    tok = load_tokenizer('byte')
    args = (f'--out_dir={run / "run"}', f'--prompt={PROMPT}', '--max_new_tokens=16', '--num_samples=3',
            '--temperature=1.5', '--top_k=4', '--seed=7')
    ids = [tok.bos_id] + tok.encode(PROMPT)
    torch.manual_seed(7)
    with torch.no_grad():
        rows = model.eval().generate(torch.tensor([ids] * 3), 16, temperature=1.5, top_k=4)[:, len(ids):].tolist()
    want = [tok.decode(row[:row.index(tok.eos_id)] if tok.eos_id in row else row) for row in rows]
    assert len(set(want)) > 1  # three different draws
    assert completion(capsys, *args) == '\n---------------\n'.join(want) + '\n'


def chat_ids_hf(path, text):
    transformers = pytest.importorskip('transformers')
    ids = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(
        [{'role': 'user', 'content': text}], add_generation_prompt=True, tokenize=True)
    return list(ids['input_ids'] if isinstance(ids, dict) or hasattr(ids, 'keys') else ids)


def test_chat_prompt_equals_transformers_and_samples(tmp_path, capsys):
    pytest.importorskip('tokenizers')
    path = write_hf_dir(tmp_path / 'hf')
    tok = load_tokenizer(path)
    ids = sample.prompt_ids(tok, QUESTION, chat=True)
    assert ids == chat_ids_hf(path, QUESTION)
    assert ids[0] == 1 and ids.count(1) == 3  # <|im_start|> as one id (system, user, assistant), no extra BOS
    out = greedy(LLaMA.from_pretrained(path), ids, 12)
    expected = tok.decode(out[:out.index(tok.eos_id)] if tok.eos_id in out else out)
    out = completion(capsys, f'--init_from={path}', '--chat=True', f'--prompt={QUESTION}', '--max_new_tokens=12')
    assert out == expected + '\n'


@pytest.mark.skipif(not os.path.isdir(SMOLLM2), reason="needs python data/smollm2/prepare.py")
def test_chat_prompt_equals_transformers_on_smollm2():
    assert sample.prompt_ids(load_tokenizer(SMOLLM2), QUESTION, chat=True) == chat_ids_hf(SMOLLM2, QUESTION)


def test_errors(run, tmp_path, capsys):
    cases = [([f'--out_dir={tmp_path}'], 'no checkpoint'),
             ([f'--init_from={run / "merged"}', '--prompt=x'], 'tokenizer'),  # a scratch run's merge: no tokenizer files
             ([f'--out_dir={run / "run"}', '--chat=True', '--prompt=x'], 'chat'),
             ([f'--out_dir={run / "run"}', '--prompt=FILE:/nonexistent.txt'], 'nonexistent'),
             ([f'--out_dir={run / "run"}', '--max_new_tokens=100'], 'block_size'),
             ([f'--out_dir={run / "run"}', '--device=gpu'], "device='gpu'")]
    for args, msg in cases:
        out, err, code = sample_py(capsys, *args)
        assert code == 2 and err.startswith('error:') and msg in err and not out, (args, err)
        assert len(err.strip().splitlines()) == 1, err
