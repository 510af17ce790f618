# Shared settings of the MoRA paper's memorisation run (SPEC 5.1, Table 2) on its own base, LLaMA-2 7B.
# Base: the hub id, downloaded once into the HF cache (gated: accept Meta's license, then `hf auth login`).
# Data: $ python data/memory/prepare.py --n_pairs=10000 --tokenizer=meta-llama/Llama-2-7b-hf
# Paper setting: 10,000 pairs, all seven projections, ~1,000 steps of ~1,000 pairs, warmup 100.
# tokens per step: 32 pairs x 80 positions x 32 micro-steps = 81,920 (1,024 pairs); 1,000 steps = ~100 epochs.
# Memory: on a GPU base_dtype='auto' keeps the frozen base in bf16; blocks are checkpointed (grad_checkpoint).
init_from = 'meta-llama/Llama-2-7b-hf'
dataset = 'memory/llama_n10000_s1337'
batch_size = 32
gradient_accumulation_steps = 32
block_size = 80  # `key:value` is 59-75 tokens with the Mistral tokenizer; prepare.py prints Llama 2's bound
max_iters = 1000
warmup_iters = 100
decay_lr = 'constant'
eval_interval = 100
log_interval = 10
eval_iters = 32  # 32 batches of 32: the first 1,024 pairs
char_acc_pairs = 1000  # greedy-decode the first 1,000 pairs at each eval (a fixed sample, SPEC 5.1)
r = 8
grad_checkpoint = True  # with the bf16 base: LoRA/MoRA r8 on a 7B fit one 24 GB GPU (README, what fits where)
