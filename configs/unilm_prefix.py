"""unilm_prefix: one stack with UniLM's seq2seq (prefix-LM) mask, trained on translation.

The source prefix attends bidirectionally, the target causally, the source never sees the target.
Usage: --config=configs/unilm_prefix.py:SIZE with SIZE in tiny | small | small_paper | base.
"""

from configs import common

OVERRIDES = dict(num_token_types=2, max_len=160)

# original:small_paper's recipe in one stack: 6 layers (vs 3 + 3; 6.8 M vs 7.6 M parameters),
# the same packed token budget per step (32 rows of 129 = 64 source + 65 target slots).
SMALL_PAPER = dict(d_model=256, num_heads=4, num_layers=6, d_ff=1024, packing=True, batch_size=32,
                   learning_rate=0.5, warmup_steps=300, num_train_steps=350, eval_every_steps=350,
                   checkpoint_every_steps=350, log_every_steps=25, bleu_max_sentences=1014)

SIZES = dict(
    tiny=dict(common.TINY, max_len=64),
    # original:small's recipe and parameter count in one stack: a seventh layer brings the
    # parameters level with the encoder-decoder's (7.57 M each with the 8k vocabulary), so the
    # two compare at equal parameters, tokens and steps.
    small=dict(SMALL_PAPER, num_layers=7, pre_ln=True, positional='rotary', dropout_rate=0.2,
               schedule='cosine', learning_rate=2e-3, num_train_steps=3000, eval_every_steps=1000,
               checkpoint_every_steps=250, max_checkpoints_to_keep=4,
               average_last_checkpoints=4),
    small_paper=SMALL_PAPER,
    base=dict(common.BASE, num_layers=12),
)


def get_config(size: str = 'small'):
  return common.make_config('unilm_prefix', OVERRIDES, SIZES, size)
