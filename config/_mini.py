# Shared settings of MoRA Table 2 in miniature on a CPU (issue 16); config/mini_<mode>.py exec it.
# Base: a 0.89M-parameter byte-level LLaMA made here (config/mini_base.py, merged to
# out/mini_base/hf): a tiny model, not an LLM. Everything end to end: `python table2.py`.
# Pressure as in the paper: 10,000 pairs x 122 bits / LLaMA-2 7B's 19,988,480 LoRA r8 params
# (all seven projections) = 0.0610 memorised bits per trainable parameter. LoRA r8 on all seven
# projections here: 4 layers x (4 x 8 x (128+128) + 2 x 8 x (128+352) + 8 x (352+128)) = 78,848
# params -> 0.0610 x 78,848 / 122 = 39.4 -> N = 40 pairs (r 32: 315,392 -> 158; r 1: 9,856 -> 5).
# $ python data/memory/prepare.py --tokenizer=byte --n_pairs=40 --seed=1
# tokens per step: 16 pairs x 73 positions = 1,168 (BOS + 36 + ':' + 36 bytes, shifted);
# 400 steps = 160 epochs of the 40 pairs.
# Protocol (fixed before the sweep, table2.py): LR grid 3e-4 1e-3 3e-3 1e-2 3e-2 per method,
# seed 1; best LR = the highest mean char acc over the evals at steps 100-400 (equal to 0.1 pt:
# the lower final val loss); a best at an edge of the grid adds the next x3 point beyond it (up to
# 3 times); then seeds 1-3 (of the pairs and of the init) at that LR: mean and std.
init_from = 'out/mini_base/hf'
tokenizer = 'byte'
dataset = 'memory/byte_n40_s1'
batch_size = 16
block_size = 73  # every example is 74 tokens: 73 inputs + 73 shifted targets
max_iters = 400
warmup_iters = 20
decay_lr = 'constant'  # as the paper's memory runs and config/_memory_gpu.py
eval_interval = 100
log_interval = 20
eval_iters = 10  # val loss over up to 10 batches of 16 = every pair for N <= 160
char_acc_pairs = -1  # greedy-decode every pair at each eval
r = 8
dtype = 'float32'  # pinned: numbers must not move with what dtype='auto' means here (issue 15)
seed = 1
