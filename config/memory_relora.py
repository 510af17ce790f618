# ReLoRA r=8 on the CPU memory demo: merge into the base every 20 steps, re-init, reset moments, re-warm.
# $ python train.py config/memory_relora.py
exec(open('config/_memory_cpu.py').read())
out_dir = 'out/memory_relora'
mode = 'relora'
alpha = 16.0
learning_rate = 3e-3
merge_every = 20
restart_warmup = 3
