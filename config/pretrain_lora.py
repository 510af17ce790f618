# Tiny from-scratch pretraining, mode lora (see config/_pretrain_tiny.py).
# $ python train.py config/pretrain_lora.py
exec(open('config/_pretrain_tiny.py').read())
out_dir = 'out/pretrain_lora'
mode = 'lora'
alpha = 40.0  # scale 2, as LoRA's usual alpha = 2r
