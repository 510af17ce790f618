# Alpaca-GPT4 with XGBLoRA: rank-1 boosters on L/3 = 10 of 30 blocks, 25 steps each -> 40 boosters.
# $ python train.py config/alpaca_xgblora.py
exec(open('config/_alpaca.py').read())
out_dir = 'out/alpaca_xgblora'
mode = 'xgblora'
booster_steps = 25
booster_blocks = 10
booster_scale = 2.0
booster_alpha = 1.0
learning_rate = 5e-4
