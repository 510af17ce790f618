# Alpaca-GPT4 instruction tuning with MoRA (rope, r=8 -> r_hat ~ 100-140) (see config/_alpaca.py).
# $ python train.py config/alpaca_mora.py
exec(open('config/_alpaca.py').read())
out_dir = 'out/alpaca_mora'
mode = 'mora'
mora_kind = 'rope'
learning_rate = 3e-4  # the paper's MoRA LR at r=8 (Table 5)
