"""Shared by the tests: run train.py in-process on a tiny from-scratch LLaMA and byte-level data; a fixed decoder."""
import json
import os
import runpy
import signal
import sys

import torch

from data import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--init_from=scratch', '--tokenizer=byte', '--n_layer=2', '--n_head=4', '--n_kv_head=2', '--n_embd=64',
        '--intermediate_size=96', '--batch_size=4', '--block_size=32', '--eval_iters=2', '--log_interval=1',
        '--warmup_iters=2', '--learning_rate=1e-2', '--r=4', '--device=cpu', '--compile=False',
        '--dtype=float32']  # fp32 whatever the CPU: tests assert exact values (dtype=auto is bf16 on bf16 CPUs)
MODE_ARGS = {
    'full': ['--mode=full', '--learning_rate=3e-3'],
    'lora': ['--mode=lora'],
    'mora': ['--mode=mora', '--mora_kind=rope'],
    'relora': ['--mode=relora', '--merge_every=2', '--restart_warmup=1'],
    'remora': ['--mode=remora', '--mora_kind=share', '--merge_every=2', '--restart_warmup=1'],
    'xgblora': ['--mode=xgblora', '--booster_steps=2', '--booster_blocks=1'],
}


def write_stream(path):
    """A byte-level stream of short repetitive English, learnable in a few steps."""
    text = "the cat sat on the mat. the dog sat on the log. " * 40
    docs = [[256] + list(text[i:i + 400].encode()) + [257] for i in range(0, len(text), 400)]
    write_dataset(str(path), {'train': docs, 'val': docs[:2]}, {'tokenizer': 'byte', 'vocab_size': 258})
    return str(path)


def run_train(args, out_dir, tiny=True):
    """Run train.py in this process and return its globals (model, optimizer, ... as the run left them)."""
    argv, handler = sys.argv, signal.getsignal(signal.SIGINT)
    sys.argv = ['train.py', *(TINY if tiny else []), *args, f'--out_dir={out_dir}']  # last: beats config files
    try:
        return runpy.run_path(os.path.join(ROOT, 'train.py'), run_name='__main__')
    finally:
        sys.argv = argv
        signal.signal(signal.SIGINT, handler)


def metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


class Oracle(torch.nn.Module):
    """A decoder that emits a fixed continuation per prompt: the true value, or a corrupted one."""

    def __init__(self, answers):
        super().__init__()
        self.answers = answers

    def generate(self, idx, max_new_tokens, temperature=0.0, pad=None, done=None):  # emits all at once: no done
        pad = [0] * len(idx) if pad is None else pad.tolist()  # left padding: the prompt starts at pad[b]
        rows = [p + self.answers[tuple(p[k:])][:max_new_tokens] for p, k in zip(idx.tolist(), pad)]
        return torch.tensor([r + [0] * (idx.size(1) + max_new_tokens - len(r)) for r in rows])


# SmolLM2-Instruct's chat template, verbatim from its tokenizer_config.json
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
                 "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_hf_dir(path, vocab_size=320):
    """A tiny HF checkpoint dir laid out as SmolLM2-Instruct's: a random 2-layer LLaMA, a byte-level BPE tokenizer.json
    trained here (offline) with its specials, tokenizer_config.json with its chat template, generation_config.json."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from model import LLaMA, ModelConfig
    specials = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']  # ids 0, 1, 2 as in SmolLM2
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat. the dog sat on the log. What is the capital of France?"] * 4,
                            trainer)
    os.makedirs(path)
    tok.save(os.path.join(path, 'tokenizer.json'))
    added = {str(i): {'content': s, 'lstrip': False, 'normalized': False, 'rstrip': False, 'single_word': False,
                      'special': True} for i, s in enumerate(specials)}
    config = {'add_prefix_space': False, 'added_tokens_decoder': added, 'bos_token': '<|im_start|>',
              'eos_token': '<|im_end|>', 'pad_token': '<|im_end|>', 'unk_token': '<|endoftext|>',
              'clean_up_tokenization_spaces': False, 'tokenizer_class': 'GPT2Tokenizer', 'chat_template': CHAT_TEMPLATE}
    with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(path, 'generation_config.json'), 'w') as f:
        json.dump({'bos_token_id': 1, 'eos_token_id': 2, 'pad_token_id': 2}, f)
    torch.manual_seed(0)
    LLaMA(ModelConfig(vocab_size=tok.get_vocab_size(), block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      intermediate_size=96, tie_embeddings=True, bos_token_id=1, eos_token_id=2)).save_pretrained(path)
    return str(path)
