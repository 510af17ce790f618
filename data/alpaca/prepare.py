"""
Instruction data (SPEC 5.3) in Alpaca format (instruction, input, output) as an "examples" dataset with loss masks:
prompt tokens mask 0 (labels -100), response tokens + EOS mask 1.
$ python data/alpaca/prepare.py --files=alpaca_gpt4.json --tokenizer=data/smollm2/SmolLM2-135M-Instruct   # local .json/.jsonl
$ python data/alpaca/prepare.py --source=hub --hf_dataset=vicgalle/alpaca-gpt4 --tokenizer=...            # needs the hub
$ python data/alpaca/prepare.py ... --chat_template=True    # the checkpoint's chat template instead of the Alpaca prompt
Example = [BOS] + prompt + response + [EOS]; prompt and response are tokenized separately, so the masked boundary is
exactly where generation starts. With --chat_template the template supplies its start markers (no BOS added) and its
special-token strings (<|im_start|>) become their ids. prompts.json: val prompts (text, ids for generate) + references.
"""
import argparse, json, os, random, socket, sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)  # `data` and `tokenizer` live at the repo root
from data import short_name, write_dataset  # noqa: E402
from tokenizer import chat_renderer, encode_with_specials, load_tokenizer  # noqa: E402

# the Stanford Alpaca prompt template
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
                   "\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def read_records(args):
    if args.source == "hub":
        import datasets  # lazy: only this route needs the hub
        host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
        try:  # fail in milliseconds when offline instead of waiting on retries
            socket.create_connection((host, 443), timeout=3).close()
        except OSError:
            sys.exit(f"error: {host} is unreachable; pass a local file with --files=...")
        return [dict(r) for r in datasets.load_dataset(args.hf_dataset, split="train")]
    records = []
    for path in args.files.split(","):
        with open(path, encoding="utf-8") as f:
            records += [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)
    return records


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=None, choices=["hub", "files"], help="default: files when --files is given")
    p.add_argument("--hf_dataset", default="vicgalle/alpaca-gpt4")
    p.add_argument("--files", default="", help="comma-separated .json (a list of records) / .jsonl paths")
    p.add_argument("--tokenizer", default="byte", help="byte | tiktoken:<name> | HF checkpoint dir")
    p.add_argument("--chat_template", type=lambda s: {"true": True, "false": False}[s.lower()], default=False,
                   help="True: format with the tokenizer dir's chat template")
    p.add_argument("--val_fraction", type=float, default=0.02, help="share of records held out for val")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val split")
    p.add_argument("--out_dir", default=None, help="default: data/alpaca/<dataset>_<tokenizer>[_chat]")
    args = p.parse_args()
    args.source = args.source or ("files" if args.files else "hub")
    tok = load_tokenizer(args.tokenizer)
    if tok.eos_id is None:
        sys.exit(f"error: tokenizer {args.tokenizer!r} has no EOS token; the response must end with one")
    try:
        render, specials = chat_renderer(args.tokenizer) if args.chat_template else (None, {})
    except ValueError as e:
        sys.exit(f"error: --chat_template=True but {e}")
    bos = [tok.bos_id] if tok.bos_id is not None and not args.chat_template else []
    records = read_records(args)
    name = short_name(args.hf_dataset if args.source == "hub" else args.files.split(",")[0].rsplit(".", 1)[0])
    out_dir = args.out_dir or os.path.join(HERE, f"{name}_{short_name(args.tokenizer)}" + "_chat" * args.chat_template)
    n_val = min(max(1, round(len(records) * args.val_fraction)), len(records) - 1)
    val = set(random.Random(args.seed).sample(range(len(records)), n_val))
    seqs, masks, prompts = {"train": [], "val": []}, {"train": [], "val": []}, []
    for i, r in enumerate(records):
        instruction, inp, output = r["instruction"].strip(), (r.get("input") or "").strip(), r["output"].strip()
        if args.chat_template:
            prompt = render(instruction + ("\n\n" + inp if inp else ""))
        else:
            prompt = (PROMPT_INPUT if inp else PROMPT_NO_INPUT).format(instruction=instruction, input=inp)
        prompt_ids = bos + encode_with_specials(tok, prompt, specials)
        response_ids = tok.encode(output) + [tok.eos_id]
        split = "val" if i in val else "train"
        seqs[split].append(prompt_ids + response_ids)
        masks[split].append([0] * len(prompt_ids) + [1] * len(response_ids))
        if split == "val":
            prompts.append({"prompt": prompt, "prompt_ids": prompt_ids, "output": output})
        if (i + 1) % 10_000 == 0:
            print(f"tokenized {i + 1:,} / {len(records):,}")
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "meta.json")):  # not "complete" while rewriting
        os.remove(os.path.join(out_dir, "meta.json"))
    with open(os.path.join(out_dir, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    cmd = " ".join(["python data/alpaca/prepare.py", *sys.argv[1:]])
    meta = write_dataset(out_dir, seqs, masks=masks, kind="examples",
                         meta={"task": "alpaca", "source": args.source, "tokenizer": args.tokenizer, "vocab_size": tok.n_vocab,
                               "chat_template": args.chat_template, "prepare_cmd": cmd})
    lens = sorted(len(s) for s in seqs["train"])
    print(f"wrote {os.path.relpath(out_dir, ROOT)}: " + ", ".join(f"{s} {v['examples']:,} examples / {v['tokens']:,} tokens"
          for s, v in meta["splits"].items()) + f"; train length median {lens[len(lens) // 2]}, max {lens[-1]}")


if __name__ == "__main__":
    main()
