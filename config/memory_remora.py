# ReMoRA (share <-> share_group, r=8) on the CPU memory demo: merge every 20 steps and switch the kind.
# $ python train.py config/memory_remora.py
exec(open('config/_memory_cpu.py').read())
out_dir = 'out/memory_remora'
mode = 'remora'
mora_kind = 'share'
learning_rate = 3e-3
merge_every = 20
restart_warmup = 3
