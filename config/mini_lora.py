# Table 2 in miniature: LoRA r8 (alpha 16, scale 2) on all seven projections, 78,848 params
# (config/_mini.py).
# $ python train.py config/mini_lora.py
exec(open('config/_mini.py').read())
out_dir = 'out/mini_lora'
mode = 'lora'
alpha = 16.0
learning_rate = 3e-3  # the sweep's best (python table2.py --stage=sweep; README)
