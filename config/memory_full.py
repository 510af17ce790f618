# Full fine-tuning on the CPU memory demo: every weight of SmolLM2-135M trains.
# $ python train.py config/memory_full.py
exec(open('config/_memory_cpu.py').read())
out_dir = 'out/memory_full'
mode = 'full'
learning_rate = 1e-4
