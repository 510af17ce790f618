# One-GPU memory reproduction: full (LR is a starting point, not yet swept on a GPU; see README).
# $ python train.py config/memory_gpu_full.py
exec(open('config/_memory_gpu.py').read())
out_dir = 'out/memory_gpu_full'
mode = 'full'
learning_rate = 1e-4
