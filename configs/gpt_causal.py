"""gpt_causal: a decoder-only causal language model (GPT), sampled with temperature/top-k/top-p.

Usage: --config=configs/gpt_causal.py:SIZE with SIZE in tiny | small | medium | base.
"""

from configs import common

OVERRIDES = dict(
    dataset='tiny_shakespeare', tokenizer='char', pre_ln=True, activation='gelu_tanh',
    positional='learned', label_smoothing=0.0, dropout_rate=0.0, schedule='cosine',
    learning_rate=1e-3, warmup_steps=100, b2=0.99, eps=1e-8, weight_decay=0.1,
    bleu_max_sentences=0, top_k=0, temperature=0.8)

SIZES = dict(
    tiny=common.TINY,
    # nanoGPT's shakespeare_char CPU recipe shape: 4 layers, 4 heads, width 128, block 64, batch 12.
    small=dict(d_model=128, num_heads=4, num_layers=4, d_ff=512, block_size=64, max_len=64,
               batch_size=12, num_train_steps=2000, eval_every_steps=250, max_eval_batches=20,
               decode_max_len=60,  # learned positions: prompt + output <= max_len
               # Small buffers: one malloc arena costs more (lock contention) than it saves.
               keep_host_memory=False),
    # The 30-minute CPU recipe: 4.8 M parameters, 256-character context, light dropout; the whole
    # validation split at each evaluation.
    medium=dict(d_model=256, num_heads=4, num_layers=6, d_ff=1024, block_size=256, max_len=256,
                batch_size=16, dropout_rate=0.1, num_train_steps=2200, eval_every_steps=275,
                decode_max_len=200),
    base=dict(common.BASE, max_len=256, block_size=256, num_train_steps=5000,
              learning_rate=6e-4),
)


def get_config(size: str = 'small'):
  return common.make_config('gpt_causal', OVERRIDES, SIZES, size)
