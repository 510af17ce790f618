# Alpaca-GPT4 instruction tuning with LoRA r=8, alpha=16 (see config/_alpaca.py).
# $ python train.py config/alpaca_lora.py
exec(open('config/_alpaca.py').read())
out_dir = 'out/alpaca_lora'
mode = 'lora'
alpha = 16.0
learning_rate = 2e-4
