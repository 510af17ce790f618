"""
Merge a trained run into its base and write a plain Hugging Face LLaMA directory (or export LoRA for PEFT).

$ python merge.py --out_dir=out/memory_mora --merged_dir=out/memory_mora/merged
$ python merge.py --out_dir=out/memory_lora --peft_dir=out/memory_lora/peft      # PEFT adapter format
$ python merge.py --out_dir=out/pretrain_mora --ranks=True      # rank of the learned dW per projection (Figure 5)

The merge is a pure function of state dicts: base weights + the run's checkpoint -> merged weights that load
strict into model.py and into transformers' LlamaForCausalLM. Settings (method, r, r_hat, kind per layer,
scale) come from the checkpoint; nothing is recomputed.
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

import adapters
from eval import build_model, load_run
from tokenizer import checkpoint_dir

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'tokenizer.model', 'special_tokens_map.json',
                   'chat_template.jinja', 'generation_config.json')


def merged_state_dict(base_sd, ckpt):
    """The run's weights folded into the base: moved weights first, then W + dW of every adapter."""
    adapter_keys = {k for k in ckpt['model'] if '.adapter.' in k}
    sd = dict(base_sd)
    sd.update({k: v for k, v in ckpt['model'].items() if k not in adapter_keys})  # trained or moved base tensors
    if not ckpt['adapters']:
        return sd
    return adapters.merge_state_dict(sd, ckpt['adapters'], {k: ckpt['model'][k] for k in adapter_keys})


def merge_run(out_dir, merged_dir):
    """Write merged_dir for the run in out_dir: config.json, model.safetensors, the base's tokenizer files and
    generation_config.json, all that transformers' AutoModelForCausalLM / AutoTokenizer / GenerationConfig load."""
    if os.path.exists(os.path.join(merged_dir, 'model.safetensors')):
        raise FileExistsError(f"{merged_dir} already holds a merged model; refusing to merge twice")
    model, ckpt = load_run(out_dir)  # checks the base fingerprint
    base = build_model(ckpt['config'])
    base.load_state_dict(merged_state_dict(base.state_dict(), ckpt), strict=True)
    base.save_pretrained(merged_dir)
    # the run's tokenizer travels with the weights (a dir or hub id: the base's own, or --tokenizer=<dir> from
    # scratch), and the base's generation settings; 'byte' and tiktoken names have no files
    config = ckpt['config']
    copies = {name: checkpoint_dir(config['tokenizer']) for name in TOKENIZER_FILES}  # file name -> source dir
    base_dir = None if config['init_from'] == 'scratch' else checkpoint_dir(config['init_from'])
    if base_dir and os.path.isfile(os.path.join(base_dir, 'generation_config.json')):  # the base's, if it has one
        copies['generation_config.json'] = base_dir
    for name, src in copies.items():
        if os.path.isdir(src) and os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), merged_dir)
    gen = os.path.join(merged_dir, 'generation_config.json')
    if not os.path.exists(gen):  # a base without one (scratch): from the model config, as transformers derives it
        with open(gen, 'w') as f:
            json.dump({'bos_token_id': base.config.bos_token_id, 'eos_token_id': base.config.eos_token_id}, f, indent=1)
    print(f"merged {len(ckpt['adapters'] or {})} adapted layers of {out_dir} (iter {ckpt['iter_num']}) into {merged_dir}")
    return merged_dir


def delta_ranks(out_dir, threshold=0.1):
    """MoRA Figure 5: per projection type, the mean number of singular values > threshold of the learned update
    dW = merged W - base W (every mode alike: full, adapters, and restart modes' moved base plus adapters)."""
    _, ckpt = load_run(out_dir)
    base = build_model(ckpt['config']).state_dict()
    merged = merged_state_dict(base, ckpt)
    counts = {}
    for k, w in merged.items():
        if k.endswith('_proj.weight'):
            s = torch.linalg.svdvals((w - base[k]).double())
            counts.setdefault(k.split('.')[-2], []).append(int((s > threshold).sum()))
    return {proj: sum(c) / len(c) for proj, c in counts.items()}


def export_peft(out_dir, peft_dir):
    """LoRA runs only: adapter_config.json + adapter_model.safetensors that peft.PeftModel.from_pretrained loads."""
    _, ckpt = load_run(out_dir)
    settings = ckpt['adapters'] or {}
    if ckpt['config']['mode'] != 'lora' or any(s['method'] != 'lora' for s in settings.values()):
        raise ValueError(f"PEFT export needs a mode='lora' run; {out_dir} is mode={ckpt['config']['mode']!r}")
    s = next(iter(settings.values()))
    targets = sorted({name.rsplit('.', 1)[-1] for name in settings})
    config = {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': s['r'], 'lora_alpha': s['scale'] * s['r'],
              'target_modules': targets, 'lora_dropout': 0.0, 'bias': 'none', 'fan_in_fan_out': False,
              'base_model_name_or_path': ckpt['config']['init_from'], 'inference_mode': True}
    # our layers.3.self_attn.q_proj.adapter.A -> PEFT's base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
    tensors = {}
    for name in settings:
        for ours, theirs in (('A', 'lora_A'), ('B', 'lora_B')):
            t = ckpt['model'][f"{name}.adapter.{ours}"]
            tensors[f"base_model.model.model.{name}.{theirs}.weight"] = t.contiguous()
    os.makedirs(peft_dir, exist_ok=True)
    save_file(tensors, os.path.join(peft_dir, 'adapter_model.safetensors'))
    with open(os.path.join(peft_dir, 'adapter_config.json'), 'w') as f:
        json.dump(config, f, indent=1)
    print(f"exported {len(settings)} LoRA layers of {out_dir} to {peft_dir} (PEFT format)")
    return peft_dir


if __name__ == '__main__':
    from configurator import configure, die
    # -----------------------------------------------------------------------------
    out_dir = 'out'  # the run to merge (holds ckpt.pt)
    merged_dir = ''  # write the merged HF model here ('' = <out_dir>/merged)
    peft_dir = ''  # instead export the LoRA adapter in PEFT format here (mode='lora' runs)
    ranks = False  # instead print the singular values > 0.1 of the learned dW per projection type
    # -----------------------------------------------------------------------------
    configure(globals(), sys.argv[1:], __file__)
    try:  # the expected failures of a missing or mismatched run or base; anything else keeps its traceback
        with torch.no_grad():
            if ranks:
                print(f"{out_dir}: singular values > 0.1 of the learned dW, mean over layers: "
                      + ", ".join(f"{proj} {n:.1f}" for proj, n in delta_ranks(out_dir).items()))
            elif peft_dir:
                export_peft(out_dir, peft_dir)
            else:
                merge_run(out_dir, merged_dir or os.path.join(out_dir, 'merged'))
    except (OSError, ValueError) as e:  # OSError: a missing file or run, a hub id offline
        die(e)
