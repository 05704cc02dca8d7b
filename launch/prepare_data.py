r"""Prepares a config's data once, before any run reads it: the corpus, the tokenizer, and the
token ids of the splits that training and evaluation read.

  python -m launch.prepare_data --config=configs/original.py:base --config.data_dir=/shared/data

Run it as one process (the launch scripts do, on one worker or one task) when several processes
share config.data_dir: they then only read what it wrote, instead of all preparing it at once.
Tokenizing uses every core (--config.prepare_workers); an interrupted preparation resumes.

A corpus too large for one machine: start the same command with --shard=I/N on N machines that
share config.data_dir (NFS or similar), each tokenizing every N-th chunk, then once without
--shard to merge (after the tokenizer exists: run once without --shard first, or stop it after the
line "tokenizer vocabulary ...").
"""

from absl import app, flags
from ml_collections import config_flags

from transformer import data, writer
from transformer.data import builders, pipelines, prepared

config_flags.DEFINE_config_file('config', None, 'A configs/VARIANT.py:SIZE file.',
                                lock_config=True)
flags.DEFINE_string('shard', '0/1', 'I/N: prepare only every N-th chunk, starting at chunk I.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  writer.quiet_library_logs()
  config = flags.FLAGS.config
  try:
    index, count = map(int, flags.FLAGS.shard.split('/'))
    assert 0 <= index < count
  except (ValueError, AssertionError):
    raise app.UsageError(f'--shard={flags.FLAGS.shard}: expected I/N with 0 <= I < N.') from None
  tokenizer = data.get_tokenizer(config)  # prepares the dataset, trains the tokenizer if needed
  print(f'{config.dataset} prepared in {config.data_dir}; tokenizer vocabulary '
        f'{tokenizer.vocab_size}.')
  objective = pipelines.get_objective(config, tokenizer)
  splits = builders.get_builder(config).info.splits
  for split in ('train', 'validation', 'test'):
    if split not in splits:
      continue
    recipe = objective.recipe(split == 'train')  # Train drops too-long examples; eval truncates.
    path = prepared.folder(config, tokenizer, split, recipe)
    done = prepared.is_complete(path) or prepared.prepare(config, tokenizer, split, recipe, path,
                                                          shard=(index, count))
    print(f'{split}: {"token ids in " + path if done else f"shard {index}/{count} of the chunks"}')


if __name__ == '__main__':
  app.run(main)
