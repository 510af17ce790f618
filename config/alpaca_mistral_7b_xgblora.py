# XGBLoRA's own setting: Mistral-7B (v0.1, its SentencePiece tokenizer) instruction-tuned on Alpaca-GPT4.
# Data: $ python data/alpaca/prepare.py --source=hub --hf_dataset=vicgalle/alpaca-gpt4 --tokenizer=mistralai/Mistral-7B-v0.1
# Rank-1 boosters on 11 of the 32 blocks (the paper's best L_s, ~L/3), 25 steps each -> 40 boosters in 1,000 steps.
# tokens per step: 8 x 4 x 512 = 16k (padded), as config/_alpaca.py. Mistral's 4,096-token sliding window is plain
# causal attention at block_size 512. Memory: on a GPU base_dtype='auto' keeps the base in bf16; blocks checkpointed.
# $ python train.py config/alpaca_mistral_7b_xgblora.py
exec(open('config/_alpaca.py').read())
init_from = 'mistralai/Mistral-7B-v0.1'
dataset = 'alpaca/alpaca_mistral'
out_dir = 'out/alpaca_mistral_7b_xgblora'
mode = 'xgblora'
booster_steps = 25
booster_blocks = 11
booster_scale = 2.0
booster_alpha = 1.0
learning_rate = 5e-4
grad_checkpoint = True  # with the bf16 base: fits one 24 GB GPU (README, what fits where)
