# Tiny from-scratch pretraining, mode remora (see config/_pretrain_tiny.py).
# $ python train.py config/pretrain_remora.py
exec(open('config/_pretrain_tiny.py').read())
out_dir = 'out/pretrain_remora'
mode = 'remora'
mora_kind = 'share'  # then share_group, share, ... (remora_cycle = 'paper')
merge_every = 150  # restarts at 150, 300, 450: four periods (the paper: 2k of 10k steps, five)
restart_warmup = 10  # steps of LR re-warm after each restart (the paper: 50 of a 2k period)
