# One-GPU memory reproduction: mora (LR is a starting point, not yet swept on a GPU; see README).
# $ python train.py config/memory_gpu_mora.py
exec(open('config/_memory_gpu.py').read())
out_dir = 'out/memory_gpu_mora'
mode = 'mora'
learning_rate = 1e-3
mora_kind = 'rope'
