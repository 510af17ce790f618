# One-GPU memory reproduction: ReMoRA r=8 (share <-> share_group), a merge every 200 steps.
# LR not yet swept (see README).
# $ python train.py config/memory_gpu_remora.py
exec(open('config/_memory_gpu.py').read())
out_dir = 'out/memory_gpu_remora'
mode = 'remora'
mora_kind = 'share'
learning_rate = 1e-3
merge_every = 200
restart_warmup = 20
