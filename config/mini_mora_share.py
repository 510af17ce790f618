# Table 2 in miniature: MoRA r8 share (the paper's kind at large r) at LoRA r8's budget
# (config/_mini.py).
# $ python train.py config/mini_mora_share.py
exec(open('config/_mini.py').read())
out_dir = 'out/mini_mora_share'
mode = 'mora'
mora_kind = 'share'
learning_rate = 3e-3  # the sweep's best (python table2.py --stage=sweep; README)
