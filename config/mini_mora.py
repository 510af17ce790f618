# Table 2 in miniature: MoRA r8 rope (the paper's kind at small r) at LoRA r8's budget
# (config/_mini.py).
# $ python train.py config/mini_mora.py
exec(open('config/_mini.py').read())
out_dir = 'out/mini_mora'
mode = 'mora'
mora_kind = 'rope'
learning_rate = 1e-2  # the sweep's best (python table2.py --stage=sweep; README)
