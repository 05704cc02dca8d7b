"""Attention kinds x positional schemes on a long-context character LM: gpt_causal:small on Tiny
Shakespeare with a 1,024-character context, two seeds, equal steps and tokens for every run.

  python -m launch.sweep --sweep=configs/sweeps/long_context.py --workdir=runs/long_context

Kinds: full (the paper), local (a sliding window of 128), strided (that window plus every 128th
key back), lsh (hash buckets, chunks of 128); low_rank is bidirectional only. Positions:
sinusoidal (the paper), rotary, alibi; lsh takes no logit bias, so it runs without alibi.
Validation reads the first 8 batches of 8 windows (65,536 characters) at every evaluation.
"""

KINDS = ('full', 'local', 'strided', 'lsh')
POSITIONALS = ('sinusoidal', 'rotary', 'alibi')


def get_sweep():
  runs = [(f'{kind},{positional}', dict(attention_kind=kind, positional=positional))
          for kind in KINDS for positional in POSITIONALS
          if not (kind == 'lsh' and positional == 'alibi')]
  overrides = dict(block_size=1024, max_len=1024, batch_size=2, attention_window=128,
                   num_train_steps=150, warmup_steps=30, eval_every_steps=75, log_every_steps=25,
                   eval_batch_size=8, max_eval_batches=8, decode_max_len=100)
  return dict(config='configs/gpt_causal.py:small', overrides=overrides, runs=runs, seeds=[0, 1])
