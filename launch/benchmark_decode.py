r"""Decoding speed: beam search over multi30k test_2016, and the key/value cache against none.

  python -m launch.benchmark_decode --config=configs/original.py:small
  python -m launch.benchmark_decode --config=configs/unilm_prefix.py:small --beam_size=1

Parameters are random: decoding speed does not depend on their values, but output length does. A
random model seldom emits eos, so sentences tend to run to config.decode_max_len tokens: a worst
case for speed. Sources are the test_2016 sentences tokenized with the config's tokenizer (random
cut to max_source_len and decoded in batches of eval_batch_size, all padded to the longest source
so that each function compiles once.

The cache comparison runs greedy decoding of one batch to exactly --compare_len tokens (eos
disabled) with the cache and with the whole prefix recomputed at every step. The last line printed
is one JSON object.
"""

import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from transformer import data, decode, objectives, variants

config_flags.DEFINE_config_file('config', None, 'A configs/VARIANT.py:SIZE file (original or '
                                'unilm_prefix).', lock_config=True)
flags.DEFINE_integer('num_sentences', 1000, 'Test sentences to translate (at most 1000).')
flags.DEFINE_integer('beam_size', 4, 'Beam width of the timed translation.')
flags.DEFINE_integer('compare_len', 64, 'Output length of the cached vs uncached greedy runs.')
flags.mark_flags_as_required(['config'])

NO_EOS = -1  # An eos id no token has: every row decodes to max_len.


def source_ids(config, num_sentences: int) -> tuple[list[list[int]], int]:
  """Token ids of the first test sentences, and the vocabulary size."""
  path = os.path.join(config.raw_data_dir, 'multi30k', f'test_2016_flickr.{config.source_lang}')
  with open(path, encoding='utf-8') as f:
    lines = [line.strip() for line in f][:num_sentences]
  tokenizer = data.get_tokenizer(config)
  return [tokenizer.encode(line) for line in lines], tokenizer.vocab_size


def batches(ids: list[list[int]], batch_size: int, length: int) -> list[np.ndarray]:
  """[batch_size, length] arrays, cut and zero-padded; the last batch padded with empty rows."""
  padded = np.zeros((-(-len(ids) // batch_size) * batch_size, length), np.int32)
  for row, tokens in zip(padded, ids):
    tokens = tokens[:length]
    row[:len(tokens)] = tokens
  return list(padded.reshape(-1, batch_size, length))


def compile_translate(model, params, batch, **settings):
  """decode.translate compiled for these shapes and settings, and the compile time in seconds."""
  start = time.perf_counter()
  compiled = decode.translate.lower(model, params, batch, **settings).compile()
  return compiled, time.perf_counter() - start


def fastest_run(fn, *args, repeats: int = 2) -> tuple[float, jax.Array]:
  """(seconds of the fastest of `repeats` runs, output)."""
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best, out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  config = flags.FLAGS.config
  if not variants.get(config.variant).translates:
    raise app.UsageError(f'{config.variant} does not translate: use '
                         f'{" or ".join(variants.able("translates"))}.')
  ids, vocab_size = source_ids(config, flags.FLAGS.num_sentences)
  num_sentences = len(ids)
  source_len = min(config.max_source_len, max(len(tokens) for tokens in ids))
  sources = batches(ids, config.eval_batch_size, source_len)
  model = variants.build_model(config, vocab_size)
  params = nn.unbox(jax.jit(lambda rng: objectives.init_params(
      model, variants.example_batch(config), rng))(jax.random.key(config.seed)))
  print(f'{config.variant}:{config.size} on {jax.devices()[0].device_kind}: {num_sentences} '
        f'sentences in {len(sources)} batches of {config.eval_batch_size} x {source_len} tokens.')

  beam = dict(max_len=config.decode_max_len, beam_size=flags.FLAGS.beam_size,
              length_penalty=config.length_penalty)
  translate_beam, beam_compile_s = compile_translate(model, params, jnp.asarray(sources[0]), **beam)
  start = time.perf_counter()
  outputs = np.concatenate([translate_beam(params, jnp.asarray(b)) for b in sources])
  beam_s = time.perf_counter() - start
  output_len = float(np.mean((outputs[:num_sentences] != decode.PAD_ID).sum(1)))
  print(f'beam {flags.FLAGS.beam_size}: {num_sentences / beam_s:.1f} sentences/s ({beam_s:.1f} s, '
        f'compile {beam_compile_s:.1f} s, {output_len:.1f} tokens per output on average).')

  batch = jnp.asarray(sources[0])
  greedy = dict(max_len=flags.FLAGS.compare_len, eos_id=NO_EOS)
  cached_s, cached = fastest_run(compile_translate(model, params, batch, **greedy)[0], params,
                                 batch)
  uncached_s, uncached = fastest_run(  # Once: it is slow.
      compile_translate(model, params, batch, cache=False, **greedy)[0], params, batch,
      repeats=1)
  print(f'greedy, {flags.FLAGS.compare_len} tokens x {config.eval_batch_size} sentences: cached '
        f'{cached_s:.3f} s, uncached {uncached_s:.3f} s: {uncached_s / cached_s:.1f}x faster with '
        f'the cache (same tokens: {bool(np.array_equal(cached, uncached))}).')
  print(json.dumps({
      'config': f'{config.variant}:{config.size}', 'device': jax.devices()[0].device_kind,
      'num_sentences': num_sentences, 'batch_size': config.eval_batch_size,
      'beam_size': flags.FLAGS.beam_size, 'max_len': config.decode_max_len,
      'sentences_per_s': round(num_sentences / beam_s, 2), 'beam_seconds': round(beam_s, 2),
      'beam_compile_seconds': round(beam_compile_s, 2), 'mean_output_len': round(output_len, 2),
      'compare_len': flags.FLAGS.compare_len, 'greedy_cached_seconds': round(cached_s, 4),
      'greedy_uncached_seconds': round(uncached_s, 4),
      'cache_speedup': round(uncached_s / cached_s, 2),
      'cached_equals_uncached': bool(np.array_equal(cached, uncached))}))


if __name__ == '__main__':
  app.run(main)
