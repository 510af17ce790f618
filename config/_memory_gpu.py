# Shared settings of the one-GPU memory reproduction (SPEC 5.1, MoRA Table 2 in miniature).
# Pressure as in the paper: ~0.06 memorised bits per trainable parameter. LoRA r8 on all seven projections
# of SmolLM2-135M is ~2.4M params, so ~1,000 uuid pairs (122 bits each).
# $ python data/memory/prepare.py --n_pairs=1000
# tokens per step: 128 pairs x 73 positions = 9,344; 800 steps = ~100 epochs.
init_from = 'data/smollm2/SmolLM2-135M-Instruct'
dataset = 'memory/smollm2_n1000_s1337'
batch_size = 128
block_size = 73  # the longest of the 1,000 examples is 74 tokens: 73 inputs + 73 shifted targets
max_iters = 800
warmup_iters = 50
decay_lr = 'constant'
eval_interval = 100
log_interval = 10
eval_iters = 8  # 8 batches of 128 = every pair once
char_acc_pairs = -1
r = 8
