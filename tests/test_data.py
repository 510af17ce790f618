"""data/__init__.py (writer, reader, batches) and the prepare scripts, with the byte tokenizer, offline."""
import json
import os
import re
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

from data import IGNORE, Dataset, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    from tokenizer import load_tokenizer
    TOK = load_tokenizer("byte")
except ImportError:  # the prepare scripts import tokenizer.py: their tests wait for it
    TOK = None
needs_tokenizer = pytest.mark.skipif(TOK is None, reason="tokenizer.py is not in the repo yet")


def prepare(name, *args):
    p = subprocess.run([sys.executable, f"data/{name}/prepare.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def read(path):
    with open(path, "rb") as f:
        return f.read()


def examples_dataset(path, lengths, masks=None, vocab_size=258):
    """Example i is [i, i+1, ...] (first token identifies it), lengths as given."""
    seqs = [[(i + j) % vocab_size for j in range(n)] for i, n in enumerate(lengths)]
    splits = {"train": seqs, "val": seqs}
    write_dataset(str(path), splits, {"tokenizer": "byte", "vocab_size": vocab_size}, kind="examples",
                  masks=None if masks is None else {"train": masks, "val": masks})
    return Dataset(str(path)), seqs


def stream_dataset(path, n_tokens, vocab_size=258):
    tokens = np.arange(n_tokens) % vocab_size
    write_dataset(str(path), {"train": [tokens], "val": [tokens[:n_tokens // 2]]}, {"tokenizer": "byte", "vocab_size": vocab_size})
    return Dataset(str(path)), tokens


# ---------------------------------------------------------------- prepare scripts

@needs_tokenizer
def test_memory_prepare(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    runs = [subprocess.Popen([sys.executable, "data/memory/prepare.py", "--n_pairs=5", f"--seed={seed}", "--tokenizer=byte",
                              f"--out_dir={d}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for seed, d in [(7, a), (7, b), (8, c)]]  # in parallel: each start pays for importing torch
    for r in runs:
        assert r.wait() == 0, r.stdout.read()
    for f in ["train.bin", "train.idx.bin", "val.bin", "pairs.json"]:
        assert read(a / f) == read(b / f), f  # same seed -> same bytes
    assert read(a / "train.bin") != read(c / "train.bin") and read(a / "pairs.json") != read(c / "pairs.json")
    assert "already prepared" in prepare("memory", "--n_pairs=5", "--seed=7", "--tokenizer=byte", f"--out_dir={a}")
    pairs = json.loads((a / "pairs.json").read_text())
    assert len(pairs) == 5 and len({p["key"] for p in pairs}) == 5
    ds = Dataset(str(a))
    assert ds.kind == "examples" and ds.n_examples("train") == ds.n_examples("val") == 5 and ds.tokenizer == "byte"
    assert ds.meta["n_pairs"] == 5 and ds.meta["seed"] == 7 and "prepare.py" in ds.meta["prepare_cmd"]
    for i, p in enumerate(pairs):
        for s in (p["key"], p["value"]):
            assert len(s) == 36 and re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", s)
            assert uuid.UUID(s).version == 4 and str(uuid.UUID(s)) == s
        tokens, mask = ds.example("train", i)
        assert tokens.tolist() == [TOK.bos_id] + TOK.encode(f"{p['key']}:{p['value']}")  # BOS, no EOS
        assert mask.all() and not os.path.exists(a / "train.mask.bin")  # loss on every token
        assert tokens[:len(p["prompt"])].tolist() == p["prompt"] and TOK.decode(p["prompt"][1:]) == p["key"] + ":"


@needs_tokenizer
def test_text_prepare_counts(tmp_path):
    docs = ["The first document.\nIt has two lines.", "Second one.", "Third, with ünïcode.", "a jsonl doc", "another"]
    (tmp_path / "a.txt").write_text(f"{docs[0]}\n\n\n{docs[1]}\n  \n{docs[2]}\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[3:])) + "\n")
    out = tmp_path / "text"
    prepare("text", f"--files={tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}", "--tokenizer=byte", f"--out_dir={out}",
            "--val_fraction=0.2", "--num_proc=1")
    ds = Dataset(str(out))
    assert ds.kind == "stream" and ds.meta["dtype"] == "uint16" and ds.data["train"].dtype == np.uint16
    expected = sum(len(TOK.encode(d)) + 2 for d in docs)  # + BOS + EOS per document
    assert ds.n_tokens("train") + ds.n_tokens("val") == expected
    tokens = np.concatenate([ds.data["val"], ds.data["train"]]).tolist()
    assert tokens.count(TOK.bos_id) == tokens.count(TOK.eos_id) == len(docs)
    decoded, doc = [], None
    for t in tokens:  # every document is BOS + text + EOS
        if t == TOK.bos_id:
            doc = []
        elif t == TOK.eos_id:
            decoded.append(TOK.decode(doc))
        else:
            doc.append(t)
    assert sorted(decoded) == sorted(docs)


@needs_tokenizer
def test_alpaca_mask(tmp_path):
    records = [{"instruction": "Say hi.", "input": "", "output": "Hi!"},
               {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               {"instruction": "Name a colour.", "input": "", "output": "Blue, like the sea."},
               {"instruction": "Reverse: abc", "input": "", "output": "cba"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    out = tmp_path / "alpaca"
    prepare("alpaca", f"--files={tmp_path / 'alpaca.json'}", "--tokenizer=byte", f"--out_dir={out}", "--val_fraction=0.5")
    ds = Dataset(str(out))
    assert ds.kind == "examples" and ds.n_examples("train") + ds.n_examples("val") == 4
    outputs = sorted(r["output"] for r in records)
    seen = []
    for split in ("train", "val"):
        for i in range(ds.n_examples(split)):
            tokens, mask = ds.example(split, i)
            assert tokens[0] == TOK.bos_id and mask[0] == 0 and tokens[-1] == TOK.eos_id and mask[-1] == 1
            target = tokens[mask == 1].tolist()
            assert target[-1] == TOK.eos_id
            seen.append(TOK.decode(target[:-1]))
            prompt = TOK.decode(tokens[1:np.argmax(mask)].tolist())
            assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:\n")
        # the batches carry the same mask: targets that are not -100 are response + EOS
        for x, y in ds.eval_batches(split, 8, 512):
            for row in y:
                assert row[row != IGNORE].tolist()[-1] == TOK.eos_id
                assert TOK.decode(row[row != IGNORE].tolist()[:-1]) in outputs
    assert sorted(seen) == outputs
    prompts = json.loads((out / "prompts.json").read_text())
    assert len(prompts) == ds.n_examples("val") and all(p["output"] in outputs and "prompt" in p for p in prompts)


@needs_tokenizer
def test_shakespeare_markdown_to_scenes():
    import importlib.util
    spec = importlib.util.spec_from_file_location("text_prepare", os.path.join(ROOT, "data", "text", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    md_scenes = module.md_scenes
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \n"
          "Stand\\!\n\n### SCENE II. A room.\n\n**HAMLET**  \nO, that this too too solid flesh would melt\n")
    assert md_scenes(md) == ["Hamlet, ACT I, SCENE I. Elsinore.\n\nEnter BERNARDO\n\nBERNARDO:\nWho's there?\nStand!",
                             "Hamlet, ACT I, SCENE II. A room.\n\nHAMLET:\nO, that this too too solid flesh would melt"]


# ---------------------------------------------------------------- writer / reader

def test_writer_dtype_uint32(tmp_path):
    ids = [[0, 65535, 65536, 69999], [3]]
    write_dataset(str(tmp_path / "big"), {"train": ids, "val": ids}, {"tokenizer": "fake", "vocab_size": 70000},
                  kind="examples")
    ds = Dataset(str(tmp_path / "big"))
    assert ds.meta["dtype"] == "uint32" and ds.data["train"].dtype == np.uint32
    assert ds.example("train", 0)[0].tolist() == ids[0] and ds.meta["splits"]["train"]["max_token"] == 69999
    ds.check(70000, 4, "fake")
    with pytest.raises(ValueError, match="69999 >= model vocab_size 65536"):
        ds.check(65536, 4, "fake")
    ds16, _ = stream_dataset(tmp_path / "small", 100)
    assert ds16.data["train"].dtype == np.uint16 and os.path.getsize(tmp_path / "small" / "train.bin") == 200


def test_writer_rejects_bad_ids_and_masks(tmp_path):
    with pytest.raises(ValueError, match="258 outside"):
        write_dataset(str(tmp_path / "a"), {"train": [[1, 258]]}, {"tokenizer": "byte", "vocab_size": 258})
    assert not os.path.exists(tmp_path / "a" / "meta.json")  # an interrupted write does not look complete
    with pytest.raises(ValueError, match="mask"):
        write_dataset(str(tmp_path / "b"), {"train": [[1, 2, 3]]}, {"tokenizer": "byte", "vocab_size": 258},
                      masks={"train": [[0, 1]]}, kind="examples")


def test_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found.*python data/memory/prepare.py"):
        Dataset("data/memory/does_not_exist")
    (tmp_path / "nometa").mkdir()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        Dataset(str(tmp_path / "nometa"))
    ds, _ = examples_dataset(tmp_path / "ok", [5, 6])
    os.remove(tmp_path / "ok" / "val.bin")
    with pytest.raises(FileNotFoundError, match="val.bin"):
        Dataset(str(tmp_path / "ok"))
    write_dataset(str(tmp_path / "empty"), {"train": [[1, 2]], "val": []}, {"tokenizer": "byte", "vocab_size": 258},
                  kind="examples")
    with pytest.raises(ValueError, match="'val'.*empty"):
        Dataset(str(tmp_path / "empty"))
    ds, _ = stream_dataset(tmp_path / "stream", 100)
    with pytest.raises(ValueError, match="tokenized with 'byte' but the run uses 'tiktoken:gpt2'"):
        ds.check(258, 16, "tiktoken:gpt2")
    with pytest.raises(ValueError, match="'val' has 50 tokens, fewer than block_size \\+ 1 = 64"):
        ds.check(258, 63, "byte")
    with pytest.raises(ValueError, match="'train' has token id 99 >= model vocab_size 50"):
        ds.check(50, 16, "byte")
    ds.check(258, 49, "byte")
    (tmp_path / "stream" / "train.bin").write_bytes(b"\0" * 10)  # truncated file
    with pytest.raises(ValueError, match="partial"):
        Dataset(str(tmp_path / "stream"))


# ---------------------------------------------------------------- batches

def test_stream_get_batch_pure(tmp_path):
    ds, tokens = stream_dataset(tmp_path / "s", 1000)
    x, y = ds.get_batch("train", 4, 32, seed=1, it=5, micro=1)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, (x + 1) % 258)  # y is x shifted by one
    again = Dataset(str(tmp_path / "s")).get_batch("train", 4, 32, seed=1, it=5, micro=1)  # fresh reader, no state
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    for kw in (dict(it=6, micro=1), dict(it=5, micro=0), dict(it=5, micro=1, rank=1), dict(it=5, micro=1, seed=2)):
        kw.setdefault("seed", 1)
        assert not torch.equal(x, ds.get_batch("train", 4, 32, **kw)[0]), kw


@pytest.mark.filterwarnings("ignore:.*will be truncated")
def test_examples_get_batch_pad_and_epoch(tmp_path):
    lengths = [3, 7, 12, 5, 9, 2, 11, 4, 6, 8]
    masks = [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths]
    ds, seqs = examples_dataset(tmp_path / "e", lengths, masks)
    x, y = ds.get_batch("train", 4, 10, seed=3, it=0)
    assert x.shape == y.shape == (4, 10) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x, ds.get_batch("train", 4, 10, seed=3, it=0)[0])
    assert not torch.equal(x, ds.get_batch("train", 4, 10, seed=3, it=1)[0])
    for xr, yr in zip(x, y):
        i = int(xr[0])  # first token identifies the example
        n = min(lengths[i], 11) - 1
        assert xr[:n].tolist() == seqs[i][:n] and (xr[n:] == 0).all() and (yr[n:] == IGNORE).all()
        want = [t if m else IGNORE for t, m in zip(seqs[i][1:n + 1], masks[i][1:n + 1])]
        assert yr[:n].tolist() == want
    # every example exactly once per epoch, across iterations, micro-steps and ranks
    B, accum, world, n = 3, 2, 2, len(lengths)
    order = []
    for it in range(5):  # 5 * 2 * 2 * 3 = 60 samples = 6 epochs
        for micro in range(accum):
            for rank in range(world):
                order += ds.get_batch("train", B, 16, 9, it, micro, accum, rank, world)[0][:, 0].tolist()
    epochs = [sorted(order[e * n:(e + 1) * n]) for e in range(6)]
    assert all(e == list(range(n)) for e in epochs)
    assert order[:n] != order[n:2 * n]  # reshuffled each epoch


def test_truncation_warns_once(tmp_path):
    ds, _ = examples_dataset(tmp_path / "t", [4, 20, 30])
    with pytest.warns(UserWarning, match="2 of 3 examples are longer"):
        ds.get_batch("train", 2, 8, 0, 0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds.get_batch("train", 2, 8, 0, 1)


def test_eval_batches_deterministic(tmp_path):
    ds, tokens = stream_dataset(tmp_path / "s", 1000)
    a = list(ds.eval_batches("train", 4, 32, max_batches=3))
    b = list(ds.eval_batches("train", 4, 32, max_batches=3))
    assert len(a) == 3 and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert a[0][0][1].tolist() == tokens[32:64].tolist() and a[1][0][0].tolist() == tokens[128:160].tolist()
    assert sum(x.shape[0] for x, _ in ds.eval_batches("train", 4, 32)) == 999 // 32  # all windows, last batch partial
    ex, seqs = examples_dataset(tmp_path / "e", [3, 5, 4, 6, 2])
    batches = list(ex.eval_batches("val", 2, 8))
    assert [x.shape[0] for x, _ in batches] == [2, 2, 1]
    assert [int(r[0]) for x, _ in batches for r in x] == [0, 1, 2, 3, 4]  # in order
