"""The 2017 block to today's (configs/sweeps/modern_block.py) on gpt_causal:small, Tiny
Shakespeare characters, two seeds; the recipe's 2,000 steps, validation on 20 batches.

  python -m launch.sweep --sweep=configs/sweeps/modern_block_gpt.py --workdir=runs/modern_gpt
"""

from configs.sweeps import modern_block


def get_sweep():
  return dict(config='configs/gpt_causal.py:small', overrides={},
              runs=modern_block.steps(d_ff=512, gqa_d_ff=384, num_heads=4), seeds=[0, 1])
