r"""Prepares a config's dataset and tokenizer once, before a multi-process run reads them.

  python -m launch.prepare_data --config=configs/original.py:base --config.data_dir=/shared/data

Run it as one process (the launch scripts do, on one worker or one task) when several processes
share config.data_dir: they then only read what it wrote, instead of all preparing it at once.
"""

from absl import app, flags
from ml_collections import config_flags

from transformer import data, writer

config_flags.DEFINE_config_file('config', None, 'A configs/VARIANT.py:SIZE file.',
                                lock_config=True)
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  writer.quiet_library_logs()
  config = flags.FLAGS.config
  tokenizer = data.get_tokenizer(config)  # prepares the dataset, trains the tokenizer if needed
  print(f'{config.dataset} prepared in {config.data_dir}; tokenizer vocabulary '
        f'{tokenizer.vocab_size}.')


if __name__ == '__main__':
  app.run(main)
