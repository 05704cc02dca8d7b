"""unilm_prefix: one stack with UniLM's seq2seq (prefix-LM) mask, trained on translation.

The source prefix attends bidirectionally, the target causally, the source never sees the target.
Usage: --config=configs/unilm_prefix.py:SIZE with SIZE in tiny | small | base.
"""

from configs import common

OVERRIDES = dict(num_token_types=2, max_len=160)

SIZES = dict(
    tiny=dict(common.TINY, max_len=64),
    # About the parameter count of original:small (6 layers in one stack vs 3 + 3).
    small=dict(d_model=256, num_heads=4, num_layers=6, d_ff=1024, batch_size=128,
               num_train_steps=4000, warmup_steps=800, eval_every_steps=1000),
    base=dict(common.BASE, num_layers=12),
)


def get_config(size: str = 'small'):
  return common.make_config('unilm_prefix', OVERRIDES, SIZES, size)
