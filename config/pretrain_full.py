# Tiny from-scratch pretraining, mode full (see config/_pretrain_tiny.py).
# $ python train.py config/pretrain_full.py
exec(open('config/_pretrain_tiny.py').read())
out_dir = 'out/pretrain_full'
mode = 'full'
