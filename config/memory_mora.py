# MoRA (rope, r=8 -> r_hat 78-130 per layer on SmolLM2-135M) on the CPU memory demo: the project's main command.
# $ python train.py config/memory_mora.py
exec(open('config/_memory_cpu.py').read())
out_dir = 'out/memory_mora'
mode = 'mora'
mora_kind = 'rope'
learning_rate = 3e-3  # MoRA has no alpha: its LR carries the scale (the paper sweeps it separately)
