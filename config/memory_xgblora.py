# XGBLoRA on the CPU memory demo: rank-1 boosters on 10 of 30 blocks (L/3), 10 steps per booster.
# $ python train.py config/memory_xgblora.py
exec(open('config/_memory_cpu.py').read())
out_dir = 'out/memory_xgblora'
mode = 'xgblora'
learning_rate = 3e-3
booster_steps = 10
booster_blocks = 10
booster_scale = 2.0
