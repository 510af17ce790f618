# The MoRA paper's memorisation run on LLaMA-2 7B: MoRA r8 (rope, the paper's kind at small r).
# $ python train.py config/memory_llama2_7b_mora.py
exec(open('config/_memory_llama2_7b.py').read())
out_dir = 'out/memory_llama2_7b_mora'
mode = 'mora'
learning_rate = 2e-4  # the paper's MoRA grid: {5e-5, 1e-4, 2e-4}
