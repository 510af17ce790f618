# The base of the Table 2 miniature (config/_mini.py): a byte-level LLaMA pretrained from scratch
# on Shakespeare, the config/_pretrain_tiny.py shape: 4 layers, width 128, 4 heads, SwiGLU 352,
# 885,888 params, 258-token byte vocab.
# $ python data/text/prepare.py && python train.py config/mini_base.py
# $ python merge.py --out_dir=out/mini_base --merged_dir=out/mini_base/hf   # what init_from reads
# tokens per step: 16 x 128 = 2,048; 600 steps = 1.2M tokens (~1/4 epoch), ~1.5 min on 2 cores.
exec(open('config/_pretrain_tiny.py').read())
out_dir = 'out/mini_base'
mode = 'full'
dtype = 'float32'  # pinned: the numbers must not move with what dtype='auto' means on a CPU
eval_interval = 200
