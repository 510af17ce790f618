# LoRA r=8, alpha=16 on the CPU memory demo (same trainable-parameter budget as config/memory_mora.py).
# $ python train.py config/memory_lora.py
exec(open('config/_memory_cpu.py').read())
out_dir = 'out/memory_lora'
mode = 'lora'
alpha = 16.0
learning_rate = 3e-3
