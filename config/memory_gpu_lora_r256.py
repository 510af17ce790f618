# One-GPU memory reproduction: lora_r256 (LR is a starting point, not yet swept on a GPU; see README).
# $ python train.py config/memory_gpu_lora_r256.py
exec(open('config/_memory_gpu.py').read())
out_dir = 'out/memory_gpu_lora_r256'
mode = 'lora'
learning_rate = 1e-3
alpha = 128.0  # scale 0.5, the LoRA alpha the MoRA paper uses at r=256
r = 256
