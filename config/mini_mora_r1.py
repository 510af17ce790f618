# Table 2 in miniature at the paper's small ratio: MoRA r1 rope at LoRA r1's budget, 5 pairs
# (python data/memory/prepare.py --tokenizer=byte --n_pairs=5 --seed=1).
# $ python train.py config/mini_mora_r1.py
exec(open('config/_mini.py').read())
out_dir = 'out/mini_mora_r1'
dataset = 'memory/byte_n5_s1'
mode = 'mora'
mora_kind = 'rope'
r = 1
learning_rate = 3e-2  # the sweep's best (9e-2, the edge's extension, collapsed; README)
