# One-GPU memory reproduction: lora (LR is a starting point, not yet swept on a GPU; see README).
# $ python train.py config/memory_gpu_lora.py
exec(open('config/_memory_gpu.py').read())
out_dir = 'out/memory_gpu_lora'
mode = 'lora'
learning_rate = 1e-3
alpha = 16.0
