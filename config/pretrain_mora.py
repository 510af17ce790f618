# Tiny from-scratch pretraining, mode mora (see config/_pretrain_tiny.py).
# $ python train.py config/pretrain_mora.py
exec(open('config/_pretrain_tiny.py').read())
out_dir = 'out/pretrain_mora'
mode = 'mora'
mora_kind = 'share'  # the paper pretrains MoRA with sharing
