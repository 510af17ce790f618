# Tiny from-scratch pretraining, mode relora (see config/_pretrain_tiny.py).
# $ python train.py config/pretrain_relora.py
exec(open('config/_pretrain_tiny.py').read())
out_dir = 'out/pretrain_relora'
mode = 'relora'
alpha = 40.0
