# One-GPU memory reproduction: mora_r256 (LR is a starting point, not yet swept on a GPU; see README).
# $ python train.py config/memory_gpu_mora_r256.py
exec(open('config/_memory_gpu.py').read())
out_dir = 'out/memory_gpu_mora_r256'
mode = 'mora'
learning_rate = 1e-3
r = 256
