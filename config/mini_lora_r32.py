# Table 2 in miniature, large budget: LoRA r32 (1/4 of width 128; alpha 64 keeps scale 2),
# 315,392 params. N at the same pressure: 0.0610 x 315,392 / 122 = 158 pairs
# (python data/memory/prepare.py --tokenizer=byte --n_pairs=158 --seed=1);
# tokens per step as config/_mini.py: 16 x 73 = 1,168; 400 steps = 40 epochs.
# $ python train.py config/mini_lora_r32.py
exec(open('config/_mini.py').read())
out_dir = 'out/mini_lora_r32'
dataset = 'memory/byte_n158_s1'
mode = 'lora'
r = 32
alpha = 64.0
learning_rate = 1e-3  # the sweep's best (python table2.py --stage=sweep; README)
