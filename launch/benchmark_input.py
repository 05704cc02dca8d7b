r"""The train input pipeline alone (no model): start-up to the first batch, batches/s, tokens/s,
peak memory, and the throughput of preparing the token ids.

  python -m launch.benchmark_input --config=configs/original.py:small
  python -m launch.benchmark_input --config=configs/gpt_causal.py:tiny --config.dataset=text \
      --config.text_train_files=corpus.txt --config.tokenizer=sentencepiece \
      --config.vocab_size=8000 --prepare_workers=1,2

Start-up is the time from the tokenizer's loading to the first batch (preparing the data first if
it is not prepared yet: the output says which). Peak RSS is this process's, read before the
preparation runs of --prepare_workers, which tokenize the train split again into a temporary
folder with each worker count (MB/s of UTF-8 text read). tokens/s counts non-padding tokens of
inputs + decoder_inputs (translation) or inputs (one stack); "padded tokens/s" counts every position
of those arrays. The last line printed is one JSON object.
"""

import json
import os
import resource
import shutil
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from transformer import data
from transformer.data import pipelines, prepared

config_flags.DEFINE_config_file('config', None, 'A configs/VARIANT.py:SIZE file.',
                                lock_config=False)
flags.DEFINE_integer('num_batches', 300, 'Batches timed (after the warmup).')
flags.DEFINE_integer('warmup_batches', 10, 'Batches drawn before timing starts.')
flags.DEFINE_list('prepare_workers', [], 'Worker counts to time preparing the train split with.')
flags.mark_flags_as_required(['config'])


def time_preparation(config, tokenizer, workers: int) -> dict:
  """Prepares the train split anew, into a temporary folder, with `workers` processes."""
  recipe = pipelines.get_objective(config, tokenizer).recipe(True)
  config.prepare_workers = workers
  directory = tempfile.mkdtemp(dir=config.data_dir)
  try:
    start = time.perf_counter()
    prepared.prepare(config, tokenizer, 'train', recipe, os.path.join(directory, 'train'))
    seconds = time.perf_counter() - start
    counts = prepared.Examples(os.path.join(directory, 'train')).metadata['counts']
  finally:
    shutil.rmtree(directory)
  return dict(workers=workers, seconds=round(seconds, 2), text_mb=counts['text_bytes'] / 1e6,
              mb_per_s=round(counts['text_bytes'] / 1e6 / seconds, 2))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  config, num_batches = flags.FLAGS.config, flags.FLAGS.num_batches
  start = time.perf_counter()
  tokenizer = data.get_tokenizer(config)
  objective = pipelines.get_objective(config, tokenizer)
  was_prepared = prepared.is_complete(
      prepared.folder(config, tokenizer, 'train', objective.recipe(True)))
  iterator = data.make_train_iterator(config, tokenizer)
  next(iterator)
  startup_s = time.perf_counter() - start
  for _ in range(flags.FLAGS.warmup_batches):
    next(iterator)

  tokens = padded = 0
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator)
    for key in ('inputs', 'decoder_inputs'):
      if key in batch:
        tokens += int(np.count_nonzero(batch[key]))
        padded += batch[key].size
  elapsed = time.perf_counter() - start
  peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  if hasattr(iterator, 'close'):
    iterator.close()
  shapes = ', '.join(f'{k} {v.shape}' for k, v in batch.items())
  print(f'{config.variant}:{config.size} dataset={config.dataset} packing={config.packing} '
        f'worker_count={config.worker_count} batch_size={config.batch_size}')
  print(f'batch: {shapes}')
  print(f'start-up to the first batch: {startup_s:.2f} s '
        f'({"data already prepared" if was_prepared else "preparing the data included"}); '
        f'peak RSS {peak_rss_mb:,.0f} MB')
  print(f'{num_batches / elapsed:.1f} batches/s, {tokens / elapsed:,.0f} tokens/s '
        f'({padded / elapsed:,.0f} padded tokens/s, {tokens / padded:.0%} non-padding) '
        f'over {num_batches} batches in {elapsed:.2f} s')
  preparation = [time_preparation(config, tokenizer, int(w)) for w in flags.FLAGS.prepare_workers]
  for run in preparation:
    print(f'preparing train with {run["workers"]} worker(s): {run["text_mb"]:,.1f} MB of text in '
          f'{run["seconds"]:.1f} s = {run["mb_per_s"]:.2f} MB/s')
  print(json.dumps(dict(config=f'{config.variant}:{config.size}', startup_s=round(startup_s, 3),
                        was_prepared=was_prepared, peak_rss_mb=round(peak_rss_mb),
                        batches_per_s=round(num_batches / elapsed, 2),
                        tokens_per_s=round(tokens / elapsed), preparation=preparation)))


if __name__ == '__main__':
  app.run(main)
