r"""Throughput of the train input pipeline alone (no model): batches/s and tokens/s.

  python -m launch.benchmark_input --config=configs/original.py:small
  python -m launch.benchmark_input --config=configs/original.py:small --config.packing=True \
      --config.worker_count=2 --num_batches=500

tokens/s counts non-padding tokens of inputs + decoder_inputs (translation) or inputs (one stack);
"padded tokens/s" counts every position of those arrays.
"""

import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from transformer import data

config_flags.DEFINE_config_file('config', None, 'A configs/VARIANT.py:SIZE file.',
                                lock_config=True)
flags.DEFINE_integer('num_batches', 300, 'Batches timed (after the warmup).')
flags.DEFINE_integer('warmup_batches', 10, 'Batches drawn before timing starts.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  config, num_batches = flags.FLAGS.config, flags.FLAGS.num_batches
  start = time.perf_counter()
  tokenizer = data.get_tokenizer(config)
  iterator = data.make_train_iterator(config, tokenizer)
  for _ in range(flags.FLAGS.warmup_batches):
    next(iterator)
  setup_s = time.perf_counter() - start

  tokens = padded = 0
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator)
    for key in ('inputs', 'decoder_inputs'):
      if key in batch:
        tokens += int(np.count_nonzero(batch[key]))
        padded += batch[key].size
  elapsed = time.perf_counter() - start
  shapes = ', '.join(f'{k} {v.shape}' for k, v in batch.items())
  print(f'{config.variant}:{config.size} dataset={config.dataset} packing={config.packing} '
        f'worker_count={config.worker_count} batch_size={config.batch_size}')
  print(f'batch: {shapes}')
  print(f'setup (prepare, tokenize, warmup): {setup_s:.1f} s')
  print(f'{num_batches / elapsed:.1f} batches/s, {tokens / elapsed:,.0f} tokens/s '
        f'({padded / elapsed:,.0f} padded tokens/s, {tokens / padded:.0%} non-padding) '
        f'over {num_batches} batches in {elapsed:.2f} s')
  if hasattr(iterator, 'close'):
    iterator.close()


if __name__ == '__main__':
  app.run(main)
