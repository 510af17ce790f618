# Table 2 in miniature: ReMoRA r8, share <-> share_group, a merge every 100 of the 400 steps
# (config/_mini.py).
# $ python train.py config/mini_remora.py
exec(open('config/_mini.py').read())
out_dir = 'out/mini_remora'
mode = 'remora'
mora_kind = 'share'
merge_every = 100
restart_warmup = 10
learning_rate = 3e-3  # the sweep's best (python table2.py --stage=sweep; README)
