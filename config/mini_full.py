# Table 2 in miniature: full fine-tuning of every weight of the base (see config/_mini.py).
# $ python train.py config/mini_full.py
exec(open('config/_mini.py').read())
out_dir = 'out/mini_full'
mode = 'full'
learning_rate = 1e-3  # the sweep's best (python table2.py --stage=sweep; README)
