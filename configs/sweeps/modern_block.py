"""From the 2017 block to today's, one change at a time, each run keeping the ones before it.

  paper     post-LN, ReLU, sinusoidal positions (the paper's block)
  pre_ln    + pre-LN (a final norm)
  rmsnorm   + RMSNorm instead of LayerNorm
  swiglu    + gated feed-forward with silu; d_ff x 2/3, so that three matrices hold what two did
  rotary    + rotary positions instead of sinusoidal
  gqa       + grouped-query attention, num_kv_heads = num_heads / 2; d_ff raised so that the
              feed-forward takes back the parameters the smaller W_K and W_V gave up
  qk_norm   + QK-norm

Every run's parameter count is within 2% of the paper block's (tests/test_blocks.py checks it).
Two specs share this list: modern_block_gpt.py (Tiny Shakespeare characters) and
modern_block_original.py (Multi30k de->en).
"""


def steps(d_ff: int, gqa_d_ff: int, num_heads: int) -> list:
  """The cumulative runs for a model of feed-forward width d_ff and num_heads heads."""
  changes = [
      ('paper', dict(pre_ln=False, activation='relu', positional='sinusoidal')),
      ('pre_ln', dict(pre_ln=True)),
      ('rmsnorm', dict(norm='rmsnorm')),
      ('swiglu', dict(ffn='gated', activation='silu', d_ff=d_ff * 2 // 3)),
      ('rotary', dict(positional='rotary')),
      ('gqa', dict(num_kv_heads=num_heads // 2, d_ff=gqa_d_ff)),
      ('qk_norm', dict(qk_norm=True)),
  ]
  runs, fields = [], {}
  for name, change in changes:
    fields = dict(fields, **change)
    runs.append((name, dict(fields)))
  return runs
