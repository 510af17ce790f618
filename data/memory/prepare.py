"""
UUID memorisation data (SPEC 5.1): N seeded (key, value) uuid4 pairs; each training example is `key:value`
(BOS first when the tokenizer has one, no EOS), loss on every token, kind "examples", no mask file.
$ python data/memory/prepare.py --n_pairs=32 --seed=1337 --tokenizer=data/smollm2/SmolLM2-135M-Instruct
  -> data/memory/smollm2_n32_s1337/ (train with --dataset=memory/smollm2_n32_s1337)
The val split holds the same pairs: the task measures memorisation of the training pairs, so "val" loss is the loss
on them in eval order. pairs.json ([{key, value, prompt}], prompt = token ids of `key:` incl. BOS) feeds eval.py's
greedy-decode character accuracy, so eval prompts with exactly the tokens that training saw. Same args -> same bytes.
"""
import argparse, json, os, random, sys, uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)  # run as a script from anywhere: `data` and `tokenizer` live at the repo root
from data import short_name, write_dataset  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def make_pairs(n_pairs: int, seed: int) -> list[tuple[str, str]]:
    """n_pairs (key, value) uuid4 strings, a pure function of seed (random.Random, not the global rng)."""
    rng = random.Random(seed)
    uid = lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))  # noqa: E731
    return [(uid(), uid()) for _ in range(n_pairs)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_pairs", type=int, default=32, help="number of (key, value) pairs N")
    p.add_argument("--seed", type=int, default=1337, help="seed of the pairs")
    p.add_argument("--tokenizer", default="data/smollm2/SmolLM2-135M-Instruct",
                   help="tokenizer spec: byte | tiktoken:<name> | HF checkpoint dir (default: the demo base model)")
    p.add_argument("--out_dir", default=None, help="default: data/memory/<tokenizer>_n<N>_s<seed>")
    p.add_argument("--force", action="store_true", help="rewrite even if already prepared with these args")
    args = p.parse_args()
    out_dir = args.out_dir or os.path.join(HERE, f"{short_name(args.tokenizer)}_n{args.n_pairs}_s{args.seed}")
    rel = os.path.relpath(out_dir, ROOT)
    task = {"task": "memory", "n_pairs": args.n_pairs, "seed": args.seed, "tokenizer": args.tokenizer}
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.isfile(meta_path) and not args.force:
        with open(meta_path) as f:
            old = json.load(f)
        files = ["pairs.json"] + [f"{s}{ext}" for s in ("train", "val") for ext in (".bin", ".idx.bin")]
        if all(old.get(k) == v for k, v in task.items()) and all(os.path.isfile(os.path.join(out_dir, f)) for f in files):
            print(f"already prepared: {rel} (--force to redo)")
            return
    tok = load_tokenizer(args.tokenizer)
    bos = [] if tok.bos_id is None else [tok.bos_id]
    pairs, seqs = [], []
    for key, value in make_pairs(args.n_pairs, args.seed):
        ids, prompt = bos + tok.encode(f"{key}:{value}"), bos + tok.encode(f"{key}:")
        # eval decodes greedily after `prompt`; it must be the very tokens training saw before the value
        assert ids[:len(prompt)] == prompt, (f"tokenizer {args.tokenizer!r} tokenizes {key + ':'!r} differently "
                                             f"alone ({prompt}) than inside {key + ':' + value!r} ({ids[:len(prompt)]})")
        pairs.append({"key": key, "value": value, "prompt": prompt})
        seqs.append(ids)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(meta_path):  # not "complete" while pairs.json and the .bin files are rewritten
        os.remove(meta_path)
    with open(os.path.join(out_dir, "pairs.json.tmp"), "w") as f:
        json.dump(pairs, f)
    os.replace(os.path.join(out_dir, "pairs.json.tmp"), os.path.join(out_dir, "pairs.json"))
    cmd = (f"python data/memory/prepare.py --n_pairs={args.n_pairs} --seed={args.seed} "
           f"--tokenizer={args.tokenizer} --out_dir={rel}")
    meta = write_dataset(out_dir, {"train": seqs, "val": seqs}, kind="examples",  # val = the same pairs (see top)
                         meta={**task, "vocab_size": tok.n_vocab, "prepare_cmd": cmd})
    lens = [len(s) for s in seqs]
    print(f"wrote {rel}: {args.n_pairs} pairs, {meta['splits']['train']['tokens']} tokens "
          f"({min(lens)}-{max(lens)} per example, block_size >= {max(lens) - 1} avoids truncation)")


if __name__ == "__main__":
    main()
