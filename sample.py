"""
Sample from a trained run (base + its adapters, no merge needed) or from any HF checkpoint dir, nanoGPT's sample.py.
Prints the completion only (up to EOS); greedy by default, so the same command prints the same text.

$ python sample.py --out_dir=out/memory_mora --prompt="b5bab1cd-8884-47a5-acef-e37b9e250d03:"   # a run dir (eval.load_run)
$ python sample.py --init_from=out/memory_mora/merged --prompt=FILE:prompt.txt   # an HF dir (merge.py's output)
$ python sample.py --init_from=data/smollm2/SmolLM2-135M-Instruct --chat=True --prompt="What is the capital of France?"
$ python sample.py --out_dir=out/x --temperature=0.8 --top_k=200 --num_samples=3 --seed=1
"""
import os
import sys

import torch

from eval import device_error, load_run
from model import LLaMA
from tokenizer import chat_renderer, checkpoint_dir, encode_with_specials, load_tokenizer


def prompt_ids(tok, text, chat=False):
    """The prompt as training saw such text: BOS first when the tokenizer has one (as data/*/prepare.py write it);
    with chat=True the checkpoint's chat template instead, which brings its own start markers (no BOS added)."""
    if not chat:
        return ([] if tok.bos_id is None else [tok.bos_id]) + tok.encode(text)
    if not os.path.isdir(checkpoint_dir(tok.spec)):
        raise ValueError(f"--chat=True needs an HF tokenizer dir with a chat template, not tokenizer {tok.spec!r}")
    render, specials = chat_renderer(tok.spec)
    return encode_with_specials(tok, render(text), specials)


@torch.no_grad()
def completions(model, tok, ids, num_samples=1, max_new_tokens=64, temperature=0.0, top_k=0):
    """num_samples continuations of ids in one batched generate, each cut before its first EOS, decoded."""
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=model.embed_tokens.weight.device)
    out = model.eval().generate(idx, max_new_tokens, temperature=temperature, top_k=top_k or None)
    rows = [row[:row.index(tok.eos_id)] if tok.eos_id in row else row for row in out[:, len(ids):].tolist()]
    return [tok.decode(row) for row in rows]


if __name__ == '__main__':
    from configurator import configure, die
    # -----------------------------------------------------------------------------
    out_dir = 'out'  # run directory holding ckpt.pt (adapters applied on the fly)
    init_from = ''  # instead an HF checkpoint dir (a base, or merge.py's output); overrides out_dir
    tokenizer = ''  # '' = the run's or the dir's own, else 'byte' (merged scratch runs) | 'tiktoken:<name>' | a dir
    prompt = ''  # the text to continue; FILE:path reads it from a file
    chat = False  # wrap the prompt in the checkpoint's chat template (instruct bases; needs jinja2)
    num_samples = 1  # completions to draw (one batched generate)
    max_new_tokens = 64  # tokens generated per completion (it is cut at EOS)
    temperature = 0.0  # 0 = greedy; > 0 samples from softmax(logits / temperature)
    top_k = 0  # sample among the top_k most likely tokens only (0 = all)
    seed = 1337  # torch seed of the sampling
    device = 'auto'  # 'cpu' | 'cuda' | 'auto'
    # -----------------------------------------------------------------------------
    configure(globals(), sys.argv[1:], __file__)
    dev = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device  # resolved after overrides
    if error := device_error(dev):
        die(error)
    if temperature < 0 or top_k < 0 or num_samples < 1 or max_new_tokens < 1:
        die("temperature and top_k must be >= 0, num_samples and max_new_tokens >= 1")
    try:  # the expected failures of a missing run, dir, tokenizer, template or prompt file
        if init_from:
            model = LLaMA.from_pretrained(checkpoint_dir(init_from)).to(dev)  # a dir or a hub id
        else:
            model, ckpt = load_run(out_dir, dev)
        tok = load_tokenizer(tokenizer or (init_from or ckpt['config']['tokenizer']))
        text = open(prompt[5:], encoding='utf-8').read() if prompt.startswith('FILE:') else prompt
        ids = prompt_ids(tok, text, chat)
    except (OSError, ValueError, ImportError) as e:  # ImportError: sentencepiece for a SentencePiece tokenizer
        die(e)
    if not ids:
        die("empty prompt and the tokenizer has no BOS to start from: give --prompt=...")
    if len(ids) + max_new_tokens > model.config.block_size:
        die(f"prompt ({len(ids)} tokens) + max_new_tokens={max_new_tokens} exceed the model's block_size "
            f"{model.config.block_size}")
    torch.manual_seed(seed)
    print('\n---------------\n'.join(completions(model, tok, ids, num_samples, max_new_tokens, temperature, top_k)))
