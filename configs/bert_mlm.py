"""bert_mlm: an encoder-only masked language model (BERT's objective, 15% of tokens, 80/10/10).

Trained on monolingual text: by default both sides of multi30k. Usage:
--config=configs/bert_mlm.py:SIZE with SIZE in tiny | small | base.
"""

from configs import common

OVERRIDES = dict(
    activation='gelu_tanh', positional='learned', label_smoothing=0.0, num_token_types=2,
    schedule='cosine', learning_rate=5e-4, warmup_steps=200, weight_decay=0.01, eps=1e-6,
    bleu_max_sentences=0, block_size=64, max_len=64)

SIZES = dict(
    tiny=common.TINY,
    # A short CPU recipe: sentences packed ~4 per 64-token row, 64 rows per step.
    small=dict(d_model=256, num_heads=4, num_layers=4, d_ff=1024, packing=True, batch_size=64,
               learning_rate=1e-3, warmup_steps=40, num_train_steps=200, eval_every_steps=100,
               checkpoint_every_steps=100, log_every_steps=20),
    base=dict(common.BASE, block_size=128, max_len=128),
)


def get_config(size: str = 'small'):
  return common.make_config('bert_mlm', OVERRIDES, SIZES, size)
