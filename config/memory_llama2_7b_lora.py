# The MoRA paper's memorisation run on LLaMA-2 7B: the LoRA r8 baseline it is measured against.
# $ python train.py config/memory_llama2_7b_lora.py
exec(open('config/_memory_llama2_7b.py').read())
out_dir = 'out/memory_llama2_7b_lora'
mode = 'lora'
learning_rate = 3e-4  # the paper's LoRA LR
alpha = 16.0
