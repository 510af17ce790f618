# Table 2 in miniature, large budget: MoRA r32 share (the paper's kind at r 256), LoRA r32's
# budget, 158 pairs (the pressure of config/_mini.py;
# python data/memory/prepare.py --tokenizer=byte --n_pairs=158 --seed=1).
# $ python train.py config/mini_mora_r32.py
exec(open('config/_mini.py').read())
out_dir = 'out/mini_mora_r32'
dataset = 'memory/byte_n158_s1'
mode = 'mora'
mora_kind = 'share'
r = 32
learning_rate = 1e-3  # the sweep's best (python table2.py --stage=sweep; README)
