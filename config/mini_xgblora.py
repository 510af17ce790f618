# Table 2 in miniature: XGBLoRA, rank-1 boosters on 1 of the 4 blocks (L/3), 50 steps each:
# 8 boosters in 400 steps (config/_mini.py).
# $ python train.py config/mini_xgblora.py
exec(open('config/_mini.py').read())
out_dir = 'out/mini_xgblora'
mode = 'xgblora'
booster_steps = 50
booster_blocks = 1
booster_scale = 2.0
learning_rate = 1e-2  # the sweep's best (python table2.py --stage=sweep; README)
