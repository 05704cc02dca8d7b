"""The 2017 block to today's (configs/sweeps/modern_block.py) on original:small_paper, Multi30k
de->en, two seeds, shortened as the one-factor ablation is (240 steps, about one epoch; greedy
BLEU on the first 500 validation sentences).

  python -m launch.sweep --sweep=configs/sweeps/modern_block_original.py --workdir=runs/modern_mt
"""

from configs.sweeps import modern_block


def get_sweep():
  return dict(config='configs/original.py:small_paper',
              overrides=dict(num_train_steps=240, warmup_steps=200, eval_every_steps=240,
                             checkpoint_every_steps=240, log_every_steps=20,
                             bleu_max_sentences=500),
              runs=modern_block.steps(d_ff=1024, gqa_d_ff=808, num_heads=4), seeds=[0, 1])
