# Shared settings of instruction tuning on Alpaca-GPT4 (SPEC 5.3; XGBLoRA's own setting, SPEC 4) on SmolLM2-135M.
# Data (needs the hub, or a local copy of the JSON):
# $ python data/alpaca/prepare.py --source=hub --hf_dataset=vicgalle/alpaca-gpt4 --tokenizer=data/smollm2/SmolLM2-135M-Instruct
# Prompt tokens are masked out of the loss; response + EOS train. Val loss is on responses only.
# tokens per step: 8 x 4 x 512 = 16k (padded); 1,000 steps ~ 0.6 epoch of 52k records. A GPU run.
init_from = 'data/smollm2/SmolLM2-135M-Instruct'
dataset = 'alpaca/alpaca_smollm2'
batch_size = 8
gradient_accumulation_steps = 4
block_size = 512
max_iters = 1000
warmup_iters = 100
decay_lr = 'cosine'
eval_interval = 200
eval_iters = 50
r = 8
