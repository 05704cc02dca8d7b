r"""Decoding with multi-head, grouped-query and multi-query attention: cache bytes and tokens/s.

  python -m launch.benchmark_kv_cache --config=configs/gpt_causal.py:medium --context=1024

For each number of key/value heads (--kv_heads; default: num_heads, num_heads / 2, ..., 1), a
model with random parameters fills its cache with a --context-token prompt per row, then
generates --new_tokens more greedily (eos disabled, so every row runs to the end). Reported: the
bytes of the key/value cache (every layer), the prefill time, and the generated tokens/s (compile
excluded: the fastest of three runs; generation is the time beyond the prefill). The last line
printed is one JSON object.
"""

import json
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from transformer import decode, objectives, precision, variants

config_flags.DEFINE_config_file('config', None, 'A configs/gpt_causal.py:SIZE file.',
                                lock_config=False)
flags.DEFINE_integer('context', 1024, 'Prompt tokens per row, already in the cache.')
flags.DEFINE_integer('new_tokens', 64, 'Tokens generated per row.')
flags.DEFINE_integer('batch', 8, 'Rows decoded together.')
flags.DEFINE_list('kv_heads', None, 'Key/value head counts to compare (default: halving).')
flags.mark_flags_as_required(['config'])

NO_EOS = -1  # An eos id no token has: every row decodes to the end.
VOCAB = 256


def cache_bytes(model, batch: int, length: int) -> int:
  """Bytes of every layer's cached keys and values for `batch` rows of `length` slots."""
  cache = jax.eval_shape(lambda: decode.init_cache(model, batch, length))
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize
             for path, x in jax.tree_util.tree_flatten_with_path(cache)[0]
             if 'cached_' in str(path[-1]))


def fastest(fn, *args, repeats: int = 3) -> float:
  """Seconds of the fastest of `repeats` runs, after one that compiles."""
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def measure(config, kv_heads: int, context: int, new_tokens: int, batch: int) -> dict:
  config.num_kv_heads = kv_heads
  config.max_len = max(config.max_len, context + new_tokens)
  model = variants.build_model(config, VOCAB)
  params = nn.unbox(jax.jit(lambda rng: objectives.init_params(
      model, variants.example_batch(config), rng))(jax.random.key(0)))
  prompt = jax.random.randint(jax.random.key(1), (batch, context), 7, VOCAB)
  run = lambda tokens: fastest(jax.jit(lambda p, x: decode.generate(
      model, p, x, max_len=tokens, eos_id=NO_EOS)), params, prompt)
  prefill_s = run(1)  # the prompt through the cache, and one token
  decode_s = max(run(new_tokens) - prefill_s, 1e-9)
  return dict(kv_heads=kv_heads, cache_mib=cache_bytes(model, batch, context + new_tokens) / 2**20,
              prefill_s=prefill_s, decode_tokens_per_s=batch * (new_tokens - 1) / decode_s)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  config = f.config
  if not variants.get(config.variant).generates:
    raise app.UsageError(f'{config.variant} does not generate: use a configs/gpt_causal.py size.')
  heads = config.num_heads
  counts = ([int(k) for k in f.kv_heads] if f.kv_heads else
            sorted({heads // 2 ** i for i in range(heads.bit_length()) if heads % 2 ** i == 0},
                   reverse=True))
  peak = precision.measure_matmul_peak()
  print(f'{config.variant}:{config.size} d_model={config.d_model} heads={heads} '
        f'layers={config.num_layers} on {jax.devices()[0].device_kind} (float32 matmul peak '
        f'{peak / 1e9:.0f} GFLOP/s): batch {f.batch}, context {f.context}, {f.new_tokens} new '
        'tokens')
  print('| key/value heads | cache MiB | prefill s | generated tokens/s |')
  print('|---|---|---|---|')
  rows = []
  for kv_heads in counts:
    row = measure(config, kv_heads, f.context, f.new_tokens, f.batch)
    rows.append(row)
    print(f'| {kv_heads} | {row["cache_mib"]:.1f} | {row["prefill_s"]:.2f} | '
          f'{row["decode_tokens_per_s"]:.0f} |', flush=True)
  print(json.dumps(dict(config=f'{config.variant}:{config.size}', peak_flops=peak,
                        context=f.context,
                        new_tokens=f.new_tokens, batch=f.batch,
                        device=jax.devices()[0].device_kind, rows=rows)))


if __name__ == '__main__':
  app.run(main)
