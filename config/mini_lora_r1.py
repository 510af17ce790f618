# Table 2 in miniature at the paper's small ratio: LoRA r1 (r 8 of 4096 ~ 1/512; 1 of 128 here),
# alpha 2 (scale 2), 9,856 params. N at the same pressure: 0.0610 x 9,856 / 122 = 4.9 -> 5 pairs
# (python data/memory/prepare.py --tokenizer=byte --n_pairs=5 --seed=1); 400 steps = 1,280 epochs.
# $ python train.py config/mini_lora_r1.py
exec(open('config/_mini.py').read())
out_dir = 'out/mini_lora_r1'
dataset = 'memory/byte_n5_s1'
mode = 'lora'
r = 1
alpha = 2.0
learning_rate = 1e-2  # the sweep's best (python table2.py --stage=sweep; README)
