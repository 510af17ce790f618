# Tiny from-scratch pretraining, mode remora (see config/_pretrain_tiny.py).
# $ python train.py config/pretrain_remora.py
exec(open('config/_pretrain_tiny.py').read())
out_dir = 'out/pretrain_remora'
mode = 'remora'
mora_kind = 'share'  # then share_group, share, ... (remora_cycle = 'paper')
