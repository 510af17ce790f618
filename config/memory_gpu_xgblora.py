# One-GPU memory reproduction: XGBLoRA, rank-1 boosters on 10 of 30 blocks (L/3), 50 steps each.
# Not yet run on a GPU (see README).
# $ python train.py config/memory_gpu_xgblora.py
exec(open('config/_memory_gpu.py').read())
out_dir = 'out/memory_gpu_xgblora'
mode = 'xgblora'
learning_rate = 1e-3
booster_steps = 50
booster_blocks = 10
booster_scale = 2.0
